"""Full and sample mode for one input: the pipeline plan -> first round -> noise calibration -> refinement ->
judgement -> report, and its driver, which retries with exact columns or exact rows where a colored shortcut does
not hold.

For tensor-valued functions the first round tries, in full mode with automatic steps and engine choices, the
hypothesised sparsity patterns of :class:`gradfd.jacobian.ColoredPass` (elementwise, then row-wise), then exact
columns with compressed analytical rows (:class:`gradfd.jacobian.Compressed`), then exact rows: each attempt is
a fresh :class:`Attempt`, so that a refuted one leaves no state. What does not live here: the stages
(:mod:`.plan`, :mod:`.first_round`, :mod:`.noise`, :mod:`.refine`, :mod:`.judge`, :mod:`.summary`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .. import budget as _budget
from .. import stencils
from ..jacobian import PATTERNS, ColoredPass, largest
from ..report import DISAGREE, TensorReport
from . import plan as _plan
from .estimates import Entries, column_entries, entry_estimates
from .first_round import FirstRound
from .noise import PairNoise, calibrate
from .plan import Plan, Request
from .policy import SEEDS
from .refine import domain_margin, refine
from .summary import finish_details, tensor_reports

__all__ = ["check_coordinates", "Attempt"]


@dataclass(frozen=True)
class Attempt:
    """How one attempt computes the Jacobian: colored backward passes for exact columns while they hold
    (``compress``), and the colored pass from pattern ``PATTERNS[colored]`` on (None: exact columns); ``notes``
    say why earlier attempts were abandoned."""

    compress: bool = True
    colored: int | None = 0
    notes: tuple = ()


@dataclass
class Retry:
    """The next attempt, when this one's shortcut did not hold."""

    attempt: Attempt


class PairEvaluator:
    """The refinement's evaluator: Jacobian pairs (numbered ``position * O + output``) at steps ``1/factor`` as
    large, from the colored pass's colors or from exact columns, with each pair's own noise (:class:`PairNoise`)."""

    def __init__(self, first: FirstRound, noise: PairNoise, sparse: ColoredPass | None, problem):
        self.first, self.plan, self.noise, self.sparse, self.problem = first, first.plan, noise, sparse, problem

    def raw(self, pairs: torch.Tensor, factor: float) -> Entries:
        plan, r, first = self.plan, self.plan.request, self.first
        size = plan.size
        positions = torch.div(pairs, size, rounding_mode="floor")
        outs_ = pairs % size
        if self.sparse is not None:
            values, disp, ana_pairs = self.sparse.pairs(self.problem, positions, outs_, factor)
            est, _ = entry_estimates(values, disp, plan.base_values[outs_], r.stencil, plan.out_eps[outs_], outs_,
                                     size, first.noise, r.policy)
            return Entries(pairs, est.numerical, ana_pairs, est.error, est.rounding, est.kink, est.finite,
                           torch.zeros_like(est.rounding))  # (model: see PairNoise.own)
        uniq, inverse = torch.unique(positions, return_inverse=True)
        cols = r.coords[uniq]
        parts: list = []

        def collect(start, stop, values, disp):
            ecols, _ = column_entries(values, disp, plan.base_values, r.stencil, plan.out_eps, first.noise, r.policy)
            parts.append((start, ecols))

        plan.evaluate_columns(cols, factor, collect)
        parts.sort(key=lambda t: t[0])
        cat = lambda name: torch.cat([getattr(pc, name) for _, pc in parts])  # noqa: E731
        num, err, rnd, knk, fin = (cat(nm) for nm in ("numerical", "error", "rounding", "kink", "finite"))
        comp = first.compressed
        if comp is not None:  # the refined pairs were moved in the first round: their color sums are theirs
            ana_pairs = comp.rows[outs_ % comp.q, cols[inverse]]
        else:
            ana_pairs = r.analytical.columns(r.k, cols)[inverse, outs_]
        return Entries(pairs, num[inverse, outs_], ana_pairs, err[inverse, outs_], rnd[inverse, outs_],
                       knk[inverse, outs_], fin[inverse, outs_], torch.zeros_like(ana_pairs))  # (see PairNoise.own)

    def __call__(self, pairs: torch.Tensor, factor: float) -> Entries:
        return self.noise.own(pairs, self.raw(pairs, factor))


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """``(n,)`` float64 spacing of ``x``'s dtype at ``|x|`` (NaN at inf)."""
    a = x.detach().abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).to(torch.float64)


def _step_limits(plan: Plan, index: torch.Tensor) -> torch.Tensor:
    """Each pair's largest step divisor: its step stays ``min_step_ulps`` ulps of its input or more."""
    r = plan.request
    cols = r.coords[torch.div(index, plan.size, rounding_mode="floor")]
    return (plan.base_steps[cols] / (r.policy.min_step_ulps * _ulp(plan.flat_x[cols]))).nan_to_num(nan=math.inf)


