"""Tensor-valued functions: Jacobian checks, the real custom op and its planted bug, batching strategies, the
gradcheck drop-in, the pytest helper, non-determinism and bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch.autograd.gradcheck import GradcheckError as TorchGradcheckError

import gradfd
from gradfd import custom_op, engine, jacobian, ops
from gradfd.demo import bench

needs_kernels = pytest.mark.skipif(not ops.kernels_available(), reason=f"no kernels: {ops.unavailable_reason()}")


def _leaf(*tensors):
    return tuple(t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors)


def _softmax_rows(x):
    return torch.softmax(1.5 * x, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["full", "sample", "directional"])
def test_tensor_valued_functions_pass_in_every_mode(seed, dtype, mode):
    x = torch.randn(6, 5, dtype=dtype)
    w = torch.randn(5, dtype=dtype)
    report = gradfd.check(lambda x, w: (_softmax_rows(x) * w, torch.tanh(x).sum(0)), _leaf(x, w), mode=mode,
                          samples=12, directions=6)
    assert report.passed, str(report)
    names = [t.name for t in report.tensors]
    if mode != "directional":
        assert names == ["output[0] wrt params[0]", "output[1] wrt params[0]", "output[0] wrt params[1]",
                         "output[1] wrt params[1]"]


def test_full_mode_compares_every_jacobian_entry_with_autograds(seed):
    x = torch.randn(4, 3, dtype=torch.float64)
    report = gradfd.check(_softmax_rows, _leaf(x))
    t = report.tensors[0]
    jac = torch.autograd.functional.jacobian(_softmax_rows, x).reshape(12, 12)  # (out, in)
    assert t.checked == t.total == 144 and t.output_shape == (4, 3)
    # entries["index"] = input_flat * n_out + output_flat
    i, o = t.entries["index"] // 12, t.entries["index"] % 12
    torch.testing.assert_close(t.entries["analytical"], jac[o, i], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(t.entries["numerical"], jac[o, i], rtol=1e-8, atol=1e-10)


class _Buggy(torch.autograd.Function):
    """Row-wise softmax whose backward is wrong for one (output, input) pair: the planted bug."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return _softmax_rows(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        gx = 1.5 * y * (grad - (grad * y).sum(-1, keepdim=True))
        gx[1, 2] = gx[1, 2] + 0.5 * grad[1, 0]  # d out[1, 0] / d in[1, 2] is off by 0.5
        return gx


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_worst_output_input_pair_is_reported_with_both_values(seed, dtype):
    x = torch.randn(3, 4, dtype=dtype)
    report = gradfd.check(_Buggy.apply, _leaf(x), raise_on_failure=False)
    t = report.tensors[0]
    assert not report.passed and t.disagree == 1, str(report)
    assert t.worst_index == ((1, 0), (1, 2)) and t.disagreeing() == [((1, 0), (1, 2))]
    jac = torch.autograd.functional.jacobian(_softmax_rows, x.double())
    assert abs(t.worst_numerical - float(jac[1, 0, 1, 2])) < 1e-3
    assert abs(t.worst_analytical - t.worst_numerical - 0.5) < 1e-3
    assert "out[1, 0] in[1, 2]" in str(report)


def test_integer_outputs_are_skipped_and_listed_and_unrelated_outputs_have_zero_gradient(seed):
    x, y = torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    report = gradfd.check(lambda x, y: (x * 2, x.argmax(), y.exp()), _leaf(x, y))
    assert report.passed and "skipped outputs without gradient: output[1] (int64)" in str(report)
    unrelated = report["output[2] wrt params[0]"]
    assert unrelated.agree == 15 and float(unrelated.entries["analytical"].abs().max()) == 0.0
    assert float(unrelated.entries["numerical"].abs().max()) == 0.0


def test_memory_never_grows_as_inputs_times_outputs(seed):
    n = 1500  # 2.25e6 Jacobian entries: neither the analytical nor the numerical Jacobian is held densely
    x = torch.randn(n, dtype=torch.float64)
    report = gradfd.check(lambda x: torch.sin(x) * 2, _leaf(x), memory_budget="4MB")
    t = report.tensors[0]
    assert report.passed and t.checked == n * n and t.agree == n * n
    assert t.entries["index"].numel() < n * n  # only statistics and the interesting entries are kept


