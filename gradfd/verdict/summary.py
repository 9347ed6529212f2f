"""The report stage of a coordinates check: one :class:`~gradfd.report.TensorReport` per compared output, from the
first round's tallies and the refined entries; plus the notes and the error that ends a check where func raised
at every node.

What does not live here: the report types and their table (:mod:`gradfd.report`).
"""

from __future__ import annotations

import math

import torch

from .. import engine as _engine
from ..errors import note
from ..report import AGREE, DISAGREE, TINY, UNRESOLVED, TensorReport, relative_errors
from .estimates import Entries
from .detection import Thresholds, allowances, detection_generator, with_walk
from .first_round import FirstRound, Tally, Worst
from .judge import Judgement

__all__ = ["finish_details", "tensor_reports"]


def finish_details(first: FirstRound, e: Entries | None, refined: int, domain_note: str | None,
                   colored: str | None) -> dict:
    """The records' details (engine choices, notes, stencil, step, noise); raises what func raised when not one
    perturbed evaluation succeeded at any step (no domain boundary: an error of func)."""
    plan, r = first.plan, first.plan.request
    details = first.details
    if first.probe_note is not None:
        details["notes"] = details.get("notes", []) + [first.probe_note]
    errors = plan.errors
    if errors.count:
        if e is not None and not bool(e.finite.any()) and not any(t.agree for t in first.tally):
            note(errors.first, f"gradfd: raised while evaluating func at {errors.where}, and at every "
                               f"perturbed node of params[{r.k}] ({errors.count} nodes) at every step tried")
            raise errors.first
        details["notes"] = details.get("notes", []) + [errors.describe()]
    if domain_note:
        details["notes"] = details.get("notes", []) + [domain_note]
    switches = first.switch_record()
    if switches is not None:
        details["notes"] = details.get("notes", []) + [switches.pop("note")]
        details["switches"] = switches
    noise = first.noise
    return {**details, "stencil": r.stencil.name, "step": "automatic" if r.h is None else r.h, "refined": refined,
            "analytical": (colored if colored is not None else
                           f"{first.compressed.q} colored backward passes" if first.compressed is not None
                           else "exact rows"),
            "loss_noise": float(noise.max()) if noise is not None and noise.numel() else 0.0,
            "truncation_estimated": len(r.stencil.multiples) > 1}


def _refined_into(tally: Tally, e: Entries, j: Judgement, sel: torch.Tensor, scale: float, rel_floor: float,
                  counts: dict) -> tuple[float, float, Worst | None]:
    """Fold the refined entries ``sel`` of one output into its tally's counts, largest errors and worst entry."""
    for v in (AGREE, DISAGREE, UNRESOLVED):
        counts[v] += int((j.verdict[sel] == v).sum())
    max_abs, max_rel, worst = tally.max_abs, tally.max_rel, tally.worst
    if bool(sel.any()):
        diff = (e.numerical - e.analytical).abs()
        fin = e.finite & sel
        if bool(fin.any()):
            rel = relative_errors(diff, e.analytical, scale, rel_floor)
            max_abs = max(max_abs, float(diff[fin].max()))
            max_rel = max(max_rel, float(rel[fin].max()))
        excess = torch.where(sel & (j.verdict != UNRESOLVED), diff / j.tol.clamp(min=TINY),
                             torch.full_like(diff, -1.0))
        w = int(excess.argmax())
        if float(excess[w]) >= 0 and (worst is None or float(excess[w]) > worst.excess):
            worst = Worst(float(excess[w]), int(e.index[w]), float(e.analytical[w]), float(e.numerical[w]),
                          float(e.error[w]), float(j.tol[w]))
    return max_abs, max_rel, worst


def _entries(first: FirstRound, e: Entries | None, j: Judgement | None, lo: int, hi: int) -> dict:
    """The record's per-entry tensors (CPU) of output entries ``lo:hi``: every pair's when they were kept, else the
    refined ones'; ``index`` is the pair's position in the record's (input coordinate, output entry) space."""
    plan, r = first.plan, first.plan.request
    size, device = plan.size, r.params[r.k].device
    if first.store is not None:
        s = first.store
        idx = (torch.arange(plan.m, device=device) * size).unsqueeze(1) + torch.arange(lo, hi, device=device)
        entries = {"index": idx.reshape(-1), "numerical": s.numerical[:, lo:hi].reshape(-1),
                   "analytical": s.analytical[:, lo:hi].reshape(-1), "error": s.error[:, lo:hi].reshape(-1),
                   "tolerance": s.tolerance[:, lo:hi].reshape(-1), "verdict": s.verdict[:, lo:hi].reshape(-1)}
    elif e is not None:
        sel = ((e.index % size) >= lo) & ((e.index % size) < hi)
        entries = {"index": e.index[sel], "numerical": e.numerical[sel], "analytical": e.analytical[sel],
                   "error": e.error[sel], "tolerance": j.tol[sel], "verdict": j.verdict[sel]}
    else:
        entries = {"index": torch.zeros(0, dtype=torch.int64), "numerical": torch.zeros(0),
                   "analytical": torch.zeros(0), "error": torch.zeros(0), "tolerance": torch.zeros(0),
                   "verdict": torch.zeros(0, dtype=torch.int8)}
    entries = {("error_estimate" if nm == "error" else nm): v.cpu() for nm, v in entries.items()}
    pos = torch.div(entries["index"], size, rounding_mode="floor")
    entries["index"] = r.coords.cpu()[pos] * (hi - lo) + (entries["index"] % size - lo)
    return entries


