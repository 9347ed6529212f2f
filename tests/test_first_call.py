"""A fast first call (issue 17, part 4): the structured engine's tracer, and the JIT loader of the native kernels.

The tracer (gradfd/structured/tracer.py) replaces make_fx, whose first call imports torch._inductor,
torch._dynamo and sympy (~3.5 s); its graphs must be make_fx's, and the gradients computed from them bitwise the same.
The JIT loader keys its build directory to the environment and lets exceptions that are not build failures through.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

from gradfd import engine, ops, structured

# --------------------------------------------------------------------------------------------------------------
# the tracer


def _make_fx_trace(func, args):
    """The tracer the structured engine used before (make_fx over functionalize), for comparisons."""
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad():
        try:
            return make_fx(torch.func.functionalize(func, remove="mutations"), tracing_mode="real")(*args)
        except Exception as exc:
            if "_local_scalar_dense" in str(exc):
                raise
        return make_fx(func, tracing_mode="real")(*args)


def _signature(gm: torch.fx.GraphModule) -> list:
    """The graph as (op, target, args, kwargs) per node, nodes by position, constants by shape, dtype and values
    (make_fx and the recorder place and name get_attr nodes differently; detach and alias are the same op here)."""
    kept = [n for n in gm.graph.nodes if n.op != "get_attr"]
    index = {n: i for i, n in enumerate(kept)}
    same = {torch.ops.aten.detach.default: "alias", torch.ops.aten.alias.default: "alias"}

    def arg(v):
        if isinstance(v, torch.fx.Node):
            if v.op == "get_attr":
                t = getattr(gm, v.target)
                return ("constant", tuple(t.shape), t.dtype, tuple(t.reshape(-1).tolist()))
            return ("node", index[v])
        if isinstance(v, (list, tuple)):
            return tuple(arg(x) for x in v)
        return v

    return [(n.op, None if n.op == "placeholder" else same.get(n.target, n.target), arg(n.args),
             arg(dict(n.kwargs))) for n in kept]


def _problems():
    g = torch.Generator().manual_seed(0)
    o = {"dtype": torch.float64}
    X = torch.randn(16, 6, generator=g, **o)
    Y = torch.randn(16, 4, generator=g, **o)
    labels = torch.randint(0, 4, (16,), generator=g)
    W, b = torch.randn(4, 6, generator=g, **o), torch.randn(4, generator=g, **o)
    W1, W2 = torch.randn(6, 8, generator=g, **o), torch.randn(8, 4, generator=g, **o)

    class Square(torch.autograd.Function):  # functionalize refuses autograd.Function: traced as is
        @staticmethod
        def forward(ctx, x):
            return x * x

        @staticmethod
        def backward(ctx, grad):
            return grad

    return {
        "linear layer mse": (lambda W, b: F.mse_loss(F.linear(X, W, b), Y), (W, b)),
        "mlp tanh cross-entropy": (lambda W1: F.cross_entropy(torch.tanh(X @ W1) @ W2, labels), (W1,)),
        "cross-entropy, label smoothing (in place after decomposition)":
            (lambda W1: F.cross_entropy(X @ W1[:, :4], labels, label_smoothing=0.1), (W1,)),
        "in-place ops in func": (lambda W1: (lambda h: (h.add_(1).relu_() ** 2).mean())(X @ W1), (W1,)),
        "a constant made from Python data": (lambda b: (b * torch.tensor([1.0, 2.0, 3.0, 4.0], **o)).sum(), (b,)),
        "several outputs (max with indices)": (lambda W1: torch.max(X @ W1, 1).values.sum(), (W1,)),
        "autograd.Function": (lambda b: Square.apply(b).sum(), (b,)),
        "factory op": (lambda b: (b + torch.ones(4, **o)).exp().sum(), (b,)),
    }


@pytest.mark.parametrize("name", list(_problems()))
def test_the_recorder_builds_make_fxs_graph(name):
    func, params = _problems()[name]
    args = [p.clone() for p in params]
    assert _signature(structured.trace(func, args)) == _signature(_make_fx_trace(func, args))


@pytest.mark.parametrize("name", ["linear layer mse", "mlp tanh cross-entropy",
                                  "cross-entropy, label smoothing (in place after decomposition)",
                                  "in-place ops in func"])
def test_structured_gradients_are_bitwise_those_of_the_make_fx_trace(name, monkeypatch):
    func, params = _problems()[name]
    for idx in range(len(params)):
        ev = engine.evaluate(func, params, idx, steps=1e-5, engine="structured")
        assert ev.engine == "structured"
        got = ev.estimate()[0]
        monkeypatch.setattr(structured, "trace", _make_fx_trace)
        want = engine.evaluate(func, params, idx, steps=1e-5, engine="structured").estimate()[0]
        monkeypatch.undo()
        assert torch.equal(got, want)


def test_the_value_of_a_constant_may_be_read():
    # make_fx refuses .item() of any value an op of the trace produced; the recorder refuses it only where the value
    # depends on an input (elsewhere it is the same at every perturbed point, so the graph may hold it)
    X = torch.randn(16, 6, dtype=torch.float64)
    params = (torch.randn(6, 3, dtype=torch.float64),)

    def func(W):
        return (X @ W).pow(2).sum() * X.abs().max().item()

    ev = engine.evaluate(func, params, 0, steps=1e-5, engine="structured")
    ref = engine.evaluate(func, params, 0, steps=1e-5, engine="batched")
    assert ev.engine == "structured"
    got, want = ev.estimate()[0], ref.estimate()[0]
    assert float((got - want).abs().max()) <= 1e-8 * float(want.abs().max())


def test_the_recorder_keeps_no_intermediate_alive():
    # make_fx holds its proxies weakly, so a loop over large temporaries peaks at one of them; the recorder must too,
    # on success and when the trace raises (the exception's traceback holds the recorder's frame)
    import weakref

    alive = []

    def func(w, fail=False):
        y = w
        for _ in range(5):
            t = torch.sin(y) + 1.0
            alive.append(weakref.ref(t))
            y = t * 0.5
        if fail:
            y.sum().item()
        return y.sum()

    gm = structured._record(func, [torch.randn(64, dtype=torch.float64)])
    assert isinstance(gm, torch.fx.GraphModule) and sum(r() is not None for r in alive) == 0
    alive.clear()
    with pytest.raises(RuntimeError, match="value of a traced tensor") as caught:
        structured._record(lambda w: func(w, fail=True), [torch.randn(64, dtype=torch.float64)])
    # the traceback holds func's own frame, whose local t is the last temporary: nothing else may be alive
    assert caught.value.__traceback__ is not None and [r() is not None for r in alive] == [False] * 4 + [True]


def test_reading_a_traced_value_is_refused_naming_the_op():
    X = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(structured.StructuredUnsupported, match=r"aten\._local_scalar_dense"):
        structured.trace(lambda w: (X @ w).sum() * w.sum().item(), [torch.randn(3, 1, dtype=torch.float64)])


FRESH = textwrap.dedent('''
    import json, sys
    import torch
    import torch.nn.functional as F
    import gradfd
    from gradfd import engine

    X, Y, labels = torch.randn(32, 48, dtype=torch.float64), torch.randn(32, 40, dtype=torch.float64), torch.randint(0, 40, (32,))
    engines = [
        engine.evaluate(lambda W, b: F.mse_loss(F.linear(X, W, b), Y), (torch.randn(40, 48, dtype=torch.float64),
                        torch.randn(40, dtype=torch.float64)), 0, steps=1e-5, engine="structured").engine,
        engine.evaluate(lambda W: F.cross_entropy(torch.tanh(X @ W), labels), (torch.randn(48, 40, dtype=torch.float64),),
                        0, steps=1e-5, engine="structured").engine,
    ]
    heavy = [m for m in ("torch._dynamo", "torch._inductor", "sympy") if m in sys.modules]
    print(json.dumps({"engines": engines, "heavy": heavy}))
''')


def test_a_structured_first_call_imports_neither_dynamo_nor_inductor_nor_sympy():
    # make_fx imports torch._inductor's config, which imports torch._dynamo and sympy: ~3.5 s of a first call
    # (benchmarks/bench_first_call.py); torch.broadcast_shapes imports sympy too
    out = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"engines": ["structured", "structured"], "heavy": []}, out.stderr[-2000:]


# --------------------------------------------------------------------------------------------------------------
# the JIT loader


@pytest.fixture
def unloaded(monkeypatch):
    """The loader's state as in a fresh process where no compiled gradfd._C exists; restored afterwards."""
    module = ops._state["module"]
    monkeypatch.setitem(ops._state, "loaded", False)
    monkeypatch.setitem(ops._state, "module", None)
    monkeypatch.setitem(ops._state, "reason", None)
    monkeypatch.delenv("GRADFD_DISABLE_KERNELS", raising=False)
    monkeypatch.delenv("GRADFD_NO_JIT", raising=False)

    def no_compiled():
        raise ImportError("no gradfd._C (simulated)")

    monkeypatch.setattr(ops, "_load_compiled", no_compiled)
    return module


