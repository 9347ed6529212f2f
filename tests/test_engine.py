"""The batched engine against the reference loop, and its behaviour on bad input, faults and randomness."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from functions import FUNCTIONS
from helpers import ALL_DEVICES, assert_unchanged, snapshot

import gradfd
from gradfd import engine, ops, reference


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
@pytest.mark.parametrize("eng", ["auto", "batched", "loop"])
def test_engine_agrees_with_reference_in_float64(seed, device, name, eng):
    func, params, idx = FUNCTIONS[name](device, torch.float64)
    ref = reference.numerical_gradient(func, params, idx)
    with warnings.catch_warnings():
        warnings.simplefilter("error", engine.FallbackWarning)  # every test function batches
        got = gradfd.numerical_gradient(func, params, idx, engine=eng)
    assert got.shape == params[idx].shape and got.dtype == params[idx].dtype and got.device == params[idx].device
    assert _rel(got, ref) <= 1e-9


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("stencil", ["central", "four_point", "richardson"])
def test_chunk_boundaries_do_not_change_the_result(seed, chunk_size, stencil):
    func, params, idx = FUNCTIONS["mlp"]("cpu", torch.float64)
    idx = 0  # W1, 35 entries: chunks that do and do not divide it
    whole = gradfd.numerical_gradient(func, params, idx, engine="batched", stencil=stencil, h=1e-3)
    chunked = gradfd.numerical_gradient(func, params, idx, engine="batched", stencil=stencil, h=1e-3,
                                        chunk_size=chunk_size)
    looped = gradfd.numerical_gradient(func, params, idx, engine="loop", stencil=stencil, h=1e-3)
    # the three differ only in the summation order of the losses: rounding of ~eps*|f|*sum|w|/h ~ 1e-12 here
    assert _rel(chunked, whole) <= 1e-10
    assert _rel(looped, whole) <= 1e-10


def test_chunk_size_is_honoured_as_given(seed):
    func, params, idx = FUNCTIONS["mlp"]("cpu", torch.float64)
    result = engine.evaluate(func, params, 0, steps=1e-5, engine="batched", chunk_size=4)
    assert result.chunk_size == 4 and result.engine == "batched" and result.batching == "vmap"


def test_higher_order_stencils_are_more_accurate(seed):
    x = torch.rand(30, dtype=torch.float64) + 0.5
    func = lambda x: torch.exp(x).sum()  # noqa: E731
    exact = torch.exp(x)
    errors = {s: _rel(gradfd.numerical_gradient(func, (x,), 0, h=1e-2, stencil=s), exact)
              for s in ("central", "four_point", "richardson")}
    assert errors["central"] > 1e-6  # h^2/6 truncation at h = 1e-2
    assert errors["four_point"] < errors["central"] / 100
    assert errors["richardson"] < errors["four_point"] / 10


def test_float32_uses_realised_steps(seed):
    # x + 1e-5 is not representable in float32 near 1: the nominal step is off by up to 1%; the realised one is exact
    x = (torch.rand(50) + 1.0).to(torch.float32)
    got = gradfd.numerical_gradient(lambda x: (x.double() ** 2).sum(), (x,), 0, h=1e-5)
    torch.testing.assert_close(got.double(), 2 * x.double(), rtol=1e-6, atol=0)
    naive = reference.numerical_gradient(lambda x: (x.double() ** 2).sum(), (x,), 0, h=1e-5)
    assert _rel(naive.double(), 2 * x.double()) > 1e-3  # the lesson's version is visibly off


@pytest.mark.parametrize("eng", ["auto", "batched", "loop"])
def test_random_functions_see_the_same_draws_at_every_point(seed, eng):
    x = torch.randn(40, dtype=torch.float64)

    def func(x):
        return torch.nn.functional.dropout(x * x, p=0.5, training=True).sum()

    state = torch.get_rng_state()
    got = gradfd.numerical_gradient(func, (x,), 0, engine=eng, h=1e-4)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG state is restored
    torch.set_rng_state(state)
    xr = x.clone().requires_grad_()
    func(xr).backward()  # same mask as every perturbed evaluation
    torch.testing.assert_close(got, xr.grad, rtol=1e-7, atol=1e-7)


def test_unbatchable_function_falls_back_to_the_loop_with_one_warning(seed):
    x = torch.randn(50, dtype=torch.float64)

    def func(x):
        return x.pow(2).sum() * (2.0 if x.sum().item() > 0 else 2.0)  # .item(): vmap cannot batch it

    with pytest.warns(engine.FallbackWarning, match=r"cannot be evaluated batched.*item") as record:
        got = gradfd.numerical_gradient(func, (x,), 0, engine="batched", h=1e-4)
    assert len([w for w in record if issubclass(w.category, engine.FallbackWarning)]) == 1
    torch.testing.assert_close(got, 4 * x, rtol=1e-8, atol=1e-8)


def test_stack_batching_for_functions_with_a_leading_batch_dimension(seed):
    X = torch.randn(9, 4, dtype=torch.float64)

    def func(w):  # accepts w of shape (4,) or (B, 4): one loss per row
        return torch.tanh(w @ X.t()).pow(2).mean(-1)

    w = torch.randn(4, dtype=torch.float64)
    ref = reference.numerical_gradient(func, (w,), 0)
    result = engine.evaluate(func, (w,), 0, steps=1e-5, engine="batched", batching="stack")
    assert result.batching == "stack"
    got = gradfd.numerical_gradient(func, (w,), 0, engine="batched", batching="stack")
    assert _rel(got, ref) <= 1e-9


def test_stack_batching_refuses_a_function_that_mixes_rows(seed):
    def func(w):  # not row-independent: mean over everything
        return (w - w.mean()).pow(2).sum(-1) if w.dim() > 1 else w.pow(2).sum()

    w = torch.randn(6, dtype=torch.float64)
    with pytest.warns(engine.FallbackWarning, match="does not treat the leading dimension as independent rows"):
        got = gradfd.numerical_gradient(func, (w,), 0, engine="batched", batching="stack", h=1e-4)
    torch.testing.assert_close(got, 2 * w, rtol=1e-8, atol=1e-8)


def test_memory_budget_sizes_the_chunks(seed):
    func, params, idx = FUNCTIONS["mlp"]("cpu", torch.float64)
    small = engine.evaluate(func, params, 0, steps=1e-5, engine="batched", memory_budget="64KB")
    large = engine.evaluate(func, params, 0, steps=1e-5, engine="batched", memory_budget=2**30)
    assert small.chunk_size < large.chunk_size
    assert torch.equal(small.losses, small.losses)
    torch.testing.assert_close(small.losses, large.losses, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("text,value", [("512MB", 512 * 10**6), ("2GiB", 2 * 2**30), (4096, 4096), ("1.5k", 1500)])
def test_parse_memory_budget(text, value):
    assert engine.parse_memory_budget(text) == value


def test_nonfinite_losses_are_reported_never_returned(seed):
    x = torch.tensor([0.5, 1e-7, 2.0], dtype=torch.float64)
    with pytest.raises(gradfd.NonFiniteLossError, match=r"1 of 3 entries.*params\[0\]\[1\]") as err:
        gradfd.numerical_gradient(lambda x: torch.log(x).sum(), (x,), 0, h=1e-5)
    assert math.isnan(err.value.gradient[1]) and err.value.indices == [(1,)]
    torch.testing.assert_close(err.value.gradient[[0, 2]], 1 / x[[0, 2]], rtol=1e-8, atol=0)


def test_nonfinite_base_loss_is_reported(seed):
    x = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    with pytest.raises(gradfd.NonFiniteLossError, match="unperturbed point"):
        gradfd.numerical_gradient(lambda x: torch.log(x).sum(), (x,), 0)


# ---- bad input: each names the argument, what was expected and what was passed -------------------------------

def _f(w, b):
    return (w**2).sum() + b.sum()


W = torch.randn(3, dtype=torch.float64)
B = torch.randn(2, dtype=torch.float64)

BAD = [
    ("param_idx out of range", dict(param_idx=2), IndexError, r"param_idx must be in \[0, 2\) for 2 params, got 2"),
    ("param_idx not int", dict(param_idx=0.0), TypeError, "param_idx must be an int, got float"),
    ("param_idx bool", dict(param_idx=True), TypeError, "param_idx must be an int, got bool"),
    ("non-tensor param", dict(params=(W, 3.0)), TypeError, r"params\[1\] must be a torch.Tensor, got float"),
    ("params a tensor", dict(params=W), TypeError, "params must be a tuple or list of tensors"),
    ("integer param", dict(params=(torch.arange(3), B)), TypeError,
     r"params\[0\] must be a floating-point tensor .* got dtype torch.int64"),
    ("sparse param", dict(params=(W.to_sparse(), B)), TypeError, "dense"),
    ("non-scalar output", dict(func=lambda w, b: w * 2), ValueError,
     r"func must return a scalar tensor \(one element\), got shape \(3,\)"),
    ("python float output", dict(func=lambda w, b: 1.0), TypeError, "func must return a scalar tensor .* got float"),
    ("integer output", dict(func=lambda w, b: (w > 0).sum()), TypeError, "floating-point loss, got dtype torch.int64"),
    ("func not callable", dict(func=3), TypeError, "func must be callable"),
    ("h zero", dict(h=0.0), ValueError, "h must be a positive finite float, got 0.0"),
    ("h negative", dict(h=-1e-3), ValueError, "h must be a positive finite float, got -0.001"),
    ("h nan", dict(h=float("nan")), ValueError, "h must be a positive finite float, got nan"),
    ("h inf", dict(h=float("inf")), ValueError, "h must be a positive finite float, got inf"),
    ("h string", dict(h="1e-3"), TypeError, "h must be a positive finite float, got str"),
    ("h too small for dtype", dict(params=(torch.ones(3, dtype=torch.float16) * 100, B), h=1e-5), ValueError,
     r"below the resolution of torch.float16 at params\[0\]\[0\] = 100"),
    ("chunk_size zero", dict(chunk_size=0), ValueError, "chunk_size must be a positive int, got 0"),
    ("chunk_size negative", dict(chunk_size=-4), ValueError, "chunk_size must be a positive int, got -4"),
    ("chunk_size float", dict(chunk_size=2.5), TypeError, "chunk_size must be a positive int or None, got float"),
    ("memory_budget zero", dict(memory_budget=0), ValueError, "memory_budget must be positive, got 0"),
    ("memory_budget junk", dict(memory_budget="lots"), ValueError, "memory_budget must be bytes"),
    ("unknown engine", dict(engine="fast"), ValueError, r"engine must be one of \['auto', 'batched', 'loop', 'structured'\], got 'fast'"),
    ("unknown batching", dict(batching="magic"), ValueError, "batching must be one of"),
    ("unknown stencil", dict(stencil="five_point"), ValueError, "stencil must be one of"),
    ("mutating func", dict(func=lambda w, b: w.mul_(2).sum()), ValueError, r"func modified its input params\[0\] in place"),
]


@pytest.mark.parametrize("name,override,exc,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_error_and_changes_nothing(name, override, exc, message):
    args = dict(func=_f, params=(W, B), param_idx=0)
    args.update(override)
    params = args["params"]
    tensors = [p for p in (params if isinstance(params, (tuple, list)) else [params]) if isinstance(p, torch.Tensor)]
    snap = snapshot(tensors) if all(t.layout == torch.strided for t in tensors) else None
    func, params, idx = args.pop("func"), args.pop("params"), args.pop("param_idx")
    with pytest.raises(exc, match=message):
        gradfd.numerical_gradient(func, params, idx, **args)
    if snap is not None:
        assert_unchanged(tensors, snap)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_params_on_different_devices_are_refused():
    with pytest.raises(ValueError, match=r"params must all be on one device, got params\[0\] on cpu, params\[1\] on cuda"):
        gradfd.numerical_gradient(_f, (W, B.cuda()), 0)


def test_params_on_different_devices_are_refused_meta():
    # a device mismatch without a GPU: the meta device stands in for the second device
    with pytest.raises(ValueError, match=r"params must all be on one device, got params\[0\] on cpu, params\[1\] on meta"):
        gradfd.numerical_gradient(_f, (W, torch.empty(2, device="meta")), 0)


# ---- state preservation -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("eng", ["auto", "batched", "loop"])
@pytest.mark.parametrize("where", ["first", "random", "last"])
def test_callers_tensors_survive_a_func_that_raises_on_the_kth_call(seed, eng, where):
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64)
    (w.sum() * 2).backward()
    snap = snapshot([w, b])
    calls = {"n": 0, "fail": None}

    class Boom(Exception):
        pass

    def func(w, b):
        calls["n"] += 1
        if calls["fail"] is not None and calls["n"] >= calls["fail"]:
            raise Boom(f"call {calls['n']}")
        return ((w + b) ** 2).sum()

    gradfd.numerical_gradient(func, (w, b), 0, engine=eng, chunk_size=3)  # count the calls of a clean run
    total = calls["n"]
    calls["n"] = 0
    calls["fail"] = {"first": 1, "last": total, "random": int(torch.randint(1, total + 1, ()))}[where]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", engine.FallbackWarning)  # a failure in the first batched call may look
        try:                                                      # like an unbatchable func: the loop re-raises it
            gradfd.numerical_gradient(func, (w, b), 0, engine=eng, chunk_size=3)
            raised = None
        except Boom as exc:
            raised = exc
    assert_unchanged([w, b], snap)
    if raised is None:
        # engine="auto" times a probe to choose its path: a rerun may take a path with fewer calls than the counted
        # run, and then never reaches the failing call
        assert eng == "auto" and calls["n"] < calls["fail"], "func raised, but the exception did not propagate"
    if calls["fail"] > 1 and eng == "loop":
        assert any("params[0]" in note for note in getattr(raised, "__notes__", []))


def test_callers_tensors_survive_keyboard_interrupt(seed):
    w = torch.randn(10, dtype=torch.float64)
    snap = snapshot([w])
    calls = {"n": 0}

    def func(w):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return w.sum()

    with pytest.raises(KeyboardInterrupt):
        gradfd.numerical_gradient(func, (w,), 0, engine="loop")
    assert_unchanged([w], snap)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_callers_tensors_are_bitwise_unchanged_after_success(seed, name):
    func, params, idx = FUNCTIONS[name]("cpu", torch.float64)
    snap = snapshot(params)
    gradfd.numerical_gradient(func, params, idx)
    assert_unchanged(params, snap)


# ---- the extension being unavailable -----------------------------------------------------------------------------

def test_auto_engine_sizes_a_cache_capped_chunk_by_timing(seed, monkeypatch):
    """A chunk the cache heuristic capped doubles while each doubling runs >= 10% faster per coordinate, and the
    fastest size measured is kept: here per-call overheads make 64 coordinates fastest, 128 fall off a cliff."""
    from gradfd.engine import coordinates

    monkeypatch.setattr(coordinates, "GENERIC_CPU_WORKING_SET", 1)  # the heuristic's chunk: GENERIC_CPU_MIN_CHUNK
    now = [0.0]
    sizes = []
    X = torch.randn(8, 1000, dtype=torch.float64)

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            return now[0]

    def func(w: torch.Tensor) -> torch.Tensor:
        rows = w.shape[0] if w.dim() == 3 else 1
        sizes.append(rows)
        now[0] += 1e-3 if rows == 1 else (1e-2 + 1e-4 * rows if rows <= 128 else 1.0)
        return (X @ w).pow(2).mean(dim=(-2, -1))

    monkeypatch.setattr(engine, "time", Clock)
    w = torch.randn(1000, 1, dtype=torch.float64)
    ev = engine.evaluate(func, (w,), 0, steps=1e-5, stencil="central", batching="stack")
    sized = [n for n in ev.notes if n.startswith("chunk sized by timing")]
    assert ev.engine == "batched" and len(sized) == 1 and sized[0].endswith(": 64 kept"), ev.notes
    # central stencil: two rows per coordinate; 128 coordinates tried once, then chunks of 64 to the end
    assert ev.chunk_size == 64 and sizes.count(2 * 128) == 1 and max(sizes) == 2 * 128
    after = sizes[sizes.index(2 * 128) + 1:]
    assert len(after) >= 10 and all(n == 2 * 64 for n in after[:-1]), after
    want = reference.numerical_gradient(lambda w: (X @ w).pow(2).mean(), (w,), 0, h=1e-5)
    got, _ = ev.estimate()
    assert _rel(got.view_as(want), want) < 1e-8


def test_sizing_never_doubles_back_into_a_chunk_that_ran_out_of_memory(seed, monkeypatch):
    """Out of memory at 64 coordinates while sizing halves the chunk to 32, and sizing settles there; out of memory
    at 16 coordinates in the probe leaves 8, which sizing never doubles back into."""
    from gradfd.engine import coordinates

    monkeypatch.setattr(coordinates, "GENERIC_CPU_WORKING_SET", 1)
    now, sizes = [0.0], []
    X = torch.randn(8, 1000, dtype=torch.float64)

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            return now[0]

    def run(limit: int):
        sizes.clear()

        def func(w: torch.Tensor) -> torch.Tensor:
            rows = w.shape[0] if w.dim() == 3 else 1
            sizes.append(rows)
            if rows > 2 * limit:
                raise torch.OutOfMemoryError("simulated")
            now[0] += 1e-3 if rows == 1 else 1e-2 + 1e-4 * rows
            return (X @ w).pow(2).mean(dim=(-2, -1))

        return engine.evaluate(func, (torch.randn(1000, 1, dtype=torch.float64),), 0, steps=1e-5, stencil="central",
                               batching="stack")

    monkeypatch.setattr(engine, "time", Clock)
    ev = run(32)
    assert sizes.count(2 * 64) == 1 and ev.chunk_size == 32, (sizes, ev.notes)
    assert any(n.startswith("chunk sized by timing") and n.endswith(": 32 kept") for n in ev.notes), ev.notes
    ev = run(8)
    assert sizes.count(2 * 16) == 1 and ev.chunk_size == 8, (sizes, ev.notes)


def test_without_kernels_batched_says_why_and_auto_uses_the_loop(monkeypatch, seed):
    monkeypatch.setitem(ops._state, "loaded", True)
    monkeypatch.setitem(ops._state, "module", None)
    monkeypatch.setitem(ops._state, "reason", "JIT build of csrc/ failed: no C++ compiler")
    x = torch.randn(100, dtype=torch.float64)
    with pytest.raises(ops.KernelsUnavailableError, match="no C\\+\\+ compiler"):
        gradfd.numerical_gradient(lambda x: x.pow(2).sum(), (x,), 0, engine="batched")
    with pytest.warns(engine.FallbackWarning, match="native kernels unavailable .*no C\\+\\+ compiler"):
        got = gradfd.numerical_gradient(lambda x: x.pow(2).sum(), (x,), 0)
    torch.testing.assert_close(got, 2 * x, rtol=1e-8, atol=1e-8)


class _Clock:
    """A stand-in for ``time.perf_counter`` that advances only when ``func`` runs: by ``loop_cost`` per call on a
    single point and by ``batch_cost`` per call on a stacked chunk (a leading batch dimension), so the "auto"
    engine's timed choice is deterministic however busy the machine is."""

    def __init__(self, loop_cost: float, batch_cost: float) -> None:
        self.now, self.loop_cost, self.batch_cost = 0.0, loop_cost, batch_cost
        self.calls = {"loop": 0, "batch": 0}

    def perf_counter(self) -> float:
        return self.now

    def tick(self, w: torch.Tensor) -> None:
        kind = "batch" if w.dim() == 3 else "loop"
        self.calls[kind] += 1
        self.now += self.batch_cost if kind == "batch" else self.loop_cost


