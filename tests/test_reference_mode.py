"""Reference mode, ``gradfd.check(op, params, reference=ref)``: half-precision kernels judged per entry against a
validated plain-PyTorch reference (gradfd/verdict/against_reference.py; docs/half-precision.md). Inputs are fresh
draws (the ``seed`` fixture); the detection rates over many draws are measured by benchmarks/bench_reference.py."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ALL_DEVICES, assert_unchanged, snapshot

import gradfd
from gradfd import custom_op, ops
from gradfd.report import DISAGREE

needs_kernels = pytest.mark.skipif(not ops.kernels_available(), reason=f"kernels unavailable: "
                                                                        f"{ops.unavailable_reason()}")
HALF = [torch.float16, torch.bfloat16]
# a planted error on one row, per dtype: twice the bars (1% and 5%), whose rates over held-out draws
# benchmarks/bench_reference.py measures; a test on a fresh draw needs the margin
ROW_ERROR = {torch.float16: 0.02, torch.bfloat16: 0.1}


def softmax_op(planted: dict | None = None):
    """gradfd's example softmax op (backward in float32, rounded once), with ``planted`` row errors if any."""
    return custom_op.softmax if not planted else (lambda x: custom_op.softmax_planted(x, planted))


reference_softmax = custom_op.softmax_reference


def _x(dtype, rows=24, cols=64, device="cpu"):
    return torch.randn(rows, cols, dtype=torch.float64, device=device).to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", HALF)
def test_a_correct_half_precision_softmax_passes_against_its_reference(seed, dtype):
    x = _x(dtype)
    report = gradfd.check(softmax_op(), (x,), reference=reference_softmax)
    t = report.tensors[0]
    assert report.passed and t.mode == "reference" and t.agree == x.numel()
    ref = t.details["reference"]
    assert ref["dtype"] == str(dtype).replace("torch.", "")
    assert ref["reference_error"] > 0 and ref["ratio"] == ref["op_error"] / ref["reference_error"]
    assert ref["cotangents"] == gradfd.verdict.policy.DEFAULT_POLICY.reference_cotangents
    assert math.isfinite(t.detection_limit) and 0 < t.detection_limit < 1
    assert "against the reference" in str(report)


@pytest.mark.parametrize("dtype", HALF)
def test_a_sign_error_in_a_half_precision_backward_is_flagged(seed, dtype):
    x = _x(dtype)
    report = gradfd.check(softmax_op({...: -2.0}), (x,), reference=reference_softmax,
                          raise_on_failure=False)
    assert not report.passed
    assert report.tensors[0].disagree > x.numel() // 2


@pytest.mark.parametrize("dtype", HALF)
def test_an_error_on_one_row_is_flagged_there_and_nowhere_else(seed, dtype):
    x = _x(dtype)
    row = int(torch.randint(0, x.shape[0], ()))
    with pytest.raises(gradfd.GradientCheckError) as info:
        gradfd.check(softmax_op({row: ROW_ERROR[dtype]}), (x,), reference=reference_softmax)
    flagged = info.value.report.tensors[0].disagreeing(10 ** 6)
    assert flagged and all(i[0] == row for i in flagged)


@needs_kernels
@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
def test_the_rms_norm_kernel_passes_and_its_planted_bug_is_found_in_x_only(seed, dtype):
    x = torch.randn(12, 96, dtype=torch.float64).to(dtype).requires_grad_()
    w = (1 + 0.2 * torch.randn(96, dtype=torch.float64)).to(dtype).requires_grad_()
    good = gradfd.check(custom_op.rms_norm, (x, w), reference=custom_op.rms_norm_reference)
    assert good.passed and [t.name for t in good.tensors] == ["params[0]", "params[1]"]
    bad = gradfd.check(custom_op.rms_norm_buggy, (x, w), reference=custom_op.rms_norm_reference,
                       raise_on_failure=False)
    assert not bad["params[0]"].passed and bad["params[1]"].passed


def test_the_callers_tensors_are_unchanged_by_passing_and_failing_calls(seed):
    x = _x(torch.float16)
    x.grad = torch.randn_like(x)
    snap = snapshot([x])
    gradfd.check(softmax_op(), (x,), reference=reference_softmax)
    with pytest.raises(gradfd.GradientCheckError):
        gradfd.check(softmax_op({0: -2.0}), (x,), reference=reference_softmax)
    with pytest.raises(ValueError):
        gradfd.check(softmax_op(), (x,), reference=lambda x: torch.softmax(x, -1)[:1])
    assert_unchanged([x], snap)


