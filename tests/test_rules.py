"""Every rule an op author writes (issue 23): forward-mode AD, the double backward (``order=2``,
``gradgradcheck``), undefined gradients, batched gradients and gradient dtypes. Each planted mistake of
:mod:`gradfd.demo.planted` is caught by the check of its rule, pointing at the right record, in float64 and float32;
its correct twin passes every check; torch's own checks catch the same mistakes in float64."""

from __future__ import annotations

import pytest
import torch

import gradfd
from gradfd.demo.planted import BUGS, OPTIONS, TORCH_MISSES, sin_mul
from helpers import DTYPES, assert_unchanged, snapshot

ALL_RULES = {"check_forward_ad": True, "check_undefined_grad": True, "check_batched_grad": True,
             "check_batched_forward_grad": True, "check_grad_dtypes": True}


def _inputs(seed: int, dtype: torch.dtype, shape=(3, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(2))


def _loss(bug):
    return lambda x, w: sin_mul(x, w, bug).sum()


def _records(report) -> dict:
    return {t.name: t for t in report.tensors}


# ---- each planted mistake, pointed at ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_a_wrong_jvp_for_one_input_fails_that_inputs_forward_records_only(seed, dtype):
    x, w = _inputs(seed, dtype)
    snap = snapshot((x, w))
    report = gradfd.check(lambda x, w: sin_mul(x, w, "jvp_one_input"), (x, w), check_forward_ad=True,
                          raise_on_failure=False)
    r = _records(report)
    assert r["output[0] wrt params[1] (forward AD)"].disagree > 0
    assert r["output[0] wrt params[1] (forward AD)"].details["ad"] == "forward"
    assert r["output[0] wrt params[0] (forward AD)"].passed  # x's term is right
    assert r["output[0] wrt params[0]"].passed and r["output[0] wrt params[1]"].passed  # the backward is right
    assert_unchanged((x, w), snap)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["full", "directional"])
def test_a_wrong_double_backward_fails_the_hessian_block_it_gets_wrong(seed, dtype, mode):
    x, w = _inputs(seed, dtype)
    report = gradfd.check(_loss("double_backward"), (x, w), order=2, mode=mode, raise_on_failure=False)
    r = _records(report)
    if mode == "full":  # the planted term is d(g_w)/dx: one block of the Hessian
        assert r["grad(params[1]) wrt params[0]"].disagree > 0
        assert all(t.passed for name, t in r.items() if name != "grad(params[1]) wrt params[0]")
        assert all(t.details["order"] == 2 for t in report.tensors)
    else:  # u^T H v over both gradients, per input
        assert r["grads wrt params[0] (u^T H v)"].disagree > 0
    assert gradfd.check(_loss(None), (x, w), order=2, mode=mode, raise_on_failure=False).passed


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_double_backward_lost_to_a_detach_is_compared_as_zero_and_fails_with_a_note(seed, dtype):
    x, w = _inputs(seed, dtype)
    report = gradfd.check(_loss("detached"), (x, w), order=2, raise_on_failure=False)
    for t in report.tensors:  # lost with respect to x and w; the output gradient was not detached
        assert t.disagree > 0 if t.name.endswith(("params[0]", "params[1]")) else t.passed
    with pytest.raises(gradfd.GradientCheckError, match=r"grad\(params\[0\]\) wrt params\[0\]"):
        gradfd.check(_loss("detached"), (x, w), order=2)