@pytest.mark.parametrize("faster", ["batched", "loop"])
def test_auto_engine_keeps_whichever_its_probe_timed_faster(seed, monkeypatch, faster):
    tiny = engine.evaluate(lambda x: x.sum(), (torch.randn(3, dtype=torch.float64),), 0, steps=1e-5)
    assert tiny.engine == "loop"  # below the batching threshold: not even probed
    # a call on a stacked chunk of up to 64 coordinates costs 8 single calls (batching wins) or 1000 (the loop wins)
    clock = _Clock(loop_cost=1e-3, batch_cost=8e-3 if faster == "batched" else 1.0)
    monkeypatch.setattr(engine, "time", clock)
    X = torch.randn(64, 400, dtype=torch.float64)

    def func(w: torch.Tensor) -> torch.Tensor:
        clock.tick(w)
        return (X @ w).pow(2).mean(dim=(-2, -1))

    w = torch.randn(400, 1, dtype=torch.float64)
    ev = engine.evaluate(func, (w,), 0, steps=1e-5, batching="stack")
    probe = [n for n in ev.notes if n.startswith("probe:")]
    assert len(probe) == 1 and probe[0].endswith(f"{faster} chosen"), ev.notes
    assert ev.engine == faster
    if faster == "batched":  # the rest went batched: a few stacked calls; single calls only to probe and to
        # check the stacking
        assert clock.calls["loop"] < 16 and clock.calls["batch"] <= 8, clock.calls
    else:  # the probe's chunks and then the loop for every coordinate left
        assert clock.calls["loop"] >= 2 * (400 - 4 - 2 * 64), clock.calls
    want = reference.numerical_gradient(lambda w: (X @ w).pow(2).mean(), (w,), 0, h=1e-5)
    got, _ = ev.estimate()
    assert _rel(got.view_as(want), want) < 1e-8


