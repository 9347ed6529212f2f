"""gradfd.check: verdicts on correct and planted-wrong gradients, the report, and bad input."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from functions import FUNCTIONS
from helpers import ALL_DEVICES, assert_unchanged, snapshot

import gradfd
from gradfd.demo import bench
from gradfd.verdict import estimates as accuracy


# a planted bug in a custom backward: identity whose backward multiplies the gradient by ``scale``
planted = bench.plant


def _leaf(*tensors):
    return tuple(t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_correct_gradients_pass_without_tuning(seed, device, dtype, name):
    func, params, _ = FUNCTIONS[name](device, dtype)
    report = gradfd.check(func, _leaf(*params))
    assert report.passed, str(report)


@pytest.mark.parametrize("mode", ["sample", "directional"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_correct_gradients_pass_in_every_mode(seed, mode, dtype):
    func, params, _ = FUNCTIONS["mlp"]("cpu", dtype)
    report = gradfd.check(func, _leaf(*params), mode=mode, samples=16, directions=6)
    assert report.passed, str(report)


def _cubic(dtype):
    x = (torch.rand(12, dtype=torch.float64) - 0.5).to(dtype)
    return (lambda x: (x**3 + x**2).sum()), (x,)


def _mlp(dtype):
    X = torch.randn(16, 6, dtype=torch.float64).to(dtype)
    Y = torch.randn(16, 2, dtype=torch.float64).to(dtype)
    W1 = (torch.randn(6, 5, dtype=torch.float64) / 2.5).to(dtype)
    W2 = (torch.randn(5, 2, dtype=torch.float64) / 2.2).to(dtype)
    return (lambda W1, W2: ((torch.tanh(X @ W1) @ W2 - Y) ** 2).mean()), (W1, W2)


def _flags_a_planted_1e_3_error(build, k, dtype) -> bool:
    """Plant a 1e-3 relative error on the largest-gradient entry; True when exactly that entry disagrees."""
    func, params = build(dtype)
    q = _leaf(*params)
    (g,) = torch.autograd.grad(func(*q), [q[k]])
    i = int(g.abs().argmax())  # a relative error needs an entry whose gradient is not negligible
    scale = torch.ones(params[k].numel(), dtype=dtype)
    scale[i] = 1 + 1e-3
    report = gradfd.check(planted(func, k, scale.reshape(params[k].shape)), _leaf(*params), wrt=k,
                          raise_on_failure=False)
    t = report.tensors[0]
    where = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), params[k].shape))
    return not report.passed and t.disagreeing() == [where] and t.worst_index == where


CASES = [(_cubic, 0), (_mlp, 0), (_mlp, 1)]
CASE_IDS = ["cubic", "mlp-W1", "mlp-W2"]


@pytest.mark.parametrize("build,k", CASES, ids=CASE_IDS)
def test_a_single_entry_off_by_1e_3_is_flagged_and_located_in_float64(seed, build, k):
    assert _flags_a_planted_1e_3_error(build, k, torch.float64)


@pytest.mark.parametrize("build,k", CASES, ids=CASE_IDS)
def test_a_single_entry_off_by_1e_3_is_flagged_and_located_in_float32(seed, build, k):
    # In float32 a 1e-3 error is only ~5 to 20 standard deviations of the loss's rounding noise on these losses:
    # detection is statistical (measured ~98%, docs/benchmarks.md), so this asserts the rate on 10 fresh draws.
    flagged = sum(_flags_a_planted_1e_3_error(build, k, torch.float32) for _ in range(10))
    assert flagged >= 8, f"flagged {flagged} of 10"


def test_an_error_inside_a_generous_truncation_estimate_gets_a_second_look(seed):
    # sin(2x) in float32: at the automatic step the 4-point stencil's error estimate (the central difference's
    # error) is ~7e-4 of the largest entry, so a planted 1e-3 error there agreed in 8 of 40 draws before agreeing
    # entries that use most of their tolerance were evaluated again at a 4x smaller step (40 of 40 caught since)
    func = lambda x: torch.sin(2 * x).sum()  # noqa: E731
    for _ in range(10):
        x = torch.randn(16)
        i = int(torch.cos(2 * x).abs().argmax())
        scale = torch.ones(16)
        scale[i] = 1 + 1e-3
        report = gradfd.check(planted(func, 0, scale), _leaf(x), raise_on_failure=False)
        assert not report.passed and report.tensors[0].disagreeing() == [(i,)]
        assert gradfd.check(func, _leaf(x)).passed


@pytest.mark.parametrize("mode", ["full", "sample", "directional"])
@pytest.mark.parametrize("bug", ["sign", "factor2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sign_errors_and_missing_factors_on_a_subset_are_flagged_in_every_mode(seed, mode, bug, dtype):
    func, params = _mlp(dtype)
    k = int(torch.randint(0, 2, ()))
    n = params[k].numel()
    subset = torch.randperm(n)[: max(1, int(torch.randint(1, n + 1, ())))]  # a random non-empty subset
    scale = torch.ones(n, dtype=dtype)
    scale[subset] = -1.0 if bug == "sign" else 0.5
    func_bad = planted(func, k, scale.reshape(params[k].shape))
    # the planted entries must matter: skip draws whose subset has (numerically) no gradient at all
    q = _leaf(*params)
    (g,) = torch.autograd.grad(func(*q), [q[k]])
    if g.reshape(-1)[subset].abs().max() < 1e-3 * g.abs().max():
        pytest.skip("the drawn subset has negligible gradient")
    with pytest.raises(gradfd.GradientCheckError) as err:
        gradfd.check(func_bad, _leaf(*params), mode=mode, samples=n, directions=8)
    report = err.value.report
    assert not report.tensors[k].passed
    if mode == "full":
        flagged = {int(torch.tensor(i) @ torch.tensor(params[k].stride())) for i in report.tensors[k].disagreeing(n)}
        assert flagged <= set(subset.tolist())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_directional_mode_keeps_per_entry_sensitivity_without_sqrt_n_inflation(seed, dtype):
    n = 4000
    x = (torch.rand(n, dtype=torch.float64) - 0.5).to(dtype)
    func = lambda x: (torch.sin(x) * x).sum()  # noqa: E731
    q = _leaf(x)
    (g,) = torch.autograd.grad(func(*q), q)
    i = int(g.abs().argmax())
    scale = torch.ones(n, dtype=dtype)
    scale[i] = 1.5  # one entry of 4000 off by 50%, well within full mode's per-entry sensitivity
    report = gradfd.check(planted(func, 0, scale), _leaf(x), mode="directional", directions=8,
                          raise_on_failure=False)
    assert not report.passed, str(report)
    assert report.tensors[0].checked == 8 and report.tensors[0].total == n


def _sin_squared(x):
    return (torch.sin(x) ** 2).sum()


def test_directional_mode_in_float32_sees_a_one_percent_error_on_one_of_ten_thousand_entries(seed):
    # issue 20's bar: the step ladder resolves an entry's 1e-2 / sqrt(N) share of each directional derivative
    caught = 0
    for draw in range(3):
        x = torch.randn(10_000, generator=torch.Generator().manual_seed(seed + draw), dtype=torch.float64).float()
        scale = torch.ones_like(x)
        scale[torch.sin(2 * x.double()).abs().argmax()] = 1.01
        assert gradfd.check(_sin_squared, _leaf(x), mode="directional", seed=seed + draw).passed
        bad = gradfd.check(bench.plant(_sin_squared, 0, scale), _leaf(x), mode="directional", seed=seed + draw,
                           raise_on_failure=False)
        caught += not bad.passed
    assert caught >= 2


def test_directional_mode_does_not_fail_correct_relu_networks_in_float32(seed):
    # every direction of a ReLU MLP's weights crosses switches at most steps of the ladder: it judges below them
    # (or, where switches are at every step, agree-only: never failed)
    for draw in range(4):
        func, params = bench.relu_mlp(seed + draw)
        report = gradfd.check(func, _leaf(*(p.float() for p in params)), mode="directional", seed=seed + draw)
        assert report.passed and report.verified, str(report)  # verified: every tensor compared something


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_switch_at_the_point_is_unresolved_in_directional_mode(seed, dtype):
    # relu at exactly 0 in every direction: every rung's central difference is off by half the jump of slope, and
    # nothing can be compared (said so), not failed
    x = torch.randn(1000, dtype=dtype)
    x[::7] = 0
    report = gradfd.check(lambda x: torch.relu(x).sum() + _sin_squared(x), _leaf(x), mode="directional")
    t = report.tensors[0]
    assert report.passed and t.unresolved == t.checked and not report.verified


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ties_of_a_max_are_unresolved_in_directional_mode(dtype):
    # 500 tied pairs: autograd's choice of one tied input is neither one-sided derivative, and the jumps of slope
    # cancel in the second differences while the biases do not; the old single-step rule failed 13 and 16 of 40
    # such draws (float64, float32), the ladder none of 100 each (seeds 100-199); fixed draws here
    for draw in range(5):
        y = torch.randn(500, 1, generator=torch.Generator().manual_seed(draw), dtype=torch.float64)
        y = y.to(dtype).expand(-1, 2).contiguous()
        report = gradfd.check(lambda y: y.max(dim=1).values.pow(2).sum(), _leaf(y), mode="directional", seed=draw)
        assert report.passed and report.tensors[0].disagree == 0 and report.tensors[0].agree == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_zero_loss_at_the_point_is_still_judged_in_directional_mode(seed, dtype):
    # the noise scales with |f(x)|; at f(x) = 0 it is measured on the cotangent's own scale
    report = gradfd.check(lambda x: (x**2 + x**3).sum(), _leaf(torch.zeros(20, dtype=dtype)), mode="directional")
    assert report.passed and report.tensors[0].agree >= 6, str(report)
    if dtype == torch.float64:  # (float32's rounding grows with f(x + t v) ~ t^2 there: some directions agree-only)
        assert not any("agree-only" in n for n in report.tensors[0].details.get("notes", [])), str(report)


def test_a_func_that_raises_at_some_nodes_is_not_reraised_in_directional_mode(seed):
    # |x| at 0 has a kink at the point in every direction; the nodes beyond 1e-5 raise: the check reports, it does
    # not abort
    x0 = torch.zeros(50, dtype=torch.float64)

    def func(x):
        if (x - x0).abs().max() > 1e-5:
            raise RuntimeError("outside")
        return x.abs().sum()

    report = gradfd.check(func, _leaf(x0), mode="directional", batching="loop")
    assert report.passed and report.tensors[0].disagree == 0


def test_a_ladder_too_short_for_the_stencil_is_an_error_naming_the_policy():
    with pytest.raises(ValueError, match="policy: directional mode needs at least 5 rungs .* got 4"):
        gradfd.check(_sin_squared, _leaf(torch.randn(10, dtype=torch.float64)), mode="directional",
                     policy={"ladder_low": -1, "ladder_high": 2})


def test_directional_cost_does_not_grow_with_size(seed):
    calls = {"n": 0}

    def func(x):
        calls["n"] += 1
        return (x * x).sum()

    counts = []
    for n in (10, 10_000):
        calls["n"] = 0
        gradfd.check(func, _leaf(torch.randn(n, dtype=torch.float64)), mode="directional", directions=4, batching="loop")
        counts.append(calls["n"])
    rungs = gradfd.verdict.policy.DEFAULT_POLICY.ladder_high - gradfd.verdict.policy.DEFAULT_POLICY.ladder_low + 1
    assert counts[0] == counts[1] <= 4 * 2 * rungs + 4  # two nodes a rung and direction, the base point, the backward


def test_sample_mode_reports_how_many_were_checked_and_includes_the_largest(seed):
    w = torch.randn(50, 40, dtype=torch.float64)
    report = gradfd.check(lambda w: (w.pow(3)).sum(), _leaf(w), mode="sample", samples=64)
    t = report.tensors[0]
    assert (t.checked, t.total) == (64, 2000)
    assert "64/2000" in str(report)
    top = (3 * w.pow(2)).reshape(-1).abs().topk(16).indices
    assert set(top.tolist()) <= set(t.entries["index"].tolist())


def test_kinks_are_unresolved_and_do_not_fail(seed):
    x = torch.tensor([0.0, 1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    report = gradfd.check(lambda x: torch.relu(x).sum() + x.abs().sum(), _leaf(x))
    t = report.tensors[0]
    assert report.passed and t.unresolved == 2 and t.agree == 3
    assert t.entries["verdict"][[0, 4]].tolist() == [2, 2]


def test_the_noise_under_a_kinked_majority_is_the_bottom_cluster(seed):
    # fourth differences of 30% noise entries (|N(0, 1)|) and 70% kinked entries (100 to 1000x larger): the plain
    # median measures the kinks; noise_median measures the noise: the median of the noise entries (sigma clipping
    # may drop a few of their largest, which moves it down by a rank or two)
    noise = torch.randn(60, dtype=torch.float64).abs()
    kinks = 100 * 10 ** torch.rand(140, dtype=torch.float64)
    values = torch.cat([noise, kinks])[torch.randperm(200)]
    ranked = noise.sort().values
    assert float(values.median()) > 50
    assert float(ranked[26]) <= float(accuracy.noise_median(values)[0]) <= float(ranked[29])  # 29: the median
    # per segment: a kinked segment next to one of pure noise, which keeps its plain median
    quiet = torch.randn(64, dtype=torch.float64).abs() * 1e-3
    got = accuracy.noise_median(torch.cat([values, quiet]), torch.arange(2).repeat_interleave(torch.tensor([200, 64])), 2)
    assert float(ranked[26]) <= float(got[0]) <= float(ranked[29]) and float(got[1]) == float(quiet.median())


@pytest.mark.parametrize("case", ["gaussian", "smooth spread", "zeros", "few draws"])
def test_the_noise_of_one_population_is_its_plain_median(seed, case):
    if case == "gaussian":  # a clipped estimate in ~1 draw in 10^4 at 64 draws (simulated): here, never
        values = torch.randn(64, dtype=torch.float64).abs()
    elif case == "smooth spread":  # fourth differences of a smooth function, spread over two decades
        values = 10 ** (2 * torch.rand(64, dtype=torch.float64))
    elif case == "zeros":  # noise rounded to a few ulps: many exact zeros are no cluster of noise
        values = torch.cat([torch.zeros(20, dtype=torch.float64), 1 + torch.rand(44, dtype=torch.float64)])
    else:  # 7 draws: too few to look for a cluster
        values = torch.tensor([1e-3, 2e-3, 3e-3, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    plain = accuracy.segment_quantile(values, torch.zeros(values.numel(), dtype=torch.int64), 1, 0.5)
    assert torch.equal(accuracy.noise_median(values), plain)
    assert float(plain[0]) == float(values.sort().values[(values.numel() - 1) // 2])


def _relu_network(seed: int, n: int = 128, d: int = 16, k: int = 16, c: int = 4):
    """A float32 ReLU network's MSE loss, whose first-layer stencils mostly straddle a switch of one of the n samples
    at the automatic float32 steps."""
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.randn(n, d, generator=g), torch.randn(n, c, generator=g)
    params = (torch.randn(d, k, generator=g) / d**0.5, 0.1 * torch.randn(k, generator=g),
              torch.randn(k, c, generator=g) / k**0.5)
    return (lambda W1, b1, W2: ((torch.relu(X @ W1 + b1) @ W2 - Y) ** 2).mean()), params


def test_a_float32_relu_network_passes_though_most_stencils_straddle_a_switch(seed):
    # Kinks in most stencils carried the measured rounding noise ~100x above the rounding, which blinded the kink
    # tests: 9 of 100 draws of this network failed a correct gradient (14 of 20 with 256 samples, 64-32-10); 0 of
    # 100 (0 of 20) since the noise is measured on the bottom cluster of the fourth differences, or again at
    # 1/256 of the steps where that is far below
    for draw in range(3):
        func, params = _relu_network(seed + draw)
        report = gradfd.check(func, _leaf(*params))  # raises GradientCheckError with the report on failure
        assert all(t.unresolved <= 0.25 * t.checked for t in report.tensors), str(report)


def test_a_sign_error_in_a_float32_relu_network_is_located(seed):
    # the largest-gradient first-layer weight with its gradient's sign flipped: located in 46 of 50 draws (the
    # others unresolved: a switch inside every stencil down to 1/256 of the step); asserted on 20 fresh draws
    located = 0
    for draw in range(20):
        func, params = _relu_network(seed + draw)
        q = _leaf(*params)
        (g,) = torch.autograd.grad(func(*q), [q[0]])
        i = int(g.abs().argmax())
        scale = torch.ones(g.numel())
        scale[i] = -1.0
        report = gradfd.check(planted(func, 0, scale.reshape(g.shape)), _leaf(*params), wrt=0, raise_on_failure=False)
        located += not report.passed and report.tensors[0].disagreeing(1) == [tuple(divmod(i, g.shape[1]))]
    assert located >= 15, f"located {located} of 20"


def test_an_error_among_the_first_entries_is_found_in_float32(seed):
    # the engine evaluates a tensor's first 2 + 4 entries in its timing probe: chunks too small for a measured noise
    # median, once judged with the model noise (a 1e-3 error there was found in 5 of 20 draws; 18 of 20 since)
    # (>= 7 of 12: missed by chance at a rate of 0.9 once in ~2000 runs; reached at 0.25 once in ~70)
    found = 0
    for draw in range(12):
        func, params = bench.relu_mlp(torch.randint(1 << 30, ()).item(), act=torch.tanh)
        params = tuple(p.float().requires_grad_() for p in params)
        found += bench._caught(func, params, 0, torch.float32, among=6)
    assert found >= 7, f"found {found} of 12"


def test_nonfinite_at_every_step_is_unresolved_never_a_pass(seed):
    x = torch.tensor([2.0, 0.0, 3.0], dtype=torch.float64)  # sqrt is undefined at 0 - h for every h
    report = gradfd.check(lambda x: torch.sqrt(x).sum(), _leaf(x), h=1e-6, stencil="central")
    t = report.tensors[0]
    assert t.entries["verdict"].tolist() == [0, 2, 0] and report.passed
    assert math.isnan(float(t.entries["numerical"][1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_stencil_outside_the_domain_is_retried_at_smaller_steps_and_checked(seed, dtype):
    # log(x - 2h) is undefined for the small entries at the automatic steps (2^-5 in float32): they are retried at
    # smaller steps until the stencil is finite, and checked there -- to the dtype's accuracy, against 1/x exactly
    x = torch.cat([torch.rand(40, dtype=torch.float64) * 1e-4 + 1e-7, 1 + torch.rand(24, dtype=torch.float64)])
    x = x[torch.randperm(64)].to(dtype)
    report = gradfd.check(lambda x: torch.log(x).sum(), _leaf(x))
    t = report.tensors[0]
    assert report.passed and t.agree == 64, str(report)
    # every entry within its own tolerance of the exact derivative, and the median to the dtype's accuracy (the
    # worst of 40 entries near the edge reached 1.9e-4 in float32 on 6 of 200 draws: a max bound of 1e-4 was flaky)
    exact = 1 / x.double()[t.entries["index"]]
    err = (t.entries["numerical"] - exact).abs()
    assert bool((err <= t.entries["tolerance"]).all()), (err / t.entries["tolerance"]).max()
    assert (err / exact).median() < (1e-4 if dtype == torch.float32 else 1e-6), (err / exact).median()
    assert (err / exact).max() < (1e-3 if dtype == torch.float32 else 1e-5), (err / exact).max()
    assert any("outside its domain" in n for n in t.details["notes"]), t.details["notes"]
    # and errors planted on 8 small entries are found there, and nowhere else. (In float32 such an entry is judged
    # at steps where the rounding is ~1e-4 of the derivative, and a 1e-3 error on one entry went unseen in 4 of 200
    # draws -- the refined stencil's noise-level fourth difference "explains" it; over 200 draws of this test at
    # least 5 of the 8 were found in float32, 7 in float64, 8 in 178 and 197.)
    small = (x < 1e-3).nonzero().flatten()[:8]
    scale = torch.ones(64, dtype=dtype)
    scale[small] = 1 + 1e-3
    bad = gradfd.check(planted(lambda x: torch.log(x).sum(), 0, scale), _leaf(x), raise_on_failure=False)
    found = {i for (i,) in bad.tensors[0].disagreeing()}
    assert found <= set(small.tolist()) and len(found) >= (5 if dtype == torch.float32 else 7), str(bad)


@pytest.mark.parametrize("case", ["log", "normal"])
def test_entries_a_few_steps_from_a_domain_edge_are_judged_in_float64(seed, case):
    # float64 stencils that stay inside the domain but whose fourth difference is curvature far above the
    # rounding at every regular refinement step (log at x ~ 5e-4: 24/x^5): more rounds, while it falls like
    # curvature, until the stencil is clean -- so a planted error there is found, not left unresolved
    from torch.distributions import Normal

    data = torch.randn(100, dtype=torch.float64)
    funcs = {"log": lambda x: torch.log(x).sum(), "normal": lambda s: Normal(0.0, s).log_prob(data).sum()}
    func = funcs[case]
    # (8 entries near the edge among 24 farther away, whose fourth differences measure the rounding noise)
    edge = 3e-4 if case == "log" else 1e-3
    x = torch.cat([torch.rand(8, dtype=torch.float64) * 2e-3 + edge, torch.rand(24, dtype=torch.float64) * 0.1 + 0.02])
    x = x[torch.randperm(32)].view(32, 1)
    report = gradfd.check(func, _leaf(x))
    t = report.tensors[0]
    assert report.passed and t.agree == 32, str(report)
    small = int(x.argmin())
    scale = torch.ones(32, 1, dtype=torch.float64)
    scale[small] = 1 + 1e-3
    bad = gradfd.check(planted(func, 0, scale), _leaf(x), raise_on_failure=False)
    assert bad.tensors[0].disagreeing() == [(small, 0)], str(bad)


def _synthetic(kink_power: float, relative_error: float, ratios: dict | None = None):
    """An evaluator for gradfd.verdict.refine: one entry whose estimate is off by ``relative_error`` at every step,
    with a rounding estimate growing like the step divisor and a fourth difference (in derivative units) falling
    like ``factor ** -kink_power`` -- 3 for curvature (h^4 / h), 0 for a kink inside the stencil (h / h) -- or,
    where ``ratios`` is given, ``ratios[factor]`` rounding estimates (then the estimate is not disturbed by it)."""
    check_module = __import__("gradfd.check", fromlist=["_Entries"])
    calls = []

    def evaluator(index, factor):
        calls.append(factor)
        n = len(index)
        one = torch.ones(n, dtype=torch.float64)
        rounding = 1e-12 * factor * one
        if ratios is not None:
            kink, disturbance = ratios[factor] * rounding, 0.0
        else:
            # (the stencil straddles what the fourth difference sees: it disturbs the estimate by as much)
            kink = disturbance = 1e-2 * factor**-kink_power * one
        return check_module._Entries(index, (1 + relative_error) * one + disturbance, one, 2 * rounding, rounding,
                                     kink, torch.ones(n, dtype=torch.bool), 0 * one)

    return check_module, evaluator, calls


@pytest.mark.parametrize("kink_power, error, verdict, rounds", [
    (3.0, 1e-3, "disagree", 5),  # curvature: kink / rounding = 1e10 / factor^4, clean at 4^4, confirmed at 4^5
    (3.0, 0.0, "agree", 4),  # ... or agrees there
    (0.0, 1e-3, "unresolved", 3),  # a kink: its ratio falls 4-fold a round, no extra rounds
])
def test_refinement_goes_on_while_the_fourth_difference_falls_like_curvature(kink_power, error, verdict, rounds):
    C, evaluator, calls = _synthetic(kink_power, error)
    e = evaluator(torch.tensor([0]), 1.0)
    calls.clear()
    v, tol, nonsmooth = C._verdicts(e, torch.zeros(1, dtype=torch.float64))
    assert int(v[0]) == C.UNRESOLVED and bool(nonsmooth[0])
    e, v, tol, refined = C.refine(e, v, tol, nonsmooth, evaluator, lambda e: torch.zeros_like(e.numerical))
    names = {C.AGREE: "agree", C.DISAGREE: "disagree", C.UNRESOLVED: "unresolved"}
    assert names[int(v[0])] == verdict and calls == [4.0**r for r in range(1, rounds + 1)], (v, calls)


@pytest.mark.parametrize("retry_ratio, verdict, rounds", [
    (4.0, "disagree", 5),  # misses CLEAN_KINK (3) by noise: one more step, which confirms
    (8.0, "unresolved", 4),  # above KINK_NOISE_FACTOR (6): a kink, no more steps
])
def test_a_reproduction_that_misses_the_clean_bar_by_noise_gets_one_more_step(retry_ratio, verdict, rounds):
    # kinked (10 rounding estimates, not falling) at the first steps, clean and disagreeing at 4^3 (first seen
    # after a kinked step: the next must reproduce it), then the reproducing step's fourth difference is at 4^4
    ratios = {1.0: 10.0, 4.0: 10.0, 16.0: 10.0, 64.0: 0.0, 256.0: retry_ratio, 1024.0: 0.0}
    C, evaluator, calls = _synthetic(0.0, 1e-3, ratios)
    e = evaluator(torch.tensor([0]), 1.0)
    calls.clear()
    v, tol, nonsmooth = C._verdicts(e, torch.zeros(1, dtype=torch.float64))
    e, v, tol, refined = C.refine(e, v, tol, nonsmooth, evaluator, lambda e: torch.zeros_like(e.numerical))
    names = {C.AGREE: "agree", C.DISAGREE: "disagree", C.UNRESOLVED: "unresolved"}
    assert names[int(v[0])] == verdict and calls == [4.0**r for r in range(1, rounds + 1)], (v, calls)


def test_a_disagreement_that_needs_a_step_below_the_limit_is_unresolved():
    # kinked at the first two steps, clean and disagreeing at 4^2 (first seen after a kinked step: the next step
    # must reproduce it), and 4^3 is below the entry's smallest step (MIN_STEP_ULPS): it stays unreproduced
    C, evaluator, calls = _synthetic(0.0, 1e-3, {1.0: 10.0, 4.0: 10.0, 16.0: 0.0, 64.0: 0.0})
    e = evaluator(torch.tensor([0]), 1.0)
    calls.clear()
    v, tol, nonsmooth = C._verdicts(e, torch.zeros(1, dtype=torch.float64))
    e, v, tol, refined = C.refine(e, v, tol, nonsmooth, evaluator, lambda e: torch.zeros_like(e.numerical),
                                  limit=torch.tensor([16.0], dtype=torch.float64))
    assert int(v[0]) == C.UNRESOLVED and calls == [4.0, 16.0], (v, calls)
    # with the step allowed, it is reproduced there and fails
    C, evaluator, calls = _synthetic(0.0, 1e-3, {1.0: 10.0, 4.0: 10.0, 16.0: 0.0, 64.0: 0.0})
    e = evaluator(torch.tensor([0]), 1.0)
    v, tol, nonsmooth = C._verdicts(e, torch.zeros(1, dtype=torch.float64))
    e, v, tol, refined = C.refine(e, v, tol, nonsmooth, evaluator, lambda e: torch.zeros_like(e.numerical))
    assert int(v[0]) == C.DISAGREE


def _with_backward(forward, derivative):
    """``forward`` (elementwise) as an autograd Function whose backward is ``g * derivative(x)``: a hand-written
    backward, correct or with a planted error."""

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return forward(x)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * derivative(x)

    return Function.apply


def _tan(error: float = 0.0):
    """tan with its backward 1 / cos(x)**2 (computed in float64) off by the factor ``1 + error``."""
    return _with_backward(torch.tan, lambda x: (1 / torch.cos(x.double()).pow(2)).to(x.dtype) * (1 + error))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("distance", [1e-4, 1e-3, 0.03])
@pytest.mark.parametrize("kind", ["loss", "elementwise"])
def test_a_single_entry_whose_stencils_straddle_a_pole_is_measured_where_they_do_not(dtype, distance, kind):
    # tan at `distance` below its pole: the first float32 steps (2^-5 of the entry) straddle the pole, with finite
    # values on both sides (-1280 for 4e7 at 1.6e-4). A single entry measures its noise from its own fourth
    # difference, so that was "rounding" and the step "clean": a confirmed false failure (float32, every distance
    # up to 3e-3), or an agreement within an error estimate larger than the derivative (float64)
    x = torch.tensor([math.pi / 2 - distance], dtype=dtype, requires_grad=True)
    func = (lambda x: _tan()(x).sum()) if kind == "loss" else _tan()
    exact = 1 / math.cos(float(x.detach().double())) ** 2
    report = gradfd.check(func, (x,), raise_on_failure=False)
    t, d = report.tensors[0], report.to_dict()["tensors"][0]
    assert (t.agree, t.disagree, t.unresolved) == (1, 0, 0), report
    # measured at steps that no longer straddle it: the estimate bounds the error against the exact derivative
    assert abs(d["worst_numerical"] - exact) <= d["worst_error_estimate"] <= 0.1 * exact, report
    if distance >= 0.03:  # and a 1% error in the backward is found there
        wrong = _tan(1e-2)
        func = (lambda x: wrong(x).sum()) if kind == "loss" else wrong
        report = gradfd.check(func, (x,), raise_on_failure=False)
        assert report.tensors[0].disagree == 1, report


@pytest.mark.parametrize("kind", ["loss", "elementwise"])
def test_a_rounding_measured_across_a_pole_is_no_allowance_to_agree_within(kind):
    # 1/x at 1.9e-3 in float32: the first steps (2^-5 of max(1, x)) straddle the pole. At 1/16 of them the
    # stencil no longer does, but the rounding the first step measured (its fourth difference, across the pole),
    # scaled to the step, was 1.7e6 against a derivative of -2.8e5: the estimate -2.2e6 agreed within it
    x = torch.tensor([0.0019027443012939558], dtype=torch.float32, requires_grad=True)
    func = (lambda x: torch.reciprocal(x).sum()) if kind == "loss" else torch.reciprocal
    exact = -1 / float(x.detach().double()) ** 2
    report = gradfd.check(func, (x,), raise_on_failure=False)
    t, d = report.tensors[0], report.to_dict()["tensors"][0]
    assert (t.agree, t.disagree, t.unresolved) == (1, 0, 0), report
    assert abs(d["worst_numerical"] - exact) <= d["worst_error_estimate"] <= 1e-2 * abs(exact), report


def test_a_step_below_an_intermediates_resolution_is_no_verdict():
    # layer_norm of exp(0.3 x**2) over rows of 2, in float32: ill-conditioned (the rows' entries are close) and
    # the outputs are moved by one input each, so their noise is unmeasured and the entries are refined while
    # their fourth differences stay far above the model's; entry out[2, 2, 1] in[2, 2, 0] (x = 0.0714) agreed at
    # -6.26 at the first steps, and at 1/65536 of them exp(0.3 x**2) no longer moves: the estimate 0, exactly,
    # was judged against the model's rounding and failed. Found by the property test.
    x = torch.randn((2, 3, 6), generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    x = x.transpose(0, -1).requires_grad_()

    def func(x):
        return torch.nn.functional.layer_norm(torch.exp(0.3 * x * x), x.shape[-1:])

    for kwargs in ({}, {"batching": "vmap"}):  # by colors, and by exact columns
        report = gradfd.check(func, (x,), raise_on_failure=False, **kwargs)
        assert report.tensors[0].disagree == 0, report


# (w + 1000)**2 - 2000 w - 1e6 = w**2, computed with values near 1e6: the loss rounds to 1.2e-10 steps
_shifted_square = _with_backward(lambda w: (w + 1000) ** 2 - 2000 * w - 1e6, lambda w: 2 * w)


def test_a_fourth_difference_of_exactly_zero_measures_no_rounding():
    # a parameter of one entry has no median to measure its rounding: at a refined step its own fourth difference
    # bounds it. Here the five nodes' losses rounded so that it was exactly 0, which collapsed the rounding to the
    # model's (the float64 eps of |f| ~ 6.5, not of the terms ~ 1e6 it was computed from) and failed the correct
    # gradient 2w by 2.4e-7 (found by review)
    w = torch.tensor([2.5497893126064204], dtype=torch.float64)
    report = gradfd.check(lambda w: _shifted_square(w).sum(), _leaf(w), raise_on_failure=False)
    assert report.passed and report.tensors[0].agree == 1, report
    # and a planted error of 1e-4 is still found
    wrong = bench.plant(lambda w: _shifted_square(w).sum(), 0, torch.tensor([1 + 1e-4], dtype=torch.float64))
    report = gradfd.check(wrong, _leaf(w), raise_on_failure=False)
    assert report.tensors[0].disagree == 1, report


@pytest.mark.parametrize("planted", [0.0, 1e-3])
def test_a_fourth_difference_of_exactly_zero_near_a_pole_takes_another_step(planted):
    # float32 1/x at x = 0.03: the first stencil (steps of 2^-5) straddles the pole, the next ones see its
    # curvature, and at 1/64 of the step the fourth difference is exactly 0. The bound carried over from the step
    # before (curvature included, 1.7e-3 of the value) hid a 0.1% error; the next step measures its own rounding
    x = torch.tensor([0.029999180068487705])
    func = lambda x: torch.reciprocal(x).sum()  # noqa: E731
    if planted:
        func = bench.plant(func, 0, torch.tensor([1 + planted]))
    t = gradfd.check(func, _leaf(x), raise_on_failure=False).tensors[0]
    assert (t.agree, t.disagree, t.unresolved) == ((0, 1, 0) if planted else (1, 0, 0)), t


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_a_zero_slope_beside_a_kink_is_a_verdict_not_a_stalled_step(offset):
    # float32 ReLU at x = -1e-2: the first stencils (steps of 2^-7) straddle the kink and estimate a nonzero slope;
    # the smaller steps estimate 0, exactly, which is ReLU's slope there and no step below the output's
    # resolution: it is judged (both the correct 0 and a planted 1 were unresolved; found by review)
    relu = _with_backward(torch.relu, lambda x: (x > 0).to(x.dtype) + offset)  # (offset 0: correct)
    x = torch.tensor([-1e-2])
    t = gradfd.check(relu, _leaf(x), raise_on_failure=False).tensors[0]
    assert (t.agree, t.disagree, t.unresolved) == ((1, 0, 0) if offset == 0 else (0, 1, 0)), t


def _plant_on_largest(func, w: torch.Tensor, relative: float) -> tuple[tuple, list]:
    """``(index, disagreeing)``: the index of the largest-|gradient| entry of ``w``, and the entries a check
    flags when a ``relative`` error is planted there."""
    leaf = w.clone().requires_grad_()
    g, = torch.autograd.grad(func(leaf), leaf)
    i = int(g.abs().argmax())
    scale = torch.ones(w.numel(), dtype=w.dtype)
    scale[i] = 1 + relative
    bad = gradfd.check(planted(func, 0, scale.view_as(w)), _leaf(w), raise_on_failure=False).tensors[0]
    return tuple(int(v) for v in torch.unravel_index(torch.tensor(i), w.shape)), bad.disagreeing()


def _small_cnn(seed: int, pool: type = torch.nn.AvgPool2d):
    """A float32 CNN (conv-ReLU-pool-conv-ReLU-global average-linear) under cross-entropy, as ``(func, w)`` of its
    second conv weight: one entry moves every activation of its output channel (bench_kinks.py's families)."""
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), pool(2),
                            torch.nn.Conv2d(16, 16, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                            torch.nn.Flatten(), torch.nn.Linear(16, 10))
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    params = {n: p.detach() for n, p in m.named_parameters()}

    def func(w):
        return torch.nn.functional.cross_entropy(torch.func.functional_call(m, {**params, "3.weight": w}, (x,)), y)

    return func, params["3.weight"].clone()