def test_a_reference_whose_own_gradient_is_wrong_is_an_error_naming_the_entries(seed):
    class WrongReference(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = torch.softmax(x, -1)
            ctx.save_for_backward(y)
            return y

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            out = y * (g - (g * y).sum(-1, keepdim=True))
            out[2] *= 1.5
            return out

    x = _x(torch.float16, rows=6, cols=8)
    with pytest.raises(gradfd.InvalidReferenceError, match=r"reference: its float64 autograd gradient fails .*"
                                                           r"params\[0\]: \d+ entries disagree, worst first \[2, "):
        gradfd.check(softmax_op(), (x,), reference=WrongReference.apply)


def test_tuple_outputs_and_several_inputs(seed):
    def op(x, y):
        return (softmax_op()(x) * y).to(x.dtype), (x.float() * y.float()).sum(-1).to(x.dtype)

    def ref(x, y):
        return torch.softmax(x, -1) * y, (x * y).sum(-1)

    x, y = _x(torch.float16, rows=5, cols=16), _x(torch.float16, rows=5, cols=16)
    report = gradfd.check(op, (x, y), reference=ref)
    assert report.passed and len(report.tensors) == 2
    bad = gradfd.check(lambda x, y: (op(x, y)[0], op(x, y)[1] * 1.02), (x, y), reference=ref,
                       raise_on_failure=False)
    assert not bad.passed


def test_a_loss_is_checked_with_its_one_cotangent(seed):
    x = _x(torch.bfloat16, rows=8, cols=32)
    w = torch.randn(8, 32, dtype=torch.float64).to(torch.bfloat16)
    report = gradfd.check(lambda x: (softmax_op()(x).float() * w.float()).sum(), (x,),
                          reference=lambda x: (torch.softmax(x, -1) * w).sum())
    assert report.passed and report.tensors[0].details["reference"]["cotangents"] == 1


def test_the_reference_check_follows_mode(seed):
    x = _x(torch.float16, rows=16, cols=32)
    for mode in ("sample", "directional"):
        report = gradfd.check(softmax_op(), (x,), reference=reference_softmax, mode=mode, samples=32)
        assert report.passed and f"({mode} mode" in report.tensors[0].details["reference"]["validation"]


def test_a_non_deterministic_backward_is_reported_with_nondet_tol(seed):
    class Noisy(torch.autograd.Function):  # adds nothing forward; its backward differs run to run
        @staticmethod
        def forward(ctx, x):
            return torch.zeros_like(x)

        @staticmethod
        def backward(ctx, g):
            return 1e-3 * torch.rand_like(g)

    def noisy(x):
        return softmax_op()(x) + Noisy.apply(x)

    x = _x(torch.float16, rows=4, cols=16)
    report = gradfd.check(noisy, (x,), reference=reference_softmax, nondet_tol=0.0, raise_on_failure=False)
    assert report.tensors[0].nondeterminism is not None and not report.passed


@pytest.mark.parametrize("reference, message", [
    (lambda x: torch.softmax(x, -1)[:, :3], r"reference: its output has shape \(4, 3\), func's has \(4, 8\)"),
    (lambda x: (torch.softmax(x, -1) * 100).long(), r"reference: its output is torch.int64 \(integer or bool\), "
                                                    r"func's is torch.float16 \(floating\)"),
    (lambda x: torch.softmax(x, -1).to("meta"), r"reference: its output is on meta, func's on cpu"),
    (lambda x: (torch.softmax(x, -1), x), r"func returned 1 tensor\(s\), the reference 2"),
])
def test_a_reference_that_does_not_match_the_op_is_an_error_naming_it(seed, reference, message):
    x = _x(torch.float16, rows=4, cols=8)
    with pytest.raises(ValueError, match=message):
        gradfd.check(softmax_op(), (x,), reference=reference)


def test_bad_reference_arguments_are_errors_naming_them(seed):
    x = _x(torch.float16, rows=4, cols=8)
    with pytest.raises(TypeError, match="reference must be callable .* got int 3"):
        gradfd.check(softmax_op(), (x,), reference=3)
    with pytest.raises(ValueError, match="reference: func and its checked params are float64; .* drop reference="):
        gradfd.check(reference_softmax, (x.detach().double().requires_grad_(),), reference=reference_softmax)
    with pytest.raises(TypeError, match="reference's output must be a tensor, got str"):
        gradfd.check(softmax_op(), (x,), reference=lambda x: "no")
    with pytest.raises(ValueError, match="policy field 'reference_factor' must be finite, > 0"):
        gradfd.check(softmax_op(), (x,), reference=reference_softmax, policy={"reference_factor": -1.0})


def test_a_reference_that_raises_says_which_run_raised(seed):
    x = _x(torch.float16, rows=4, cols=8)

    def broken(x):
        if x.dtype == torch.float64:
            raise RuntimeError("no float64 here")
        return torch.softmax(x, -1)

    with pytest.raises(RuntimeError, match="no float64 here") as info:
        gradfd.check(softmax_op(), (x,), reference=broken)
    assert any("reference in float64" in n for n in getattr(info.value, "__notes__", []))


def test_entries_where_the_reference_is_not_finite_in_the_ops_dtype_are_unresolved(seed):
    # exp overflows float16 above ~11.1: the reference's own rounding there cannot be measured
    x = (1 + torch.rand(3, 8, dtype=torch.float64) * 4).to(torch.float16)
    x[1, 2] = 11.5
    x.requires_grad_()

    class Exp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.exp(x.float()).clamp(max=60000).to(x.dtype)

        @staticmethod
        def backward(ctx, g):
            return g  # wrong everywhere

    report = gradfd.check(Exp.apply, (x,), reference=torch.exp, raise_on_failure=False)
    v = report.tensors[0].entries["verdict"].view(3, 8)
    assert int(v[1, 2]) == 2 and bool((v.flatten()[torch.arange(24) != 10] == DISAGREE).all())


@needs_kernels
@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, *HALF])
def test_rms_norm_kernels_match_the_reference(seed, device, dtype):
    x = torch.randn(7, 300, dtype=torch.float64, device=device)
    w = 1 + 0.1 * torch.randn(300, dtype=torch.float64, device=device)
    g = torch.randn(7, 300, dtype=torch.float64, device=device)
    xs, ws = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    y = custom_op.rms_norm(xs, ws)
    gx, gw = torch.autograd.grad(y, (xs, ws), g.to(dtype))
    x64, w64 = xs.detach().double().requires_grad_(), ws.detach().double().requires_grad_()
    y64 = custom_op.rms_norm_reference(x64, w64)
    rx, rw = torch.autograd.grad(y64, (x64, w64), g.to(dtype).double())
    eps = torch.finfo(dtype).eps
    for got, want, what in ((y, y64, "y"), (gx, rx, "grad_x"), (gw, rw, "grad_weight")):
        err = float((got.double() - want).abs().max() / want.abs().max())
        assert err <= 8 * eps, f"{what}: relative error {err:.2e} above 8 eps of {dtype}"