@pytest.mark.parametrize("dim", [0, 1])
def test_masked_softmax_with_minus_inf_inputs_passes(seed, dim):
    x = torch.randn(5, 6, dtype=torch.float64)
    x[torch.rand(5, 6) < 0.3] = -math.inf
    x[0] = x[:, 0] = 0.5  # no row or column fully masked: every output finite
    report = gradfd.check(lambda x: torch.softmax(x, dim=dim), _leaf(x), raise_on_failure=False)
    t = report.tensors[0]
    masked = int(torch.isinf(x).sum())
    assert report.passed and t.disagree == 0 and t.agree + t.unresolved == t.total, str(report)
    # a masked input's derivatives are exactly zero: nothing moves, nothing is estimated
    assert t.unresolved <= masked * t.output_shape[0] * t.output_shape[1]


def test_a_nan_from_the_backward_fails_the_check_at_that_input(seed):
    x = torch.randn(40, dtype=torch.float64)
    _Elementwise.bug = "nan"
    try:
        report = gradfd.check(_Elementwise.apply, _leaf(x), raise_on_failure=False)
    finally:
        _Elementwise.bug = None
    t = report.tensors[0]
    assert not report.passed and t.disagree >= 1
    assert {inp for _, inp in t.disagreeing(100)} == {(3,)}


# OpInfo's matrix_exp sample (float64, seed 0): its 25 inputs take steps of four sizes, and the 4 columns at one of
# them measured each output's rounding noise at a quarter of what all 25 columns measure.
_EXPM_X = [[-4.826984902407649, -7.582430495695129, -0.6046891126565539, -1.5411692216498662, -1.9719097652168658],
           [-4.146041530864057, -5.4215280659972755, -4.784169829877467, -4.150805063878843, 7.380839390984031],
           [5.576059452216908, -8.315684908389088, 4.177597026003685, 2.047386382824099, -4.076012721760325],
           [-3.063683029231029, -3.342174545322517, -5.439777184204883, 4.480518929058965, 2.685009210157367],
           [-3.8432258180800494, -3.0355148286483775, -2.146076312776824, -2.6718482427688133, -7.7232222137058715]]