def _sin(backward=None, jvp=None):
    """``sin(x)`` with hand-written rules: ``backward(g, x)`` and ``jvp(t, x)``; a rule not given raises."""

    class Sin(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            ctx.save_for_forward(x)
            return x.sin()

        @staticmethod
        def backward(ctx, g):
            if backward is None:
                raise NotImplementedError
            (x,) = ctx.saved_tensors
            return backward(g, x)

        @staticmethod
        def jvp(ctx, t):
            if jvp is None:
                raise NotImplementedError
            (x,) = ctx.saved_tensors
            return jvp(t, x)

    return Sin.apply


def test_a_first_order_gradient_without_any_graph_is_compared_as_constant_with_a_note(seed):
    host = _sin(backward=lambda g, x: (g * x.cos()).detach())  # a backward computed off the graph (as through numpy)
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert gradfd.check(lambda x: host(x).sum(), (x,)).passed  # right at first order
    report = gradfd.check(lambda x: host(x).sum(), (x,), order=2, raise_on_failure=False)
    assert any("first-order gradient of params[0] has no autograd graph" in n for n in report.notes)
    assert all(t.disagree > 0 for t in report.tensors)  # wrt x (-sin) and wrt the output gradient (cos)


def test_a_function_linear_in_its_inputs_passes_order_2_with_zero_derivatives(seed):
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    report = gradfd.check(lambda x: (3 * x).sum(), (x,), order=2)
    assert report.passed and report.tensors[0].agree == 25


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_undefined_gradient_taken_as_ones_fails_every_input(seed, dtype):
    x, w = _inputs(seed, dtype)
    report = gradfd.check(lambda x, w: sin_mul(x, w, "undefined_as_ones"), (x, w), check_undefined_grad=True,
                          raise_on_failure=False)
    assert all(t.undefined_grad and "nonzero gradient" in t.undefined_grad for t in report.tensors)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_backward_that_cannot_run_under_vmap_is_a_batched_grad_finding(seed, dtype):
    x, w = _inputs(seed, dtype)
    f = lambda x, w: sin_mul(x, w, "backward_not_batchable")  # noqa: E731
    report = gradfd.check(f, (x, w), check_batched_grad=True, raise_on_failure=False)
    assert all(t.disagree == 0 for t in report.tensors)  # its values are right
    for t in report.tensors:
        assert "cannot run batched" in t.findings["batched_grad"] and "item" in t.findings["batched_grad"]
        assert not t.passed and t.verdict == "FAIL"
    assert "batched backward: the backward cannot run batched" in str(report)
    assert gradfd.check(f, (x, w)).passed  # without the option, nothing is said


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_jvp_that_cannot_run_under_vmap_is_a_batched_forward_finding(seed, dtype):
    x, w = _inputs(seed, dtype)
    report = gradfd.check(lambda x, w: sin_mul(x, w, "jvp_not_batchable"), (x, w), check_forward_ad=True,
                          check_batched_forward_grad=True, raise_on_failure=False)
    for name, t in _records(report).items():
        if name.endswith("(forward AD)"):
            assert t.disagree == 0 and "cannot run batched" in t.findings["batched_forward_grad"]
        else:  # the backward records are not the forward check's
            assert t.passed and "batched_forward_grad" not in t.details


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_undefined_tangent_taken_as_ones_fails_the_forward_records(seed, dtype):
    x, w = _inputs(seed, dtype)
    report = gradfd.check(lambda x, w: sin_mul(x, w, "undefined_tangent_as_ones"), (x, w), check_forward_ad=True,
                          check_undefined_grad=True, raise_on_failure=False)
    r = _records(report)
    assert "tangent undefined" in r["output[0] wrt params[1] (forward AD)"].undefined_grad
    assert "undefined tangents: with params[1]'s tangent undefined" in str(report)
    assert r["output[0] wrt params[0]"].undefined_grad is None  # the backward is right


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_tangent_in_another_dtype_is_a_grad_dtype_finding(seed, dtype):
    x, w = _inputs(seed, dtype)
    report = gradfd.check(lambda x, w: sin_mul(x, w, "jvp_wrong_dtype"), (x, w), check_forward_ad=True,
                          check_grad_dtypes=True, raise_on_failure=False)
    for name, t in _records(report).items():
        if name.endswith("(forward AD)"):
            assert "a tangent of dtype" in t.findings["grad_dtypes"] and not t.passed
        else:
            assert t.passed and t.details["grad_dtypes"] == "passed"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["full", "sample", "directional"])
def test_the_correct_op_passes_every_rule_in_every_mode(seed, dtype, mode):
    x, w = _inputs(seed, dtype)
    snap = snapshot((x, w))
    rng = torch.get_rng_state()
    for f in (_loss(None), lambda x, w: sin_mul(x, w)):
        for order in (1, 2):  # (order 2 with forward AD: forward over reverse)
            report = gradfd.check(f, (x, w), order=order, mode=mode, samples=5, raise_on_failure=False,
                                  **ALL_RULES)
            assert report.passed, str(report)
    assert_unchanged((x, w), snap)
    assert torch.equal(torch.get_rng_state(), rng)


def test_every_rule_replays_the_random_draws_of_a_stochastic_function_and_leaves_the_rng(seed):
    x = torch.randn(12, dtype=torch.float64, requires_grad=True)
    f = lambda x: torch.nn.functional.dropout(x.sin(), 0.5, training=True)  # noqa: E731
    snap = snapshot((x,))
    rng = torch.get_rng_state()
    unbatched = {k: v for k, v in ALL_RULES.items() if k != "check_batched_forward_grad"}
    assert gradfd.check(f, (x,), **unbatched).passed
    # vmap cannot batch random draws: torch's batched forward check raises, and gradfd's is a finding naming it
    report = gradfd.check(f, (x,), check_forward_ad=True, check_batched_forward_grad=True, raise_on_failure=False)
    assert "random operations" in report.tensors[-1].findings["batched_forward_grad"]
    assert gradfd.check(lambda x: f(x).pow(2).sum(), (x,), order=2).passed
    assert gradfd.gradgradcheck(f, (x,)) is True
    assert torch.equal(torch.get_rng_state(), rng)
    assert_unchanged((x,), snap)


