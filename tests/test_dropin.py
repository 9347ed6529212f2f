"""gradfd.gradcheck does what torch.autograd.gradcheck's defaults do (issue 17, part 3; issue 23): reentrancy
(nondet_tol=0.0 means identical backward passes), tensors where nothing could be compared fail the drop-in and the
pytest helper, and the undefined-gradient check: a backward must treat undefined output gradients as zeros."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError as TorchGradcheckError

import gradfd
from gradfd.check import _difference
from helpers import assert_unchanged, snapshot


def _sine(jitter: float = 0.0, scale: float = 1.0):
    """``scale * sin(x)`` with a hand-written backward that multiplies its result by ``1 + jitter * N(0, 1)``: a
    backward whose last bits change from run to run, like one that accumulates with atomics."""

    class Sine(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return scale * torch.sin(x)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            g = grad * scale * torch.cos(x)
            return g * (1 + jitter * torch.randn_like(g)) if jitter else g

    return Sine.apply


def _leaf(*tensors):
    return tuple(t.detach().clone().requires_grad_(True) for t in tensors)


# ---- 1. reentrancy -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fast_mode", [False, True])
def test_a_backward_with_1e13_relative_jitter_fails_by_default_like_torch(seed, fast_mode):
    x = _leaf(torch.randn(6, dtype=torch.float64))
    snap = snapshot(x)
    jittery = _sine(jitter=1e-13)
    assert torch.autograd.gradcheck(jittery, x, fast_mode=fast_mode, raise_exception=False) is False
    assert gradfd.gradcheck(jittery, x, fast_mode=fast_mode, raise_exception=False) is False
    with pytest.raises(gradfd.GradcheckError, match="backward is not deterministic") as err:
        gradfd.gradcheck(jittery, x, fast_mode=fast_mode)
    assert "nondet_tol=0.0" in str(err.value) and isinstance(err.value, TorchGradcheckError)
    t = err.value.report.tensors[0]
    assert t.disagree == 0 and 0 < t.details["backward_spread"] < 1e-11  # the gradient itself is right
    assert gradfd.gradcheck(jittery, x, fast_mode=fast_mode, nondet_tol=1e-10) is True
    assert torch.autograd.gradcheck(jittery, x, fast_mode=fast_mode, nondet_tol=1e-10) is True
    assert gradfd.gradcheck(jittery, x, fast_mode=fast_mode, nondet_tol=None) is True  # gradfd's "off"
    assert gradfd.gradcheck(_sine(), x, fast_mode=fast_mode) is True  # deterministic: exact agreement
    assert_unchanged(x, snap)


@pytest.mark.parametrize("nondet_tol", [1e-10, 1e-4])
def test_nondet_tol_is_an_absolute_bound_as_in_torch(seed, nondet_tol):
    # a gradient of size ~1e6 with 1e-13 relative jitter differs by ~1e-7 absolutely: beyond 1e-10, within 1e-4
    x = _leaf(torch.randn(5, dtype=torch.float64))
    jittery = _sine(jitter=1e-13, scale=1e6)
    expected = torch.autograd.gradcheck(jittery, x, nondet_tol=nondet_tol, raise_exception=False)
    assert expected is (nondet_tol == 1e-4)
    assert gradfd.gradcheck(jittery, x, nondet_tol=nondet_tol, raise_exception=False) is expected
    loss = lambda x: jittery(x).sum()  # noqa: E731  (a loss: output gradient 1, as torch's)
    assert torch.autograd.gradcheck(loss, x, nondet_tol=nondet_tol, raise_exception=False) is expected
    assert gradfd.gradcheck(loss, x, nondet_tol=nondet_tol, raise_exception=False) is expected


def test_check_nondet_tol_zero_means_exact_and_none_means_off(seed):
    x = _leaf(torch.randn(6, dtype=torch.float64))
    snap = snapshot(x)
    jittery = _sine(jitter=1e-13)
    report = gradfd.check(jittery, x, nondet_tol=0.0, raise_on_failure=False)
    assert not report.passed and "not deterministic" in str(report) and report.tensors[0].disagree == 0
    with pytest.raises(gradfd.GradientCheckError, match="not deterministic"):
        gradfd.check(jittery, x, nondet_tol=0.0)
    off = gradfd.check(jittery, x)  # check()'s own default: None, no reentrancy check
    assert off.passed and "backward_spread" not in off.tensors[0].details
    exact = gradfd.check(_sine(), x, nondet_tol=0.0)
    assert exact.passed and exact.tensors[0].details["backward_spread"] == 0.0
    # two checked tensors: only the one whose backward jitters fails
    two = gradfd.check(lambda a, b: (jittery(a) * b).sum(), _leaf(torch.randn(4, dtype=torch.float64),
                                                                    torch.randn(4, dtype=torch.float64)),
                       nondet_tol=0.0, raise_on_failure=False)
    assert [t.nondeterminism is not None for t in two.tensors] == [True, False]
    assert_unchanged(x, snap)


def test_a_nan_against_a_number_is_a_difference():
    nan, inf = float("nan"), float("inf")
    a = torch.tensor([1.0, nan, inf, -0.0])
    assert _difference(a, a.clone()) == 0.0  # the same NaN, the same infinity, 0.0 against -0.0: identical
    assert _difference(a, torch.tensor([1.0, nan, inf, 0.0])) == 0.0
    assert _difference(a, torch.tensor([1.0, 2.0, inf, 0.0])) == inf  # torch's (a - b).abs().max() > tol misses it
    assert _difference(a, torch.tensor([1.5, nan, inf, 0.0])) == 0.5
    assert _difference(None, None) == 0.0 and _difference(None, torch.tensor([0.0, 2.0])) == 2.0


# ---- 2. nothing compared -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fast_mode", [False, True])
def test_a_tensor_where_nothing_could_be_compared_fails_the_drop_in(seed, fast_mode):
    z = _leaf(torch.zeros(3, dtype=torch.float64))  # sqrt at 0: every stencil leaves the domain
    snap = snapshot(z)
    assert gradfd.gradcheck(torch.sqrt, z, fast_mode=fast_mode, raise_exception=False) is False
    with pytest.raises(gradfd.GradcheckError) as err:
        gradfd.gradcheck(torch.sqrt, z, fast_mode=fast_mode)
    what = "directions" if fast_mode else "entries"
    name = "outputs wrt params[0] (u^T J v)" if fast_mode else "output[0] wrt params[0]"
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"nothing could be compared for {name} (all ") and f" {what} unresolved: " in first
    assert err.value.report.passed and err.value.report.uncompared == [name]
    assert_unchanged(z, snap)


def test_a_tensor_where_nothing_could_be_compared_fails_assert_gradients_match(seed):
    z, y = _leaf(torch.zeros(3, dtype=torch.float64), torch.randn(4, dtype=torch.float64))
    snap = snapshot((z, y))

    def loss(z, y):
        return torch.sqrt(z).sum() + (y * y).sum()

    with pytest.raises(AssertionError) as err:
        gradfd.testing.assert_gradients_match(loss, (z, y))
    message = str(err.value)
    assert message.startswith("nothing could be compared for params[0] (all 3 entries unresolved: ")
    assert "for params[1]" not in message  # params[1] was compared, and agrees
    # check() itself keeps its verdict: passed means "no disagreement", and says what could not be compared
    report = gradfd.check(loss, (z, y))
    assert report.passed and not report.verified and report.uncompared == ["params[0]"]
    assert str(report).startswith("gradfd.check: PASSED (but nothing could be compared for params[0]")
    assert report.to_dict()["uncompared"] == ["params[0]"] and report.to_dict()["verified"] is False
    assert_unchanged((z, y), snap)


def test_partly_unresolved_tensors_still_pass(seed):
    # ReLU at exactly 0: that entry's stencil straddles the kink (unresolved), the others are compared
    x = _leaf(torch.tensor([0.0, 0.5, -0.25, 1.5], dtype=torch.float64))
    snap = snapshot(x)
    report = gradfd.testing.assert_gradients_match(lambda x: torch.relu(x).sum(), x)
    t = report.tensors[0]
    assert t.unresolved >= 1 and t.agree >= 1 and report.verified and report.uncompared == []
    assert gradfd.gradcheck(torch.relu, x) is True
    assert_unchanged(x, snap)


# ---- 3. undefined gradients --------------------------------------------------------------------------------------

def _doubling(undefined_as: str):
    """``2 x`` (or ``(2 x, 3 x)`` for the ``"alone"`` kinds) with a hand-written backward that sees an undefined
    output gradient as None (``set_materialize_grads(False)``) and takes it as: ``"zeros"`` (right), ``"ones"``
    (the planted bug of issue 23), ``"raise"`` (it reads ``None.shape``: AttributeError), ``"alone"`` (two outputs:
    right when both are undefined, ones when one alone is)."""

    class Doubling(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.set_materialize_grads(False)
            ctx.shape, ctx.dtype = x.shape, x.dtype
            return (2 * x, 3 * x) if undefined_as == "alone" else 2 * x

        @staticmethod
        def backward(ctx, *grads):
            if undefined_as == "raise":
                return 2 * grads[0].reshape(grads[0].shape)
            both_missing = all(g is None for g in grads)
            total = torch.zeros(ctx.shape, dtype=ctx.dtype)
            for g, c in zip(grads, (2, 3)):
                if g is None and (undefined_as == "ones" or (undefined_as == "alone" and not both_missing)):
                    g = torch.ones(ctx.shape, dtype=ctx.dtype)
                if g is not None:
                    total = total + c * g
            return total

    return Doubling.apply


@pytest.mark.parametrize("fast_mode", [False, True])
def test_a_backward_that_takes_an_undefined_gradient_as_ones_fails_as_in_torch_and_its_twin_passes(seed, fast_mode):
    x = _leaf(torch.randn(5, dtype=torch.float64))
    snap = snapshot(x)
    # torch: the Jacobian is right; only its undefined-gradient check fails the planted bug
    assert torch.autograd.gradcheck(_doubling("ones"), x, fast_mode=fast_mode, check_undefined_grad=False) is True
    with pytest.raises(TorchGradcheckError, match="Expected all input grads to be undefined or zero"):
        torch.autograd.gradcheck(_doubling("ones"), x, fast_mode=fast_mode)
    with pytest.raises(gradfd.GradcheckError, match=r"undefined output gradients: with every output gradient "
                                                    r"undefined, the backward gave params\[0\] a nonzero gradient "
                                                    r"\(5 of 5 entries, the largest 2 at params\[0\]\[0\]\)"):
        gradfd.gradcheck(_doubling("ones"), x, fast_mode=fast_mode)
    assert gradfd.gradcheck(_doubling("ones"), x, fast_mode=fast_mode, check_undefined_grad=False) is True
    assert torch.autograd.gradcheck(_doubling("zeros"), x, fast_mode=fast_mode) is True
    assert gradfd.gradcheck(_doubling("zeros"), x, fast_mode=fast_mode) is True
    assert_unchanged(x, snap)


def test_a_backward_that_raises_on_an_undefined_gradient_fails_naming_what_it_raised(seed):
    x = _leaf(torch.randn(4, dtype=torch.float64))
    with pytest.raises(AttributeError):  # torch's check lets an error other than RuntimeError escape
        torch.autograd.gradcheck(_doubling("raise"), x)
    with pytest.raises(gradfd.GradcheckError, match="with every output gradient undefined, the backward raised "
                                                    "AttributeError"):
        gradfd.gradcheck(_doubling("raise"), x)


def test_each_output_is_undefined_alone_as_well(seed):
    x = _leaf(torch.randn(4, dtype=torch.float64))
    report = gradfd.check(_doubling("alone"), x, raise_on_failure=False, check_undefined_grad=True)
    assert not report.passed
    assert all("with output 0's gradient undefined, the others zero" in t.undefined_grad for t in report.tensors)


def test_check_takes_the_undefined_gradient_check_as_an_option_and_blames_the_right_input(seed):
    x, y = _leaf(torch.randn(4, dtype=torch.float64), torch.randn(3, dtype=torch.float64))
    f = lambda x, y: (_doubling("ones")(x), torch.sin(y))  # noqa: E731
    report = gradfd.check(f, (x, y), raise_on_failure=False)
    assert report.passed and all(t.undefined_grad is None and "undefined_grad" not in t.details
                                 for t in report.tensors)
    report = gradfd.check(f, (x, y), raise_on_failure=False, check_undefined_grad=True)
    assert not report.passed
    for t in report.tensors:  # the records of x fail, those of y pass
        assert (t.undefined_grad is not None) == t.name.endswith("wrt params[0]"), t.name
    assert "undefined output gradients:" in str(report)
    assert report.to_dict()["tensors"][0]["undefined_grad"]
    good = gradfd.check(_doubling("zeros"), (x,), check_undefined_grad=True)
    assert all(t.details["undefined_grad"] == "passed" for t in good.tensors)
    with pytest.raises(TypeError, match="check_undefined_grad must be a bool, got str"):
        gradfd.check(torch.sin, (x,), check_undefined_grad="yes")


def test_check_module_names_the_parameter_in_the_undefined_gradient_finding(seed):
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))

        def forward(self, x):
            return (_doubling("ones")(self.weight) * x).sum()

    net = Scaled()
    report = gradfd.check_module(net, torch.randn(3, dtype=torch.float64), check_undefined_grad=True,
                                 raise_on_failure=False)
    t = report["weight"]
    assert not t.passed and "gave weight a nonzero gradient" in t.undefined_grad and "params[" not in str(report)


# ---- torch's other options and bad input -------------------------------------------------------------------------

def test_check_backward_ad_false_is_refused_as_torch_refuses_it(seed):
    x = _leaf(torch.randn(3, dtype=torch.float64))
    snap = snapshot(x)
    with pytest.raises(AssertionError, match="check_forward_ad or check_backward_ad"):
        torch.autograd.gradcheck(torch.sin, x, check_backward_ad=False)
    with pytest.raises(AssertionError, match="check_forward_ad or check_backward_ad"):
        gradfd.gradcheck(torch.sin, x, check_backward_ad=False)
    # forward AD alone is torch's forward-only check: performed, and it passes for sin in both
    assert torch.autograd.gradcheck(torch.sin, x, check_backward_ad=False, check_forward_ad=True)
    assert gradfd.gradcheck(torch.sin, x, check_backward_ad=False, check_forward_ad=True) is True
    with pytest.raises(AssertionError, match="check_batched_grad=True requires check_backward_ad"):
        gradfd.gradcheck(torch.sin, x, check_backward_ad=False, check_forward_ad=True, check_batched_grad=True)
    assert gradfd.gradcheck(torch.sin, x, masked=False, check_undefined_grad=False) is True
    assert_unchanged(x, snap)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"check_undefined_grad": "no"}, TypeError, "check_undefined_grad must be a bool, got str"),
    ({"check_backward_ad": 1.0}, TypeError, "check_backward_ad must be a bool"),
    ({"fast_mode": None}, TypeError, "fast_mode must be a bool"),
    ({"raise_exception": "yes"}, TypeError, "raise_exception must be a bool"),
    ({"masked": "dense"}, TypeError, "masked must be a bool or None"),
    ({"masked": True}, NotImplementedError, "masked=True"),
    ({"check_grad_dtypes": "yes"}, TypeError, "check_grad_dtypes must be a bool"),
    ({"frobnicate": True}, TypeError, "unexpected keyword argument 'frobnicate'"),
    ({"eps": 0.0}, ValueError, "eps must be a positive finite float"),
    ({"eps": "1e-6"}, TypeError, "eps must be a positive finite float"),
    ({"nondet_tol": -1.0}, ValueError, "nondet_tol must be a finite float >= 0"),
    ({"atol": float("nan")}, ValueError, "atol must be a finite float >= 0"),
])
def test_bad_options_name_the_argument(kwargs, error, match):
    x = _leaf(torch.randn(3, dtype=torch.float64))
    snap = snapshot(x)
    with pytest.raises(error, match=match):
        gradfd.gradcheck(torch.sin, x, **kwargs)
    assert_unchanged(x, snap)


@pytest.mark.parametrize("inputs, error, match", [
    (3, TypeError, "inputs must be a tensor or a tuple of tensors, got int"),
    ((torch.randn(3, dtype=torch.float64),), ValueError, "no tensor to check"),
    ((torch.randn(3, dtype=torch.float64, requires_grad=True), "x"), TypeError, r"params\[1\] must be a torch.Tensor"),
])
def test_bad_inputs_name_the_argument(inputs, error, match):
    with pytest.raises(error, match=match):
        gradfd.gradcheck(torch.sin, inputs)


def test_truthy_flags_keep_torchs_call_sites_working():
    # torch takes any truthy value for its flags (configs hand over 0/1 or numpy bools); so does the drop-in
    import numpy as np

    x = _leaf(torch.randn(6, dtype=torch.float64))
    assert gradfd.gradcheck(_sine(), x, fast_mode=np.bool_(False), raise_exception=1, check_undefined_grad=0) is True
    # check_undefined_grad=0 is False: the planted undefined-gradient bug is not looked for (as in torch)
    assert gradfd.gradcheck(_doubling("ones"), x, check_undefined_grad=0) is True
    assert torch.autograd.gradcheck(_doubling("ones"), x, check_undefined_grad=0) is True
