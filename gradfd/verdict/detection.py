"""Detection limits: the smallest error on a single entry, relative to the tensor's RMS gradient, that a check would
flag with ``DETECTION_PROBABILITY``.

Rule: an error ``delta * rms`` planted on one entry, chosen uniformly among the entries looked at, shifts what the
check compares by that much. It is flagged at the first step where the shift exceeds the room the entry's verdict
left, ``a = flags[0] + |numerical - analytical|`` (the worse sign of the existing discrepancy; ``flags[0]`` is the
smallest discrepancy the verdict rule calls a disagreement: beyond the tolerance, the ambiguous truncation band and
the kink's reach; infinite on a non-smooth or non-finite stencil; :func:`.judge.judge`), and the refinement then
reproduces it: the estimate one ``refine``-fold step smaller must lie closer to the first estimate than to the
analytical value (:mod:`.refine`), which fails where that estimate's noise, toward the analytical value, exceeds
half the shift. So the shift must also exceed ``2 zeta sd``, ``zeta`` standard normal (no bound where it is
negative) and ``sd = refine * rounding / rounding_safety`` that estimate's noise. A shift past the tolerance that
the rule calls unresolved (a kink, the ambiguous band) is refined, and gets the same test at each smaller step
``k`` the refinement may take (``flags[k]`` of the judgement, the rounding ``refine**k``-fold larger):
``a_k = max(tolerance, flags[k]) + |numerical - analytical|``. Each looked-at entry's threshold is
``min_k max(a_k, 2 zeta_k refine**k sd) / rms`` (``zeta`` drawn, seeded), and the limit is the
``DETECTION_PROBABILITY`` quantile of the thresholds: that share of the entries is flagged at or above it.

- Coordinates (full and sample mode): ``a`` of each judged pair; 0 for a disagreeing one (flagged already). The
  pairs the function does not depend on (no node moved the output, and the analytical value is exactly zero: most
  of an elementwise Jacobian) are not counted, in the thresholds or in the RMS: an error there faces only the dtype
  floor. Sample mode states the limit per sampled entry, beside the share of entries not looked at, which no error
  can be found in.
- Directions: an error on entry ``i`` (and output ``o`` of a tensor-valued function) moves direction ``d``'s
  derivative by ``delta * rms * s_i * z_d * u_do``, where ``s_i`` is the entry's step and ``z_d`` the direction's
  standard-normal coefficient there, unknown to the user; flagged if one direction's move exceeds its allowance
  ``a_d``: the room its judged rung and its confirming rung both leave (their tolerances plus their discrepancies,
  :func:`~.directional.judge_ladder`; nothing is re-evaluated, so there is no reproduction draw). Its threshold
  ``min_d a_d / (rms s_i |z_d u_do|)`` is drawn ``DETECTION_DRAWS`` times (seeded), over uniform ``i``, ``o`` and
  fresh ``z``.

``benchmarks/bench_detection.py`` plants errors at the stated limit and measures the share caught
(docs/verdicts.md).
"""

from __future__ import annotations

import math

import torch

from ..report import DISAGREE
from .judge import flag_steps
from .policy import (DETECTION_BINS_PER_OCTAVE, DETECTION_DRAWS, DETECTION_LOG2_RANGE, DETECTION_PROBABILITY,
                     DETECTION_SAMPLE, SEEDS)

__all__ = ["DETECTION_PROBABILITY", "Thresholds", "allowances", "with_walk", "detection_generator", "sampled",
           "directional_limit"]

_BINS_PER_OCTAVE, _LOG2_RANGE = DETECTION_BINS_PER_OCTAVE, DETECTION_LOG2_RANGE


def detection_generator() -> torch.Generator:
    """The seeded generator of the draws (``zeta``): a report's limit is reproducible."""
    return torch.Generator().manual_seed(SEEDS.detection)


class Thresholds:
    """The absolute thresholds ``a`` of the pairs of one compared output, streamed chunk by chunk: a histogram of
    ``log2 a``, a count of zeros (flagged at any error) and of infinities (never flagged), and the sum of squared
    analytical values and the number of pairs (the RMS gradient)."""

    def __init__(self) -> None:
        self.hist = torch.zeros(2 * _LOG2_RANGE * _BINS_PER_OCTAVE, dtype=torch.float64)
        self.zeros = 0
        self.infinite = 0
        self.sumsq = 0.0
        self.pairs = 0

    def add(self, a: torch.Tensor, weight: int = 1) -> None:
        """Count thresholds in (0: flagged at any error; inf or NaN: never), each standing for ``weight`` pairs
        (a sample of a chunk's, :func:`sampled`)."""
        a = a.detach().to(torch.float64).reshape(-1).cpu()
        never = ~torch.isfinite(a)
        self.infinite += weight * int(never.sum())
        a = a[~never]
        self.zeros += weight * int((a <= 0).sum())
        a = a[a > 0]
        if a.numel():
            bins = ((a.log2() + _LOG2_RANGE) * _BINS_PER_OCTAVE).floor().clamp(0, self.hist.numel() - 1).long()
            self.hist += weight * torch.bincount(bins, minlength=self.hist.numel()).to(torch.float64)

    def add_gradient(self, analytical: torch.Tensor, pairs: int) -> None:
        """Count ``pairs`` pairs in, whose nonzero analytical values are ``analytical``."""
        g = analytical.detach().to(torch.float64)
        self.sumsq += float(g[g.isfinite()].pow(2).sum())  # a non-finite analytical entry is judged, not summed
        self.pairs += pairs

    def rms_of(self, gradient: torch.Tensor) -> None:
        """Take the RMS from ``gradient`` (its finite nonzero entries: those a loss depends on) instead of the pairs
        counted in."""
        g = gradient.detach().to(torch.float64)
        g = g[g.isfinite() & (g != 0)]
        self.sumsq, self.pairs = float(g.pow(2).sum()), g.numel()

    def merged(self, other: "Thresholds") -> "Thresholds":
        out = Thresholds()
        out.hist = self.hist + other.hist
        out.zeros, out.infinite = self.zeros + other.zeros, self.infinite + other.infinite
        out.sumsq, out.pairs = self.sumsq + other.sumsq, self.pairs + other.pairs
        return out

    def quantile(self, p: float) -> float:
        """The ``p`` quantile of the values counted in (the upper edge of its histogram bin): 0 where zeros make
        it, inf where infinities do, NaN without a value."""
        total = self.zeros + self.infinite + float(self.hist.sum())
        if total == 0:
            return math.nan
        need = p * total
        if need <= self.zeros:
            return 0.0
        cum = self.zeros + self.hist.cumsum(0)
        reached = (cum >= need).nonzero()  # integer counts and weights: exact in float64
        if reached.numel() == 0:
            return math.inf
        return 2.0 ** ((int(reached[0]) + 1) / _BINS_PER_OCTAVE - _LOG2_RANGE)

    def limit(self) -> float:
        """The ``DETECTION_PROBABILITY`` quantile of the thresholds over the RMS gradient; inf where more than
        ``1 - DETECTION_PROBABILITY`` of the pairs are never flagged, NaN without a pair or with a zero gradient."""
        if self.sumsq <= 0 or self.pairs == 0:
            return math.nan
        return self.quantile(DETECTION_PROBABILITY) / math.sqrt(self.sumsq / self.pairs)