class _Expm(torch.autograd.Function):  # matrix_exp, with an optional relative error on one Jacobian entry
    planted = 0.0

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.linalg.matrix_exp(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xx = x.detach().requires_grad_()
            (gx,) = torch.autograd.grad(torch.linalg.matrix_exp(xx), xx, g)
        if _Expm.planted:  # d out[0, 3] / d in[0, 4] off by `planted`, relatively
            true = torch.autograd.functional.jacobian(torch.linalg.matrix_exp, x)[0, 3, 0, 4]
            gx = gx.clone()
            gx[0, 4] += _Expm.planted * true * g[0, 3]
        return gx


@pytest.mark.parametrize("planted", [0.0, 1e-7])
def test_noise_measured_on_a_few_columns_does_not_fail_a_correct_entry(planted):
    x = torch.tensor(_EXPM_X, dtype=torch.float64, requires_grad=True)
    _Expm.planted = planted
    try:
        report = gradfd.check(_Expm.apply, (x,), raise_on_failure=False)
    finally:
        _Expm.planted = 0.0
    t = report.tensors[0]
    if planted:  # sensitivity kept: a 1e-7 relative error (2.4e-6 absolute) on that entry still fails, there
        assert not report.passed and t.disagreeing(10) == [((0, 3), (0, 4))]
    else:  # the finite difference errs by 4.4e-9 there (autograd matches a complex-step derivative to 7e-13)
        assert report.passed, report


@pytest.mark.parametrize("softmax", [torch.softmax, torch.log_softmax])
def test_an_output_finer_than_its_input_is_judged_at_the_inputs_precision(seed, softmax):
    # softmax(x, dtype=torch.float64) of a float32 x: the outputs are float64, the Jacobian's entries that backward
    # returns are float32 (3.6e-8 off the float64 ones); judged with the float64 outputs' floor, and the few
    # outputs' rounding the float64 model gives, correct entries failed (OpInfo's softmax.with_dtype)
    x = torch.randn(5, dtype=torch.float64).float() * 3
    func = lambda t: softmax(t, 0, dtype=torch.float64)  # noqa: E731
    assert gradfd.check(func, _leaf(x)).passed
    # and an error of 1e-4 on the column that holds the largest entry (the floor is 64 float32 eps of that entry,
    # 7.6e-6 of it) is still found there; a column of entries 20 times smaller would be under that floor
    exact = torch.autograd.functional.jacobian(func, x.double())
    j = int(exact.abs().amax(0).argmax())
    scale = torch.ones(5)
    scale[j] = 1 + 1e-4
    report = gradfd.check(bench.plant(func, 0, scale), _leaf(x), raise_on_failure=False)
    assert not report.passed and all(pair[1] == (j,) for pair in report.tensors[0].disagreeing()), report


def test_a_colored_check_judged_in_blocks_judges_as_one(monkeypatch):
    # a colored pass judges its pattern's entries in blocks of _JUDGED_PAIRS (2^20) so that memory stays bounded;
    # the model's term sizes were added once per block and the floor's scale was the first block's largest entry:
    # both changed which entries were refined (tan(x) * x, 400 float32 entries in blocks of 16: 175 refined, not
    # 287) and how tightly (found by review)
    x = (torch.randn(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3).float()
    summaries = []
    for judged in (jacobian._JUDGED_PAIRS, 16):
        monkeypatch.setattr(jacobian, "_JUDGED_PAIRS", judged)
        t = gradfd.check(lambda t: torch.tan(t) * t, _leaf(x), raise_on_failure=False).tensors[0]
        assert t.details["engine"] == "colored"
        summaries.append((t.agree, t.disagree, t.unresolved, t.worst_index, t.max_abs_error, t.max_rel_error,
                          t.worst_error_estimate, t.details["refined"]))
    assert summaries[0] == summaries[1]


def test_an_elementwise_check_looks_again_only_at_entries_whose_estimates_are_loose(seed):
    # every output of an elementwise op is moved by one input: no median measures its rounding, and its kinks are
    # measured against the model's eps * (|f| + terms). gelu(x) * x rounds 6 to 50 times above that model in
    # float64, with error estimates of 5e-8: looking again at each such entry (18% of them) doubled the check's
    # time and told nothing new. The second look is for kinks far above the model (a pole's curvature).
    x = torch.randn(2000, dtype=torch.float64)
    report = gradfd.check(lambda t: torch.nn.functional.gelu(t) * t, _leaf(x))
    assert report.passed and report.tensors[0].details["refined"] <= 0.05 * x.numel(), report.tensors[0].details


@pytest.mark.parametrize("width,chain", [(2, ["square"]), (6, ["exp", "sigmoid"])])
def test_a_finite_difference_that_has_not_converged_is_unresolved_not_a_failure(seed, width, chain):
    # layer_norm of a constant row: its scale is sqrt(1e-5), below float32's steps; the 4-point estimates at
    # h, h/4, h/16 climb 37 -> 147 -> 468 towards the derivative 689 (width 2). Found by the property test.
    x = torch.randn(2, 1).expand(2, width).requires_grad_()
    ops = {"square": torch.square, "exp": torch.exp, "sigmoid": torch.sigmoid}

    def func(x):
        for name in chain:
            x = ops[name](x)
        return torch.nn.functional.layer_norm(x, (width,))

    for kwargs in ({}, {"batching": "vmap"}):  # by colors, and by exact columns
        report = gradfd.check(func, (x,), raise_on_failure=False, **kwargs)
        assert report.passed, report
        assert report.tensors[0].disagree == 0


@pytest.mark.parametrize("out_dtype", [torch.float16])  # (bfloat16's dtype floor, 64 eps, is 50%: see docs/verdicts.md)
def test_an_output_coarser_than_its_input_is_checked_at_steps_it_can_resolve(seed, out_dtype):
    class Cast(torch.autograd.Function):  # a cast whose backward scales by ``factor``
        factor = 1.0

        @staticmethod
        def forward(x):
            return x.to(out_dtype)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, grad):
            return grad.to(torch.float64) * Cast.factor

    x = torch.randn(20, dtype=torch.float64)
    assert gradfd.check(Cast.apply, _leaf(x)).passed
    Cast.factor = 1.5  # steps sized for float64 would not move the output: this passed vacuously before
    report = gradfd.check(Cast.apply, _leaf(x), raise_on_failure=False)
    t = report.tensors[0]
    assert not report.passed and sorted(o for o, _ in t.disagreeing(100)) == [(i,) for i in range(20)]


# ---- full mode by colors: a hypothesised pattern, verified on both sides ---------------------------------------

class _Elementwise(torch.autograd.Function):
    """sin(x) * x with a hand-written backward; ``bug`` plants one of four mistakes."""

    generate_vmap_rule = True
    bug = None

    @staticmethod
    def forward(x):
        return torch.sin(x) * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        gx = grad * (torch.cos(x) * x + torch.sin(x))
        if _Elementwise.bug == "one entry":
            gx[5] = gx[5] * (1 + 1e-3)
        elif _Elementwise.bug == "leak":  # input 3 also receives output 4's cotangent
            gx[3] = gx[3] + 0.25 * grad[4]
        elif _Elementwise.bug == "nan":
            gx[3] = math.nan
        return gx


def _missing_neighbour(x):  # depends on the next entry too; its backward (below) forgets that
    return _Elementwise.apply(x) + 0.5 * x.roll(-1).detach() ** 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("func,shapes,colors", [
    (lambda x: torch.sin(x) * x, [(40, 10)], 1),
    (_softmax_rows, [(40, 10)], 10),
    (lambda x, b: torch.tanh(x + b), [(40, 10), (10,)], 1),  # params[1] broadcasts: 40 output colors
])
def test_structured_jacobians_are_checked_by_colors_with_the_exact_verdict(seed, dtype, func, shapes, colors):
    args = _leaf(*(torch.randn(sh, dtype=dtype) for sh in shapes))
    before = snapshot(args)
    report = gradfd.check(func, args)
    exact = gradfd.check(func, args, chunk_size=64)  # an explicit chunk size asks for exact columns
    assert_unchanged(args, before)
    assert report.passed and exact.passed, str(report)
    t, e = report.tensors[0], exact.tensors[0]
    assert t.details["engine"] == "colored" and e.details["engine"] != "colored"
    assert f"{colors} input color(s)" in t.details["notes"][-1]
    assert (t.checked, t.agree) == (e.checked, e.agree) == (t.total, t.total)
    # every entry: the same analytical values (up to the rounding of weighted cotangents: a few ulps of the dtype),
    # numerical values within their tolerances
    torch.testing.assert_close(t.entries["index"], e.entries["index"])
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(t.entries["analytical"], e.entries["analytical"], rtol=16 * ulp, atol=16 * ulp)
    gap = (t.entries["numerical"] - t.entries["analytical"]).abs()
    assert bool((gap <= t.entries["tolerance"]).all())


@pytest.mark.parametrize("bug,func", [("one entry", _Elementwise.apply), ("leak", _Elementwise.apply),
                                      (None, _missing_neighbour)])
def test_colored_full_mode_catches_each_kind_of_backward_bug_and_points_at_it(seed, bug, func):
    x = torch.randn(64, dtype=torch.float64)
    _Elementwise.bug = bug
    try:
        report = gradfd.check(func, _leaf(x), raise_on_failure=False)
    finally:
        _Elementwise.bug = None
    t = report.tensors[0]
    assert not report.passed and t.details["engine"] != "colored", str(report)
    expected = {"one entry": [((5,), (5,))], "leak": [((4,), (3,))],
                None: [((j,), ((j + 1) % 64,)) for j in range(64)]}[bug]
    assert sorted(t.disagreeing(1000)) == sorted(expected)
    assert any(n.startswith("colored pass") for n in t.details["notes"]), t.details["notes"]


def test_functions_outside_the_hypothesised_patterns_fall_back_to_exact_columns(seed):
    x = torch.randn(64, dtype=torch.float64)
    report = gradfd.check(lambda x: torch.cumsum(x, 0), _leaf(x))
    t = report.tensors[0]
    assert report.passed and t.details["engine"] != "colored" and t.agree == 64 * 64
    assert t.details["notes"][0].startswith("colored pass: "), t.details["notes"]


# ---- the real custom op ------------------------------------------------------------------------------------------

@needs_kernels
def test_custom_op_forward_and_backward_match_the_reference(seed):
    x, b = torch.randn(7, 9, requires_grad=True), torch.randn(9, requires_grad=True)
    y = custom_op.bias_gelu(x, b)
    y_ref = custom_op.bias_gelu_reference(x, b)
    torch.testing.assert_close(y, y_ref)
    v = torch.randn_like(y)
    g = torch.autograd.grad((y * v).sum(), (x, b))
    g_ref = torch.autograd.grad((y_ref * v).sum(), (x, b))
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_custom_op_is_float32_only_with_a_clear_error():
    with pytest.raises(RuntimeError, match="gradfd::bias_gelu: x must be float32 .* got Double"):
        custom_op.bias_gelu(torch.randn(3, 2, dtype=torch.float64), torch.randn(2, dtype=torch.float64))


@needs_kernels
def test_custom_op_passes_in_float32_without_tolerance_tweaks_and_uses_stacking(seed):
    x, b = torch.randn(16, 8), torch.randn(8)
    report = gradfd.check(custom_op.bias_gelu, _leaf(x, b))
    assert report.passed, str(report)
    # (engine="auto" may time the loop as faster on a busy machine; the batched engine must pick stacking)
    report = gradfd.check(custom_op.bias_gelu, _leaf(x, b), engine="batched", wrt=0)
    assert report.tensors[0].details["batching"] == "stack"  # no vmap rule; rows are independent


@needs_kernels
@pytest.mark.parametrize("mode", ["full", "sample", "directional"])
def test_custom_op_with_a_planted_bug_fails_and_points_at_the_wrong_entries(seed, mode):
    x, b = torch.randn(16, 8), torch.randn(8)
    with pytest.raises(gradfd.GradientCheckError) as err:
        gradfd.check(custom_op.bias_gelu_buggy, _leaf(x, b), mode=mode, samples=64)
    report = err.value.report
    if mode == "full":
        t = report["output[0] wrt params[0]"]
        z = (x + b).reshape(-1)
        flagged = t.disagreeing(10_000)
        assert flagged and all(out == inp for out, inp in flagged)  # elementwise: the diagonal only
        assert all(float(z[int(torch.tensor(i) @ torch.tensor([8, 1]))]) < custom_op.BUGGY_BRANCH for _, i in flagged)


@needs_kernels
def test_torch_gradcheck_cannot_check_the_float32_only_op(seed):
    x, b = torch.randn(4, 3), torch.randn(3)
    with pytest.raises(RuntimeError, match="float32"):
        torch.autograd.gradcheck(custom_op.bias_gelu, _leaf(x.double(), b.double()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verdict = torch.autograd.gradcheck(custom_op.bias_gelu, _leaf(x, b), raise_exception=False)
    assert verdict is False  # a false verdict on a correct op: float32 with gradcheck's float64 step and tolerance


# ---- batching strategies -----------------------------------------------------------------------------------------

def test_stack_is_refused_with_a_warning_when_rows_are_not_independent(seed):
    x = torch.randn(5, 4, dtype=torch.float64)

    def mixes(x):  # normalises by a statistic of the whole input: stacking copies changes every row
        return x / x.std()

    with pytest.warns(engine.FallbackWarning, match="does not treat the leading dimension as independent rows"):
        report = gradfd.check(mixes, _leaf(x), batching="stack")
    assert report.passed


@pytest.mark.parametrize("batching", ["vmap", "stack", "loop"])
def test_each_batching_strategy_gives_the_same_verdict(seed, batching):
    x = torch.randn(6, 3, dtype=torch.float64)
    report = gradfd.check(_softmax_rows, _leaf(x), batching=batching, engine="loop" if batching == "loop" else
                          "batched")
    assert report.passed
    assert report.tensors[0].details["batching"] == (None if batching == "loop" else batching)


# ---- drop-in and helpers -----------------------------------------------------------------------------------------

def test_gradcheck_drop_in_mirrors_torch(seed):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert gradfd.gradcheck(_softmax_rows, (x,)) is True
    assert gradfd.gradcheck(_softmax_rows, x, fast_mode=True) is True
    assert gradfd.gradcheck(_Buggy.apply, (x,), raise_exception=False) is False
    with pytest.raises(TorchGradcheckError):
        gradfd.gradcheck(_Buggy.apply, (x,))
    with pytest.raises(gradfd.GradientCheckError):
        gradfd.gradcheck(_Buggy.apply, (x,))
    assert gradfd.gradcheck(_softmax_rows, (x,), check_forward_ad=True, check_batched_grad=True,
                            check_batched_forward_grad=True, check_grad_dtypes=True) is True
    with pytest.raises(TypeError, match="unexpected keyword argument 'frobnicate'"):
        gradfd.gradcheck(_softmax_rows, (x,), frobnicate=True)


def test_gradcheck_drop_in_checks_float32(seed):
    x = torch.randn(5, 4, requires_grad=True)
    assert gradfd.gradcheck(_softmax_rows, (x,))


def test_assert_gradients_match_fails_with_the_report_table(seed):
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    gradfd.testing.assert_gradients_match(_softmax_rows, (x,))
    with pytest.raises(AssertionError) as err:
        gradfd.testing.assert_gradients_match(_Buggy.apply, (x,))
    assert "gradfd.check: FAILED" in str(err.value) and "out[1, 0] in[1, 2]" in str(err.value)


class _Nondeterministic(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2 * (1 + 1e-15 * torch.rand_like(grad))  # like atomics: a slightly different sum every run


def test_nondeterministic_backward_is_reported_beyond_nondet_tol(seed):
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    report = gradfd.check(_Nondeterministic.apply, (x,), nondet_tol=1e-18, raise_on_failure=False, batching="loop")
    assert not report.passed and "not deterministic" in str(report)
    assert report.tensors[0].disagree == 0  # a few ulps: the gradient itself is right to within the tolerance
    assert gradfd.check(_Nondeterministic.apply, (x,), nondet_tol=1e-12, batching="loop").passed
    assert gradfd.check(lambda x: x * 2, (x,), nondet_tol=0.0).passed


# ---- bad input ---------------------------------------------------------------------------------------------------

X = torch.randn(4, dtype=torch.float64, requires_grad=True)

BAD = [
    ("different devices", dict(params=(X, torch.empty(4, device="meta"))), ValueError,
     r"params must all be on one device"),
    ("sparse input", dict(params=(X.detach().to_sparse().requires_grad_(),)), TypeError, "dense"),
    ("nested input", dict(params=(torch.nested.nested_tensor([X.detach(), X.detach()[:2]]),), wrt=0), TypeError,
     "dense"),
    ("mutating op", dict(func=lambda x: x.mul_(2)), (ValueError, RuntimeError), "in place|leaf Variable"),
    ("shape changes", dict(func=lambda x: x[x > 0], params=(torch.tensor([1e-6, 1.0, -1.0, 2.0], dtype=torch.float64,
                                                                         requires_grad=True),)),
     ValueError, "changed shape under perturbation"),
]


@pytest.mark.parametrize("name,override,exc,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_error(name, override, exc, message):
    args = dict(func=lambda *p: p[0] * 2, params=(X,))
    args.update(override)
    dense = [p for p in args["params"] if p.layout == torch.strided and not p.is_nested and p.device.type != "meta"]
    snap = snapshot(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", engine.FallbackWarning)
        with pytest.raises(exc, match=message):
            gradfd.check(args.pop("func"), args.pop("params"), **args)
    assert_unchanged(dense, snap)


@pytest.mark.parametrize("eng", ["loop", "batched"])
@pytest.mark.parametrize("view", ["view", "t", "row", "expand", "index"])
def test_outputs_that_are_views_of_the_input_are_compared_correctly(seed, eng, view):
    # the engine perturbs a private buffer in place: outputs aliasing it must be copied when they are produced
    func = {"view": lambda x: x.view(12), "t": lambda x: x.t(), "row": lambda x: x[1],
            "expand": lambda x: x.expand(2, 3, 4), "index": lambda x: x[0, 0]}[view]
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    report = gradfd.check(func, (x,), engine=eng, batching="loop" if eng == "loop" else "auto")
    assert report.passed and report.tensors[0].disagree == 0
    g = gradfd.numerical_gradient(lambda x: x[1, 2], (x.detach(),), 0, engine=eng)
    assert g[1, 2] == 1 and g.abs().sum() == 1
