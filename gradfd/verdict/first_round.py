"""The first round of a coordinates check: every checked pair estimated at the automatic steps, its noise measured
per chunk (and by the noise probe), judged, and tallied -- the pairs that agree are summarised and dropped, the
others (:class:`Flagged`) go on to the noise calibration and the refinement.

What lives here: :class:`FirstRound` (the chunk sinks of the exact-column and colored passes, and their
accumulators), :class:`Tally`/:class:`Worst` (per-output summaries), :class:`Store` (every entry's values, for
small checks), :class:`Probe`. What does not: how columns are evaluated (:mod:`.plan`, :mod:`gradfd.engine`), the
colored and compressed Jacobians (:mod:`gradfd.jacobian`), the estimator (:mod:`.estimates`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import budget as _budget
from ..jacobian import Compressed, largest, term_sizes
from ..report import AGREE, DISAGREE, TINY
from .estimates import NOISE_FROM_FOURTH_DIFFERENCE, Entries, entry_estimates, has_fourth_difference, probe_noise
from .judge import Judgement, judge, second_look
from .plan import Plan
from .detection import Thresholds, allowances, detection_generator, sampled, with_walk
from .policy import SEEDS

__all__ = ["FirstRound", "Flagged", "Tally", "Worst", "Store", "Probe"]


@dataclass
class Flagged:
    """Pairs of one chunk that did not agree (or earn a second look, or were judged with too few draws): their
    entries and judgement, the realised ``h`` of each pair's smallest level, and whether its output's noise was
    measured from fewer pairs than a reliable median takes (``few``)."""

    entries: Entries
    judgement: Judgement
    half_step: torch.Tensor
    few: torch.Tensor


@dataclass
class Worst:
    """The worst judged entry of an output so far (largest discrepancy over tolerance)."""

    excess: float
    index: int  # pair number
    analytical: float
    numerical: float
    error: float
    tol: float


@dataclass
class Tally:
    """The summary of one output tensor's agreeing pairs."""

    agree: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst: Worst | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)  # every pair's, for the detection limit
    walk_thresholds: Thresholds = field(default_factory=Thresholds)  # ... with the rule on switches' allowance

    def limit_thresholds(self, walking: bool) -> Thresholds:
        """The pairs' thresholds with the rule on switches' allowance where it stayed on, else without (the RMS
        gradient is counted in ``thresholds`` only)."""
        if not walking:
            return self.thresholds
        out = self.walk_thresholds.merged(Thresholds())
        out.sumsq, out.pairs = self.thresholds.sumsq, self.thresholds.pairs
        return out

    def add(self, e: Entries, tol: torch.Tensor, sel: torch.Tensor, diff: torch.Tensor, rel: torch.Tensor,
            excess: torch.Tensor) -> None:
        """Count the pairs ``sel`` (agreeing) in."""
        self.agree += int(sel.sum())
        self.max_abs = max(self.max_abs, float(diff[sel].max()))
        self.max_rel = max(self.max_rel, float(rel[sel].max()))
        w = int(torch.where(sel, excess, torch.full_like(excess, -1.0)).argmax())
        if self.worst is None or float(excess[w]) > self.worst.excess:
            self.worst = Worst(float(excess[w]), int(e.index[w]), float(e.analytical[w]), float(e.numerical[w]),
                               float(e.error[w]), float(tol[w]))


