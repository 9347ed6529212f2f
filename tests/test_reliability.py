"""Reliability: property tests over shapes, layouts, dtypes, engines and chunking; fault injection (exceptions,
KeyboardInterrupt, out of memory, non-finite values); native input checks; opcheck; memory and size limits."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from helpers import assert_unchanged, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradfd
from gradfd import custom_op, engine, ops, reference

PROPERTY_EXAMPLES = 80  # recorded in docs/reliability.md

UNARY = {
    "sin": torch.sin,
    "tanh": torch.tanh,
    "exp": lambda t: torch.exp(0.3 * t),
    "square": lambda t: t * t,
    "softplus": torch.nn.functional.softplus,
}


@st.composite
def tensors(draw):
    """A parameter: 0-d, 0-size, contiguous, transposed, expanded or channels-last; any floating dtype."""
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    kind = draw(st.sampled_from(["contiguous", "scalar", "empty", "transposed", "expanded", "channels_last",
                                 "strided"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rnd = lambda *s: (torch.rand(s, generator=g, dtype=torch.float64) + 0.5).to(dtype)  # noqa: E731  |x| in [.5, 1.5]
    if kind == "scalar":
        x = rnd()
    elif kind == "empty":
        x = rnd(0, 3)
    elif kind == "transposed":
        x = rnd(3, 4).t()
    elif kind == "expanded":
        x = rnd(1, 4).expand(3, 4)
    elif kind == "channels_last":
        x = rnd(1, 2, 2, 3).contiguous(memory_format=torch.channels_last)
    elif kind == "strided":
        x = rnd(10)[::3]
    else:
        x = rnd(*draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    return x, kind


@settings(max_examples=PROPERTY_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors(), st.lists(st.sampled_from(sorted(UNARY)), min_size=1, max_size=3),
       st.sampled_from(["auto", "batched", "loop"]), st.sampled_from(["auto", "vmap", "stack", "loop"]),
       st.sampled_from([None, 1, 2, 5]))
def test_every_engine_agrees_with_the_reference_and_changes_nothing(param, ops_, eng, batching, chunk_size):
    x, _ = param
    x.requires_grad_(x.numel() % 2 == 0)
    snap = snapshot([x])

    def func(x):
        t = x
        for name in ops_:
            t = UNARY[name](t)
        return t.sum()

    eps = torch.finfo(x.dtype).eps
    h = {torch.float64: 2.0**-14, torch.float32: 2.0**-8}.get(x.dtype, 2.0**-4)  # powers of two: x + h is exact
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = gradfd.numerical_gradient(func, (x,), 0, h, engine=eng, batching=batching, chunk_size=chunk_size)
    want = reference.numerical_gradient(func, (x.detach(),), 0, h)
    assert_unchanged([x], snap)
    assert got.shape == x.shape and got.dtype == x.dtype
    # only the documented warning may appear (stacking refused: these funcs reduce over the whole input)
    assert all(issubclass(w.category, gradfd.FallbackWarning) for w in caught), [str(w.message) for w in caught]
    if x.numel():
        # the same differences up to the rounding of the loss values (batched and single evaluations round alike
        # to a few eps of |f|), divided by 2h
        f = abs(float(func(x.detach().double())))
        assert (got.double() - want.double()).abs().max() <= 16 * eps * (f + 1) / h + 2 * eps * float(
            want.double().abs().max())


# ---- fault injection ---------------------------------------------------------------------------------------------

class Boom(Exception):
    pass


def _counting(fail_at):
    calls = {"n": 0}

    def func(w, b):
        calls["n"] += 1
        if fail_at is not None and calls["n"] >= fail_at:
            raise Boom(f"call {calls['n']}")
        return (torch.tanh(w) * b).sum(-1) if w.dim() > 1 else (torch.tanh(w) * b).sum()

    return func, calls


@pytest.mark.parametrize("eng,batching", [("auto", "auto"), ("batched", "vmap"), ("batched", "stack"),
                                          ("loop", "loop")])
@pytest.mark.parametrize("entry,mode", [("numerical_gradient", None), ("check", "full"), ("check", "directional")])
def test_an_exception_on_the_kth_evaluation_leaves_everything_intact(seed, eng, batching, mode, entry):
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64)
    snap = snapshot([w, b])

    def run(func):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gradfd.FallbackWarning)
            if entry == "check":
                return gradfd.check(func, (w, b), engine=eng, batching=batching, chunk_size=2, mode=mode,
                                    raise_on_failure=False)
            return gradfd.numerical_gradient(func, (w, b), 0, engine=eng, batching=batching, chunk_size=2)

    func, calls = _counting(None)
    run(func)
    total = calls["n"]
    for k in range(1, total + 1):  # every call gradfd makes, in turn
        state = torch.get_rng_state()
        func, calls = _counting(k)
        with pytest.raises(Boom) as err:
            run(func)
        assert_unchanged([w, b], snap)
        assert torch.equal(torch.get_rng_state(), state)
        # the original exception, not a wrapper (a later call's when gradfd took a failure in a batched call for
        # "cannot batch" and went on to the next strategy)
        assert str(err.value).startswith("call ")
        # whichever call raised, one note says what gradfd was doing; the loop names the perturbed coordinate
        notes = [n for n in getattr(err.value, "__notes__", []) if n.startswith("gradfd: raised ")]
        assert len(notes) == 1, (k, total, getattr(err.value, "__notes__", None))
        if eng == "loop":
            assert re.search(r"at (params\[0\]\[\d\] [+-][\d.]+\*h|perturbed point \d+ of|the unperturbed params)",
                             notes[0]), notes


@pytest.mark.parametrize("eng", ["auto", "batched", "loop"])
def test_keyboard_interrupt_midway_leaves_everything_intact(seed, eng):
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    snap = snapshot([w])
    calls = {"n": 0}

    def func(w):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return w.pow(2).sum()

    with pytest.raises(KeyboardInterrupt):
        gradfd.numerical_gradient(func, (w,), 0, engine=eng, chunk_size=2, batching="loop" if eng == "loop" else
                                  "auto")
    assert_unchanged([w], snap)


def test_out_of_memory_halves_the_chunk_and_reports_it(seed):
    w = torch.randn(40, dtype=torch.float64)

    def func(w):  # stacked: "runs out of memory" on batches of more than 8 rows
        if w.dim() == 2 and w.shape[0] > 8:
            raise torch.OutOfMemoryError("simulated: out of memory for a batch of %d" % w.shape[0])
        return (w * w).sum(-1)

    result = engine.evaluate(func, (w,), 0, steps=1e-4, engine="batched", batching="stack", chunk_size=40)
    # a chunk of c coordinates is 2c stacked rows (central differences): 40 -> 20 -> 10 -> 5 -> 2 coordinates
    assert result.chunk_size == 2
    assert [n for n in result.notes if "out of memory" in n][-1] == "out of memory: chunk halved to 2"
    got = gradfd.numerical_gradient(func, (w,), 0, engine="batched", batching="stack", chunk_size=40)
    torch.testing.assert_close(got, 2 * w, rtol=1e-8, atol=1e-8)


def test_out_of_memory_at_chunk_size_one_gives_up_clearly(seed):
    w = torch.randn(4, dtype=torch.float64)

    def func(w):
        if w.dim() == 2:
            raise torch.OutOfMemoryError("simulated")
        return (w * w).sum()

    with pytest.raises(MemoryError, match="out of memory evaluating a single perturbed point"):
        engine.evaluate(func, (w,), 0, steps=1e-4, engine="batched", batching="stack", chunk_size=4)


@pytest.mark.parametrize("where", ["loss", "params", "perturbed"])
def test_nan_and_inf_are_reported_never_a_pass(seed, where):
    x = torch.tensor([0.5, 2.0, 1e-9, 3.0], dtype=torch.float64)
    if where == "params":
        x[1] = math.nan
    func = {"loss": lambda x: torch.log(x - 10).sum(), "params": lambda x: (x * x).sum(),
            "perturbed": lambda x: torch.log(x).sum()}[where]
    if where == "perturbed":  # only the nodes around x[2] leave log's domain: that entry is checked at smaller steps
        report = gradfd.check(func, (x.requires_grad_(),), h=1e-6, stencil="central")
        t = report.tensors[0]
        assert t.entries["verdict"].tolist() == [0, 0, 0, 0]
        assert abs(float(t.entries["numerical"][2]) * 1e-9 - 1) < 1e-6
        assert any("1 entries had a non-finite loss" in n for n in t.details["notes"]), t.details["notes"]
        with pytest.raises(gradfd.NonFiniteLossError, match=r"params\[0\]\[2\]"):
            gradfd.numerical_gradient(func, (x.detach(),), 0, h=1e-6)
    else:
        with pytest.raises(gradfd.NonFiniteLossError, match="unperturbed point"):
            gradfd.check(func, (x.requires_grad_(),))
        with pytest.raises(gradfd.NonFiniteLossError):
            gradfd.numerical_gradient(func, (x.detach(),), 0)


# ---- native code -------------------------------------------------------------------------------------------------

needs_kernels = pytest.mark.skipif(not ops.kernels_available(), reason=f"no kernels: {ops.unavailable_reason()}")

BAD_BIAS_GELU = [
    ("x float64", "bias_gelu", (torch.randn(3, 2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)),
     "x must be float32"),
    ("bias float64", "bias_gelu", (torch.randn(3, 2), torch.randn(2, dtype=torch.float64)), "bias must be float32"),
    ("bias 2-D", "bias_gelu", (torch.randn(3, 2), torch.randn(1, 2)), "bias must be 1-D"),
    ("bias wrong length", "bias_gelu", (torch.randn(3, 2), torch.randn(3)), "x's last dimension"),
    ("x 0-d", "bias_gelu", (torch.randn(()), torch.randn(1)), "bias must be 1-D with x's last dimension"),
    ("non-contiguous", "bias_gelu", (torch.randn(2, 3).t(), torch.randn(2)), "must be contiguous"),
    ("grad shape", "bias_gelu_backward", (torch.randn(3, 3), torch.randn(3, 2), torch.randn(2)),
     "grad must be a contiguous float32 tensor of x's shape"),
    ("grad dtype", "bias_gelu_backward", (torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2), torch.randn(2)),
     "grad must be a contiguous float32"),
    ("rms_norm int x", "rms_norm", (torch.ones(3, 2, dtype=torch.int32), torch.ones(2, dtype=torch.int32), 1e-6),
     "x must be float16, bfloat16, float32 or float64, got Int"),
    ("rms_norm weight dtype", "rms_norm", (torch.randn(3, 2), torch.randn(2).half(), 1e-6),
     "weight must have x's dtype Float, got Half"),
    ("rms_norm weight length", "rms_norm", (torch.randn(3, 2), torch.randn(3), 1e-6), "x's last dimension"),
    ("rms_norm non-contiguous", "rms_norm", (torch.randn(2, 3).t(), torch.randn(2), 1e-6), "must be contiguous"),
    ("rms_norm_backward rstd", "rms_norm_backward", (torch.randn(3, 2), torch.randn(3, 2), torch.randn(2),
                                                      torch.randn(4), False), "rstd must be rms_norm's"),
    ("rms_norm_backward grad", "rms_norm_backward", (torch.randn(3, 2).half(), torch.randn(3, 2), torch.randn(2),
                                                      torch.randn(3), False), "grad must be a contiguous Float"),
]


@needs_kernels
@pytest.mark.parametrize("name,op,args,message", BAD_BIAS_GELU, ids=[b[0] for b in BAD_BIAS_GELU])
def test_example_op_rejects_bad_input_with_a_message(name, op, args, message):
    with pytest.raises(RuntimeError) as err:
        getattr(torch.ops.gradfd, op)(*args)
    assert f"gradfd::{op}" in str(err.value) and message in str(err.value)


@needs_kernels
def test_example_op_passes_opcheck_including_autograd():
    custom_op.bias_gelu(torch.randn(2, 3), torch.randn(3))  # registers the autograd formula and fake kernel
    x = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    torch.library.opcheck(torch.ops.gradfd.bias_gelu.default, (x, b))
    torch.library.opcheck(torch.ops.gradfd.bias_gelu_backward.default, (torch.randn(4, 3), x.detach(), b.detach()))


# ---- limits ------------------------------------------------------------------------------------------------------

def test_memory_stays_within_the_budget(tmp_path):
    # 20,000 coordinates: all perturbed rows at once would be 2 x 20000 x 20000 x 8 bytes = 6.4 GB
    script = textwrap.dedent('''
        import resource, torch, gradfd
        w = torch.randn(20000, dtype=torch.float64)
        f = lambda w: (w * w).sum()
        gradfd.numerical_gradient(f, (w,), 0, engine="batched", memory_budget="64MB")  # warm up, load kernels
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        g = gradfd.numerical_gradient(f, (w,), 0, engine="batched", memory_budget="64MB")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert torch.allclose(g, 2 * w, rtol=1e-6, atol=1e-5)
        print((after - before) / 1024)
    ''')
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown_mib = float(proc.stdout.strip().splitlines()[-1])
    assert grown_mib < 200, f"peak memory grew by {grown_mib:.0f} MiB with a 64 MB budget"


@pytest.mark.parametrize("batching", ["auto", "vmap"])  # "auto": by colors; "vmap": exact columns
def test_jacobian_checks_stay_within_the_budget(batching):
    # 4,000 inputs and outputs: the dense Jacobian is 128 MB, the numerical columns at all nodes 512 MB
    script = textwrap.dedent(f'''
        import resource, torch, gradfd
        x = torch.randn(4000, dtype=torch.float64, requires_grad=True)
        f = lambda x: torch.softmax(x.view(-1, 100), dim=-1)
        small = torch.randn(400, dtype=torch.float64, requires_grad=True)
        gradfd.check(f, (small,), batching="{batching}", memory_budget="64MB")  # warm up
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        report = gradfd.check(f, (x,), batching="{batching}", memory_budget="64MB")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert report.passed and report.tensors[0].agree == 4000 ** 2
        assert (report.tensors[0].details["engine"] == "colored") == ("{batching}" == "auto")
        print((after - before) / 1024)
    ''')
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown_mib = float(proc.stdout.strip().splitlines()[-1])
    assert grown_mib < 100, f"peak memory grew by {grown_mib:.0f} MiB with a 64 MB budget"


def test_ten_million_parameters_in_sample_and_directional_modes_with_progress():
    x = torch.randn(10_000_000).requires_grad_()
    func = lambda x: (x * x).sum() / 1e6  # noqa: E731
    for mode in ("sample", "directional"):
        seen = []
        report = gradfd.check(func, (x,), mode=mode, samples=16, directions=3,
                              progress=lambda done, total: seen.append((done, total)))
        assert report.passed and seen and seen[-1][0] == seen[-1][1]
