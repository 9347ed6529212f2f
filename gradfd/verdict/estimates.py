"""The estimator: numerical derivatives with error estimates, the fourth difference, the kink and rounding
measures, the noise median, and the one per-entry record (:class:`Entries`) that every stage of the verdict
pipeline passes on.

For every entry the numerical derivative carries an error estimate ``error = truncation + rounding``:

* ``truncation``: the spread between the last two Richardson extrapolants (for the 4-point stencil, between the
  central difference at ``h`` and the extrapolated value), an over-estimate of the extrapolant's own error.
* ``rounding``: ``rounding_safety * sigma * ||w|| / h``, ``sigma`` the noise of one function value and ``||w||/h``
  the stencil's noise gain. ``sigma`` is measured: the robust spread of the fourth differences
  ``f(x+2h) - 4f(x+h) + 6f(x) - 4f(x-h) + f(x-2h)`` across entries (:func:`noise_median`), never below the
  model ``eps * (|f| + terms) / noise_floor_divisor`` (the model itself for fewer than ``reliable_median`` draws,
  and for the central stencil).

``kink`` is the same fourth difference in derivative units: a derivative jump ``J`` inside the stencil gives
``kink ~ J``, a smooth function ``h**3 f''''/2``. Thresholds come from the :class:`~gradfd.verdict.policy.Policy`
passed in. What does not live here: the verdict rule (:mod:`.judge`), the refinement (:mod:`.refine`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import stencils
from ..stencils import FOURTH_DIFFERENCE_CENTRE, FOURTH_DIFFERENCE_INNER, eps
from .policy import DEFAULT_POLICY, MEDIAN_ABS_NORMAL, MEDIAN_QUANTILE, NOISE_FROM_FOURTH_DIFFERENCE, Policy

__all__ = ["Entries", "has_fourth_difference", "fourth_difference", "second_difference", "noise_median", "segment_quantile", "loss_noise",
           "loss_noise_from", "estimate_entries", "entry_estimates", "column_entries", "probe_noise",
           "NOISE_FROM_FOURTH_DIFFERENCE"]


@dataclass
class Entries:
    """The per-entry record of the verdict pipeline: checked entries (Jacobian pairs, coordinates or directions) of
    one input, all tensors of one shape (``(n,)``, or ``(c, O)`` for a chunk's columns), float64 unless stated.

    Attributes:
        index: int64 entry numbers (pair ``position * O + output``, or direction numbers); None for raw estimates.
        numerical: the extrapolated derivative (NaN where not finite).
        analytical: autograd's value; None for raw estimates.
        error: ``truncation + rounding``.
        rounding: the noise part of the error estimate.
        kink: the fourth difference in derivative units (large at kinks and jumps).
        finite: bool, every node's value (and the estimate) is finite.
        model: where no reliable median measured the entry's noise, the rounding the model ``eps * (|f| + terms)``
            gives (in the units of ``rounding``; 0 elsewhere). Such an entry's rounding comes from its own fourth
            difference, which then explains whatever its stencil straddles (see :func:`.judge.unsettled`).
    """

    index: torch.Tensor | None
    numerical: torch.Tensor
    analytical: torch.Tensor | None
    error: torch.Tensor
    rounding: torch.Tensor
    kink: torch.Tensor
    finite: torch.Tensor
    model: torch.Tensor | None

    def take(self, j: torch.Tensor) -> "Entries":
        """The entries at positions ``j``."""
        return Entries(*(getattr(self, f.name)[j] for f in dataclasses.fields(self)))

    def put(self, j: torch.Tensor, other: "Entries", where: torch.Tensor) -> None:
        """Overwrite positions ``j[where]`` with ``other[where]``."""
        jj = j[where]
        for f in dataclasses.fields(self):
            getattr(self, f.name)[jj] = getattr(other, f.name)[where]

    @staticmethod
    def cat(parts: Sequence["Entries"]) -> "Entries":
        """The parts' entries, one after the other."""
        return Entries(*(torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Entries)))


def has_fourth_difference(offsets: Sequence[float]) -> bool:
    """Whether a stencil with these node offsets has the +-h and +-2h nodes of the fourth difference."""
    return all(v in offsets for v in (1.0, -1.0, 2.0, -2.0))


def fourth_difference(values, base, offsets: Sequence[float]):
    """``f(x+2h) - 4f(x+h) + 6f(x) - 4f(x-h) + f(x-2h)``, rows of ``values`` in ``offsets`` order and ``base`` the
    value at ``x`` (tensors, broadcasting); None when the stencil lacks the +-h and +-2h nodes."""
    if not has_fourth_difference(offsets):
        return None
    p1, m1, p2, m2 = (offsets.index(v) for v in (1.0, -1.0, 2.0, -2.0))
    return (values[p2] - FOURTH_DIFFERENCE_INNER * values[p1] + FOURTH_DIFFERENCE_CENTRE * base
            - FOURTH_DIFFERENCE_INNER * values[m1] + values[m2])