# ---- the drop-ins, beside torch's -----------------------------------------------------------------------------------

def _dropin(lib, bug, x, w, fast_mode=False) -> bool:
    opts = dict(OPTIONS[bug])
    f = lambda x, w: sin_mul(x, w, bug)  # noqa: E731
    if opts.pop("gradgrad", False):
        return lib.gradgradcheck(f, (x, w), raise_exception=False, fast_mode=fast_mode, **opts)
    return lib.gradcheck(f, (x, w), raise_exception=False, fast_mode=fast_mode, **opts)


@pytest.mark.parametrize("bug", BUGS)
def test_each_planted_mistake_fails_torchs_check_and_gradfds_drop_ins(seed, bug):
    x, w = _inputs(seed, torch.float64)
    # torch catches it in float64 (but a tangent in another real dtype, which its check lets through) ...
    assert _dropin(torch.autograd, bug, x, w) is (bug in TORCH_MISSES)
    for dtype in DTYPES:  # ... and so does gradfd, in float64 and float32, in full and fast mode
        xd, wd = (t.detach().to(dtype).requires_grad_() for t in (x, w))
        assert _dropin(gradfd, bug, xd, wd) is False
        assert _dropin(gradfd, bug, xd, wd, fast_mode=True) is False


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_correct_op_passes_the_drop_ins_with_every_option(seed, dtype):
    x, w = _inputs(seed, dtype)
    f = lambda x, w: sin_mul(x, w)  # noqa: E731
    for fast_mode in (False, True):
        assert gradfd.gradcheck(f, (x, w), fast_mode=fast_mode, **ALL_RULES) is True
        assert gradfd.gradgradcheck(f, (x, w), fast_mode=fast_mode, check_batched_grad=True,
                                    check_fwd_over_rev=True, gen_non_contig_grad_outputs=True) is True
    if dtype == torch.float64:
        assert torch.autograd.gradgradcheck(f, (x, w), check_fwd_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("func", [torch.tanh, lambda x: torch.softmax(x, -1), lambda x: x.exp().cumsum(0),
                                  lambda x: (x.sin(), x * x)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradgradcheck_passes_builtin_ops_that_torch_passes(seed, func, dtype):
    x = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    snap = snapshot((x,))
    assert torch.autograd.gradgradcheck(func, (x.detach().double().requires_grad_(),))  # (draws from the global RNG)
    rng = torch.get_rng_state()
    assert gradfd.gradgradcheck(func, (x,), check_fwd_over_rev=True, gen_non_contig_grad_outputs=True) is True
    assert gradfd.gradcheck(func, (x,), check_forward_ad=True, check_batched_forward_grad=True) is True
    assert_unchanged((x,), snap)
    assert torch.equal(torch.get_rng_state(), rng)  # its own grad_outputs come from a seeded generator


def test_gradgradcheck_takes_given_grad_outputs_and_differentiates_them_when_they_require_grad(seed):
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, dtype=torch.float64)
    assert gradfd.gradgradcheck(torch.sin, (x,), (v,)) is True
    assert gradfd.gradgradcheck(torch.sin, (x,), v.clone().requires_grad_()) is True
    half = _sin(backward=lambda g, x: g.detach() * x.cos())  # right at first order; its derivative in g is lost
    with pytest.raises(gradfd.GradcheckError) as info:  # a wrong gradient with respect to the grad_output
        gradfd.gradgradcheck(half, (x,), torch.ones(4, dtype=torch.float64, requires_grad=True))
    assert "grad(params[0]) wrt grad_outputs[0]" in str(info.value)


# ---- forward mode details ------------------------------------------------------------------------------------------

def test_forward_ad_of_a_function_without_a_jvp_rule_raises_with_a_note(seed):
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.exp()

        @staticmethod
        def backward(ctx, g):
            return g

    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="jvp") as info:
        gradfd.check(NoJvp.apply, (x,), check_forward_ad=True)
    assert any("forward-mode AD" in n for n in getattr(info.value, "__notes__", []))


def test_forward_ad_replays_the_random_draws_of_a_stochastic_function(seed):
    x = torch.randn(20, dtype=torch.float64, requires_grad=True)
    rng = torch.get_rng_state()
    f = lambda x: torch.nn.functional.dropout(x.sin(), 0.5, training=True)  # noqa: E731
    report = gradfd.check(f, (x,), check_forward_ad=True, check_backward_ad=False)
    assert report.passed and report.tensors[0].agree > 0
    assert torch.equal(torch.get_rng_state(), rng)


def test_forward_ad_alone_checks_only_forward_mode(seed):
    x, w = _inputs(seed, torch.float64)
    report = gradfd.check(lambda x, w: sin_mul(x, w, "jvp_one_input"), (x, w), check_forward_ad=True,
                          check_backward_ad=False, raise_on_failure=False)
    assert [t.name for t in report.tensors] == ["output[0] wrt params[0] (forward AD)",
                                                "output[0] wrt params[1] (forward AD)"]
    assert not report.passed


def test_check_module_names_forward_and_second_order_records_by_parameter(seed):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    report = gradfd.check_module(lin, (x,), loss=lambda y: y.tanh().pow(2).sum(), check_forward_ad=True)
    assert {t.name for t in report.tensors} >= {"weight", "weight (forward AD)", "bias (forward AD)"}
    report = gradfd.check_module(lin, (x,), loss=lambda y: y.tanh().pow(2).sum(), order=2)
    assert "grad(weight) wrt bias" in {t.name for t in report.tensors}


# ---- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    ({"order": 3}, ValueError, "order must be 1 or 2, got 3"),
    ({"order": True}, ValueError, "order must be 1 or 2, got True"),
    ({"order": 2, "reference": torch.sin}, ValueError, "order=2 with reference is not supported"),
    ({"check_forward_ad": True, "reference": torch.sin}, ValueError, "check_forward_ad=True"),
    ({"check_backward_ad": False}, ValueError, "nothing to check"),
    ({"check_forward_ad": 1}, TypeError, "check_forward_ad must be a bool, got int"),
    ({"check_batched_grad": True, "check_backward_ad": False, "check_forward_ad": True}, ValueError,
     "check_batched_grad=True needs check_backward_ad=True"),
    ({"check_batched_forward_grad": True}, ValueError, "check_batched_forward_grad=True needs check_forward_ad"),
])
def test_bad_options_name_the_argument(kwargs, error, match):
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    snap = snapshot((x,))
    with pytest.raises(error, match=match):
        gradfd.check(torch.sin, (x,), **kwargs)
    assert_unchanged((x,), snap)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"check_fwd_over_rev": False, "check_rev_over_rev": False}, AssertionError, "check_fwd_over_rev"),
    ({"check_rev_over_rev": False, "check_fwd_over_rev": True}, AssertionError,
     "check_undefined_grad=True requires check_rev_over_rev"),
    ({"grad_outputs": (torch.ones(2),)}, ValueError, "grad_outputs must match func's differentiable outputs"),
    ({"grad_outputs": "ones"}, TypeError, "grad_outputs must be a tensor"),
    ({"gen_non_contig_grad_outputs": "yes"}, TypeError, "gen_non_contig_grad_outputs must be a bool"),
    ({"masked": True}, NotImplementedError, "masked=True"),
])
def test_gradgradcheck_bad_options_name_the_argument(kwargs, error, match):
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(error, match=match):
        gradfd.gradgradcheck(torch.sin, (x,), **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_mode_takes_colored_columns_and_still_locates_a_one_entry_jvp_error(seed, dtype):
    # an elementwise op: one jvp per input color gives every column the colored finite differences perturb
    x, w = _inputs(seed, dtype, shape=(20, 30))
    report = gradfd.check(lambda x, w: sin_mul(x, w), (x, w), check_forward_ad=True, check_backward_ad=False)
    assert all(t.details["engine"] == "colored" for t in report.tensors), [t.details for t in report.tensors]

    def one_entry(t, x):  # sin(x)'s jvp, 1% off on entry (3, 7)
        scale = torch.ones_like(x)
        scale[3, 7] = 1.01
        return t * x.cos() * scale

    report = gradfd.check(_sin(jvp=one_entry), (x,), check_forward_ad=True, check_backward_ad=False,
                          raise_on_failure=False)
    t = report.tensors[0]
    assert t.disagree == 1 and t.disagreeing(1)[0] == ((3, 7), (3, 7))
    assert any("colored pass" in note for note in t.details.get("notes", [])), t.details  # refuted, then exact


@pytest.mark.parametrize("jvp", ["ignores the tangent", "rolls the tangent", "averages the tangent"])
def test_a_jvp_that_does_not_use_its_tangent_entry_by_entry_is_caught_through_colors(seed, jvp):
    # a one-color elementwise pattern: an all-ones tangent would hide these; the colored jvp's random weights do not
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    wrong = {"ignores the tangent": lambda t, x: x.cos(), "rolls the tangent": lambda t, x: x.cos() * t.roll(1, 1),
             "averages the tangent": lambda t, x: x.cos() * t.mean()}[jvp]

    sin = _sin(jvp=wrong)
    report = gradfd.check(sin, (x,), check_forward_ad=True, check_backward_ad=False, raise_on_failure=False)
    t = report.tensors[0]
    assert t.disagree > 0 and any("colored pass" in note for note in t.details.get("notes", [])), t.details
    assert gradfd.gradcheck(sin, (x,), check_forward_ad=True, check_backward_ad=False,
                            raise_exception=False) is False