def _colored_first_round(plan: Plan, first: FirstRound, colored: int):
    """The colored pass of pattern ``PATTERNS[colored]`` as the first round: ``(pass, problem, None)``, or
    ``(None, None, why)`` when it does not apply (why None) or was refuted."""
    r = plan.request
    a, k = r.analytical, r.k
    atol_floor = (lambda scale: r.atol) if r.atol is not None else (
        lambda scale: float(plan.floors.floor.max()) * scale)
    whole = PATTERNS[colored]
    sparse = ColoredPass.build(a, k, plan.base_steps, r.stencil, whole,
                               lambda n: SEEDS.weights(n, SEEDS.colored_inputs(k, whole)))
    why = None if sparse is None else sparse.analytical_entries(
        atol_floor, SEEDS.weights(a.spec.size, SEEDS.colored_outputs(k)).to(plan.base_steps.device),
        SEEDS.weights(plan.n, SEEDS.colored_tangents(k)))
    if sparse is None or why is not None:
        return None, None, why
    # every analytical entry is known now: each block's scale is the whole block's, not its first judged block's
    # (the floor, and so the verdicts, do not depend on budget.JUDGED_PAIRS:
    # tests/test_jacobian.py::test_a_colored_check_judged_in_blocks_judges_as_one)
    for j in range(len(plan.scales)):
        if plan.scales[j] is None:
            plan.scales[j] = largest(sparse.vals[plan.group[sparse.outs] == j])
    problem = plan.prepare(vector=True)
    why = sparse.first_round(problem, plan.base_values, first.on_block)
    if why is not None:
        return None, None, why
    first.details = {"engine": "colored", "batching": sparse.batching, "chunk_size": None,
                     "notes": [sparse.describe()]}
    return sparse, problem, None


def _colored_applies(r: Request, attempt: Attempt, n: int, size: int) -> bool:
    return (attempt.colored is not None and r.mode == "full" and r.h is None and r.engine == "auto"
            and r.batching == "auto" and r.chunk_size is None and not r.analytical.scalar
            and n >= 2 * _budget.COLORED_SAVING and size >= _budget.COMPRESSION_MIN_OUTPUTS)


def _first_round(plan: Plan, attempt: Attempt):
    """The first round of ``attempt``: ``(first, sparse, problem)``, or a :class:`Retry`."""
    r = plan.request
    first = FirstRound.start(plan, attempt.compress)
    sparse = problem = None
    if _colored_applies(r, attempt, plan.n, plan.size):
        following = attempt.colored + 1 if attempt.colored + 1 < len(PATTERNS) else None
        sparse, problem, why = _colored_first_round(plan, first, attempt.colored)
        if sparse is None:
            return Retry(replace(attempt, colored=following,
                                 notes=attempt.notes + ((f"colored pass: {why}",) if why else ())))
    else:
        if plan.m >= r.policy.reliable_median:
            first.run_probe()  # before the first round: a loss's chunks are judged with it
        first.details = plan.evaluate_columns(r.coords, 1.0, first.on_chunk, report=True)
        if first.fallback:
            return Retry(Attempt(compress=False, colored=None, notes=attempt.notes))
    first.details["notes"] = list(attempt.notes) + first.details.get("notes", [])
    return first, sparse, problem


def _run(r: Request, attempt: Attempt) -> list[TensorReport] | Retry:
    """One attempt of the pipeline for input ``r.k``."""
    plan = _plan.make_plan(r)
    _plan.evaluate_base(plan)
    started = _first_round(plan, attempt)
    if isinstance(started, Retry):
        return started
    first, sparse, problem = started
    e = j = None
    refined, domain_note = 0, None
    if first.flagged:
        calibrated = calibrate(first)
        size = plan.size
        result = refine(calibrated.entries, calibrated.judgement, PairEvaluator(first, calibrated.noise, sparse,
                                                                                problem),
                        lambda entries: plan.floors.of(entries, size), r.policy,
                        _step_limits(plan, calibrated.entries.index), calibrated.noise.remeasure,
                        domain_margin(r.stencil, stencils.coarsest([r.params[r.k].dtype, *r.analytical.spec.dtypes]),
                                      r.policy), walk=first.walk_reach()[calibrated.entries.index % size])
        e, j, refined = result.entries, result.judgement, result.evaluations
        first.curved = result.curved
        if result.retreated:
            domain_note = (f"{result.retreated} entries had a non-finite loss or an error of func at a node "
                           f"(outside its domain): checked at steps down to 1/{result.smallest:.0f} of the "
                           "automatic ones, where their stencils are finite")
        if sparse is not None and bool((j.verdict == DISAGREE).any()):
            # a wrong pattern, or a wrong gradient: an entry of a colored pass may sum in an input outside the
            # pattern, so the disagreement is located with the next pattern or with exact columns
            following = attempt.colored + 1 if attempt.colored + 1 < len(PATTERNS) else None
            return Retry(replace(attempt, colored=following, notes=attempt.notes + (
                f"colored pass: the {sparse.name} pattern gave disagreements",)))
        if first.store is not None:
            first.store.put(e, j, size)
    if sparse is not None and r.progress is not None:
        r.progress(plan.m)
    details = finish_details(first, e, refined, domain_note,
                             sparse.passes() if sparse is not None else None)
    return tensor_reports(first, e, j, details)


def check_coordinates(r: Request) -> list[TensorReport]:
    """Full or sample mode for input ``params[r.k]``: one :class:`TensorReport` per compared output.

    The driver: attempts run in turn (:class:`Attempt`: colored patterns, then exact columns with compressed rows,
    then exact rows) until one's shortcuts hold; a refuted attempt's notes are carried into the next one's report.
    """
    attempt = Attempt()
    while True:
        outcome = _run(r, attempt)
        if not isinstance(outcome, Retry):
            return outcome
        attempt = outcome.attempt