_DATA = torch.linspace(-2, 2, 7, dtype=torch.float64)


def _validating(x: torch.Tensor, validate: bool = True) -> torch.Tensor:
    """A Normal's log-likelihood in its scale: torch.distributions validates ``scale > 0`` and raises otherwise
    (also under vmap)."""
    return torch.distributions.Normal(0.0, x.unsqueeze(-1), validate_args=validate).log_prob(_DATA).sum()


@pytest.mark.parametrize("first", [True, False], ids=["in the first chunk", "after batched chunks"])
def test_a_node_that_raises_is_recorded_and_the_rest_stays_batched(seed, first):
    # 400 entries at 1 .. 2; one small entry (whose nodes x - h, x - 2h are <= 0 at step 1e-2) early or late
    x = 1 + torch.rand(400, dtype=torch.float64)
    small = 2 if first else 300
    x[small] = 5e-3
    errors = engine.NodeErrors()
    problem = engine.prepare(_validating, (x,), 0, node_errors=errors)
    with warnings.catch_warnings():
        warnings.simplefilter("error", engine.FallbackWarning)  # no fallback to the loop for the whole tensor
        ev = engine.evaluate(_validating, (x,), 0, steps=1e-2, stencil="four_point", engine="batched",
                             batching="vmap", chunk_size=64, problem=problem)
    assert ev.batching == "vmap" and ev.engine == "batched"
    assert errors.count == 2 and "ValueError: Expected parameter scale" in errors.describe()  # x - h and x - 2h
    bad = ~ev.finite()
    assert bad.nonzero().flatten().tolist() == [small]
    # every other coordinate is exactly what the reference loop computes
    want = reference.numerical_gradient(lambda x: _validating(x, validate=False), (x,), 0, h=1e-2)
    got, _ = ev.estimate()
    ok = torch.arange(400) != small
    assert _rel(got[ok], want[ok]) < 1e-3  # (four-point against central differences at h = 1e-2)
    # and without a recorder, the exception propagates, naming where
    with pytest.raises(ValueError, match="Expected parameter scale"):
        gradfd.numerical_gradient(_validating, (x,), 0, h=1e-2, engine="batched", batching="vmap", chunk_size=64)


