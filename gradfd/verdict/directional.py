"""Directional mode: random directions of one input, ``d/dt uᵀf(x + t v)`` at ``t = 0`` against ``(uᵀJ) v``,
judged on a ladder of steps and summarised in one :class:`~gradfd.report.TensorReport`.

Rule (the step ladder). Each direction ``v`` (Gaussian, scaled entry-wise by the automatic steps, or by ``h``) is
evaluated at ``t = +-2^k`` for every ``k`` in ``[ladder_low, ladder_high]``: one central difference per rung. The
stencil's Richardson window slides along the rungs, so rung ``j`` has an extrapolant ``E_j`` (for the 4-point
stencil, ``(4 D(2^j) - D(2^(j+1))) / 3``), and the analytical side gets the same extrapolation of the realised
displacement (exact, so the nodes' rounding does not enter); ``E_j - A_j`` is rung ``j``'s miss. Per direction:

- **Noise** of one value (:func:`_noise`): rung-to-rung differences of the misses on the lowest rungs, where
  truncation has fallen by ``2^(4 ladder_low)`` against the automatic step and rounding is all that is left; their
  median over directions (each scaled by its cotangent's weight), never below the rounding floor of the loss
  (:func:`noise_floor`); the model ``eps * sum |u f|`` from fewer than ``reliable_median`` of them.
- **Truncation** of rung ``j``: ``|miss_j - miss_(j+1)| / (2^order - 1)``, the extrapolant's own error where the
  truncation has its order: 10-100 times below the 4-point spread it replaces.
- **Smooth below** (:func:`_smooth_below`): a rung is judged only where it and every rung below are smooth (no
  difference, fourth difference or drift of the misses that rounding or truncation does not explain).
- **The rung** judged is the smooth one with the least ``truncation + rounding``: large steps where the function is
  smooth (rounding falls as ``1/t``), small ones near switches and domain edges; ``ladder_margin`` lower where a
  switch stopped the ladder while that error still fell (:func:`_below_cut`).
- **Switches** (:func:`_switches`, :func:`_near_switches`): no rung within ``ladder_margin`` below one where the
  second differences show switches is judged (a switch next to the point biases every rung alike).
- **Verdict** (:func:`judge_ladder`): agree within ``floor + tolerance_safety * (truncation + rounding)``; disagree
  only where the neighbouring rung with the smaller error disagrees too, on the same side; unresolved otherwise. A
  direction with no rung judged is judged agree-only, within all the rungs moved by.
- **Retreat** (:func:`directional_report`): a direction with a non-finite node and too few rungs judged is
  evaluated again on a ladder shifted down.

This is what lets float32 see one wrong entry among 10^5: its derivative moves by about ``1e-2 / sqrt(N)`` of the
directional derivative, which the 4-point spread at the automatic step (and a noise inflated by curvature summed
over N entries) hid (benchmarks/bench_directional.py; docs/verdicts.md). What does not live here: the estimator of
the coordinate modes (:mod:`.estimates`), their refinement (:mod:`.refine`).
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass

import torch

from .. import distributed as _distributed
from .. import engine as _engine
from ..budget import DIRECTIONAL_NODE_COPIES
from .. import stencils
from ..errors import note
from ..jacobian import Analytical
from ..report import AGREE, DISAGREE, TINY, UNRESOLVED, TensorReport, relative_errors
from .detection import directional_limit
from .estimates import Entries, fourth_difference
from .judge import Judgement
from .policy import MEDIAN_ABS_NORMAL, MEDIAN_QUANTILE, SEEDS, Policy

__all__ = ["Directions", "Rungs", "DirectionalFloor", "judge_ladder", "directional_report"]


class DirectionalFloor:
    """The floor of directional mode's tolerances: ``atol + rtol * |analytical|`` per direction. ``rtol`` defaults
    to ``floor``; ``atol`` to ``floor * ||(uᵀJ) * v||_2`` (``spread``): an error of ``floor`` relative to every
    entry of the gradient, in independent signs, moves direction ``v`` by about that much."""

    def __init__(self, floor: float, atol: float | None, rtol: float | None, spread: torch.Tensor):
        self.atol = floor * spread if atol is None else torch.full_like(spread, atol)
        self.rtol = floor if rtol is None else rtol

    def __call__(self, analytical: torch.Tensor) -> torch.Tensor:
        return self.atol + self.rtol * analytical.abs()


@dataclass
class Rungs:
    """The ladder of every direction: ``(J, D)`` float64 per rung ``j`` (a window of the stencil's levels) and
    direction ``d``, rung ``j``'s smallest step ``2^(ladder_low + j)`` times the direction.

    Attributes:
        multiples: ``(J, D)`` the rungs' smallest step multiples.
        numerical, analytical: the extrapolants ``E_j`` and the analytical side's ``A_j``.
        truncation, rounding: the error estimate's parts (truncation inf where the rung is not judged).
        finite: bool, the rung is judged: every node of it and the next is finite, it has a next, and the rules of
            the module docstring allow it.
        noise: ``(D,)`` the noise of one value of each direction.
        complete: ``(D,)`` bool, every node of every rung is finite.
        spread: ``(D,)`` ``||(u_dᵀJ) * v_d||_2``, the scale of an error of every entry (:class:`DirectionalFloor`).
        fallback: the agree-only allowance of every rung whose nodes are finite (inf elsewhere): beyond their
            rounding, its difference to the next rung plus the largest difference to the rungs below, for directions
            with no rung judged (:func:`judge_ladder`).
    """

    multiples: torch.Tensor
    numerical: torch.Tensor
    analytical: torch.Tensor
    truncation: torch.Tensor
    rounding: torch.Tensor
    finite: torch.Tensor
    noise: torch.Tensor
    complete: torch.Tensor
    spread: torch.Tensor
    fallback: torch.Tensor

    @property
    def error(self) -> torch.Tensor:
        return torch.where(self.finite, self.truncation + self.rounding, math.inf)

    def put(self, where: torch.Tensor, other: "Rungs") -> None:
        """Overwrite the directions ``where`` (``(D,)`` bool) with ``other``'s (which holds just those)."""
        for f in dataclasses.fields(self):
            mine = getattr(self, f.name)
            if mine.dim() == 1:
                mine[where] = getattr(other, f.name)
            else:
                mine[:, where] = getattr(other, f.name)


_ROW = ("losses", "analytical", "finite")  # a direction's row (Directions._direction), the spread last


class Directions:
    """Evaluates random directions of one input on the step ladder (the module docstring): Gaussian input
    directions ``v`` scaled entry-wise by the per-entry steps and (for tensor-valued functions) Gaussian output
    cotangents ``u``; the nodes of as many directions as ``budget`` bytes hold go to ``func`` in one batched call,
    the analytical side costs one backward per direction. Called with direction numbers, returns :class:`Rungs`."""

    def __init__(self, func, params, k, analytical: Analytical, count, h, stencil, batching, seed, budget: int,
                 policy: Policy):
        self.func, self.params, self.k, self.stencil, self.batching = func, params, k, stencil, batching
        self.budget, self.policy = budget, policy
        self.scalar = analytical.scalar
        self.skip_outputs = analytical.nondifferentiable
        x = params[k].detach().reshape(-1)
        coarse = stencils.coarsest([x.dtype, *analytical.spec.dtypes])
        self.steps = (stencils.automatic_steps(x, stencil, dtype=coarse) if h is None
                      else torch.full(x.shape, h, dtype=torch.float64, device=x.device))
        rungs = policy.ladder_high - policy.ladder_low + 1
        need = len(stencil.multiples) + len(stencils.SWITCH_COMBINATION)  # a rung above the switches' three levels
        if rungs < need:
            raise ValueError(f"policy: directional mode needs at least {need} rungs for the "
                             f"{stencil.name} stencil (ladder_high - ladder_low + 1), got {rungs}")
        self.levels = torch.exp2(torch.arange(policy.ladder_low, policy.ladder_high + 1, dtype=torch.float64,
                                              device=x.device))  # (K,) the step multiples of the central differences
        self.seed = SEEDS.directions(seed, k)
        gen = torch.Generator().manual_seed(self.seed)
        size = analytical.spec.size
        self.u = torch.randn(count, size, generator=gen, dtype=torch.float64).to(x.device)
        if self.scalar:
            self.u = torch.ones(count, 1, dtype=torch.float64, device=x.device)
        self.analytical = analytical
        if analytical.forward:
            # forward mode has J v, not u_dᵀJ: the nodes' analytical values are jvps of their realised displacements,
            # and ||(u_dᵀJ) * v_d||_2 is estimated from jvps along v_d with random signs (its mean square)
            self.grads = None
            self.probes = torch.stack([self._probes(d) for d in range(count)])  # (D, M)
            self.spreads = self.probes.pow(2).mean(-1).sqrt()
        elif self.scalar:
            g = analytical.vjp(k, torch.ones(1, dtype=torch.float64, device=x.device))
            self.grads = g.expand(count, -1)
        else:
            self.grads = torch.stack([analytical.vjp(k, self.u[d]) for d in range(count)])  # (D, N): u_dᵀJ
        self.details: dict = {"directions": count}
        self.errors = _engine.NodeErrors()  # what func raised at perturbed nodes (NaN values: left out)

    def direction(self, d: int) -> torch.Tensor:
        """``(N,)`` float64 input direction ``d``: Gaussian, scaled entry-wise by the steps (drawn on demand, so that
        memory stays one direction at a time)."""
        gen = torch.Generator().manual_seed(self.seed + 1 + d)
        return torch.randn(self.steps.numel(), generator=gen, dtype=torch.float64).to(self.steps.device) * self.steps

    def _probes(self, d: int) -> torch.Tensor:
        """``(M,)`` ``u_dᵀJ (v_d * s_m)`` for ``M = Policy.forward_probes`` seeded random signs ``s_m``: the mean
        square is ``||(u_dᵀJ) * v_d||_2^2`` in expectation (forward mode)."""
        gen = torch.Generator().manual_seed(self.seed + 1 + d + SEEDS.stride)
        m = self.policy.forward_probes
        signs = torch.randint(0, 2, (m, self.steps.numel()), generator=gen).to(torch.float64) * 2 - 1
        return self.analytical.jvp(self.k, signs.to(self.steps.device) * self.direction(d)) @ self.u[d]

    def moves(self, shift: int) -> bool:
        """Whether the middle rung of the ladder, ``2^shift`` times smaller, still moves most entries by
        ``min_step_ulps`` ulps (the rungs below it may not: the realised displacement is what both sides compare)."""
        x = self.params[self.k].detach().reshape(-1).to(torch.float64)
        ulp = (x.abs() * stencils.eps(self.params[self.k].dtype)).clamp(min=torch.finfo(torch.float64).tiny)
        middle = self.levels[self.levels.numel() // 2] * 2.0 ** -shift * self.steps
        return bool((middle >= self.policy.min_step_ulps * ulp).double().mean() >= MEDIAN_QUANTILE)

    def _values(self, problem, which: list[int], levels: torch.Tensor):
        """``(S, D)`` cotangent-weighted outputs at the nodes ``+-levels`` (in ``(+m, -m)`` pairs), ``(S, D)`` the
        analytical side's ``<u_dᵀJ, realised displacement>``, ``(S, D)`` whether every output at a node is finite,
        the base outputs and ``(D,)`` each direction's ``||(u_dᵀJ) * v_d||_2``. In a distributed check the
        directions are dealt out over the ranks (:func:`gradfd.distributed.share_rows`: a direction's values depend on
        it alone)."""
        offsets = torch.stack([levels, -levels], 1).reshape(-1)  # (S,)
        S = len(offsets)
        device = self.steps.device
        # per direction: S losses, S analytical values, S finite flags and the spread, as one row
        out = torch.empty(len(which), len(_ROW) * S + 1, dtype=torch.float64, device=device)
        base_vec = problem.base_loss.to(torch.float64).reshape(-1)

        def fill(a: int, b: int) -> torch.Tensor:
            return torch.stack([self._direction(problem, which[c], offsets, base_vec)[0] for c in range(a, b)])

        # the first direction on every rank: its batching strategy is the one in the details
        out[0], self.details["batching"] = self._direction(problem, which[0], offsets, base_vec)
        if _distributed.sharing() is not None:
            _distributed.share_rows(out, problem.node_errors, [(c, c + 1) for c in range(1, len(which))], fill)
        elif len(which) > 1:
            out[1:] = fill(1, len(which))
        losses, ana, finite = out[:, :S].t(), out[:, S:2 * S].t(), out[:, 2 * S:-1].t() != 0
        return losses.contiguous(), ana.contiguous(), finite.contiguous(), base_vec, out[:, -1].clone()

    def _direction(self, problem, d: int, offsets: torch.Tensor, base_vec: torch.Tensor) -> tuple[torch.Tensor, str]:
        """Direction ``d``'s row of :meth:`_values` (``S`` losses, analytical values and finite flags, then the
        spread), and the batching strategy that evaluated it."""
        S = len(offsets)
        row = torch.empty(len(_ROW) * S + 1, dtype=torch.float64, device=self.steps.device)
        x = problem.flat
        x64 = x.to(torch.float64)
        # the nodes of one direction at a time, `per` of them per call: float64 staging (the points, their
        # displacement) plus the points and func's outputs, within the budget
        node_bytes = (DIRECTIONAL_NODE_COPIES * torch.float64.itemsize + x.element_size()) * x.numel() + (
            torch.float64.itemsize * base_vec.numel())
        per = max(1, min(S, self.budget // max(1, node_bytes)))
        v = self.direction(d)  # (N,)
        g = None if self.grads is None else self.grads[d]
        row[-1] = self.spreads[d] if g is None else (v * g).norm()
        if g is None:  # forward mode: one jvp of the direction (in the input's dtype), scaled by each offset
            v_in = v.to(x.dtype).to(torch.float64)
            along, at_zero = (self.analytical.jvp(self.k, torch.stack([v_in, torch.zeros_like(v_in)])) @ self.u[d]
                              ).tolist()
        for start in range(0, S, per):
            rows = slice(start, min(S, start + per))
            points = (x64 + offsets[rows].view(-1, 1) * v).to(x.dtype)  # (s, N)
            disp = points.to(torch.float64) - x64
            ana = row[S + start:S + rows.stop]
            if g is not None:
                ana[:] = disp @ g  # exact for the nodes
            else:  # plus the linear part of a jvp of what rounding the nodes added: a jvp rule that is not
                # linear (an offset: a tangent not multiplied in) stays in `along` alone, a miss on every rung
                ana[:] = offsets[rows] * along
                rest = disp - offsets[rows].view(-1, 1) * v_in
                moved = (rest != 0).any(dim=1).nonzero().flatten()
                if moved.numel():
                    ana[moved] += self.analytical.jvp(self.k, rest[moved]) @ self.u[d] - at_zero
            values, used = _engine.evaluate_points(problem, points, self.batching)
            values = values.reshape(points.shape[0], -1)  # (s, O)
            row[2 * S + start:2 * S + rows.stop] = torch.isfinite(values).all(-1).to(torch.float64)
            row[start:rows.stop] = values @ self.u[d]
        return row, used

    def __call__(self, which: list[int], shift: int = 0) -> Rungs:
        """The ladder of directions ``which``, every rung ``2^shift`` times smaller (a retreat)."""
        policy, stencil = self.policy, self.stencil
        levels = self.levels * 2.0 ** -shift
        problem = _engine.prepare(self.func, self.params, self.k, vector=not self.scalar,
                                  skip_outputs=self.skip_outputs, node_errors=self.errors)
        try:
            losses, ana, finite, base_vec, spread = self._values(problem, which, levels)
        finally:
            problem.rng.close()
        u = self.u[which]  # (D, O)
        m = levels.view(-1, 1).expand(-1, len(which))  # (K, D)
        central = (losses[0::2] - losses[1::2]) / (2 * m)
        central_ana = (ana[0::2] - ana[1::2]) / (2 * m)
        level_finite = finite[0::2] & finite[1::2] & torch.isfinite(central)
        w, K = len(stencil.multiples), m.shape[0]
        J = K - w + 1
        E = torch.stack([stencils.extrapolate(central[j:j + w], m[j:j + w])[0] for j in range(J)])  # (J, D)
        A = torch.stack([stencils.extrapolate(central_ana[j:j + w], m[j:j + w])[0] for j in range(J)])
        ok = torch.stack([level_finite[j:j + w].all(0) for j in range(J)]) & torch.isfinite(E)
        miss = torch.where(ok, E - A, math.nan)
        # the noise of one value, each direction's scaled by its cotangent's weight (|f| for a loss)
        weight = (u * (base_vec.abs() + base_vec.abs().mean())).norm(dim=-1) / 2  # (D,)
        weight = torch.where(weight > 0, weight, u.norm(dim=-1))  # f(x) = 0: the cotangent's own scale
        noise = _noise(miss, levels, weight, stencil, policy)
        noise = torch.maximum(noise, noise_floor(problem, base_vec, policy) * weight)
        if noise.isnan().any():  # fewer than reliable_median differences: the model eps * |f|
            model = output_eps(problem) * (u.abs() * base_vec.abs()).sum(-1)
            noise = torch.where(noise.isnan(), model, noise)
        rounding = policy.rounding_safety * noise * stencil.weight_norm / m[:J]  # (J, D)
        # the values less the analytical side's linear change (the nodes' rounding moves both alike)
        resid = losses - ana
        base = (u * base_vec).sum(-1)  # (D,)
        truncation, smooth, steady = _smooth_below(miss, resid, base, rounding, noise, stencil, policy)
        valid = smooth & steady & _below_cut(smooth, truncation + rounding, policy)
        valid = valid & ~_near_switches(_switches(resid, base, noise, J, w, policy), policy.ladder_margin)
        # the agree-only allowance: what the rungs moved the miss by beyond their rounding (to the next rung, and to
        # every rung below)
        pair_rounding = _pair_norm(stencil) / stencil.weight_norm * rounding  # (J, D): of E_j - E_l, l >= j
        beyond = ((miss.unsqueeze(0) - miss.unsqueeze(1)).abs() - pair_rounding.unsqueeze(0)).clamp(min=0.0)
        lower = torch.tril(torch.ones(J, J, dtype=torch.bool, device=miss.device), -1).unsqueeze(-1)  # [j, l]: l < j
        below = torch.where(lower, beyond.nan_to_num(0.0), 0.0).amax(1)  # (J, D)
        ahead = torch.cat([(truncation[:-1] * (2.0**stencil.order - 1) - pair_rounding[:-1]).clamp(min=0.0),
                           truncation[-1:]])  # the top rung's NaN stays
        fallback = torch.where(torch.isfinite(truncation), ahead + below, math.inf)
        return Rungs(m[:J].clone(), E, A, torch.where(valid, truncation, math.inf), rounding, valid, noise,
                     level_finite.all(0), spread, fallback)


def _noise(miss: torch.Tensor, levels: torch.Tensor, weight: torch.Tensor, stencil: stencils.Stencil,
           policy: Policy) -> torch.Tensor:
    """``(D,)`` the noise of one value.

    Rule: rung-to-rung differences of ``E - A``, in units of one value (their weights have norm ``_pair_norm /
    2^l``), are rounding only where truncation has not set in: on the lowest rungs (truncation fell by
    ``2^(4 ladder_low)`` there), and up the ladder while a rung's median over the directions stays within
    ``noise_rise`` of the lowest ``ladder_noise_rungs``' (rounding of tiny displacements is partly shared between
    nodes, so it rises a little before it settles). The noise is the median over those rungs and the directions,
    each direction's scaled by its cotangent's weight; NaN from fewer than ``reliable_median`` of them."""
    pair = (miss[:-1] - miss[1:]) * levels[:miss.shape[0] - 1].view(-1, 1)  # (J-1, D)
    scaled = pair.abs() / (_pair_norm(stencil) * weight.clamp(min=TINY))
    per_rung = scaled.nanmedian(1).values  # (J-1,)
    low = min(policy.ladder_noise_rungs, per_rung.numel())
    lowest = scaled[:low][torch.isfinite(scaled[:low])]
    flat = _all_below(per_rung <= policy.noise_rise * (float(lowest.median()) if lowest.numel() else math.nan))
    flat[:low] = True
    kept = scaled[flat]
    kept = kept[torch.isfinite(kept)]
    if kept.numel() < policy.reliable_median:
        return torch.full_like(weight, math.nan)
    return float(kept.median()) / MEDIAN_ABS_NORMAL * weight


def _smooth_below(miss, resid, base, rounding, noise, stencil: stencils.Stencil, policy: Policy):
    """``(truncation, smooth, steady)``, all ``(J, D)``: each rung's truncation ``|miss_j - miss_(j+1)| /
    (2^order - 1)`` (NaN at the top rung, which has no next); whether it and every rung below are smooth; whether its
    miss agrees with the rungs below (a rung that does not is left out, the rungs above it are not).

    Rule: a rung is smooth where its difference to the next rung is within `ladder_structure` x its rounding or
    rises as truncation does, its fourth difference likewise (curvature's rises 16-fold a level), and the weighted
    mean of the misses below agrees with its own within `ladder_drift` x `rounding_safety` sigmas, beyond its
    truncation (an error of the analytical side moves every rung alike; switches spread along the line move the
    larger steps more).
    Differences of ``E - A``: each rung's nodes round differently, which moves E and A alike."""
    J, w = miss.shape[0], len(stencil.multiples)
    gain = 2.0 ** stencil.order
    step = (miss[:-1] - miss[1:]).abs()  # (J-1, D), NaN where either rung is not finite
    pair_rounding = _pair_norm(stencil) / stencil.weight_norm * rounding  # (J, D): of E_j - E_(j+1)
    smooth_steps = (step <= policy.ladder_structure * pair_rounding[:-1]) | _falls(step, gain, policy.fall_slack)
    offsets = (1.0, -1.0, 2.0, -2.0)  # the rows of levels l and l + 1
    fourth = torch.stack([fourth_difference(resid[2 * l:2 * l + len(offsets)], base, offsets)
                          for l in range(resid.shape[0] // 2 - 1)]).abs()  # (K-1, D): nodes 2^l and 2^(l+1)
    fourth_rounding = policy.rounding_safety * noise * stencils.FOURTH_DIFFERENCE_NORM
    smooth_fourth = ((fourth <= policy.ladder_structure * fourth_rounding)
                     | _falls(fourth, stencils.FOURTH_DIFFERENCE_GROWTH, policy.fall_slack))
    truncation = torch.cat([step / (gain - 1), torch.full_like(step[:1], math.nan)])
    # drift: rung j's miss against the weighted mean of the misses below it (weights 1 / sigma^2: the nearest rungs
    # count most, and one outlier on a low rung little), beyond rung j's truncation, in sigmas of the difference
    sigma2 = (rounding / policy.rounding_safety) ** 2
    weights = torch.where(torch.isfinite(miss), 1 / sigma2.clamp(min=TINY), 0.0)
    total = torch.cumsum(weights, 0) - weights  # (J, D): over the rungs below
    mean = (torch.cumsum(weights * miss.nan_to_num(0.0), 0) - weights * miss.nan_to_num(0.0)) / total.clamp(min=TINY)
    spread = torch.sqrt(1 / total.clamp(min=TINY) + sigma2)
    drift = ((mean - miss).abs() - policy.tolerance_safety * truncation) / (policy.rounding_safety * spread)
    steady = (total == 0) | (drift.nan_to_num(math.inf) <= policy.ladder_drift)
    reach = max(w - 2, 0)  # rung j's nodes reach the fourth difference of level j + reach
    smooth = _all_below(smooth_steps) & _all_below(smooth_fourth)[reach:reach + J - 1] & torch.isfinite(step)
    smooth = torch.cat([smooth, torch.zeros_like(smooth[:1])])  # the top rung has no next
    return truncation, smooth, steady


def _below_cut(smooth: torch.Tensor, error: torch.Tensor, policy: Policy) -> torch.Tensor:
    """``(J, D)`` bool: the rungs a cut leaves, ``ladder_margin`` or more below it (every rung where there is none).

    Rule: where the smooth part of the ladder ends while its error still falls (the first rung that is not smooth
    would, by its estimate, beat the last one that is: a switch ended it, not the truncation), switches lie just
    beyond, and the rung judged is ``ladder_margin`` rungs lower (the chance that one lies within a rung's reach
    halves a rung)."""
    J = smooth.shape[0]
    first = torch.where(smooth[:-1].all(0), J - 1, (~smooth[:-1]).int().argmax(0))  # (D,) the first rung not smooth
    cols = torch.arange(first.numel(), device=first.device)
    last = torch.where(smooth, error, math.inf)[(first - 1).clamp(min=0), cols]
    cut = (first < J - 1) & (first > 0) & (error[first, cols].nan_to_num(math.inf) < last)
    cap = torch.where(cut, first - 1 - policy.ladder_margin, J)  # below 0: no rung
    return torch.arange(J, device=smooth.device).view(-1, 1) <= cap


def _switches(resid, base, noise, J: int, w: int, policy: Policy) -> torch.Tensor:
    """``(J, D)`` bool: switches show within rung ``j``'s reach.

    Rule: a switch at ``t0`` within ``[-s, s]`` biases the central difference at ``s`` by half the jump of slope
    ``J`` it causes, at every step that reaches it, and one at ``t0 ~ 0`` alike at every rung (no drift shows it).
    The second difference ``S(s) = f(s) + f(-s) - 2 f(0)`` carries it as ``J s`` against curvature's
    ``a s^2 + b s^4``: :data:`~gradfd.stencils.SWITCH_COMBINATION` of ``S(s), S(2s), S(4s)`` keeps ``J s``, which
    doubles a level where curvature's remainder grows 64-fold. It is read at ``S(2^w s), S(2^(w+1) s), S(2^(w+2) s)``
    for a rung of smallest step ``s`` and ``w`` levels, just beyond its reach (it grows with the step, the bias does
    not: it shows there first), and shows switches where it stands out of its rounding by ``ladder_structure`` and
    grows less than ``kink_growth``-fold from the level below."""
    second = resid[0::2] + resid[1::2] - 2 * base  # (K, D), in units of one value
    c0, c1, c2 = stencils.SWITCH_COMBINATION
    kinks = (c0 * second[:-2] + c1 * second[1:-1] + c2 * second[2:]).abs()  # (K-2, D): levels l, l+1, l+2
    kink_rounding = policy.rounding_safety * noise * stencils.SWITCH_NORM
    ahead = [min(j + w, kinks.shape[0] - 1) for j in range(J)]
    k2, k1 = kinks[ahead], kinks[[a - 1 for a in ahead]]
    return (k2 > policy.ladder_structure * kink_rounding) & (k2 <= policy.kink_growth * k1)


def _near_switches(seen: torch.Tensor, margin: int) -> torch.Tensor:
    """``(J, D)`` bool: switches show at some rung at most ``margin`` rungs above (or anywhere below).

    Rule: a rung judged lies ``ladder_margin`` rungs below every rung where switches show (the chance that one lies
    within a rung's reach halves a rung, and the bias of one next to the point, half its jump, stays while the
    tolerance doubles a rung down); a switch within a rung's reach is within every larger rung's."""
    J = seen.shape[0]
    any_below = _all_below(~seen).logical_not()  # switches show at this rung or one below
    return any_below[[min(j + margin, J - 1) for j in range(J)]]


def _columns(r: Rungs, keep: torch.Tensor) -> Rungs:
    """The directions ``keep`` (``(D,)`` bool) of ``r``."""
    return Rungs(*(getattr(r, f.name)[keep] if getattr(r, f.name).dim() == 1 else getattr(r, f.name)[:, keep]
                   for f in dataclasses.fields(r)))


def _pair_norm(stencil: stencils.Stencil) -> float:
    """The norm of the node weights of ``E_l - E_(l+1)`` (two neighbouring rungs' extrapolants) in units of
    ``1/2^l``: the noise of the difference for unit noise on each value."""
    w = stencil._level_weights()  # level i of rung l: step 2^(l+i) ... E_(l+1) shares all but its lowest
    m = stencil.multiples
    weights: dict[float, float] = {}
    for shift, sign in ((1, 1.0), (2, -1.0)):
        for wi, mi in zip(w, m):
            node = mi * shift
            weights[node] = weights.get(node, 0.0) + sign * wi / (2 * node)
    return math.sqrt(2 * sum(v * v for v in weights.values()))


def _falls(d: torch.Tensor, gain: float, slack: float, last: bool = False) -> torch.Tensor:
    """``(L, D)`` bool of ``(L, D)`` ``d``: the next row is ``gain`` times this one within ``slack`` (smooth
    truncation, rising with the step); the last row has no next: False, or with ``last`` its ratio to the row
    before."""
    ratio = d[1:] / d[:-1].clamp(min=TINY)
    falls = (ratio >= gain / slack) & (ratio <= gain * slack)
    return torch.cat([falls, falls[-1:] if last else torch.zeros_like(falls[:1])])


def _all_below(ok: torch.Tensor) -> torch.Tensor:
    """``(L, D)`` bool: every row up to and including this one holds."""
    return torch.cummin(ok.to(torch.int8), 0).values.bool()


def output_eps(problem) -> float:
    """The eps of the coarsest output dtype (a loss reduced in float64 still sums terms rounded in func's dtype)."""
    if problem.spec:
        return max(stencils.eps(dt) for dt in problem.spec.dtypes)
    return stencils.eps(problem.plain_base.dtype)


def noise_floor(problem, base_vec: torch.Tensor, policy: Policy) -> float:
    """The smallest noise of one value, relative to ``|f|``: the dtype's rounding of ``f`` over
    ``noise_floor_divisor``; for a loss reduced in float64, float64's rounding but never below one of its
    low-precision terms' (the rule of :func:`~.plan.evaluate_base`)."""
    plain = output_eps(problem) / policy.noise_floor_divisor
    if not problem.reduce64:
        return plain
    quantum = problem.reduction_quantum / policy.noise_floor_divisor
    relative = quantum / max(float(base_vec.abs().max()), torch.finfo(torch.float64).tiny)
    return min(max(relative, stencils.eps(torch.float64)), plain)


@dataclass
class Ladder:
    """The judged directions: the rung each is judged at and the neighbour that must confirm a disagreement."""

    entries: Entries
    judgement: Judgement
    allowance: torch.Tensor  # (D,) the shift each direction needs to be flagged (0: disagreeing; inf: never)
    chosen: torch.Tensor  # (D,) int64 rung judged
    agree_only: torch.Tensor  # (D,) bool: no rung judged, and agreeing agree-only


def judge_ladder(r: Rungs, floor: DirectionalFloor, index: torch.Tensor, policy: Policy) -> Ladder:
    """The verdict rule of the module docstring, and each direction's detection allowance: the smallest shift of
    the analytical side (an error, on the worse side of the discrepancy) that both the judged rung and its
    confirming neighbour would call a disagreement."""
    J, D = r.numerical.shape
    err = r.error
    cols = torch.arange(D, device=err.device)
    chosen = err.argmin(0)  # (D,)
    lower = torch.where(chosen > 0, err[(chosen - 1).clamp(min=0), cols], math.inf)
    upper = torch.where(chosen < J - 1, err[(chosen + 1).clamp(max=J - 1), cols], math.inf)
    neighbour = torch.where(lower <= upper, chosen - 1, chosen + 1).clamp(0, J - 1)
    finite = torch.isfinite(err[chosen, cols])
    confirmable = finite & torch.isfinite(torch.minimum(lower, upper))

    def at(t: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return t[j, cols]

    e = Entries(index, at(r.numerical, chosen), at(r.analytical, chosen), at(err, chosen), at(r.rounding, chosen),
                torch.zeros_like(err[0]), finite, None)  # (no kink measure: the rules above replace it)
    tol = floor(e.analytical) + policy.tolerance_safety * e.error
    tol_n = floor(at(r.analytical, neighbour)) + policy.tolerance_safety * at(err, neighbour)
    miss = e.numerical - e.analytical
    miss_n = at(r.numerical, neighbour) - at(r.analytical, neighbour)
    agree = finite & (miss.abs() <= tol)
    disagree = (confirmable & ~agree & (miss_n.abs() > tol_n) & (torch.sign(miss) == torch.sign(miss_n)))
    verdict = torch.full((D,), UNRESOLVED, dtype=torch.int8, device=err.device)
    verdict[agree] = AGREE
    verdict[disagree] = DISAGREE
    allowance = torch.where(confirmable, torch.maximum(tol + miss.abs(), tol_n + miss_n.abs()), math.inf)
    allowance = torch.where(disagree, 0.0, allowance)
    # Rule (agree-only): a direction with no rung judged (switches at every step, structure everywhere) agrees where
    # the rung of least fallback + rounding misses by less than the floor plus tolerance_safety times them -- its
    # difference to the next rung and to every rung below, all that the switches moved it by -- and is never failed
    # (no detection: its allowance stays inf); unresolved otherwise
    none = ~torch.isfinite(err).any(0)
    fb = torch.zeros_like(none)
    if bool(none.any()):
        spare = r.fallback + r.rounding
        pick = spare.argmin(0)
        tol_fb = floor(at(r.analytical, pick)) + policy.tolerance_safety * at(spare, pick)
        miss_fb = at(r.numerical, pick) - at(r.analytical, pick)
        fb = none & torch.isfinite(tol_fb) & (miss_fb.abs() <= tol_fb)
        verdict[fb] = AGREE
        for name, value in (("numerical", at(r.numerical, pick)), ("analytical", at(r.analytical, pick)),
                            ("error", at(spare, pick))):
            setattr(e, name, torch.where(fb, value, getattr(e, name)))
        e.finite = e.finite | fb
        tol = torch.where(fb, tol_fb, tol)
        chosen = torch.where(fb, pick, chosen)
    e.error = torch.where(e.finite, e.error, math.nan)
    return Ladder(e, Judgement(verdict, torch.where(e.finite, tol, math.nan), torch.zeros_like(agree)), allowance,
                  chosen, fb)


def _record(name: str, p: torch.Tensor, e: Entries, j: Judgement, details: dict, policy: Policy) -> TensorReport:
    """The summary record of one tensor's judged directions."""
    diff = (e.numerical - e.analytical).abs()
    rel = relative_errors(diff, e.analytical, float(e.analytical.abs().max()) if e.analytical.numel() else 0.0,
                          policy.rel_floor)
    finite_diff = torch.where(e.finite, diff, torch.zeros_like(diff))
    excess = torch.where(j.verdict == UNRESOLVED, torch.zeros_like(diff), diff / j.tol.clamp(min=TINY))
    checked = diff.numel()
    w = int(excess.nan_to_num(0.0).argmax()) if checked else None
    entries = {"index": e.index.cpu(), "numerical": e.numerical.cpu(), "analytical": e.analytical.cpu(),
               "error_estimate": e.error.cpu(), "tolerance": j.tol.cpu(), "verdict": j.verdict.cpu()}
    pick = (lambda t: float(t[w])) if w is not None else (lambda t: math.nan)
    return TensorReport(
        name=name, shape=tuple(p.shape), dtype=p.dtype, mode="directional", checked=checked, total=p.numel(),
        max_abs_error=float(finite_diff.max()) if checked else 0.0,
        max_rel_error=float(torch.where(e.finite, rel, torch.zeros_like(rel)).max()) if checked else 0.0,
        worst_index=int(e.index[w]) if w is not None else None, worst_analytical=pick(e.analytical),
        worst_numerical=pick(e.numerical), worst_error_estimate=pick(e.error), worst_tolerance=pick(j.tol),
        agree=int((j.verdict == AGREE).sum()), disagree=int((j.verdict == DISAGREE).sum()),
        unresolved=int((j.verdict == UNRESOLVED).sum()), entries=entries, details=details,
    )


def directional_report(evaluator: Directions, k: int, p: torch.Tensor, directions: int, atol, rtol,
                       stencil: stencils.Stencil, h, analytical: Analytical, policy: Policy) -> TensorReport:
    """Judge the directions of one input on the step ladder and summarise them in a record.

    Raises:
        Exception: what ``func`` raised at every perturbed node of every rung (with a note saying so).
    """
    index = torch.arange(directions, device=p.device)
    rungs = evaluator(index.tolist())
    # Rule (the retreat from a domain's edge): a direction with a non-finite node and fewer than
    # ladder_noise_rungs + 1 rungs judged is evaluated again on a ladder shifted down by all but two of its rungs,
    # as long as the total shift stays within the coordinate modes' reach (refine**domain_rounds) and the middle
    # rung moves most entries by min_step_ulps ulps
    levels = evaluator.levels.numel()
    shift, retreated = 0, torch.zeros(directions, dtype=torch.bool, device=p.device)
    while True:
        short = (rungs.finite.sum(0) < policy.ladder_noise_rungs + 1) & ~rungs.complete
        shift += levels - 2
        if not bool(short.any()) or 2.0**shift > policy.refine**policy.domain_rounds or not evaluator.moves(shift):
            break
        again = evaluator(index[short].tolist(), shift)
        better = torch.zeros_like(short)
        better[short] = again.finite.sum(0) > rungs.finite[:, short].sum(0)  # a retreat that judges more rungs
        keep = better[short]
        if bool(keep.any()):
            rungs.put(better, _columns(again, keep))
        retreated |= better
    floor = DirectionalFloor(policy.floor_eps * stencils.eps(p.dtype), atol, rtol, rungs.spread)
    ladder = judge_ladder(rungs, floor, index, policy)
    e = ladder.entries
    errors = evaluator.errors
    if errors.count and not bool(torch.isfinite(rungs.numerical).any()):
        note(errors.first, f"gradfd: raised while evaluating func at {errors.where}, and at every "
                           f"perturbed node of params[{k}] ({errors.count} nodes) at every step tried")
        raise errors.first
    chosen = rungs.multiples[ladder.chosen, torch.arange(directions, device=p.device)]
    details = {**evaluator.details, "ladder": [float(rungs.multiples.min()), float(rungs.multiples.max())],
               "stencil": stencil.name, "step": "automatic" if h is None else h,
               "rtol": floor.rtol, "atol": float(floor.atol.max()), "loss_noise": float(rungs.noise.max()),
               "rungs": [float(v) for v in chosen[e.finite].tolist()]}
    edge = int((~rungs.complete).sum())
    notes = ([errors.describe()] if errors.count else []) + (
        [f"{edge} directions had a non-finite value or an error of func at a node (outside its domain): judged at "
         f"the steps where every node was finite"] if edge else []) + (
        [f"{int(retreated.sum())} directions were judged on a ladder down to "
         f"2^{int(math.log2(float(rungs.multiples.min())))} of the steps (a domain's edge)"]
        if bool(retreated.any()) else []) + (
        [f"{int(ladder.agree_only.sum())} directions had no step judged (switches or structure at every step): they "
         f"agree within what the steps moved them by beyond rounding (agree-only: never failed, no error is "
         f"detected there)"] if bool(ladder.agree_only.any()) else [])
    if notes:
        details["notes"] = details.get("notes", []) + notes
    name = f"params[{k}]" if analytical.scalar else f"outputs wrt params[{k}] (u^T J v)"
    record = _record(name, p, e, ladder.judgement, details, policy)
    record.detection_limit = _limit(evaluator, ladder)
    return record


def _limit(evaluator: Directions, ladder: Ladder) -> float:
    """The detection limit of the judged directions (:func:`~.detection.directional_limit`)."""
    # the RMS over the gradient's nonzero entries for a loss (as full mode counts the entries it depends on); for a
    # tensor-valued function over every Jacobian entry: E[(u_dᵀJ)_i^2] = sum_o J_oi^2
    if evaluator.grads is None:  # forward mode: E[probe^2] = sum_oi J_oi^2 steps_i^2 over the probes' directions
        steps = evaluator.steps
        scale = float(steps.pow(2).mean()) * steps.numel() * (1 if evaluator.scalar else evaluator.u.shape[1])
        rms = math.sqrt(float(evaluator.probes.pow(2).mean()) / scale) if scale > 0 else 0.0
    elif evaluator.scalar:
        g = evaluator.grads[0]
        g = g[g.isfinite() & (g != 0)]
        rms = math.sqrt(float(g.pow(2).mean())) if g.numel() else 0.0
    else:
        rms = math.sqrt(float(evaluator.grads.pow(2).mean()) / evaluator.u.shape[1])
    e = ladder.entries
    return directional_limit(ladder.allowance, evaluator.steps, rms,
                             None if evaluator.scalar else evaluator.u[e.index])