@dataclass
class Store:
    """Every pair's values, ``(m, O)`` each, kept when there are few (``budget.DENSE_ENTRIES``)."""

    numerical: torch.Tensor
    analytical: torch.Tensor
    error: torch.Tensor
    tolerance: torch.Tensor
    verdict: torch.Tensor

    @staticmethod
    def empty(m: int, size: int, device) -> "Store":
        values = {name: torch.empty(m, size, dtype=torch.float64, device=device)
                  for name in ("numerical", "analytical", "error", "tolerance")}
        return Store(**values, verdict=torch.empty(m, size, dtype=torch.int8, device=device))

    def fill_chunk(self, start: int, stop: int, jj, oo, e: Entries, j: Judgement, floors) -> None:
        """Columns ``start:stop``: the judged pairs (``start + jj``, ``oo``), exact zeros with agreement elsewhere."""
        c, size = stop - start, self.numerical.shape[1]
        zeros = torch.zeros(c, size, dtype=torch.float64, device=self.numerical.device)
        self.numerical[start:stop] = zeros
        self.analytical[start:stop] = zeros
        self.error[start:stop] = zeros
        outs = torch.arange(size, device=zeros.device).expand(c, size)
        self.tolerance[start:stop] = floors(zeros.reshape(-1), outs.reshape(-1)).view(c, size)
        self.verdict[start:stop] = AGREE
        self.numerical[start + jj, oo] = e.numerical
        self.analytical[start + jj, oo] = e.analytical
        self.error[start + jj, oo] = e.error
        self.tolerance[start + jj, oo] = j.tol
        self.verdict[start + jj, oo] = j.verdict

    def put(self, e: Entries, j: Judgement, size: int) -> None:
        """The refined pairs' final values."""
        pos, outs = torch.div(e.index, size, rounding_mode="floor"), e.index % size
        self.numerical[pos, outs] = e.numerical
        self.error[pos, outs] = e.error
        self.tolerance[pos, outs] = j.tol
        self.verdict[pos, outs] = j.verdict


@dataclass
class Probe:
    """The noise probe's measurement: ``(O,)`` noise and draws per output, from ``columns`` columns."""

    noise: torch.Tensor
    draws: torch.Tensor
    columns: int