def test_a_conv_net_whose_stencils_straddle_switches_is_not_failed():
    # several of the ReLU inputs a conv weight moves switch within every float32 step: the estimate of a correct
    # entry sits ~1% off at the first step and at the smaller ones (6 entries failed here before the rule on
    # switches near an entry); an error well above what they explain is still located, and there only
    func, w = _small_cnn(4)
    t = gradfd.check(func, _leaf(w)).tensors[0]
    assert t.passed and t.agree + t.unresolved == t.checked, str(t)
    assert t.details["switches"]["rule"] == "on", t.details  # (not isolated: many small switches)
    assert 0 < t.detection_limit < math.inf, str(t)  # (stated with the rule's allowance, and the RMS gradient)
    where, found = _plant_on_largest(func, w, 0.2)
    assert found == [where], (where, found)


@pytest.mark.parametrize("engine", ["structured", "batched"])
def test_the_rule_on_switches_holds_however_the_columns_are_chunked(engine):
    # the structured engine evaluates this conv weight in one chunk of 2304 columns, whose clipped median finds the
    # clean quarter of the stencils (the rounding); the generic engine's chunks of 16 measured the switches'. Most
    # stencils straddle switches either way: counted per stencil, the rule holds in both (3 entries failed under the
    # structured engine before; bench_kinks.py's max-pool CNN, seed 6005)
    func, w = _small_cnn(6005, torch.nn.MaxPool2d)
    t = gradfd.check(func, _leaf(w), engine=engine).tensors[0]
    assert t.passed and t.details["switches"]["rule"] == "on", str(t)
    assert (t.details["engine"] == "structured") == (engine == "structured"), t.details