def second_difference(values, base, offsets: Sequence[float]):
    """``|f(x+h) - 2f(x) + f(x-h)|``: the kink measure of the central stencil (no fourth difference)."""
    i_p, i_m = offsets.index(1.0), offsets.index(-1.0)
    return (values[i_p] - 2 * base + values[i_m]).abs()


def _sorted_segments(values: torch.Tensor, segments: torch.Tensor, count: int):
    """``values`` sorted within each segment: ``(sorted values, their segments, segment starts, segment counts)``."""
    order = torch.argsort(values)
    v, s = values[order], segments[order]
    order = torch.argsort(s, stable=True)
    v, s = v[order], s[order]
    counts = torch.bincount(s, minlength=count)
    return v, s, torch.cumsum(counts, 0) - counts, counts


def _at(v: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, q: float) -> torch.Tensor:
    """The lower ``q``-quantile of each segment's sorted run (NaN where empty)."""
    if v.numel() == 0:
        return torch.full(counts.shape, math.nan, dtype=v.dtype, device=v.device)
    at = (starts + ((counts - 1).clamp(min=0) * q).long()).clamp(max=v.numel() - 1)
    return torch.where(counts > 0, v[at], torch.full_like(v[at], math.nan))


def segment_quantile(values: torch.Tensor, segments: torch.Tensor, count: int, q: float) -> torch.Tensor:
    """``(count,)``: the lower ``q``-quantile of ``values`` within each segment id (``0 <= segments < count``), NaN
    for empty segments. ``q = 0.5`` is the lower median."""
    v, _, starts, counts = _sorted_segments(values, segments, count)
    return _at(v, starts, counts, q)


def noise_median(values: torch.Tensor, segments: torch.Tensor | None = None, count: int = 1,
                 policy: Policy = DEFAULT_POLICY) -> torch.Tensor:
    """``(count,)``: the median of ``|fourth differences|`` that rounding noise gives, per segment (output entry).

    The plain (lower) median of ``values``, except where a segment holds ``reliable_median`` draws or more and most
    of them are outliers far above a bottom cluster -- kinks inside the stencils. There the median of the cluster
    is taken: sigma clipping at ``clip`` medians, started from the ``low_quantile`` quantile, used when the cluster
    holds ``cluster_min`` draws, its median is positive and the plain median is ``separation`` times larger.
    Gaussian noise keeps the plain median in all but 0.14% of segments (0.005% from 32 draws); the chance of
    halving the noise is 3.8% either way at 16 draws (simulated). One sort: the draws a clip keeps are a prefix of
    each segment's sorted run.

    Args:
        values: ``(n,)`` float64 absolute fourth differences.
        segments: ``(n,)`` int64 segment of each value; None: one segment.
        count: number of segments.
    """
    if segments is None:
        segments = torch.zeros(values.numel(), dtype=torch.int64, device=values.device)
    v, s, starts, counts = _sorted_segments(values, segments, count)
    median = _at(v, starts, counts, MEDIAN_QUANTILE)
    clipped = _at(v, starts, counts, policy.low_quantile) * (MEDIAN_ABS_NORMAL / policy.low_abs_normal)
    kept = counts
    for _ in range(policy.clip_iterations):
        kept = torch.bincount(s[v <= policy.clip * clipped[s]], minlength=count)
        clipped = _at(v, starts, kept, MEDIAN_QUANTILE)
    many = (counts >= policy.reliable_median) & (kept >= policy.cluster_min)
    # (a cluster of exact zeros is no noise measurement: rounding to a few ulps gives many zero differences)
    return torch.where(many & (clipped > 0) & (policy.separation * clipped < median), clipped, median)


def loss_noise_from(model: float, fourth: torch.Tensor | None, policy: Policy = DEFAULT_POLICY) -> float:
    """The noise of one loss value: measured from the fourth differences ``fourth`` (:func:`noise_median`), never
    below ``model / noise_floor_divisor``, nor below ``model`` itself from fewer than ``reliable_median`` of them
    (a median of a few draws can sit far below the spread); ``model`` without any."""
    if fourth is None or fourth.numel() == 0:
        return model
    measured = float(noise_median(fourth.abs().to(torch.float64), policy=policy)[0]) * NOISE_FROM_FOURTH_DIFFERENCE
    if fourth.numel() < policy.reliable_median:
        return max(model, measured)
    return max(model / policy.noise_floor_divisor, measured)