def test_a_node_error_is_a_domain_edge_only_while_func_runs_at_the_unperturbed_point():
    errors = engine.NodeErrors()
    assert not errors.take(torch.OutOfMemoryError("simulated"), "a node", lambda: None)  # never out of memory

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")  # sticky: the base fails too

    assert not errors.take(RuntimeError("CUDA error"), "a node", broken)

    class Timeout(Exception):  # raised into func by a signal handler, say: no domain check raises that
        pass

    assert not errors.take(Timeout("exceeded 20 s"), "a node", lambda: None)
    assert not errors.take(NotImplementedError("no kernel for this dtype"), "a node", lambda: None)
    assert errors.count == 0 and errors.first is None
    assert errors.take(ValueError("scale must be > 0"), "params[0][1] -2*h", lambda: None)
    assert errors.count == 1 and "at params[0][1] -2*h: ValueError: scale must be > 0" in errors.describe()


class _Timeout(Exception):
    """What a signal handler raises into func (a per-test time guard); not a sign that func cannot be batched."""


@pytest.mark.parametrize("where", ["vmap", "trace"])
def test_an_exception_of_another_kind_is_not_taken_for_a_batching_failure(where):
    # the engine tries vmap, then a leading batch dimension, then the loop, when func cannot run batched; an exception
    # of another kind raised during the first batched call (or the structured engine's trace) must propagate, not
    # send the check to a slower path where the time guard that raised it is lost
    X = torch.randn(32, 16, dtype=torch.float64)
    w = torch.randn(16, 4, dtype=torch.float64)
    traced = []

    def func(w):
        inside = torch._C._functorch.is_batchedtensor(w) if where == "vmap" else \
            torch._C._dispatch_tls_is_dispatch_key_included(torch._C.DispatchKey.Python)
        if inside:
            traced.append(True)
            raise _Timeout("time is up")
        return torch.tanh(X @ w).pow(2).sum()

    before = snapshot((w,))
    eng = "batched" if where == "vmap" else "structured"
    with pytest.raises(_Timeout, match="time is up") as err:
        gradfd.numerical_gradient(func, (w,), 0, engine=eng)
    assert traced and [n for n in err.value.__notes__ if n.startswith("gradfd: raised while")]
    assert_unchanged((w,), before)