class FusedNorm(torch.nn.Module):
    """A module around the RMSNorm kernel (``buggy``: its planted bug), and its plain-PyTorch twin (``plain``)."""

    def __init__(self, d: int, dtype: torch.dtype, kind: str = "kernel"):
        super().__init__()
        self.weight = torch.nn.Parameter((1 + 0.1 * torch.randn(d, dtype=torch.float64)).to(dtype))
        self.kind = kind

    def forward(self, x):
        f = {"kernel": custom_op.rms_norm, "buggy": custom_op.rms_norm_buggy,
             "plain": custom_op.rms_norm_reference}[self.kind]
        return f(x, self.weight)


@needs_kernels
def test_check_module_takes_a_reference_module_with_the_same_names(seed):
    dtype = torch.float16
    x = torch.randn(6, 40, dtype=torch.float64).to(dtype).requires_grad_()
    fused, plain = FusedNorm(40, dtype), FusedNorm(40, dtype, "plain")
    plain.weight.data.fill_(7.0)  # never read: the module's values are used
    snap = snapshot([fused.weight, plain.weight, x])
    report = gradfd.check_module(fused, x, reference=plain, check_inputs=True)
    assert report.passed and [t.name for t in report.tensors] == ["weight", "inputs[0]"]
    assert all(t.mode == "reference" for t in report.tensors)
    buggy = FusedNorm(40, dtype, "buggy")
    buggy.weight.data.copy_(fused.weight.data)
    bad = gradfd.check_module(buggy, x, reference=plain, check_inputs=True, raise_on_failure=False)
    assert bad["weight"].passed and not bad["inputs[0]"].passed
    assert_unchanged([fused.weight, plain.weight, x], snap)


def test_check_module_refuses_a_reference_that_is_not_a_twin(seed):
    net = torch.nn.Linear(4, 3).half()
    x = torch.randn(2, 4).half()
    with pytest.raises(TypeError, match="reference must be a torch.nn.Module .* got function"):
        gradfd.check_module(net, x, reference=lambda x: x)
    with pytest.raises(ValueError, match=r"reference: .* it lacks \['weight', 'bias'\]"):
        gradfd.check_module(net, x, reference=torch.nn.Sequential(torch.nn.Linear(4, 3)).half())


def test_an_empty_tensor_is_checked_with_nothing_to_compare(seed):
    x = torch.randn(0, 8, dtype=torch.float64).half().requires_grad_()
    report = gradfd.check(softmax_op(), (x,), reference=reference_softmax)
    assert report.passed and report.tensors[0].checked == 0