@dataclass
class FirstRound:
    """The first round's accumulators, filled chunk by chunk (:meth:`on_chunk`, :meth:`on_block`).

    Attributes:
        noise: ``(O,)`` the largest noise any chunk measured per output (None before the first).
        measured: ``(O,)`` the largest noise a reliable median measured per output (0: none did).
        magnitude: ``(O,)`` the size of the terms each output sums, over the chunks seen.
        kinked: ``(O,)`` outputs whose chunk measurement the probe replaced.
        kinks, above, walk_votes, walk_count, clean, large: a loss's first-round kinks (histogram), and per output
            how many of the judged pairs have a fourth difference above ``walk_separation`` times the probe's noise
            (:attr:`loose`), how many a kink above ``walk_signature`` times their truncation spread, of how many,
            how many are below ``clean_kink`` rounding estimates and how many ``clean_kink *
            refine**refine_rounds`` or more: for :meth:`walk_reach`.
        curved: the refinement switched the rule on switches off (:func:`~.refine.curved`).
        compressed: the colored backward passes while they hold (None: exact rows).
        fallback: the tensor is to be redone with exact rows (a leak, or a disagreement of compressed rows).
    """

    plan: Plan
    compressed: Compressed | None
    noise: torch.Tensor | None = None
    measured: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    kinked: torch.Tensor | None = None
    probe: Probe | None = None
    probe_note: str | None = None
    fallback: bool = False
    details: dict = field(default_factory=dict)
    flagged: list = field(default_factory=list)
    tally: list = field(default_factory=list)
    store: Store | None = None
    detection_draws: torch.Generator = field(default_factory=detection_generator)  # (the detection limit's)
    kinks: Thresholds = field(default_factory=Thresholds)
    above: torch.Tensor | None = None
    walk_votes: torch.Tensor | None = None
    walk_count: torch.Tensor | None = None
    clean: torch.Tensor | None = None
    large: torch.Tensor | None = None
    curved: bool = False

    @staticmethod
    def start(plan: Plan, compress: bool) -> "FirstRound":
        r = plan.request
        a, size, device = r.analytical, plan.size, r.params[r.k].device
        comp = (Compressed(a, r.k) if compress and not a.scalar and not a.forward
                and size >= _budget.COMPRESSION_MIN_OUTPUTS else None)  # (forward mode: exact columns, no rows)
        return FirstRound(plan, comp, None, torch.zeros(size, dtype=torch.float64, device=device),
                          torch.zeros(size, dtype=torch.float64, device=device),
                          torch.zeros(size, dtype=torch.bool, device=device),
                          tally=[Tally() for _ in a.spec.kept],
                          store=Store.empty(plan.m, size, device) if plan.keep_all else None,
                          above=torch.zeros(size, dtype=torch.long, device=device),
                          walk_votes=torch.zeros(size, dtype=torch.long, device=device),
                          walk_count=torch.zeros(size, dtype=torch.long, device=device),
                          clean=torch.zeros(size, dtype=torch.long, device=device),
                          large=torch.zeros(size, dtype=torch.long, device=device))

    def run_probe(self) -> None:
        """The noise probe's ``(noise, draws)`` per output (:func:`~.estimates.probe_noise`), measured once, before
        the first round of a scalar loss with ``reliable_median`` columns or more: fourth differences at steps
        ``noise_probe`` times smaller on ``noise_probe_columns`` columns, where kinks inside the stencils are rare.
        Rule: a kinked majority (most first-round stencils straddle a switch) carries a chunk's measured noise far
        above the rounding; where that is ``separation`` times the probe's, the probe's is used
        (tests/test_check.py::test_a_float32_relu_network_passes_though_most_stencils_straddle_a_switch). None
        without fourth differences, and for tensor-valued functions (an output is moved by few probe columns, and
        their fourth differences cost a pass over every output)."""
        plan, r = self.plan, self.plan.request
        policy = r.policy
        if not (r.analytical.scalar and has_fourth_difference(r.stencil.offsets)):
            return
        gen = torch.Generator().manual_seed(SEEDS.probe)
        pick = torch.randperm(plan.m, generator=gen)[:policy.noise_probe_columns].sort().values.to(r.coords.device)
        parts: list = []
        plan.evaluate_columns(r.coords[pick], float(policy.noise_probe), lambda a, b, v, d: parts.append((v, d)))
        noise, draws = probe_noise(torch.cat([v for v, _ in parts], dim=1), torch.cat([d for _, d in parts], 1),
                                   plan.base_values, r.stencil, plan.out_eps, plan.reliable_eps, policy)
        self.probe = Probe(noise, draws, int(pick.numel()))

    @property
    def loose(self) -> torch.Tensor:
        """``(O,)`` bool: the outputs most of whose first-round fourth differences (``reliable_median`` or more of
        them, and as many probe draws) stand above ``walk_separation`` times the probe's noise (and the floor).

        Rule: counted per stencil over every chunk, not from a chunk's median: a chunk's clipped median finds the
        clean stencils where it holds enough of them (the structured engine's one chunk of a whole conv weight;
        bench_kinks.py's CNN, seed 6005, failed so), and a small tensor's chunks hold fewer than a reliable median
        each (a BatchNorm's bias of 12 entries: the engine's timing probe evaluates 2 and 4 columns; seed 9002 of
        the ResNet blocks in train mode failed so)
        (tests/test_check.py::test_the_rule_on_switches_holds_however_the_columns_are_chunked and
        ::test_a_small_tensor_whose_stencils_all_straddle_switches_is_not_failed)."""
        policy = self.plan.request.policy
        if self.probe is None:
            return torch.zeros_like(self.above, dtype=torch.bool)
        return ((2 * self.above > self.walk_count) & (self.walk_count >= policy.reliable_median)
                & (self.probe.draws >= policy.reliable_median))

    def walk_reach(self) -> torch.Tensor:
        """``(O,)`` float64: where most of a loss's stencils straddle switches, ``walk_reach`` times the
        ``walk_quantile`` of the first round's kinks over its entries; 0 elsewhere (see
        :func:`gradfd.verdict.refine.walked`).

        Rule: most stencils straddle switches where most of their fourth differences stand ``walk_separation``
        times the probe's noise (:attr:`loose`) and most of its kinks (``reliable_median`` or more) are
        ``walk_signature`` times their truncation spread: switches; the fourth difference of curvature is a small
        share of its spread, however far above the probe's noise (``log`` near 0 in float64)
        (tests/test_check.py::test_a_conv_net_whose_stencils_straddle_switches_is_not_failed). Unless they are
        isolated: the clean share ``c`` of the stencils (below ``clean_kink`` rounding estimates) puts at most
        ``isolated_switches`` switches in the first refined stencil on average (``-ln(c) / refine``), and at least
        half the kinked stencils stand ``clean_kink * refine**refine_rounds`` rounding estimates or more (switches
        large against the refined steps' rounding). Then the rule is off: a lone switch cannot confirm a
        disagreement (docs/verdicts.md, "Isolated switches"; a ReLU MLP's first layer)
        (tests/test_check.py::test_a_relu_mlp_whose_switches_are_isolated_keeps_a_one_entry_error_found)."""
        policy = self.plan.request.policy
        if self.curved:
            return torch.zeros_like(self.measured)
        straddling, isolated = self.switches()
        walking = straddling & ~isolated
        reach = torch.zeros_like(self.measured)
        if bool(walking.any()):
            q = self.kinks.quantile(policy.walk_quantile)
            if math.isfinite(q):
                reach = torch.where(walking, policy.walk_reach * q, reach)
        return reach

    def switches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(straddling, isolated)``, ``(O,)`` bool: the outputs most of whose stencils straddle switches, and
        those whose switches are isolated (the rules of :meth:`walk_reach`)."""
        policy = self.plan.request.policy
        straddling = (self.loose & (2 * self.walk_votes > self.walk_count)
                      & (self.walk_count >= policy.reliable_median))
        isolated = ((self.clean >= math.exp(-policy.refine * policy.isolated_switches) * self.walk_count)
                    & (2 * self.large >= self.walk_count - self.clean))
        return straddling, isolated

    def switch_record(self) -> dict | None:
        """Where most of the first round's kinks are switches' (:meth:`switches`): the share of clean stencils
        (``clean``), the share of the others ``clean_kink * refine**refine_rounds`` rounding estimates or more
        (``tall``; None when every stencil is clean), what the rule on switches did (``rule``: ``"on"``, or off:
        ``"isolated"``, ``"curvature"``) and a note for the report; None elsewhere. Only a scalar loss is judged for
        switches (the noise probe that finds them is scalar-only), so one output is reported."""
        straddling, isolated = self.switches()
        if not bool(straddling.any()):
            return None
        policy = self.plan.request.policy
        o = int(straddling.nonzero()[0])
        count, clean = int(self.walk_count[o]), int(self.clean[o])
        tall = int(self.large[o]) / (count - clean) if count > clean else None
        rule = "curvature" if self.curved else "isolated" if bool(isolated[o]) else "on"
        tall_text = "" if tall is None else (f"; {tall:.0%} of the others "
                                             f"{policy.clean_kink * policy.refine**policy.refine_rounds:g} rounding "
                                             "estimates or more")
        seen = f"the first round's kinks are switches' ({clean / count:.0%} of the stencils clean{tall_text})"
        if rule == "on":
            note = (f"{seen}: a disagreement stands only beyond what switches near its entry can do "
                    f"({float(self.walk_reach()[o]):.2g}, or its own kinks' share)")
        else:
            note = f"{seen}: " + ("curvature, not switches, at the refined steps" if rule == "curvature" else
                                  "isolated switches, which alone cannot confirm a disagreement")
            note += " (the rule on switches is off)"
        return {"clean": clean / count, "tall": tall, "rule": rule, "note": note}

    def note_probe(self, probed: float, first: float) -> None:
        """The report's note, the first time the probe's noise replaces a measured one."""
        if self.probe_note is None:
            self.probe_note = (f"rounding noise measured at 1/{self.plan.request.policy.noise_probe} of the steps "
                               f"on {self.probe.columns} columns: {probed:.2g}, where the stencils of the first "
                               f"round measured up to {first:.2g} (kinks inside most stencils)")

    def on_chunk(self, start: int, stop: int, values: torch.Tensor, disp: torch.Tensor) -> None:
        """The exact-column pass's sink: a chunk's ``(S, c, O)`` values. Pairs whose output no node moved (exactly)
        and whose analytical entry is exactly zero agree with zero error (most of an elementwise or row-wise
        Jacobian); only the others are estimated and judged."""
        if self.fallback:
            return  # the tensor will be redone with exact rows
        plan, r = self.plan, self.plan.request
        cols = r.coords[start:stop]
        comp = self.compressed
        if comp is not None:
            moved = (values != plan.base_values).any(dim=0)  # NaN and inf compare unequal: they count as moved
            if comp.fit(moved):
                ana, unused_sums = comp.entries(cols, moved)
                if self._leaks(ana, unused_sums, disp):
                    self.fallback = True  # a leak: redo with exact rows, which say where
                    return
            else:
                self.compressed = comp = None
        if comp is None:
            ana = r.analytical.columns(r.k, cols)  # (c, O)
        for j in range(len(plan.scales)):  # a chunk-local scale where the Jacobian is not held densely
            if plan.scales[j] is None:
                plan.scales[j] = largest(ana[:, plan.group == j])
        active = (moved if comp is not None else (values != plan.base_values).any(dim=0)) | (ana != 0)
        jj, oo = active.nonzero(as_tuple=True)
        terms = ana.abs() * term_sizes(plan.flat_x[cols]).unsqueeze(1)  # a NaN analytical entry is judged, not summed
        magnitude = torch.where(torch.isfinite(terms), terms, torch.zeros_like(terms)).sum(dim=0)  # (O,)
        bad = self.judge_pairs(start, stop, jj, oo, values[:, jj, oo], disp[:, jj], ana[jj, oo], magnitude)
        if bad is not None:
            if comp is not None and bool((bad.judgement.verdict == DISAGREE).any()):
                self.fallback = True  # report exact values: redo with exact rows
                return
            self.flagged.append(bad)

    def _leaks(self, ana: torch.Tensor, unused_sums: torch.Tensor, disp: torch.Tensor) -> bool:
        """Whether a color the columns did not move sums above what rounding allows (a backward that leaks)."""
        plan = self.plan
        spec = plan.request.analytical.spec
        h_col = (disp[0] - disp[1]).abs() / 2  # (c,)
        lo_hi = [(spec.offsets[j], spec.offsets[j] + spec.numels[j]) for j in range(len(spec.kept))]
        allowed = (float(plan.floors.floor.max()) * max((float(ana[:, a:b].abs().max()) if b > a else 0.0)
                                                        for a, b in lo_hi)
                   + float((plan.out_eps * plan.base_values.abs()).sum()) / h_col.unsqueeze(1))
        return bool((unused_sums.abs() > allowed).any())

    def on_block(self, start, stop, jj, oo, vals, disp_pairs, ana_pairs, magnitude) -> None:
        """The colored pass's sink: a block of pattern pairs (see :meth:`judge_pairs`)."""
        bad = self.judge_pairs(start, stop, jj, oo, vals, disp_pairs, ana_pairs, magnitude)
        if bad is not None:
            self.flagged.append(bad)

    def _estimate(self, oo, vals, disp_pairs, magnitude):
        """The pairs' estimates, with the chunk's noise measurement (replaced by the probe's where that is
        ``separation`` times smaller), and the accumulators updated."""
        plan, r = self.plan, self.plan.request
        policy, size, base = r.policy, plan.size, plan.base_values
        reliable_eps = plan.reliable_eps[oo] if plan.reliable_eps is not None else None
        est, noise = entry_estimates(vals, disp_pairs, base[oo], r.stencil, plan.out_eps[oo], oo, size, None,
                                     policy, magnitude, reliable_eps)
        if self.probe is not None:
            probed, draws = self.probe.noise, self.probe.draws
            measured = torch.bincount(oo, minlength=size) >= policy.reliable_median
            # (above the floor too: the probe's has no terms' magnitude in it)
            floor = ((plan.reliable_eps if plan.reliable_eps is not None else plan.out_eps / policy.noise_floor_divisor)
                     * (base.abs() + magnitude))
            fourth = est.kink * (disp_pairs[0] - disp_pairs[1]).abs() * NOISE_FROM_FOURTH_DIFFERENCE  # (noise units)
            over = est.finite & (fourth > policy.walk_separation * torch.maximum(probed, floor)[oo])
            self.above += torch.bincount(oo[over], minlength=size)
            kinked = measured & (draws >= policy.reliable_median) & (noise > policy.separation * probed)
            if bool(kinked.any()):
                self.note_probe(float(probed[kinked].max()), float(noise[kinked].max()))
                self.kinked |= kinked
                noise = torch.where(kinked, probed, noise)
                est, _ = entry_estimates(vals, disp_pairs, base[oo], r.stencil, plan.out_eps[oo], oo, size, noise,
                                         policy)
        # each chunk measures its own noise (the largest seen per output entry is kept: see the calibration)
        self.noise = noise if self.noise is None else torch.maximum(self.noise, noise)
        reliable = torch.bincount(oo, minlength=size) >= policy.reliable_median  # (a measured median, per output)
        self.measured = torch.maximum(self.measured, torch.where(reliable, noise, 0.0))
        return est, noise

    def judge_pairs(self, start: int, stop: int, jj, oo, vals, disp_pairs, ana_pairs, magnitude) -> Flagged | None:
        """Estimate, judge and tally the pairs (``start + jj``, ``oo``) of the columns ``start:stop``; every other
        pair of those columns agrees exactly. Returns the pairs that did not agree, or None."""
        plan, r = self.plan, self.plan.request
        policy, size, spec = r.policy, plan.size, r.analytical.spec
        c = stop - start
        g_pairs = plan.group[oo]
        for j in range(len(spec.kept)):  # a chunk-local scale where the Jacobian is not held densely
            if plan.scales[j] is None:
                plan.scales[j] = largest(ana_pairs[g_pairs == j])
        est, noise = self._estimate(oo, vals, disp_pairs, magnitude)
        # an output no reliable median measured yet: the model's rounding, for judge.unsettled
        unmeasured = ((torch.bincount(oo, minlength=size)[oo] < policy.reliable_median)
                      & ~(self.measured[oo] > 0))
        self.magnitude += magnitude
        model = plan.out_eps[oo] * (plan.base_values[oo].abs() + magnitude[oo]) + plan.out_tiny[oo]
        model = torch.where(unmeasured, est.rounding * model / noise[oo].clamp(min=TINY), 0.0)
        e = Entries((start + jj) * size + oo, est.numerical, ana_pairs, est.error, est.rounding, est.kink,
                    est.finite, model)
        floor = plan.floors(e.analytical, oo)
        jd = judge(e, floor, policy)
        if r.analytical.scalar:
            self.kinks.add(e.kink[e.finite])
            votes = e.finite & (e.kink > policy.walk_signature * (e.error - e.rounding))
            self.walk_votes += torch.bincount(oo[votes], minlength=size)
            self.walk_count += torch.bincount(oo[e.finite], minlength=size)
            clean = e.finite & (e.kink < policy.clean_kink * e.rounding)
            large = e.finite & (e.kink >= policy.clean_kink * policy.refine**policy.refine_rounds * e.rounding)
            self.clean += torch.bincount(oo[clean], minlength=size)
            self.large += torch.bincount(oo[large], minlength=size)
        if self.store is not None:
            self.store.fill_chunk(start, stop, jj, oo, e, jd, plan.floors)
        for j in range(len(spec.kept)):
            judged = g_pairs == j
            self.tally[j].agree += c * spec.numels[j] - int(judged.sum())  # the pairs not judged: exact zeros
            self.tally[j].thresholds.add_gradient(ana_pairs[judged], int(judged.sum()))
        good = (jd.verdict == AGREE) & ~second_look(e, jd, policy)  # (the others are refined before they count)
        few = torch.bincount(oo, minlength=size)[oo] < policy.reliable_median
        if r.analytical.scalar:
            # Rule: a loss's chunk of fewer columns than a reliable median takes (the engine's timing probe
            # evaluates 2 and 4) is judged with the model, far above the rounding of a loss reduced in float64; its
            # entries are judged again after the first round, with what the other chunks measured
            # (tests/test_check.py::test_an_error_among_the_first_entries_is_found_in_float32)
            good &= ~few
        half_step = (disp_pairs[0] - disp_pairs[1]).abs() / 2  # the realised h of each pair's smallest level
        if bool(good.any()):
            self._tally_good(e, jd, good, g_pairs, floor, start + jj, half_step)
        bad = (~good).nonzero().flatten()
        return Flagged(e.take(bad), jd.take(bad), half_step[bad], few[bad]) if bad.numel() else None

    def _tally_good(self, e: Entries, jd: Judgement, good: torch.Tensor, g_pairs: torch.Tensor,
                    floor: torch.Tensor, columns: torch.Tensor, half_step: torch.Tensor) -> None:
        plan, policy = self.plan, self.plan.request.policy
        diff = (e.numerical - e.analytical).abs()
        sc = plan.floors.scale_of(e.index % plan.size, diff.device)
        rel = torch.where(e.analytical.abs() >= policy.rel_floor * sc, diff / e.analytical.abs().clamp(min=TINY),
                          torch.zeros_like(diff))
        excess = diff / jd.tol.clamp(min=TINY)
        for j in range(len(self.tally)):
            sel = good & (g_pairs == j)
            if bool(sel.any()):
                self.tally[j].add(e, jd.tol, sel, diff, rel, excess)
                at, weight = sampled(sel, self.detection_draws)
                part = self._calibrated(e.take(at), columns[at], half_step[at])
                a = allowances(part, jd.take(at), floor[at], policy, self.detection_draws)
                self.tally[j].thresholds.add(a, weight)
                walk = self.walk_reach()[part.index % plan.size] if bool(self.loose.any()) else None
                self.tally[j].walk_thresholds.add(a if walk is None else with_walk(a, part, jd.take(at), walk, policy),
                                                  weight)

    def _calibrated(self, e: Entries, columns: torch.Tensor, half_step: torch.Tensor) -> Entries:
        """Agreeing entries as a planted error would have them judged: past the first round's tolerance an entry is
        flagged, and the noise calibration (:func:`~.noise.calibrate`) never judges a flagged entry with less noise
        than ``eps / noise_floor_divisor`` times its terms (the detection limit's model)."""
        plan, r = self.plan, self.plan.request
        policy = r.policy
        outs = e.index % plan.size
        terms = term_sizes(plan.flat_x[r.coords[columns]]) * e.analytical.abs()
        gain = policy.rounding_safety * r.stencil.weight_norm / half_step.clamp(min=TINY)
        least = plan.out_eps[outs] / policy.noise_floor_divisor * torch.where(terms.isfinite(), terms, 0.0) * gain
        rounding = torch.where(e.finite, torch.maximum(e.rounding, least), e.rounding)
        return Entries(e.index, e.numerical, e.analytical, e.error - e.rounding + rounding, rounding, e.kink,
                       e.finite, e.model)