def _bn_train_block_bias(seed: int):
    """A float32 ResNet basic block (conv-BN-ReLU-conv-BN + residual, ReLU; BatchNorm in train mode, 12-16 channels)
    under a mean square, as ``(func, b)`` of its first BatchNorm's bias: bench_kinks.py's family, drawn as it is."""
    g = torch.Generator().manual_seed(seed)
    c, n, s = (12, 16)[int(torch.randint(0, 2, (1,), generator=g))], *(int(torch.randint(lo, hi + 1, (1,), generator=g))
                                                                        for lo, hi in ((4, 6), (10, 13)))
    torch.manual_seed(seed)
    c1, c2 = (torch.nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(2))
    bns = [[torch.empty(c).uniform_(lo, hi) for lo, hi in ((-0.2, 0.2), (0.5, 1.5), (0.8, 1.2), (-0.1, 0.1))]
           for _ in range(2)]  # (running statistics, unused in train mode; weight; bias) of both BatchNorms
    x = torch.randn(n, c, s, s)
    bn = torch.nn.functional.batch_norm

    def func(b):
        h = torch.relu(bn(c1(x), None, None, bns[0][2], b, training=True))
        return torch.relu(x + bn(c2(h), None, None, bns[1][2], bns[1][3], training=True)).pow(2).mean()

    return func, bns[0][3]