def sampled(mask: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Positions of a random ``1/weight`` of the set entries of ``mask`` (drawn with ``gen``), at most
    ``DETECTION_SAMPLE`` of them, and the integer ``weight``: the thresholds of a large chunk are estimated from a
    sample (their quantile needs no more); a random one, since a regular stride could alias with a periodic layout
    (a convolution's kernel positions)."""
    where = mask.nonzero().flatten()
    weight = max(1, -(-where.numel() // DETECTION_SAMPLE))
    if weight == 1:
        return where, 1
    pick = torch.randperm(where.numel(), generator=gen)[:where.numel() // weight].to(where.device)
    return where[pick.sort().values], weight


def allowances(e, j, floor: torch.Tensor, policy, gen: torch.Generator) -> torch.Tensor:
    """The shift each entry of ``e`` (judged ``j``, with tolerance floor ``floor``) needs to be flagged (the module
    docstring; drawn with ``gen``): 0 where it disagrees already."""
    flags = flag_steps(e, floor, policy)
    diff = (e.numerical - e.analytical).abs()
    sd = policy.refine * e.rounding / policy.rounding_safety

    def reproduced(a: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        zeta = torch.randn(noise.shape, generator=gen, dtype=torch.float64).clamp(min=0).to(noise.device)
        return torch.maximum(a + diff, 2 * zeta * noise)

    a = reproduced(flags[0], sd)
    for k in range(1, flags.shape[0]):
        a = torch.minimum(a, reproduced(torch.maximum(j.tol, flags[k]), policy.refine ** k * sd))
    return torch.where(j.verdict == DISAGREE, 0.0, a)


def with_walk(a: torch.Tensor, e, j, walk: torch.Tensor, policy) -> torch.Tensor:
    """The thresholds ``a`` (:func:`allowances`) of entries ``e`` (judged ``j``) where the rule on switches holds
    (``walk``, the reach of the switches near each entry, 0 elsewhere; :func:`~.refine.walked`): every reproduction
    must also exceed the reach, and ``walk_explains`` times the entry's kink (which the refined step about halves).
    The first round passes the reach as measured so far (chunk by chunk), the summary the final one."""
    diff = (e.numerical - e.analytical).abs()
    reach = torch.maximum(walk, policy.walk_explains * e.kink)
    return torch.where((walk > 0) & (j.verdict != DISAGREE), torch.maximum(a, reach + diff), a)


def directional_limit(allowance: torch.Tensor, steps: torch.Tensor, rms: float, u: torch.Tensor | None) -> float:
    """The detection limit of a directional check (the module docstring).

    Args:
        allowance: ``(D,)`` float64 the shift each direction needs to be flagged
            (:func:`~.directional.judge_ladder`; 0: disagreeing; inf: never flagged).
        steps: ``(N,)`` float64 the entries' steps (the scale of the directions' coefficients).
        rms: the RMS gradient (for a tensor-valued function, of its Jacobian entries).
        u: ``(D, O)`` the directions' output cotangents, or None for a loss.

    Returns:
        The limit relative to ``rms``; inf where more than ``1 - DETECTION_PROBABILITY`` of the draws are never
        flagged, NaN for a zero gradient or no direction.
    """
    if allowance.numel() == 0 or steps.numel() == 0 or not rms > 0:
        return math.nan
    gen = detection_generator()
    k, d = DETECTION_DRAWS, allowance.numel()
    s = steps.detach().to(torch.float64).cpu()[torch.randint(steps.numel(), (k,), generator=gen)]
    z = torch.randn(k, d, generator=gen, dtype=torch.float64).abs()
    if u is not None:
        o = torch.randint(u.shape[1], (k,), generator=gen)
        z = z * u.detach().to(torch.float64).cpu()[:, o].T.abs()
    a = allowance.detach().to(torch.float64).cpu()
    per = a.unsqueeze(0) / (rms * s.unsqueeze(1) * z)  # (k, D)
    per = torch.where(torch.isnan(per), math.inf, per)  # a NaN allowance, or 0 / 0: not flagged
    threshold = per.min(dim=1).values.sort().values
    return float(threshold[math.ceil(DETECTION_PROBABILITY * k) - 1])