def test_the_allocation_meter_is_repeatable():
    """Every new storage is counted, whatever addresses the allocator reuses (chunk sizes must not vary by run)."""
    x = torch.randn(1000, dtype=torch.float64)

    def func(x):
        for _ in range(20):
            x = x * 1.0001  # 8000 new bytes each; the allocator reuses freed addresses
        return x.sum()  # 8 bytes

    problem = engine.prepare(func, (x,), 0)
    sizes = {problem.activation_bytes() for _ in range(5)}
    assert sizes == {20 * 8000 + 8}


@pytest.mark.parametrize("kind", ["GRU", "LSTM", "attention"])
def test_an_op_without_a_batching_rule_batches_through_its_batchable_form(kind):
    """An RNN (aten::gru has no batching rule) or fused attention no longer sends the whole function to the loop:
    vmap runs it through PyTorch's own decomposition (or math formulation), and the values agree with the loop's."""
    import warnings

    torch.manual_seed(0)
    if kind == "attention":
        m = torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True).eval().double()
        x = torch.randn(2, 5, 16, dtype=torch.float64)
    else:
        m = getattr(torch.nn, kind)(3, 4, batch_first=True).double()
        x = torch.randn(2, 5, 3, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    values = [p.detach() for _, p in m.named_parameters()]

    def func(w):
        out = torch.func.functional_call(m, {**dict(zip(names, values)), names[0]: w}, (x,))
        return (out[0] if isinstance(out, tuple) else out).pow(2).sum()

    fastpath = torch.backends.mha.get_fastpath_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradfd.FallbackWarning)  # no fall to the loop
        # (engine="batched": "auto" times a probe and may keep the loop on a loaded machine; found by a CI dry run)
        ev = engine.evaluate(func, (values[0],), 0, engine="batched", batching="vmap")
    assert ev.batching == "vmap+forms" and any("batchable forms" in n for n in ev.notes), ev.notes
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
    batched = gradfd.numerical_gradient(func, (values[0],), 0, batching="vmap")
    loop = gradfd.numerical_gradient(func, (values[0],), 0, batching="loop")
    # the same function in another formulation: equal up to the loss's float64 rounding over the step (h = 1e-5)
    bound = 16 * torch.finfo(torch.float64).eps * abs(float(func(values[0]))) / 1e-5
    assert float((batched - loop).abs().max()) <= bound