@pytest.mark.parametrize("seed", [9002])
def test_a_small_tensor_whose_stencils_all_straddle_switches_is_not_failed(seed):
    # a BatchNorm bias moves every ReLU input of its channel (~500 here), several of which switch within every
    # float32 step: a correct entry's estimate sits 10-20% off at every step. The tensor's 12 columns come in chunks
    # of fewer than a reliable median (the timing probe's 2 and 4, then 6), which alone never measure a noise; their
    # fourth differences pooled do, and the rule on switches holds (a fresh ResNet draw failed here before)
    func, b = _bn_train_block_bias(seed)
    t = gradfd.check(func, _leaf(b)).tensors[0]
    assert t.passed, str(t)
    assert t.details["switches"]["rule"] == "on", t.details


@pytest.mark.parametrize("seed", [3, 5])
def test_a_relu_mlp_whose_switches_are_isolated_keeps_a_one_entry_error_found(seed):
    # most first-layer stencils of a 64-sample ReLU MLP straddle a switch in float32, but few and large ones (a
    # clean stencil holds none): the rule on switches stays off, and a 1e-3 error on the largest-gradient entry of W1
    # is located (its allowance hid it on these draws; the conv nets above keep the rule). Where the machine's float32
    # rounding states a limit above 1e-3 (seed 5 on an AMD EPYC: 0.0145 rms, the error 0.0046 rms), an error of twice
    # the limit is planted instead: what the report says it sees, it finds
    func, params = bench.relu_mlp(seed)
    W1, b1, W2 = (p.to(torch.float32) for p in params)
    t = gradfd.check(lambda w: func(w, b1, W2), _leaf(W1)).tensors[0]
    assert t.passed and t.details["switches"]["rule"] == "isolated", t.details
    assert any("isolated switches" in note for note in t.details["notes"]), t.details
    assert t.detection_limit < 0.05, str(t)  # (0.007 and 0.015 rms on an AMD EPYC)
    leaf = _leaf(W1)[0]
    g, = torch.autograd.grad(func(leaf, b1, W2), leaf)
    relative = max(1e-3, 2 * t.detection_limit * float(g.pow(2).mean().sqrt() / g.abs().max()))
    where, found = _plant_on_largest(lambda w: func(w, b1, W2), W1, relative)
    assert found == [where], (where, found, relative)


