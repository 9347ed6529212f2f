"""Complex tensors in PyTorch's convention (issue 24): a complex input or output is checked as its real pairs
(gradfd.wirtinger), so a hand-written backward with a missing conjugate or a wrong imaginary part disagrees with the
finite differences of the real and imaginary parts, in complex128 and complex64; built-in complex ops pass."""

from __future__ import annotations

import pytest
import torch

import gradfd
from gradfd.demo.planted import COMPLEX_OPS, complex_op
from helpers import assert_unchanged, snapshot

COMPLEX = [torch.complex128, torch.complex64]


def _mul(bug: str | None = None):
    """``z * w`` with a hand-written backward: right (``g * conj(w)``), without the conjugate, or with its imaginary
    part 1% off."""

    class Mul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z, w):
            ctx.save_for_backward(z, w)
            return z * w

        @staticmethod
        def backward(ctx, g):
            z, w = ctx.saved_tensors
            gz = g * (w if bug == "no_conj" else w.conj())
            if bug == "imag":
                gz = torch.complex(gz.real, 1.01 * gz.imag)
            return gz, g * z.conj()

    return Mul.apply


def _inputs(seed: int, dtype: torch.dtype, shape=(3, 4)):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() for _ in range(2))


@pytest.mark.parametrize("dtype", COMPLEX)
@pytest.mark.parametrize("bug", ["no_conj", "imag"])
@pytest.mark.parametrize("mode", ["full", "directional"])
def test_a_planted_complex_mistake_is_caught_on_its_input_and_the_correct_twin_passes(seed, dtype, bug, mode):
    z, w = _inputs(seed, dtype)
    snap = snapshot((z, w))
    loss = lambda mul: lambda z, w: mul(z, w).abs().pow(2).sum()  # noqa: E731
    for form in (lambda mul: mul, loss):  # tensor-valued, and a real loss
        report = gradfd.check(form(_mul(bug)), (z, w), mode=mode, raise_on_failure=False)
        bad, good = report.tensors
        assert bad.disagree > 0 and good.passed and bad.dtype == dtype and bad.complex_input
        assert gradfd.check(form(_mul()), (z, w), mode=mode).passed
    assert_unchanged((z, w), snap)


def test_torch_catches_the_same_planted_mistakes_in_complex128(seed):
    z, w = _inputs(seed, torch.complex128)
    for bug in ("no_conj", "imag"):
        assert torch.autograd.gradcheck(_mul(bug), (z, w), raise_exception=False) is False
        assert gradfd.gradcheck(_mul(bug), (z, w), raise_exception=False) is False
    assert torch.autograd.gradcheck(_mul(), (z, w)) and gradfd.gradcheck(_mul(), (z, w))


@pytest.mark.parametrize("dtype", COMPLEX)
@pytest.mark.parametrize("op", [torch.exp, torch.abs, torch.sin, lambda z: (z * z.conj()).real,
                                lambda z: torch.fft.ifft(z), lambda z: z.angle()])