class _Timeout(Exception):
    """What a signal handler might raise while the build runs."""


def test_jit_loader_lets_unrelated_exceptions_through_and_retries(unloaded, monkeypatch):
    def interrupted():
        raise _Timeout("exceeded 20 s")

    monkeypatch.setattr(ops, "_load_jit", interrupted)
    with pytest.raises(_Timeout):
        ops._ensure_loaded()
    assert ops._state["loaded"] is False  # not latched: the next call tries again
    with pytest.raises(TimeoutError):  # an OSError subclass, yet not a build failure
        monkeypatch.setattr(ops, "_load_jit", lambda: (_ for _ in ()).throw(TimeoutError("timed out")))
        ops._ensure_loaded()
    assert ops._state["loaded"] is False
    monkeypatch.setattr(ops, "_load_jit", lambda: unloaded or types.SimpleNamespace(with_cuda=False))
    assert ops.kernels_available() and ops.unavailable_reason() is None


@pytest.mark.parametrize("failure", [
    RuntimeError("Error building extension 'gradfd_C': ninja: build stopped: subcommand failed."),
    subprocess.CalledProcessError(1, ["c++", "--version"]),
    FileNotFoundError(2, "No such file or directory", "c++"),
    ImportError("gradfd_C.so: undefined symbol: _ZN3c10"),
], ids=["ninja", "compiler probe", "no compiler", "bad module"])
def test_jit_build_failures_disable_the_kernels_with_the_reason(unloaded, monkeypatch, failure):
    def fail():
        raise failure

    monkeypatch.setattr(ops, "_load_jit", fail)
    assert not ops.kernels_available()
    assert f"JIT build of csrc/ failed: {type(failure).__name__}" in ops.unavailable_reason()
    with pytest.raises(ops.KernelsUnavailableError, match="JIT build of csrc/ failed"):
        ops.require_kernels()


