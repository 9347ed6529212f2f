"""Refinement: every entry that does not agree (or earns a second look) is evaluated again at steps ``refine``
times smaller, and the smaller step's verdict replaces the first unless it reproduces a disagreement.

The rules, each a named predicate below:

- a disagreement stands only when the smaller step :func:`reproduced` it (lies closer to the first estimate than to
  the analytical value) on a :func:`clean` stencil; otherwise the first stencil straddled something (a ReLU
  switching, a jump) and the smaller step's verdict replaces it;
- where most stencils of a loss straddle switches (:meth:`~.first_round.FirstRound.walk_reach`), a reproduced
  disagreement must also stand out of what the switches near the entry can do (:func:`walked`);
- a disagreement first seen after a kinked step, or after the entry agreed (noise not measured by a reliable
  median), must be reproduced by a step that disagrees on its own (:func:`confirmed`); one first seen at the last
  regular round gets one more step (:func:`retried`), and one whose next step is not allowed is unresolved;
- rounds go on (up to ``curvature_rounds`` more) while the fourth difference :func:`falls_like_curvature`, the
  stencil is :func:`unsettled <gradfd.verdict.judge.unsettled>`, or the estimate :func:`tightens`;
- a step whose estimate :func:`stalled` at exactly 0 says nothing;
- a stencil that is not finite (a node outside func's domain) is first retried at smaller steps until it is
  (:meth:`Refinement.retreat`), then :func:`domain_margin` refine-fold steps smaller again.

What does not live here: the verdict rule itself (:mod:`.judge`), how entries are evaluated (the evaluator passed
in: :mod:`.coordinates`), directional mode's step ladder (:mod:`.directional`, which refines nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .. import stencils
from ..report import AGREE, DISAGREE, UNRESOLVED
from .estimates import Entries
from .judge import Judgement, judge, second_look, unsettled
from .policy import Policy

__all__ = ["Refined", "refine", "domain_margin", "evaluate_at", "Evaluator"]

Evaluator = Callable[[torch.Tensor, float], Entries]  # (entry numbers, step divisor) -> their entries there


def domain_margin(stencil: stencils.Stencil, dtype: torch.dtype, policy: Policy) -> int:
    """How many refine-fold steps a retreat from a domain's edge takes past the first finite stencil.

    The first finite stencil's outer node sits within a step of the edge (log at 0 < x: h in [x/8, x/2)); the
    stencil's best step at distance x from it is its automatic relative step times x (``~eps**(1/4) x`` for the
    4-point stencil: x/32 in float32, x/8192 in float64), about ``log_refine(1 / (refine * relative step))``
    refine-fold steps below h ~ x/4: 2 in float32, 6 in float64 (4-point stencil)."""
    relative = stencil.step_scale * stencils.eps(dtype) ** stencil.step_exponent
    return max(1, round(math.log(1.0 / relative, policy.refine) - 1))


def evaluate_at(evaluator: Evaluator, index: torch.Tensor, factors: torch.Tensor) -> Entries:
    """``evaluator`` on the entries ``index``, each with its own step divisor ``factors`` (one call per value)."""
    values = torch.unique(factors)
    if values.numel() == 1:
        return evaluator(index, float(values[0]))
    groups = [(factors == f).nonzero().flatten() for f in values]
    parts = [evaluator(index[g], float(f)) for g, f in zip(groups, values)]
    return Entries.cat(parts).take(torch.argsort(torch.cat(groups)))


# --- the refinement rules -------------------------------------------------------------------------------------


def measured_nothing(e2: Entries) -> torch.Tensor:
    """An entry whose noise no reliable median measured bounds its rounding by its own fourth difference; where that
    is exactly 0 (the five nodes' roundings cancelled) it measured nothing."""
    return (e2.model > 0) & e2.finite & (e2.kink == 0)


def keep_last_bound(e2: Entries, blind: torch.Tensor, previous_rounding: torch.Tensor, floor: torch.Tensor,
                    policy: Policy) -> torch.Tensor:
    """For the entries that measured nothing (``blind``) and miss the model's tolerance: the last step's rounding
    bound, ``refine`` times larger at this step, stands (never below the model's) and the entry takes another step
    to measure its own. An entry within the model's tolerance needs no
    other step (tests/test_check.py::test_a_fourth_difference_of_exactly_zero_measures_no_rounding). Updates
    ``e2`` in place; returns the entries the bound was carried to."""
    tight = floor + policy.tolerance_safety * (e2.error - e2.rounding + e2.model)
    blind = blind & ((e2.numerical - e2.analytical).abs() > tight)
    bound = torch.maximum(e2.model, torch.minimum(e2.rounding, policy.refine * previous_rounding))
    e2.error = torch.where(blind, e2.error - e2.rounding + bound, e2.error)
    e2.rounding = torch.where(blind, bound, e2.rounding)
    return blind


def stalled(previous_numerical: torch.Tensor, e2: Entries, nonsmooth: torch.Tensor) -> torch.Tensor:
    """A step whose estimate is exactly 0 where the larger, unkinked step's was not fell below the resolution of the
    output (or of an intermediate) and says nothing: the entry keeps its verdict as if it had no such step (a
    function constant where the backward is not estimates 0 at every step, and fails); a kinked larger step's
    nonzero estimate is no sign of that
    (tests/test_check.py::test_a_zero_slope_beside_a_kink_is_a_verdict_not_a_stalled_step)."""
    return (e2.numerical == 0) & (previous_numerical != 0) & ~nonsmooth


def fell_like_curvature(previous_kink: torch.Tensor, e2: Entries, policy: Policy) -> torch.Tensor:
    """An entry whose noise no reliable median measured is settled once its fourth difference fell refine**2-fold
    in derivative units: curvature's falls refine**3-fold a round, a kink's stays, a jump's grows."""
    return (e2.model > 0) & (policy.refine**2 * e2.kink <= previous_kink)


def reproduced(previous_numerical: torch.Tensor, previous_error: torch.Tensor, e2: Entries,
               policy: Policy) -> torch.Tensor:
    """The smaller step sides with the first estimate rather than the analytical value, within the two estimates'
    error bounds of each other (a function still far from its asymptotic regime moves towards the analytical value
    by more at every step); a non-finite analytical entry against a finite estimate is always reproduced."""
    moved = (previous_numerical - e2.numerical).abs()
    out = (moved < (e2.numerical - e2.analytical).abs()) & (
        moved <= policy.tolerance_safety * (previous_error + e2.error))
    return out | (~torch.isfinite(e2.analytical) & torch.isfinite(e2.numerical))


def clean(e2: Entries, fell: torch.Tensor, policy: Policy) -> torch.Tensor:
    """The smaller stencil shows no kink beyond what its rounding produces (``clean_kink`` rounding estimates) and
    is settled."""
    return e2.finite & (e2.kink < policy.clean_kink * e2.rounding) & ~unsettled(e2, policy, fell)


def walked(previous: Entries, e2: Entries, reach: torch.Tensor, policy: Policy) -> torch.Tensor:
    """Rule: where most stencils straddle switches (a conv weight moves thousands of ReLU inputs), the switches
    within a step of an entry shift its estimate at every step a float32 check can take, by about the sum of their
    jumps, which its fourth differences can miss (two switches on either side with opposite jumps cancel in them).
    A discrepancy within ``reach`` (``walk_reach`` times the ``walk_quantile`` of the first round's kinks over the
    output's entries; 0 elsewhere, and the rule is off), or within ``walk_explains`` times the entry's own (the
    larger step's kink / 2 + the smaller's + the move between the two estimates), is explained by them, and the
    disagreement does not stand at this step
    (tests/test_check.py::test_a_conv_net_whose_stencils_straddle_switches_is_not_failed). Both were measured in
    float64 on conv nets at float32's steps (benchmarks/bench_kinks.py)."""
    moved = (previous.numerical - e2.numerical).abs()
    own = policy.walk_explains * (previous.kink / 2 + e2.kink + moved)
    return (reach > 0) & ((e2.numerical - e2.analytical).abs() <= torch.maximum(reach, own))


def curved(previous: Entries, e2: Entries, policy: Policy) -> bool:
    """Rule: a refined step tells switches from curvature that only looked like them at the larger steps
    (``exp(sin(5 x))`` in float32, ``sin(1000 x)`` in float64: the first steps are not small against the period).
    An entry votes curvature where its kink fell ``refine**2``-fold or more (curvature's falls ``refine**3``,
    switches' much less), counting a kink at this step as no smaller than ``clean_kink`` roundings (one
    that fell into the rounding fell by at least that much, no more is known: a loss moving in quanta has fourth
    differences of exactly 0); it votes switches where its kink still stands out of the rounding and fell less;
    others do not vote. With ``reliable_median`` votes or more, a curvature majority switches the rule on switches
    off (about 5% of a conv net's entries fall that much, one near switch left behind, but not most: the float64
    table of benchmarks/bench_kinks.py)
    (tests/test_check.py::test_an_error_is_found_where_high_frequency_curvature_looks_like_switches)."""
    seen = previous.finite & e2.finite & (previous.kink > policy.clean_kink * previous.rounding)
    floor = policy.clean_kink * e2.rounding
    fall = previous.kink / torch.maximum(e2.kink, floor).clamp(min=torch.finfo(torch.float64).tiny)
    curvature = seen & (fall >= policy.refine**2)
    switches = seen & (fall < policy.refine**2) & (e2.kink > floor)
    votes = int(curvature.sum()) + int(switches.sum())
    return votes >= policy.reliable_median and int(curvature.sum()) > int(switches.sum())


def confirmed(was: Judgement, late: torch.Tensor, v2: torch.Tensor, reproduced_: torch.Tensor,
              clean_: torch.Tensor, stalled_: torch.Tensor, walked_: torch.Tensor) -> torch.Tensor:
    """A smooth disagreement stands when reproduced on a clean stencil, beyond what switches explain
    (:func:`walked`); one first seen late (after a kinked step, or after agreeing) must also disagree on its own
    at this step."""
    return ((was.verdict == DISAGREE) & ~was.nonsmooth & reproduced_ & clean_ & (~late | (v2 == DISAGREE))
            & ~stalled_ & ~walked_)


def retried(extra: torch.Tensor, replace: torch.Tensor, j2: Judgement, reproduced_: torch.Tensor, round_: int,
            policy: Policy) -> torch.Tensor:
    """The extra step reproduces a disagreement first seen at the last regular round; one that disagrees again,
    reproduces and is smooth, but misses ``clean_kink`` by no more than noise, takes another step
    (tests/test_check.py::test_a_reproduction_that_misses_the_clean_bar_by_noise_gets_one_more_step)."""
    return (extra & replace & (j2.verdict == DISAGREE) & reproduced_ & ~j2.nonsmooth
            & (round_ < policy.refine_rounds + policy.curvature_rounds))


def falls_like_curvature(previous: Entries, e2: Entries, policy: Policy) -> torch.Tensor:
    """The fourth difference, relative to the rounding, fell by ``curvature_fall`` or more this round: curvature
    (refine**4-fold a round; a kink's refine-fold), which earns another regular round
    (tests/test_check.py::test_refinement_goes_on_while_the_fourth_difference_falls_like_curvature)."""
    return policy.curvature_fall * e2.kink * previous.rounding <= previous.kink * e2.rounding


def tightens(replace: torch.Tensor, v2: torch.Tensor, fell: torch.Tensor, blind: torch.Tensor, e2: Entries,
             policy: Policy) -> torch.Tensor:
    """An agreeing or ambiguous entry judged within an error of curvature (it fell like curvature but is still
    ``kink_noise_factor`` above the model's rounding), or with a bound carried from the last step, takes the steps
    that tighten it."""
    return (replace & (v2 != DISAGREE) & fell & (e2.kink > policy.kink_noise_factor * e2.model)) | (
        replace & (v2 != DISAGREE) & blind)


@dataclass
class Refined:
    """What the refinement returns: the entries and their judgement (updated), the re-evaluations, how many entries
    needed a smaller step to be finite, the largest step divisor those took, and whether the rule on switches was
    switched off (:func:`curved`)."""

    entries: Entries
    judgement: Judgement
    evaluations: int
    retreated: int
    smallest: float
    curved: bool = False


class Refinement:
    """The state of one refinement: entries ``e`` and their judgement ``j`` (updated in place), each entry's step
    divisor ``base`` (past a domain's edge), last regular round ``last``, whether its disagreement was first seen
    late, whether its last step measured nothing, and the reach of the switches near it (``walk``, see
    :func:`walked`)."""

    def __init__(self, e: Entries, j: Judgement, evaluator: Evaluator, floor_of: Callable[[Entries], torch.Tensor],
                 limit: torch.Tensor | None, policy: Policy, walk: torch.Tensor | None = None):
        self.e, self.j, self.evaluator, self.floor_of, self.limit, self.policy = e, j, evaluator, floor_of, limit, policy
        self.walk = torch.zeros_like(e.numerical) if walk is None else walk
        self.curved = False
        self.base = torch.ones(e.index.shape, dtype=torch.float64, device=e.index.device)
        self.late = torch.zeros_like(j.nonsmooth)
        self.was_blind = torch.zeros_like(j.nonsmooth)
        self.last = torch.full(e.index.shape, policy.refine_rounds, dtype=torch.long, device=e.index.device)

    def _take(self, which: torch.Tensor, e2: Entries, factors: torch.Tensor) -> None:
        ok = e2.finite
        j2 = judge(e2, self.floor_of(e2), self.policy)
        self.e.put(which, e2, ok)
        got = which[ok]
        self.j.verdict[got], self.j.tol[got], self.j.nonsmooth[got] = j2.verdict[ok], j2.tol[ok], j2.nonsmooth[ok]
        self.base[got] = factors[ok]

    def retreat(self, remeasure: Callable[[Entries, torch.Tensor], Entries] | None, margin: int):
        """The entries whose stencil is not finite, retried at steps ``refine`` times smaller until it is
        (``domain_rounds`` times at most), then ``refine**margin`` times smaller again (:func:`domain_margin`);
        ``remeasure(entries, factors)`` re-measures their rounding there. Returns ``(evaluations, retreated,
        smallest)``."""
        e, base, limit, policy = self.e, self.base, self.limit, self.policy
        evaluations, retreated, smallest = 0, 0, 1.0
        out = (~e.finite).nonzero().flatten()
        for round_ in range(1, policy.domain_rounds + 1):
            factor = float(policy.refine**round_)
            if limit is not None:
                out = out[factor <= limit[out]]
            if out.numel() == 0:
                break
            evaluations += out.numel()
            e2 = self.evaluator(e.index[out], factor)
            self._take(out, e2, torch.full((out.numel(),), factor, dtype=torch.float64, device=base.device))
            if bool(e2.finite.any()):
                retreated, smallest = retreated + int(e2.finite.sum()), factor
            out = out[~e2.finite]
        moved = (base > 1).nonzero().flatten()
        factors = base[moved] * policy.refine**margin
        if limit is not None:
            moved, factors = moved[factors <= limit[moved]], factors[factors <= limit[moved]]
        if moved.numel():  # a margin from the edge (see domain_margin)
            evaluations += moved.numel()
            e2 = evaluate_at(self.evaluator, e.index[moved], factors)
            self._take(moved, remeasure(e2, factors) if remeasure is not None else e2, factors)
            smallest = max(smallest, float(base.max()))
        return evaluations, retreated, smallest

    def unreproduced(self, which: torch.Tensor, round_: int) -> None:
        """Entries that get no step ``round_``: a disagreement that needed it to be reproduced (first seen late, or
        at the last regular round) is unresolved (tests/test_check.py::
        test_a_disagreement_that_needs_a_step_below_the_limit_is_unresolved)."""
        pending = (self.j.verdict[which] == DISAGREE) & (self.late[which] | (round_ > self.last[which]))
        self.j.verdict[which[pending]] = UNRESOLVED

    def allowed(self, todo: torch.Tensor, round_: int) -> torch.Tensor:
        """The entries of ``todo`` whose step at ``round_`` stays ``min_step_ulps`` ulps of the input or more."""
        if self.limit is None:
            return todo
        factor = self.base * self.policy.refine**round_
        return todo[factor[todo] <= self.limit[todo]]

    def step(self, todo: torch.Tensor, round_: int) -> torch.Tensor:
        """One round for the entries ``todo``; returns those that take the next."""
        e, j, policy = self.e, self.j, self.policy
        was, prev = j.take(todo), e.take(todo)
        e2 = evaluate_at(self.evaluator, e.index[todo], self.base[todo] * policy.refine**round_)
        blind = measured_nothing(e2)
        if bool(blind.any()):
            blind = keep_last_bound(e2, blind, prev.rounding, self.floor_of(e2), policy)
        stalled_ = stalled(prev.numerical, e2, was.nonsmooth)
        self.unreproduced(todo[stalled_], round_)
        was = j.take(todo)  # (after unreproduced)
        fell = fell_like_curvature(prev.kink, e2, policy)
        j2 = judge(e2, self.floor_of(e2), policy, fell)
        v2 = j2.verdict
        reproduced_ = reproduced(prev.numerical, prev.error, e2, policy)
        clean_ = clean(e2, fell, policy)
        # (the reach was measured at the first round's steps: not for an entry that retreated from a domain's edge)
        reach = torch.where(self.base[todo] == 1, self.walk[todo], 0.0)
        on = reach > 0
        if bool(on.any()) and curved(prev.take(on.nonzero().flatten()), e2.take(on.nonzero().flatten()), policy):
            self.walk, self.curved = torch.zeros_like(self.walk), True
            reach = torch.zeros_like(reach)
        walked_ = walked(prev, e2, reach, policy)
        replace = ~confirmed(was, self.late[todo], v2, reproduced_, clean_, stalled_, walked_) & ~stalled_
        extra = round_ > self.last[todo]
        retry = retried(extra, replace, j2, reproduced_, round_, policy)
        self.last[todo[retry]] = round_
        extra &= ~retry
        j.verdict[todo[extra & replace]] = UNRESOLVED  # no step reproduced it: the estimates contradict each other
        replace &= ~extra
        curving = replace & (v2 != AGREE) & ~clean_ & falls_like_curvature(prev, e2, policy)
        curving |= replace & (v2 != AGREE) & (unsettled(e2, policy, fell) | fell)
        tighten = tightens(replace, v2, fell, blind, e2, policy)
        curving |= tighten
        grow = todo[curving & (self.last[todo] == round_) & (round_ < policy.refine_rounds + policy.curvature_rounds)]
        self.last[grow] += 1
        # a disagreement first seen after the entry agreed (noise not measured by a reliable median) has a step
        # behind it that contradicts it; an agreement within a bound carried from a larger step is no such step
        after_agreeing = (j.verdict[todo] == AGREE) & (e.model[todo] > 0) & ~self.was_blind[todo]
        e.put(todo, e2, replace)
        rep = todo[replace]
        j.verdict[rep] = v2[replace]
        j.tol[rep] = j2.tol[replace]
        self.late[rep] = (v2[replace] == DISAGREE) & (j.nonsmooth[rep] | after_agreeing[replace])
        self.late[todo[retry]] = True
        j.nonsmooth[rep] = j2.nonsmooth[replace]
        self.was_blind[rep] = blind[replace]
        # what is unresolved at its last regular round stays so; a disagreement first seen there gets one more step
        keep = replace & ((v2 != AGREE) | tighten) & ((round_ < self.last[todo]) | (v2 == DISAGREE))
        return todo[keep]


def refine(e: Entries, j: Judgement, evaluator: Evaluator, floor_of: Callable[[Entries], torch.Tensor],
           policy: Policy, limit: torch.Tensor | None = None,
           remeasure: Callable[[Entries, torch.Tensor], Entries] | None = None, margin: int = 2,
           walk: torch.Tensor | None = None) -> Refined:
    """Refine the entries of ``e`` that do not agree (and those :func:`~gradfd.verdict.judge.second_look` picks):
    first the retreat from a domain's edge, then up to ``refine_rounds`` rounds (plus up to ``curvature_rounds``
    while the rules of the module docstring ask for more, plus one to reproduce a disagreement first seen at the
    last).

    Args:
        e, j: the entries and their first-round judgement; updated in place.
        evaluator: ``evaluator(index, factor)`` returns the entries ``index`` evaluated with steps ``1/factor`` as
            large.
        floor_of: the tolerance floor of some entries.
        limit: each entry's largest factor (its step stays ``min_step_ulps`` ulps of its input), None for none.
        remeasure: see :meth:`Refinement.retreat`.
        margin: :func:`domain_margin`.
        walk: float64 per entry, the reach of the switches near it where most stencils of its output straddle
            switches, 0 elsewhere (:func:`walked`); None for 0.
    """
    r = Refinement(e, j, evaluator, floor_of, limit, policy, walk)
    evaluations, retreated, smallest = r.retreat(remeasure, margin)
    todo = (((j.verdict != AGREE) | second_look(e, j, policy)) & e.finite).nonzero().flatten()
    rounds = policy.refine_rounds + policy.curvature_rounds
    for round_ in range(1, rounds + 2):
        kept = r.allowed(todo, round_)
        r.unreproduced(todo[~torch.isin(todo, kept)], round_)  # (steps below min_step_ulps ulps of the input)
        todo = kept
        if todo.numel() == 0:
            break
        evaluations += todo.numel()
        todo = r.step(todo, round_)
    r.unreproduced(todo, rounds + 2)
    return Refined(e, j, evaluations, retreated, smallest, r.curved)