def test_builtin_complex_ops_pass_in_both_complex_dtypes(seed, dtype, op):
    z = torch.randn(6, dtype=dtype, requires_grad=True)
    assert gradfd.check(op, (z,)).passed
    assert gradfd.check(op, (z,), mode="directional").passed
    assert gradfd.gradcheck(op, (z,)) is True
    if dtype == torch.complex128:
        assert torch.autograd.gradcheck(op, (z,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_fft_of_a_real_input_passes_and_names_the_parts_of_its_output(seed, dtype):
    x = torch.randn(8, dtype=dtype, requires_grad=True)
    report = gradfd.check(torch.fft.fft, (x,))
    t = report.tensors[0]
    assert report.passed and t.complex_output and not t.complex_input and t.output_shape == (8, 2)
    assert t.checked == 8 * 16
    assert ".re in[" in str(report) or ".im in[" in str(report)
    assert gradfd.check(lambda x: torch.fft.rfft(x).abs().sum(), (x,)).passed


def test_a_disagreeing_entry_names_its_part(seed):
    z, w = _inputs(seed, torch.complex128, shape=(4,))
    report = gradfd.check(lambda z, w: _mul("imag")(z, w).abs().pow(2).sum(), (z, w), raise_on_failure=False)
    t = report["params[0]"]
    assert t.disagree > 0 and str(t.dtype) == "torch.complex128" and t.shape == (4, 2)
    assert all(index[-1] == 1 for index in t.disagreeing())  # only imaginary parts are wrong
    assert "].im" in str(report) and "].re" not in str(report).split("disagreeing entries")[1]


@pytest.mark.parametrize("dtype", COMPLEX)
def test_numerical_gradient_of_a_complex_param_is_pytorchs_gradient(seed, dtype):
    z = torch.randn(5, dtype=dtype)
    w = torch.randn(5, dtype=dtype.to_real())
    f = lambda z, w: (z.abs() ** 2 * w).sum() + (z * z).real.sum()  # noqa: E731
    snap = snapshot((z, w))
    zz = z.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(f(zz, w), zz)
    tol = 1e-8 if dtype == torch.complex128 else 1e-2
    for numerical in (gradfd.numerical_gradient(f, (z, w), 0, h=None),
                      gradfd.reference.numerical_gradient(f, (z, w), 0, h=1e-6 if dtype == torch.complex128 else 1e-2)):
        assert numerical.dtype == dtype and numerical.shape == z.shape
        torch.testing.assert_close(numerical, expected, rtol=tol, atol=tol)
    assert gradfd.numerical_gradient(f, (z, w), 1, h=None).dtype == w.dtype  # a real param of a complex function
    assert_unchanged((z, w), snap)


def test_the_other_rules_and_second_order_take_complex_tensors(seed):
    z = torch.randn(4, dtype=torch.complex128, requires_grad=True)
    assert gradfd.check(torch.exp, (z,), check_forward_ad=True, check_batched_grad=True,
                        check_undefined_grad=True).passed
    # (a loss whose gradient has no part that is zero by structure: |exp(z)|^2 = exp(2 Re z) would leave the
    # imaginary part rounding residue, whose noise exact columns can underestimate: the note of issue 24)
    assert gradfd.check(lambda z: (z.exp() * (z * z).conj()).real.sum(), (z,), order=2).passed
    assert gradfd.gradgradcheck(torch.exp, (z,)) is True


def test_reference_mode_refuses_complex_tensors_naming_reference():
    z = torch.randn(4, dtype=torch.complex64, requires_grad=True)
    snap = snapshot((z,))
    with pytest.raises(TypeError, match="reference mode compares real tensors"):
        gradfd.check(torch.exp, (z,), reference=torch.exp)
    assert_unchanged((z,), snap)


def _square(bug: bool = False):
    """``z * z`` whose backward is itself a Function (the double backward hand-written); with ``bug``, that double
    backward conjugates the output gradient it saved: invisible while output gradients are real."""

    class SquareGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z, g):
            ctx.save_for_backward(z, g)
            return 2 * g * z.conj()

        @staticmethod
        def backward(ctx, gg):
            z, g = ctx.saved_tensors
            return 2 * (g.conj() if bug else g) * gg.conj(), 2 * gg * z

    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            ctx.save_for_backward(z)
            return z * z

        @staticmethod
        def backward(ctx, g):
            (z,) = ctx.saved_tensors
            return SquareGrad.apply(z, g)

    return Square.apply


@pytest.mark.parametrize("dtype", COMPLEX)
def test_a_double_backward_wrong_only_for_complex_output_gradients_is_caught(seed, dtype):
    z = torch.randn(5, dtype=dtype, requires_grad=True)
    real_v = torch.randn(5, dtype=torch.float64).to(dtype).requires_grad_()
    if dtype == torch.complex128:  # torch: caught with its random (complex) output gradients, not with real ones
        assert torch.autograd.gradgradcheck(_square(True), (z,), (real_v,), raise_exception=False)
        assert not torch.autograd.gradgradcheck(_square(True), (z,), raise_exception=False)
    assert gradfd.gradgradcheck(_square(True), (z,), raise_exception=False) is False
    assert not gradfd.check(_square(True), (z,), order=2, raise_on_failure=False).passed
    assert gradfd.gradgradcheck(_square(), (z,)) and gradfd.check(_square(), (z,), order=2).passed


def test_complex_checks_leave_the_callers_tensors_their_grad_conj_bit_and_the_rng_unchanged(seed):
    z = torch.randn(4, dtype=torch.complex64, requires_grad=True)
    z.grad = torch.randn(4, dtype=torch.complex64)
    w = torch.randn(4, dtype=torch.complex64).conj()  # a conjugate view
    snap = snapshot((z,))
    w_bits, rng = torch.view_as_real(w.resolve_conj()).clone(), torch.get_rng_state()
    f = lambda z, w: torch.nn.functional.dropout(torch.view_as_real(z * w), 0.3).sum()  # noqa: E731
    assert gradfd.check(f, (z, w)).passed
    assert gradfd.check(lambda z: torch.fft.fft(z.abs()), (z,), order=2).passed
    x = torch.linspace(-1, 1, 6, dtype=torch.float64, requires_grad=True)  # (no draw from the RNG under test)
    ticks = []  # real params, a complex output: the ComplexOutputs retry (its progress callback and RNG)
    report = gradfd.check(lambda x: torch.fft.fft(torch.nn.functional.dropout(x, 0.3)), (x,),
                          progress=lambda done, total: ticks.append((done, total)))
    assert report.passed and report.tensors[0].complex_output and ticks and ticks[-1][0] == ticks[-1][1]
    assert_unchanged((z,), snap)
    assert w.is_conj() and torch.equal(torch.view_as_real(w.resolve_conj()), w_bits)
    assert torch.equal(torch.get_rng_state(), rng)


def test_check_module_takes_complex_parameters_and_outputs(seed):
    class Spectral(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(5, dtype=torch.complex64) / 3)

        def forward(self, x):
            return torch.fft.irfft(torch.fft.rfft(x) * self.weight, n=x.shape[-1]), torch.fft.rfft(x) * self.weight

    m = Spectral()
    x = torch.randn(3, 8)
    before = m.weight.detach().clone()
    report = gradfd.check_module(m, (x,))  # loss=None: both outputs projected, the complex one as real pairs
    t = report["weight"]
    assert report.passed and t.complex_input and t.dtype == torch.complex64 and t.shape == (5, 2)
    assert torch.equal(m.weight.detach(), before)
    report = gradfd.check_module(m, (x.clone().requires_grad_(),), check_inputs=True,
                                 loss=lambda out: out[0].pow(2).sum())
    assert "inputs[0]" in {t.name for t in report.tensors}


@pytest.mark.parametrize("name", sorted(COMPLEX_OPS))
@pytest.mark.parametrize("dtype", COMPLEX)
def test_each_example_complex_op_passes_and_its_missing_conjugate_is_caught(seed, name, dtype):
    z, w = _inputs(seed, dtype)
    assert gradfd.gradcheck(lambda z, w: complex_op(name, z, w), (z, w)) is True
    assert gradfd.gradcheck(lambda z, w: complex_op(name, z, w, missing_conj=True), (z, w),
                            raise_exception=False) is False