@pytest.fixture
def fake_builds(tmp_path, monkeypatch):
    """torch.utils.cpp_extension.load replaced by a recorder that "builds" a Python module file; builds go to
    ``tmp_path/ext`` (TORCH_EXTENSIONS_DIR)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    calls: list[dict] = []

    def load(name, build_directory, **kwargs):
        calls.append({"name": name, "build_directory": build_directory, **kwargs})
        path = tmp_path / f"built{len(calls)}.py"
        path.write_text(f"BUILD = {len(calls)}\n")
        module = types.ModuleType(name)
        module.__file__ = str(path)
        module.BUILD = len(calls)
        return module

    monkeypatch.setattr(ops, "_cpp_extension", lambda: types.SimpleNamespace(load=load, CUDA_HOME=None))
    monkeypatch.setattr(ops, "_want_cuda", lambda: False)
    return calls


def test_jit_builds_are_keyed_to_the_environment_and_reused(fake_builds, tmp_path, monkeypatch):
    prefix = sys.prefix
    assert ops._load_jit().BUILD == 1
    first = fake_builds[0]["build_directory"]
    assert first.startswith(str(tmp_path / "ext" / "gradfd" / "gradfd_C-"))  # TORCH_EXTENSIONS_DIR is respected
    assert ops._load_jit().BUILD == 1  # unchanged sources: the built module is imported, nothing is rebuilt
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "another-venv"))  # another environment: its own directory
    assert ops._load_jit().BUILD == 2
    assert fake_builds[1]["build_directory"] != first
    monkeypatch.setattr(sys, "prefix", prefix)  # back to the first environment: no rebuild
    assert ops._load_jit().BUILD == 1
    assert len(fake_builds) == 2


def test_jit_rebuilds_when_a_source_changes(fake_builds, monkeypatch):
    assert ops._load_jit().BUILD == 1
    digest = ops._sources_digest
    monkeypatch.setattr(ops, "_sources_digest", lambda d: digest(d) + "-edited")
    assert ops._load_jit().BUILD == 2
    assert fake_builds[0]["build_directory"] == fake_builds[1]["build_directory"]  # same key: ninja rebuilds there


def test_build_directory_key_covers_the_environment_torch_and_flags(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    kwargs = {"sources": ["a.cpp"], "extra_compile_args": {"cxx": ["-O3"]}}
    base = ops.build_directory("gradfd_C", False, kwargs)
    from torch.utils.cpp_extension import get_default_build_root

    assert base.parent == ops.Path(get_default_build_root()) / "gradfd"
    assert ops.build_directory("gradfd_C", False, kwargs) == base  # stable
    assert ops.build_directory("gradfd_C", False, {**kwargs, "extra_compile_args": {"cxx": ["-O2"]}}) != base
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert ops.build_directory("gradfd_C", False, kwargs) != base
    monkeypatch.undo()
    monkeypatch.setattr(sys, "prefix", "/elsewhere/venv")
    assert ops.build_directory("gradfd_C", False, kwargs) != base