def tensor_reports(first: FirstRound, e: Entries | None, j: Judgement | None, details: dict) -> list[TensorReport]:
    """One record per compared output of the input."""
    plan, r = first.plan, first.plan.request
    analytical, p = r.analytical, r.params[r.k]
    spec, size = analytical.spec, plan.size
    reports = []
    for g, out_k in enumerate(spec.kept):
        name = f"params[{r.k}]" if analytical.scalar else f"output[{out_k}] wrt params[{r.k}]"
        lo, hi = spec.offsets[g], spec.offsets[g] + spec.numels[g]
        tally = first.tally[g]
        counts = {AGREE: tally.agree, DISAGREE: 0, UNRESOLVED: 0}
        max_abs, max_rel, worst = tally.max_abs, tally.max_rel, tally.worst
        if e is not None:
            sel = ((e.index % size) >= lo) & ((e.index % size) < hi)
            max_abs, max_rel, worst = _refined_into(tally, e, j, sel, plan.scales[g] or 0.0, r.policy.rel_floor,
                                                    counts)
        if analytical.scalar and plan.m < plan.n and not analytical.forward:  # sample mode: the RMS of the whole
            # tensor's gradient, not of the sample (a quarter of it the largest-|gradient| entries); forward mode's
            # sample is uniform (its own RMS estimates the tensor's) and the whole gradient would cost every column
            tally.thresholds.rms_of(analytical.columns(r.k, torch.arange(plan.n, device=p.device))[:, 0])
        walk = first.walk_reach() if bool(first.loose.any()) else None
        limit = _detection_limit(tally, e, j, sel if e is not None else None, plan.floors, size, r.policy,
                                 walk if walk is not None and bool((walk > 0).any()) else None)
        worst_index = None
        if worst is not None:
            w_pos, w_out = divmod(worst.index, size)
            in_idx = _engine.unravel(int(r.coords[w_pos]), tuple(p.shape))
            worst_index = in_idx if analytical.scalar else (_engine.unravel(w_out - lo, spec.shapes[g]), in_idx)
        reports.append(TensorReport(
            name=name, shape=tuple(p.shape), dtype=p.dtype, mode=r.mode, checked=plan.m * spec.numels[g],
            total=plan.n * spec.numels[g], max_abs_error=max_abs, max_rel_error=max_rel, worst_index=worst_index,
            worst_analytical=worst.analytical if worst else math.nan,
            worst_numerical=worst.numerical if worst else math.nan,
            worst_error_estimate=worst.error if worst else math.nan,
            worst_tolerance=worst.tol if worst else math.nan,
            agree=counts[AGREE], disagree=counts[DISAGREE], unresolved=counts[UNRESOLVED],
            entries=_entries(first, e, j, lo, hi), details={**details, "checked_inputs": plan.m, "inputs": plan.n},
            output_shape=None if analytical.scalar else spec.shapes[g], detection_limit=limit,
            unexamined=1.0 - plan.m / plan.n if plan.n else 0.0,
        ))
    return reports


def _detection_limit(tally: Tally, e: Entries | None, j: Judgement | None, sel: torch.Tensor | None,
                     floors, size: int, policy, walk: torch.Tensor | None = None) -> float:
    """The output's detection limit (:mod:`.detection`): the first round's agreeing pairs (in ``tally``) and the
    refined ones ``sel`` of ``e``; ``walk`` the ``(O,)`` reach of switches (:meth:`FirstRound.walk_reach`)."""
    thresholds = tally.limit_thresholds(walk is not None)
    if e is not None and bool(sel.any()):
        refined = Thresholds()
        at = sel.nonzero().flatten()
        part = e.take(at)
        a = allowances(part, j.take(at), floors.of(part, size), policy, detection_generator())
        refined.add(a if walk is None else with_walk(a, part, j.take(at), walk[part.index % size], policy))
        thresholds = thresholds.merged(refined)
    return thresholds.limit()