def loss_noise(dtype: torch.dtype, base_loss: float, fourth: torch.Tensor | None,
               policy: Policy = DEFAULT_POLICY) -> float:
    """:func:`loss_noise_from` with the model ``eps * |f(x)|`` of ``dtype``."""
    return loss_noise_from(eps(dtype) * abs(base_loss), fourth, policy)


def estimate_entries(ev, noise: float | None = None, policy: Policy = DEFAULT_POLICY) -> Entries:
    """Numerical derivatives of a :class:`gradfd.engine.Evaluation` with error estimates and kink measures
    (``index``, ``analytical`` and ``model`` are None).

    Args:
        ev: the engine's raw result.
        noise: the loss noise ``sigma`` to use instead of estimating it from ``ev``.
    """
    numerical, spread = ev.estimate()
    half = ev.half_spacing()[0].abs()  # realised half-spacing of the smallest level
    finite = ev.finite() & torch.isfinite(numerical)
    offsets = ev.stencil.offsets
    fourth = fourth_difference(ev.losses, ev.base_loss, offsets)
    if noise is None:
        noise = loss_noise(ev.dtype, float(ev.base_loss) + ev.loss_offset,
                           fourth[finite] if fourth is not None else None, policy)
    rounding = policy.rounding_safety * noise * ev.stencil.weight_norm / half
    truncation = spread if spread is not None else torch.zeros_like(numerical)
    if fourth is not None:
        kink = fourth.abs() / (2 * half)
    else:
        kink = second_difference(ev.losses, ev.base_loss, offsets) / half
    nan = torch.full_like(numerical, math.nan)
    return Entries(index=None, numerical=torch.where(finite, numerical, nan), analytical=None,
                   error=torch.where(finite, truncation + rounding, nan), rounding=rounding,
                   kink=torch.where(finite, kink, nan), finite=finite, model=None)


def entry_estimates(values: torch.Tensor, displacement: torch.Tensor, base: torch.Tensor, stencil: stencils.Stencil,
                    out_eps: torch.Tensor, outputs: torch.Tensor, n_outputs: int,
                    noise: torch.Tensor | None, policy: Policy, magnitude: torch.Tensor | None = None,
                    reliable_eps: torch.Tensor | None = None) -> tuple[Entries, torch.Tensor]:
    """Numerical Jacobian entries with error estimates, for ``n`` (input column, output entry) pairs.

    Args:
        values: ``(S, n)`` float64 output entry ``outputs[e]`` at the stencil's nodes around column ``e``'s input.
        displacement: ``(S, n)`` float64 realised steps of each entry's column.
        base: ``(n,)`` float64 output values at the unperturbed point.
        stencil: the stencil (rows of ``values`` in ``stencil.offsets`` order).
        out_eps: ``(n,)`` machine epsilon of each output's dtype.
        outputs: ``(n,)`` int64 output entry of each pair; ``n_outputs`` their number.
        noise: ``(n_outputs,)`` noise per output entry to use, or None to measure it here: the median of the
            fourth differences over the pairs that moved each output (:func:`noise_median`), never below the
            model ``eps * (|f| + magnitude)`` (divided by ``noise_floor_divisor`` where the median is reliable).
        magnitude: ``(n_outputs,)`` size of the terms each output sums (``sum_i |J_oi x_i|``): an output that is a
            sum with cancellation rounds like its terms, not like its value.
        reliable_eps: ``(n,)`` the model's epsilon where the median is reliable; default
            ``out_eps / noise_floor_divisor``. A loss reduced in float64 passes float64's.

    Returns:
        ``(entries, noise)``: ``(n,)`` :class:`Entries` (``index``, ``analytical``, ``model`` None) and the
        ``(n_outputs,)`` noise.
    """
    offsets = stencil.offsets
    diff = displacement[0::2] - displacement[1::2]  # (K, n)
    levels = (values[0::2] - values[1::2]) / diff
    numerical, spread = stencils.extrapolate(levels, diff / 2)
    finite = torch.isfinite(values).all(dim=0) & torch.isfinite(numerical)
    h = diff[0].abs() / 2
    fourth = fourth_difference(values, base, offsets)
    kink = fourth.abs() / (2 * h) if fourth is not None else second_difference(values, base, offsets) / h
    if noise is None:
        model = torch.zeros(n_outputs, dtype=torch.float64, device=values.device)
        trusted = torch.zeros(n_outputs, dtype=torch.float64, device=values.device)
        size = base.abs() + (magnitude[outputs] if magnitude is not None else 0)
        model[outputs] = out_eps * size
        trusted[outputs] = (out_eps / policy.noise_floor_divisor if reliable_eps is None else reliable_eps) * size
        if fourth is None:
            noise = model
        else:
            moved = finite & (values != base).any(dim=0)
            measured = noise_median(fourth.abs()[moved], outputs[moved], n_outputs, policy)
            moved_count = torch.bincount(outputs[moved], minlength=n_outputs)
            measured = measured.nan_to_num(0.0) * NOISE_FROM_FOURTH_DIFFERENCE
            reliable = moved_count >= policy.reliable_median
            noise = torch.maximum(torch.where(reliable, trusted, model), measured)
    rounding = policy.rounding_safety * noise[outputs] * stencil.weight_norm / h
    truncation = spread if spread is not None else torch.zeros_like(numerical)
    nan = torch.full_like(numerical, math.nan)
    entries = Entries(index=None, numerical=torch.where(finite, numerical, nan), analytical=None,
                      error=torch.where(finite, truncation + rounding, nan), rounding=rounding,
                      kink=torch.where(finite, kink, nan), finite=finite, model=None)
    return entries, noise