@pytest.mark.parametrize("case", ["exp(sin(5x)) float32", "sin(1000x) float64"])
def test_an_error_is_found_where_high_frequency_curvature_looks_like_switches(case):
    # at the first round's steps these are not small against the period: the fourth differences stand far above
    # the probe's and above their truncation spreads, as switches' do, but fall like curvature at the first refined
    # step, and the rule on switches stays off (a 100% error passed, its limit stated at 2-9 rms; found by review)
    funcs = {"exp(sin(5x)) float32": (lambda x: torch.exp(torch.sin(5 * x)).sum(), torch.float32),
             "sin(1000x) float64": (lambda x: torch.sin(1000 * x).sum(), torch.float64)}
    func, dtype = funcs[case]
    x = (torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 + 1).to(dtype)
    t = gradfd.check(func, _leaf(x)).tensors[0]
    assert t.passed and t.details.get("switches", {}).get("rule") != "on", str(t)
    # the rule's allowance left out of the limit (1-9 rms with it; without it, below 0.01 on an Intel Xeon and 0.052
    # on an AMD EPYC, whose float32 exp and sin round differently): the 5% error planted below is above it
    leaf = _leaf(x)[0]
    g, = torch.autograd.grad(func(leaf), leaf)
    assert t.detection_limit < 0.05 * float(g.abs().max() / g.pow(2).mean().sqrt()), str(t)
    where, found = _plant_on_largest(func, x, 0.05)
    assert found == [where], (where, found)


