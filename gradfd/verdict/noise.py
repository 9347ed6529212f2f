"""Noise calibration: the rounding each flagged pair is judged with from the first round on, and how the refinement
keeps it (each pair's own noise scaled to its step; re-measured past a domain's edge).

What lives here: :func:`calibrate` (the stage between the first round and the refinement) and :class:`PairNoise`.
What does not: the measurement itself (:mod:`.estimates`), the first round's per-chunk noise (:mod:`.first_round`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..jacobian import term_sizes
from ..report import TINY
from .estimates import NOISE_FROM_FOURTH_DIFFERENCE, Entries, noise_median
from .first_round import FirstRound
from .judge import Judgement, judge

__all__ = ["Calibrated", "calibrate", "PairNoise"]


@dataclass
class Calibrated:
    """The flagged pairs with the noise they are judged with, their judgement, and the noise kept for the
    refinement."""

    entries: Entries
    judgement: Judgement
    noise: "PairNoise"


class PairNoise:
    """Each flagged pair's noise (``noise_e``, ``(n,)`` in function units) and the model's share of it, looked up by
    pair number; used to carry the first round's rounding to the refinement's steps."""

    def __init__(self, first: FirstRound, index: torch.Tensor, noise_e: torch.Tensor, model_share: torch.Tensor):
        self.first, self.plan = first, first.plan
        self.noise_e, self.model_share = noise_e, model_share
        self.order = torch.argsort(index)
        self.sorted_index = index[self.order]

    def _at(self, pairs: torch.Tensor) -> torch.Tensor:
        return self.order[torch.searchsorted(self.sorted_index, pairs)]

    def own(self, pairs: torch.Tensor, entries: Entries) -> Entries:
        """``entries`` (evaluated with the output's pooled noise) with the rounding of each pair's own noise. An
        entry no reliable median measured takes the noise of its own fourth difference at this step where that is
        smaller (the first round's may be a pole its stencil straddled), never below the model's; a fourth
        difference that is exactly 0 measured nothing and leaves the scaled first-round rounding."""
        r = self.plan.request
        policy = r.policy
        pooled = self.first.noise[pairs % self.plan.size]
        at = self._at(pairs)
        mine = self.noise_e[at]
        rounding = torch.where(pooled > 0, entries.rounding * mine / pooled.clamp(min=TINY), entries.rounding)
        entries.model = rounding * self.model_share[at]
        own = 2 * policy.rounding_safety * r.stencil.weight_norm * NOISE_FROM_FOURTH_DIFFERENCE
        alone = (entries.model > 0) & entries.finite
        mine_kink = torch.where(entries.kink > 0, own * entries.kink, rounding)
        rounding = torch.where(alone, torch.maximum(entries.model, torch.minimum(rounding, mine_kink)), rounding)
        entries.error = entries.error - entries.rounding + rounding
        entries.rounding = rounding
        return entries

    def remeasure(self, entries: Entries, factors: torch.Tensor) -> Entries:
        """Entries moved to smaller steps by a non-finite first stencil, with each output's noise measured again
        from their own fourth differences where ``reliable_median`` of them or more are finite: the first round
        measured the curvature near the edge, not the rounding
        (tests/test_check.py::test_entries_a_few_steps_from_a_domain_edge_are_judged_in_float64)."""
        plan, r = self.plan, self.plan.request
        policy, size = r.policy, plan.size
        outs_ = entries.index % size
        cols_ = r.coords[torch.div(entries.index, size, rounding_mode="floor")]
        h_ = plan.base_steps[cols_] / factors
        fin = entries.finite
        fourth = entries.kink * 2 * h_  # kink = |fourth difference| / (2h)
        measured = noise_median(fourth[fin], outs_[fin], size, policy) * NOISE_FROM_FOURTH_DIFFERENCE
        draws = torch.bincount(outs_[fin], minlength=size)
        terms = term_sizes(plan.flat_x[cols_]) * entries.analytical.abs()
        new = torch.maximum(measured.nan_to_num(0.0)[outs_], plan.out_eps[outs_] / policy.noise_floor_divisor
                            * torch.where(terms.isfinite(), terms, 0.0))
        ok = fin & (draws[outs_] >= policy.reliable_median)
        rounding = torch.where(ok, policy.rounding_safety * r.stencil.weight_norm * new / h_, entries.rounding)
        entries.error = entries.error - entries.rounding + rounding
        entries.rounding = rounding
        at = self._at(entries.index[ok])
        self.noise_e[at] = new[ok]  # for the later rounds, which measure these kinks against it
        self.model_share[at] = 0.0
        entries.model = torch.where(ok, 0.0, entries.model)
        return entries


def _pair_noise(first: FirstRound, e: Entries, gain: torch.Tensor, few: torch.Tensor):
    """``(noise_e, kinked)``: each flagged pair's noise in function units, and where the probe's replaced it."""
    plan, r = first.plan, first.plan.request
    policy, outs = r.policy, e.index % plan.size
    # Rule: a median of a few draws can sit well below the noise: those entries get at least the largest noise seen
    # for their output (tests/test_jacobian.py::test_noise_measured_on_a_few_columns_does_not_fail_a_correct_entry)
    noise_e = torch.where(few, torch.maximum(e.rounding / gain, first.noise[outs]), e.rounding / gain)
    if r.analytical.scalar:
        # a loss's few-column chunk: what the chunks of a reliable median measured (the largest), where one did
        measured = first.measured[outs]
        noise_e = torch.where(few & (measured > 0), measured, noise_e)
    kinked = None
    if first.probe is not None:
        # Rule: a kinked majority carries a chunk's measured noise far above the rounding and blinds the kink
        # tests: the probe's noise replaces one `separation` times larger -- a measured one, or the model of a
        # chunk of a few draws only where another chunk of the output measured kinks (a smooth function's probe
        # can undercut that model many times)
        # (tests/test_check.py::test_a_float32_relu_network_passes_though_most_stencils_straddle_a_switch)
        probed, draws = first.probe.noise, first.probe.draws
        kinked = ((~few | first.kinked[outs]) & (draws[outs] >= policy.reliable_median)
                  & (noise_e > policy.separation * probed[outs]))
        if bool(kinked.any()):
            first.note_probe(float(probed[outs[kinked]].max()), float(noise_e[kinked].max()))
            noise_e = torch.where(kinked, probed[outs], noise_e)
    return noise_e, kinked


def calibrate(first: FirstRound) -> Calibrated:
    """The noise calibration stage: the flagged pairs of the first round, each judged from here on with its chunk's
    noise, raised where few draws measured it, replaced by the probe's where kinks carried it, and never below
    ``eps / noise_floor_divisor`` times the size of the terms its input enters (the largest-gradient entry of
    x**3 - 2x**2 + x is its noisiest); the model's share of it where no reliable median measured the output."""
    plan, r = first.plan, first.plan.request
    policy, size = r.policy, plan.size
    e = Entries.cat([f.entries for f in first.flagged])
    half_step = torch.cat([f.half_step for f in first.flagged])  # the realised h of each entry's smallest level
    few = torch.cat([f.few for f in first.flagged])
    outs = e.index % size
    gain = policy.rounding_safety * r.stencil.weight_norm / half_step.clamp(min=TINY)
    noise_e, kinked = _pair_noise(first, e, gain, few)
    terms = term_sizes(plan.flat_x[r.coords[torch.div(e.index, size, rounding_mode="floor")]]) * e.analytical.abs()
    noise_e = torch.maximum(noise_e, plan.out_eps[outs] / policy.noise_floor_divisor
                            * torch.where(terms.isfinite(), terms, 0.0))
    # the entries whose output no chunk of a reliable median measured (nor the probe): the model's rounding
    # eps * (|f| + its terms) (+ the subnormals' spacing), as a share of the noise they are judged with
    unmeasured = few & ~(first.measured[outs] > 0)
    if kinked is not None and bool(kinked.any()):
        unmeasured &= ~kinked
    size_e = plan.base_values[outs].abs() + torch.maximum(first.magnitude[outs],
                                                          torch.where(terms.isfinite(), terms, 0.0))
    model_share = torch.where(unmeasured, (plan.out_eps[outs] * size_e + plan.out_tiny[outs])
                              / noise_e.clamp(min=TINY), 0.0)
    e.rounding, e.error = (torch.where(e.finite, noise_e * gain, e.rounding),
                           torch.where(e.finite, e.error - e.rounding + noise_e * gain, e.error))
    e.model = e.rounding * model_share
    return Calibrated(e, judge(e, plan.floors(e.analytical, outs), policy), PairNoise(first, e.index, noise_e,
                                                                                       model_share))