def column_entries(values: torch.Tensor, displacement: torch.Tensor, base: torch.Tensor, stencil: stencils.Stencil,
                   out_eps: torch.Tensor, noise: torch.Tensor | None, policy: Policy) -> tuple[Entries, torch.Tensor]:
    """:func:`entry_estimates` for every pair of a chunk: ``values (S, c, O)``, ``displacement (S, c)``,
    ``base (O,)``, ``out_eps (O,)``; the returned entries' tensors are ``(c, O)``."""
    s_, c, o = values.shape
    outputs = torch.arange(o, device=values.device).repeat(c)
    entries, noise = entry_estimates(values.reshape(s_, c * o), displacement.repeat_interleave(o, dim=1),
                                     base.repeat(c), stencil, out_eps.repeat(c), outputs, o, noise, policy)
    shaped = {f: getattr(entries, f).view(c, o) for f in ("numerical", "error", "rounding", "kink", "finite")}
    return dataclasses.replace(entries, **shaped), noise


def probe_noise(values: torch.Tensor, displacement: torch.Tensor, base: torch.Tensor, stencil: stencils.Stencil,
                out_eps: torch.Tensor, reliable_eps: torch.Tensor | None, policy: Policy
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise of each output measured by the noise probe: fourth differences at steps so small that kinks inside
    the stencils are rare.

    Args:
        values: ``(S, c, O)`` float64 outputs at the stencil's nodes around ``c`` probe columns.
        displacement: ``(S, c)`` float64 realised steps of the nodes.
        base, out_eps, reliable_eps: ``(O,)`` as in :func:`entry_estimates` (per output entry).

    Returns:
        ``(noise, draws)``: ``(O,)`` float64 noise (as :func:`entry_estimates` measures it) and ``(O,)`` int64 number
        of columns that moved each output (0 where the probe measured a rounding pattern: see below). Columns whose
        realised nodes are off the stencil's grid by more than ``probe_grid_tolerance`` of a step (a step of a few
        ulps of its input) are left out: their fourth difference is no noise.
    """
    s_, c, o = values.shape
    p1, m1 = stencil.offsets.index(1.0), stencil.offsets.index(-1.0)
    unit = (displacement[p1] - displacement[m1]) / 2  # (c,)
    offsets = torch.tensor(stencil.offsets, dtype=torch.float64, device=values.device).view(-1, 1)
    on_grid = (unit != 0) & ((displacement - offsets * unit).abs() <= policy.probe_grid_tolerance * unit.abs()
                             ).all(dim=0)
    values, displacement = values[:, on_grid], displacement[:, on_grid]
    c = values.shape[1]
    outputs = torch.arange(o, device=values.device).repeat(c)
    flat = values.reshape(s_, c * o)
    pair_base = base.repeat(c)
    _, noise = entry_estimates(flat, displacement.repeat_interleave(o, dim=1), pair_base, stencil, out_eps.repeat(c),
                               outputs, o, None, policy, None,
                               reliable_eps.repeat(c) if reliable_eps is not None else None)
    moved = torch.isfinite(flat).all(dim=0) & (flat != pair_base).any(dim=0)
    draws = torch.bincount(outputs[moved], minlength=o)
    # Rule: a fourth difference of exactly zero is a rounding pattern, not noise (at steps of a few thousand ulps
    # a polynomial's roundings follow the nodes regularly and half of them cancel); an output with more than
    # probe_zeros of them is not measured by the probe
    fourth = fourth_difference(flat, pair_base, stencil.offsets)
    zeros = torch.bincount(outputs[moved & (fourth == 0)], minlength=o)
    return noise, torch.where(zeros > policy.probe_zeros * draws, torch.zeros_like(draws), draws)
