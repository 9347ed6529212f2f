"""Judgement: tolerances and their floors, the verdict rule, and the second look.

Each checked entry gets ``tolerance = floor + tolerance_safety * error`` with ``floor = atol + rtol * |analytical|``
(``atol``/``rtol`` default to ``floor_eps`` eps of the dtype, relative to the tensor's largest analytical entry
and to the entry). ``|numerical - analytical| <= tolerance`` agrees; otherwise an entry is unresolved where the
finite difference cannot be trusted (a non-finite stencil, a kink whose size explains the discrepancy, an
ambiguous miss within the truncation band), and disagrees elsewhere. What does not live here: the estimates
(:mod:`.estimates`), the refinement (:mod:`.refine`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..report import AGREE, DISAGREE, UNRESOLVED
from .estimates import Entries
from .policy import Policy

__all__ = ["Judgement", "judge", "flag_steps", "unsettled", "second_look", "Floors"]


@dataclass
class Judgement:
    """The verdicts of some entries: ``verdict`` int8 (AGREE / DISAGREE / UNRESOLVED), ``tol`` float64 tolerances,
    ``nonsmooth`` bool (a kink stands out of the rounding, or the stencil is unsettled)."""

    verdict: torch.Tensor
    tol: torch.Tensor
    nonsmooth: torch.Tensor

    def take(self, j: torch.Tensor) -> "Judgement":
        return Judgement(self.verdict[j], self.tol[j], self.nonsmooth[j])

    @staticmethod
    def cat(parts: Sequence["Judgement"]) -> "Judgement":
        return Judgement(torch.cat([p.verdict for p in parts]), torch.cat([p.tol for p in parts]),
                         torch.cat([p.nonsmooth for p in parts]))


def unsettled(e: Entries, policy: Policy, settled: torch.Tensor | None = None) -> torch.Tensor:
    """Rule: an entry whose noise no reliable median measured (``e.model > 0``) is not settled while its stencil
    shows structure -- a kink above both ``kink_noise_factor`` times the model's rounding and ``structure`` times
    the estimate itself: a pole, a jump, curvature or rounding that large leaves the estimate no meaning
    (tests/test_check.py::test_a_single_entry_whose_stencils_straddle_a_pole_is_measured_where_they_do_not).
    Rounding above the model alone is no structure while the estimate stands out of it. ``settled`` exempts the
    entries whose fourth difference fell like curvature."""
    out = ((e.model > 0) & (e.kink > policy.kink_noise_factor * e.model)
           & (e.kink > policy.structure * e.numerical.abs()))
    return out if settled is None else out & ~settled


def _allowances(e: Entries, floor: torch.Tensor, policy: Policy, settled: torch.Tensor | None):
    """``(tol, nonsmooth, band, flag)`` of entries ``e``: the rules of :func:`judge` that do not read the
    discrepancy."""
    truncation = e.error - e.rounding
    # Rule: non-smooth within the stencil (kink well above what rounding noise produces): the truncation spread is
    # contaminated, so the entry agrees only within the rounding allowance, and is otherwise unresolved.
    own = e.kink > policy.kink_noise_factor * e.rounding
    tol = torch.where(own, floor + policy.tolerance_safety * e.rounding, floor + policy.tolerance_safety * e.error)
    # Rule: an unsettled entry (see unsettled) agrees only where the allowance it is judged with is informative
    # (within `informative` of the analytical value: its rounding where its own kink stands out of it), and
    # never fails.
    unsettled_ = unsettled(e, policy, settled)
    nonsmooth = own | unsettled_
    vague = unsettled_ & (torch.where(own, e.rounding, e.error) > policy.informative * e.analytical.abs())
    tol = torch.where(vague, floor, tol)
    # Rule: a kink the fourth difference cannot see (a ReLU switching at 2/3 of a step) moves the extrapolant by up
    # to twice the truncation spread; a discrepancy within kink_band spreads is ambiguous.
    band = floor + policy.kink_band * truncation + policy.tolerance_safety * e.rounding
    # the rule inverted: a discrepancy disagrees beyond the tolerance, the ambiguous band and the kink's reach
    flag = torch.maximum(torch.maximum(tol, band), e.kink / policy.kink_explains)
    flag = torch.where(~e.finite | nonsmooth, math.inf, flag)
    return tol, nonsmooth, band, flag


def judge(e: Entries, floor: torch.Tensor, policy: Policy, settled: torch.Tensor | None = None) -> Judgement:
    """Per-entry verdicts (the module docstring's rule); ``settled`` marks the entries whose fourth difference fell
    like curvature since their previous step (see :mod:`.refine`)."""
    diff = (e.numerical - e.analytical).abs()
    tol, nonsmooth, band, _ = _allowances(e, floor, policy, settled)
    agree = e.finite & (diff <= tol)
    ambiguous = diff <= band
    unresolved = ~e.finite | (~agree & (nonsmooth | ambiguous | (e.kink >= policy.kink_explains * diff)))
    verdict = torch.full(diff.shape, AGREE, dtype=torch.int8, device=diff.device)
    verdict[~agree] = DISAGREE
    verdict[unresolved] = UNRESOLVED
    return Judgement(verdict, tol, nonsmooth)


def flag_steps(e: Entries, floor: torch.Tensor, policy: Policy) -> torch.Tensor:
    """``(1 + refine_rounds + curvature_rounds, ...)`` float64: the smallest ``|numerical - analytical|`` the rule of
    :func:`judge` calls a disagreement for entries ``e`` at their step and, modelled, at each refined step the
    refinement may take (rounding ``refine``-fold larger a step, the truncation spread and a curvature kink
    ``refine**2``-fold smaller: the 4-point stencil's spread; curvature kinks fall faster); inf where the rule never
    would (a non-finite or non-smooth stencil), or where the next step's stencil would not be clean
    (:func:`~.refine.clean`: a disagreement stands only on one). The detection limits read them."""
    rounds = policy.refine_rounds + policy.curvature_rounds
    steps = [e] + [_smaller(e, policy.refine ** k) for k in range(1, rounds + 2)]
    flags = [_allowances(s, floor, policy, None)[-1] for s in steps[:-1]]
    return torch.stack([torch.where(nxt.kink < policy.clean_kink * nxt.rounding, f, math.inf)
                        for f, nxt in zip(flags, steps[1:])])


def _smaller(e: Entries, r: float) -> Entries:
    """Entries ``e`` modelled at an ``r``-fold smaller step (see :func:`flag_steps`)."""
    return Entries(e.index, e.numerical, e.analytical, (e.error - e.rounding) / r**2 + r * e.rounding,
                   r * e.rounding, e.kink / r**2, e.finite, None if e.model is None else r * e.model)


def second_look(e: Entries, j: Judgement, policy: Policy) -> torch.Tensor:
    """Boolean mask of the agreeing entries that the refinement looks at again.

    Rule: an agreement whose discrepancy exceeds ``second_look`` of its tolerance while its error estimate is
    mostly truncation spread (generous enough to hide a 1e-3 error in float32:
    tests/test_check.py::test_an_error_inside_a_generous_truncation_estimate_gets_a_second_look); and one whose
    noise no reliable median measured while its kink is far above the model's rounding -- ``curvature_fall`` times
    it, or ``kink_noise_factor`` times it with an estimate above ``informative`` of the value: curvature that
    smaller steps shed. A kink below ``curvature_fall`` times the model's with a tight estimate is rounding the
    model underestimates, and gets none
    (tests/test_jacobian.py::test_an_elementwise_check_looks_again_only_at_entries_whose_estimates_are_loose)."""
    diff = (e.numerical - e.analytical).abs()
    truncated = (diff > policy.second_look * j.tol) & (e.error - e.rounding > e.rounding)
    curved = (e.model > 0) & ((e.kink > policy.curvature_fall * e.model)
                              | ((e.kink > policy.kink_noise_factor * e.model)
                                 & (e.error > policy.informative * e.analytical.abs())))
    return (j.verdict == AGREE) & e.finite & (truncated | curved)


class Floors:
    """The absolute-plus-relative floor of each Jacobian pair's tolerance (coordinates mode).

    ``floor`` is ``(O,)``: ``floor_eps`` eps of the coarser of each output's dtype and the input's (backward rounds
    the Jacobian's entries to the input's dtype). ``atol`` defaults to ``floor`` times the largest |entry| of the
    output's Jacobian block (``scales``, set as the blocks are seen), ``rtol`` to ``floor``; explicit values
    replace them."""

    def __init__(self, floor: torch.Tensor, atol: float | None, rtol: float | None, scales: list,
                 group: torch.Tensor):
        self.floor, self.atol, self.scales, self.group = floor, atol, scales, group
        self.rtol = floor if rtol is None else torch.full_like(floor, rtol)

    def scale_of(self, outs: torch.Tensor, device) -> torch.Tensor:
        """``(n,)`` the scale of each output's block (0 where not seen yet)."""
        return torch.tensor([s if s is not None else 0.0 for s in self.scales], dtype=torch.float64,
                            device=device)[self.group[outs]]

    def __call__(self, analytical_values: torch.Tensor, outs: torch.Tensor) -> torch.Tensor:
        if self.atol is not None:
            atol_ = torch.full_like(analytical_values, self.atol)
        else:
            atol_ = self.floor[outs] * self.scale_of(outs, analytical_values.device)
        return atol_ + self.rtol[outs] * analytical_values.abs()

    def of(self, entries: Entries, size: int) -> torch.Tensor:
        """The floors of ``entries`` (pairs numbered ``position * size + output``)."""
        return self(entries.analytical, entries.index % size)