def test_a_float32_loss_that_moves_in_quanta_of_one_term_is_not_failed():
    # a classifier head whose features 2 and 4 are alive on one sample only, and small: a step of their weights
    # moves one sample's float32 cross-entropy, in quanta of its rounding, however finely float64 averages the
    # terms; the noise measured there (mostly exact zeros) was 1e-16, and 5 correct entries failed
    gen = torch.Generator().manual_seed(0)
    feats = (torch.randn(6, 16, generator=gen) * 0.05).relu()
    feats[:, :5] = 0
    feats[0, 2], feats[3, 4] = 1.3e-3, 1.5e-3
    y = torch.randint(0, 10, (6,), generator=gen)
    w = torch.randn(10, 16, generator=gen) * 0.25
    func = lambda w: torch.nn.functional.cross_entropy(feats @ w.T, y)  # noqa: E731
    t = gradfd.check(func, _leaf(w)).tensors[0]
    assert t.passed and t.agree == t.checked, str(t)
    where, found = _plant_on_largest(func, w, 0.01)
    assert found == [where], (where, found)


@pytest.mark.xfail(strict=True, reason="known false failure in float64, open (issue 20): refinement's smaller "
                   "steps fall below the resolution of an output computed as log(1 + tiny), and the rounding model "
                   "(eps * (|f| + terms)) does not see the O(1) intermediate")