def test_an_op_without_a_gradient_path_is_named(seed):
    x = _x(torch.float16, rows=4, cols=8)
    with pytest.raises(ValueError, match="func returned no differentiable floating output, and neither did the "
                                         "reference"):
        gradfd.check(lambda x: x.detach() * 2, (x,), reference=lambda x: x.detach() * 2)
    # the op loses the gradient of one output the reference has: compared, and flagged
    report = gradfd.check(lambda x: (softmax_op()(x), x.detach() * 2), (x,),
                          reference=lambda x: (torch.softmax(x, -1), x * 2), raise_on_failure=False)
    assert not report.passed


def test_a_reference_that_upcasts_is_an_error_naming_the_dtypes(seed):
    x = _x(torch.float16, rows=4, cols=8)
    with pytest.raises(ValueError, match=r"reference: given func's params, its output is torch.float32, finer than "
                                         r"func's torch.float16; .*\(no internal upcast\)"):
        gradfd.check(softmax_op(), (x,), reference=lambda x: torch.softmax(x if x.dtype == torch.float64
                                                                            else x.float(), -1))
    with pytest.raises(ValueError, match=r"reference: given float64 params, its output is torch.float32"):
        gradfd.check(softmax_op(), (x,), reference=lambda x: torch.softmax(x.float(), -1).to(
            torch.float32 if x.dtype == torch.float64 else x.dtype))


def test_random_draws_are_the_same_in_every_run_and_the_callers_rng_is_kept(seed):
    x = _x(torch.float16, rows=4, cols=16)
    mask = lambda x: (torch.rand(x.shape) < 0.7).to(x.dtype)  # noqa: E731  (dropout-like: the same in every run)
    state = torch.get_rng_state()
    report = gradfd.check(lambda x: softmax_op()(x) * mask(x), (x,), reference=lambda x: torch.softmax(x, -1) * mask(x))
    assert report.passed and torch.equal(torch.get_rng_state(), state)


@needs_kernels
@pytest.mark.parametrize("device", ALL_DEVICES)
def test_reference_mode_on_each_device(seed, device):
    x = torch.randn(8, 64, dtype=torch.float64, device=device).half().requires_grad_()
    w = (1 + 0.2 * torch.randn(64, dtype=torch.float64, device=device)).half().requires_grad_()
    assert gradfd.check(custom_op.rms_norm, (x, w), reference=custom_op.rms_norm_reference).passed
    bad = gradfd.check(custom_op.rms_norm_buggy, (x, w), reference=custom_op.rms_norm_reference,
                       raise_on_failure=False)
    assert not bad["params[0]"].passed and bad["params[1]"].passed


@needs_kernels
def test_rms_norm_ops_pass_opcheck(seed):
    x = torch.randn(5, 12, dtype=torch.float64).half().requires_grad_()
    w = (1 + 0.1 * torch.randn(12, dtype=torch.float64)).half().requires_grad_()
    custom_op.rms_norm(x, w)  # registers the autograd formula and fake kernels
    torch.library.opcheck(torch.ops.gradfd.rms_norm.default, (x, w, 1e-6))
    _, rstd = torch.ops.gradfd.rms_norm(x.detach(), w.detach(), 1e-6)
    torch.library.opcheck(torch.ops.gradfd.rms_norm_backward.default,
                          (torch.randn(5, 12).half(), x.detach(), w.detach(), rstd, False))


@needs_kernels
def test_check_module_runs_the_whole_twin_in_float64_for_the_truth(seed):
    dtype = torch.float16
    torch.manual_seed(seed)
    fused = torch.nn.Sequential(torch.nn.Linear(16, 16), FusedNorm(16, dtype)).to(dtype)
    plain = torch.nn.Sequential(torch.nn.Linear(16, 16), FusedNorm(16, dtype, "plain")).to(dtype)
    x = torch.randn(6, 16, dtype=torch.float64).to(dtype)  # an input not checked: it must follow to float64 too
    report = gradfd.check_module(fused, x, reference=plain)
    assert report.passed and [t.name for t in report.tensors] == ["0.weight", "0.bias", "1.weight"]
    fused[1].kind = "buggy"
    bad = gradfd.check_module(fused, x, reference=plain, raise_on_failure=False)
    assert not bad["0.weight"].passed and bad["1.weight"].passed


def test_complex_outputs_and_a_reference_without_a_gradient_in_the_ops_dtype_are_refused(seed):
    x = _x(torch.float16, rows=4, cols=8)
    with pytest.raises(TypeError, match="func's output\\[1\\] is complex .* real tensors only"):
        gradfd.check(lambda x: (softmax_op()(x), torch.zeros(2, dtype=torch.complex64)), (x,),
                     reference=lambda x: (torch.softmax(x, -1), torch.zeros(2, dtype=torch.complex64)))
    with pytest.raises(ValueError, match="reference: its output\\[0\\] has a gradient in float64 but not in func's "
                                         "dtype"):
        gradfd.check(softmax_op(), (x,), reference=lambda x: torch.softmax(x if x.dtype == torch.float64
                                                                           else x.detach(), -1))