def test_a_random_function_is_not_evaluated_in_batchable_forms():
    """An LSTM with dropout in training mode: its decomposition would draw other masks than the native kernel that
    gave the unperturbed point and autograd's gradient, so vmap+forms refuses it and the loop runs (a check there
    passed vacuously: rel. error 27 against an estimated error of 186)."""
    torch.manual_seed(0)
    m = torch.nn.LSTM(3, 4, num_layers=2, dropout=0.5).double().train()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    report = gradfd.check_module(m, x, wrt="weight_ih_l1", raise_on_failure=False)
    t = report.tensors[0]
    assert t.details["batching"] != "vmap+forms"
    assert report.passed and t.max_rel_error < 1e-6, report  # compared for real: the same masks at every point


def test_a_linear_over_a_non_contiguous_input_batches_without_copying_the_weight_per_row():
    """MultiheadAttention projects a ``(L, N, E)`` view of a batch-first input. Under vmap over its weight, the
    unfolded product materialised the weight once per sequence position (K x L x E x 3E values); folded to 2-D it
    allocates about K weights and K outputs. The folded form gives the same values as the original linear."""
    from gradfd.engine.forms import batchable_forms
    from gradfd.engine.modes import AllocationMeter

    torch.manual_seed(0)
    L, N, E, K = 16, 4, 32, 8
    x = torch.randn(N, L, E).transpose(0, 1)  # (L, N, E), not contiguous
    w, b = torch.randn(3 * E, E), torch.randn(3 * E)
    ws = w.expand(K, *w.shape).clone()
    with AllocationMeter() as unfolded:
        plain = torch.func.vmap(lambda v: torch.nn.functional.linear(x, v, b))(ws)
    with batchable_forms() as mode:
        assert torch.equal(torch.nn.functional.linear(x.contiguous(), w, b), torch.nn.functional.linear(
            x.contiguous().reshape(-1, E), w, b).view(L, N, 3 * E))  # at::linear folds a contiguous input alike
        with AllocationMeter() as meter:
            folded = torch.func.vmap(lambda v: torch.nn.functional.linear(x, v, b))(ws)
    assert "linear (its input folded to 2-D)" in mode.used
    torch.testing.assert_close(folded, plain, rtol=1e-6, atol=1e-5)
    if unfolded.total < K * L * E * 3 * E * 4:
        pytest.skip("this PyTorch no longer copies the weight per position under vmap: nothing to fold away")
    assert meter.total < unfolded.total / 4, (meter.total, unfolded.total)
    assert torch.nn.functional.linear is torch._C._nn.linear  # restored