@pytest.mark.parametrize("rows", [2, 4])
def test_refinement_below_the_resolution_of_a_quantised_output(rows):
    # log_softmax(x**4) along rows where one x**4 dominates: the outputs are -log(1 + s) with s down to 5.6e-13,
    # rounded on the grid of 1 + s. The first round agrees; refinement's smaller steps go below that grid, where
    # the node values move in quanta (rows=2: rounded symmetrically, an estimate of exactly 0; rows=4: a fourth
    # difference that collapses to 0 while the estimate sits a quantum off), and the rounding model, blind to the
    # O(1) intermediate, "reproduces" a disagreement. Found by tests/test_properties.py's hypothesis test.
    x = torch.randn((rows, 3, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64).transpose(0, -1)
    func = lambda x: torch.log_softmax((x * x) * (x * x), -1)  # noqa: E731
    t = gradfd.check(func, _leaf(x), raise_on_failure=False, batching="vmap").tensors[0]
    assert t.disagree == 0, t


def test_a_check_where_nothing_could_be_compared_says_so(seed):
    x = torch.zeros(3, dtype=torch.float64)  # sqrt(0 - h) for every entry and every step
    report = gradfd.check(lambda x: torch.sqrt(x).sum(), _leaf(x))
    t = report.tensors[0]
    assert report.passed and (t.agree, t.disagree, t.unresolved) == (0, 0, 3) and t.verdict == "UNRESOLVED"
    assert str(report).splitlines()[0].startswith("gradfd.check: PASSED (but nothing could be compared for params[0]")
    assert report.to_dict()["tensors"][0]["verdict"] == "UNRESOLVED"


@pytest.mark.parametrize("mode", ["full", "directional"])
def test_a_node_where_func_raises_is_outside_its_domain_not_an_abort(seed, mode):
    # torch.distributions validates scale > 0 and raises at scale - 2h for small scales (float32 steps are 2^-5)
    from torch.distributions import Normal

    data = torch.randn(100)
    scale = torch.rand(20, 1) * 0.05 + 1e-3
    func = lambda s: Normal(0.0, s).log_prob(data).sum()  # noqa: E731
    with warnings.catch_warnings():
        # (directional mode: its batched calls raise at a node and fall back to one call per point, saying so)
        warnings.simplefilter("ignore", gradfd.FallbackWarning)
        report = gradfd.check(func, _leaf(scale), mode=mode)
    t = report.tensors[0]
    assert report.passed and t.unresolved == 0 and t.agree == t.checked, str(report)
    assert any("func raised at" in n and "ValueError" in n for n in t.details["notes"]), t.details["notes"]
    # a wrong gradient is still found
    bad = gradfd.check(bench.plant(func, 0, torch.full_like(scale, 1.01)), _leaf(scale), mode=mode,
                       raise_on_failure=False)
    assert not bad.passed


def test_a_func_that_raises_at_every_perturbed_node_raises(seed):
    x0 = torch.randn(5, dtype=torch.float64)

    def func(x):
        if not torch.equal(x, x0):
            raise RuntimeError("cache miss: x changed")
        return (x**2).sum()

    params = _leaf(x0.clone())
    with pytest.raises(RuntimeError, match="cache miss") as info:
        gradfd.check(func, params)
    notes = [n for n in getattr(info.value, "__notes__", []) if n.startswith("gradfd: raised ")]
    assert len(notes) == 1 and "every perturbed node" in notes[0], notes
    assert torch.equal(params[0].detach(), x0) and params[0].grad is None


def test_a_tensor_func_does_not_depend_on_gets_zero_gradient_and_no_division_by_zero(seed):
    a, b = torch.randn(3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    report = gradfd.check(lambda a, b: (a**2).sum(), _leaf(a, b))
    t = report.tensors[1]
    assert report.passed and t.max_rel_error == 0.0 and t.max_abs_error == 0.0
    assert torch.equal(t.entries["analytical"], torch.zeros(2, dtype=torch.float64))


def test_float32_is_evaluated_in_float32_and_tf32_is_off_then_restored(seed):
    seen = {}

    def func(w):
        seen["dtype"] = w.dtype
        seen["tf32"] = torch.backends.cuda.matmul.allow_tf32
        seen["precision"] = torch.get_float32_matmul_precision()
        return (w @ w.t()).sum()

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    try:
        gradfd.check(func, _leaf(torch.randn(3, 3)))
        assert seen == {"dtype": torch.float32, "tf32": False, "precision": "highest"}
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")


def test_random_functions_check_against_the_same_draws(seed):
    x = torch.randn(30, dtype=torch.float64)
    state = torch.get_rng_state()
    report = gradfd.check(lambda x: torch.nn.functional.dropout(torch.sin(x), 0.3).sum(), _leaf(x))
    assert report.passed and torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("outcome", ["pass", "fail", "raise"])
def test_callers_tensors_and_grads_are_bitwise_unchanged(seed, outcome):
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    (w.sum() + b.sum()).backward()
    snap = snapshot([w, b])

    def func(w, b):
        if outcome == "raise" and not torch.is_grad_enabled():
            raise RuntimeError("boom")
        return ((w + b) ** 2).sum()

    if outcome == "fail":
        func_ = planted(func, 0, torch.full((4, 3), -1.0, dtype=torch.float64))
        with pytest.raises(gradfd.GradientCheckError):
            gradfd.check(func_, (w, b))
    elif outcome == "raise":
        with pytest.raises(RuntimeError, match="boom"):
            gradfd.check(func, (w, b))
    else:
        assert gradfd.check(func, (w, b)).passed
    assert_unchanged([w, b], snap)


# ---- the report --------------------------------------------------------------------------------------------------

def _failing_report():
    func, params = _mlp(torch.float64)
    scale = torch.ones(6, 5, dtype=torch.float64)
    scale[2, 3] = -1.0
    return gradfd.check(planted(func, 0, scale), _leaf(*params), raise_on_failure=False)


def test_report_table_labels_values_and_points_at_the_wrong_entry(seed):
    report = _failing_report()
    text = str(report)
    assert "FAILED" in text and "analytical" in text and "numerical" in text
    assert "actual" not in text and "desired" not in text
    assert "[2, 3]" in text and "params[0]: disagreeing entries (worst first): (2, 3)" in text
    t = report["params[0]"]
    assert t.worst_index == (2, 3) and t.disagree == 1 and t.agree == 29
    assert set(t.entries) == {"index", "numerical", "analytical", "error_estimate", "tolerance", "verdict"}
    assert all(v.shape == (30,) for v in t.entries.values())


def test_report_to_dict_is_json(seed):
    d = _failing_report().to_dict()
    text = json.dumps(d)
    assert d["passed"] is False and d["tensors"][0]["disagreeing"] == [[2, 3]]
    assert json.loads(text)["tensors"][1]["passed"] is True


def test_gradient_check_error_carries_the_report(seed):
    func, params = _mlp(torch.float64)
    with pytest.raises(gradfd.GradientCheckError) as err:
        gradfd.check(planted(func, 1, torch.full((5, 2), 2.0, dtype=torch.float64)), _leaf(*params))
    assert isinstance(err.value.report, gradfd.CheckReport) and "params[1]" in str(err.value)


def test_report_plot(seed, tmp_path):
    pytest.importorskip("matplotlib")
    fig = _failing_report().plot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 1000 and len(fig.axes) >= 2


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, seed):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install 'gradfd\[plot\]'"):
        _failing_report().plot()


# ---- the h sweep -------------------------------------------------------------------------------------------------

def test_step_sweep_is_v_shaped_and_plots(seed, tmp_path):
    pytest.importorskip("matplotlib")
    func, params = _mlp(torch.float64)
    sweep = gradfd.step_sweep(func, params, 0)
    assert sweep.hs.shape == sweep.central.shape == sweep.four_point.shape == (30,)
    h_best, err_best = sweep.best("central")
    assert 1e-8 < h_best < 1e-3 and err_best < 1e-8
    assert float(sweep.central[0]) > 100 * err_best and float(sweep.central[-1]) > 100 * err_best
    assert sweep.best("four_point")[1] < err_best
    sweep.plot(str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").stat().st_size > 1000


# ---- bad input ---------------------------------------------------------------------------------------------------

X = torch.randn(3, dtype=torch.float64, requires_grad=True)
IDX = torch.arange(3)

BAD = [
    ("wrt non-float", dict(params=(X, IDX), wrt=1), TypeError, r"wrt=1: params\[1\] must be a floating-point tensor"),
    ("wrt out of range", dict(wrt=3), IndexError, r"wrt entries must be in \[0, 2\)"),
    ("wrt junk", dict(wrt="all"), TypeError, "wrt must be an int or a tuple of ints"),
    ("wrt empty", dict(wrt=()), ValueError, "no tensor to check: wrt is empty"),
    ("nothing requires grad", dict(params=(X.detach(), IDX)), ValueError, "no tensor to check"),
    ("samples zero", dict(samples=0), ValueError, "samples must be a positive int, got 0"),
    ("directions negative", dict(directions=-2), ValueError, "directions must be a positive int, got -2"),
    ("unknown mode", dict(mode="quick"), ValueError, r"mode must be one of \['full', 'sample', 'directional'\]"),
    ("unknown stencil", dict(stencil="fivepoint"), ValueError, "stencil must be one of"),
    ("h too small", dict(h=1e-20), ValueError, "below the resolution of torch.float64.*h=None for gradfd's automatic"),
    ("negative atol", dict(atol=-1.0), ValueError, "atol must be a finite float >= 0"),
    ("nan rtol", dict(rtol=float("nan")), ValueError, "rtol must be a finite float >= 0"),
    ("seed float", dict(seed=1.5), TypeError, "seed must be an int"),
    ("non-tensor output", dict(func=lambda x, i: 3.0), TypeError, "func must return a tensor or a tuple of tensors"),
    ("no float output", dict(func=lambda x, i: (x > 0)), ValueError, "no floating-point output to compare"),
]


@pytest.mark.parametrize("name,override,exc,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_error(name, override, exc, message):
    args = dict(func=lambda x, i: (x**2).sum(), params=(X, IDX))
    args.update(override)
    snap = snapshot([X])
    with pytest.raises(exc, match=message):
        gradfd.check(args.pop("func"), args.pop("params"), **args)
    assert_unchanged([X], snap)


def test_a_long_check_warns_with_its_estimate(monkeypatch):
    """A check estimated (from its own measured rate) above COST_WARNING_SECONDS warns, naming the cheaper modes and
    their estimates; under -W error the warning stops the check and the caller's tensors are unchanged."""
    from gradfd import progress

    monkeypatch.setattr(progress, "MEASURE_SECONDS", 0.0)
    monkeypatch.setattr(progress, "COST_WARNING_SECONDS", 0.0)
    x = torch.randn(300, dtype=torch.float64)
    with pytest.warns(gradfd.CostWarning, match=r"full check of 300 coordinates is estimated to take .*"
                                                  r"mode='sample' about .*mode='directional' about"):
        gradfd.check(lambda x: x.sin().sum(), _leaf(x))
    before, rng = x.clone(), torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradfd.CostWarning)
        with pytest.raises(gradfd.CostWarning):  # a func that draws: the RNG is restored when the warning stops it
            gradfd.check(lambda x: (x.sin() * (1 + 0 * torch.rand(()))).sum(), (x.requires_grad_(),))
    assert torch.equal(x.detach(), before) and torch.equal(rng, torch.get_rng_state())
    with warnings.catch_warnings():  # a short check does not warn at the real thresholds
        monkeypatch.undo()
        warnings.simplefilter("error", gradfd.CostWarning)
        gradfd.check(lambda x: x.sin().sum(), _leaf(x))


def test_the_automatic_progress_bar_opens_only_for_a_long_check_on_a_terminal(monkeypatch):
    from gradfd import progress

    now = [0.0]
    opened = []
    monkeypatch.setattr(progress.Progress, "_open_bar", lambda self: opened.append(self.done))
    monkeypatch.setattr(progress.sys, "stderr", type("Tty", (), {"isatty": staticmethod(lambda: True)})())
    p = progress.Progress(None, total=1000, mode="full", cheaper={}, clock=lambda: now[0])
    now[0] = 30.0  # setup and autograd took 30 s: not part of the rate
    p.tick(10)  # the clock starts when the first chunk is done
    now[0] = 30.5
    p.tick(10)  # before MEASURE_SECONDS: no estimate yet
    now[0] = 32.0
    p.tick(80)  # 90 more in 2 s: 20 s left > BAR_SECONDS
    assert opened == [100]
    quick = progress.Progress(None, total=1000, mode="full", cheaper={}, clock=lambda: now[0])
    quick.tick(100)
    now[0] += 1.0
    quick.tick(800)  # 100 left at 800 per second
    assert opened == [100]
