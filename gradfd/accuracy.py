"""Error estimates for finite-difference entries, and the tests that decide when a difference cannot be trusted.

For every entry the numerical derivative carries an error estimate

    error = truncation + rounding

* ``truncation``: the spread between the last two Richardson extrapolants (for the 4-point stencil, between the
  central difference at ``h`` and the extrapolated value). It is an over-estimate of the extrapolant's own
  truncation error, and it also absorbs part of the rounding noise.
* ``rounding``: ``ROUNDING_SAFETY * sigma * ||w|| / h``, where ``sigma`` is the noise of one loss evaluation and
  ``||w||/h`` the noise gain of the stencil (the norm of its weights). ``sigma`` is measured: the robust spread
  (median absolute value) of the fourth differences ``f(x+2h) - 4f(x+h) + 6f(x) - 4f(x-h) + f(x-2h)`` across
  entries, which is noise wherever the function is smooth on the scale of ``h``; it is never taken below a
  quarter of ``eps * |f(x)|`` (the rounding of the loss itself), which is also the model for the central stencil.
  The measurement catches losses whose rounding exceeds ``eps*|f|`` (long sums, cancellation).

``kink`` measures how far the one-sided differences at two steps are from what a smooth function gives (the same
fourth difference, in units of a derivative): a derivative jump ``J`` at ``x`` (ReLU, abs) gives ``kink ~ J``, a
smooth function ``h**3 * f''''/2``. An entry whose numerical and analytical values disagree by less than about
twice its ``kink`` is *unresolved*: the finite difference there is not reliable enough to blame the gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .engine import Evaluation
from .stencils import eps

__all__ = ["EntryEstimates", "estimate_entries", "loss_noise", "loss_noise_from", "noise_median",
           "segment_quantile", "ROUNDING_SAFETY", "NOISE_FROM_FOURTH_DIFFERENCE"]

RELIABLE_MEDIAN = 8
# A kinked majority: in a float32 ReLU network most stencils of a first-layer weight straddle a switch (62% of W1
# in benchmarks' 64-sample 30-20-4 net), whose fourth differences sit 100x above the rounding noise and carry the
# median with them. Where the median is that far above the bottom cluster, the cluster measures the noise:
LOW_QUANTILE, LOW_ABS_NORMAL = 0.1, 0.1257  # a start that tolerates 90% outliers: |N(0,1)|'s 10th percentile ...
MEDIAN_ABS_NORMAL = 0.6745  # ... and median
CLIP = 6.0  # sigma clipping: keep draws within CLIP medians (~4 standard deviations) of the noise
CLUSTER_MIN = 5  # ... of at least this many draws, of RELIABLE_MEDIAN or more in all
SEPARATION = 16.0  # use the clipped median only when the median of all draws is this many times larger
ROUNDING_SAFETY = 3.0  # sigma multiples: the rounding part bounds ~99.7% of Gaussian-like noise
# |4th difference| of i.i.d. noise sigma has spread sqrt(1+16+36+16+1) = sqrt(70) sigma; median|N(0,1)| = 0.6745
NOISE_FROM_FOURTH_DIFFERENCE = 1.0 / (math.sqrt(70.0) * 0.6745)


@dataclass
class EntryEstimates:
    """Per-entry numerical derivatives and their error estimates (all ``(M,)`` float64 unless stated).

    Attributes:
        numerical: the extrapolated derivative.
        truncation: spread between the last two extrapolants (0 for the plain central stencil).
        rounding: noise part of the error estimate.
        error: ``truncation + rounding``.
        kink: inconsistency of the one-sided differences (derivative units); large at kinks and jumps.
        finite: bool, every node loss was finite.
        noise: estimated standard deviation of one loss evaluation (float).
        truncation_estimated: whether the stencil gave a truncation estimate (False for ``"central"``).
    """

    numerical: torch.Tensor
    truncation: torch.Tensor
    rounding: torch.Tensor
    error: torch.Tensor
    kink: torch.Tensor
    finite: torch.Tensor
    noise: float
    truncation_estimated: bool


def _fourth_difference(ev: Evaluation) -> torch.Tensor | None:
    """``f(x+2h) - 4f(x+h) + 6f(x) - 4f(x-h) + f(x-2h)`` per entry, when the stencil has the +-h and +-2h nodes."""
    offsets = ev.stencil.offsets
    try:
        p1, m1, p2, m2 = (offsets.index(o) for o in (1.0, -1.0, 2.0, -2.0))
    except ValueError:
        return None
    f = ev.losses
    return f[p2] - 4 * f[p1] + 6 * ev.base_loss - 4 * f[m1] + f[m2]


def loss_noise(dtype: torch.dtype, base_loss: float, fourth: torch.Tensor | None) -> float:
    """Standard deviation of the rounding noise of one loss evaluation.

    Measured from the fourth differences (robustly: their median absolute value, see :func:`noise_median`), but
    never below a quarter of ``eps * |f(x)|``, or below ``eps * |f(x)|`` itself when there are fewer than
    ``RELIABLE_MEDIAN`` of them (a median of a few draws can sit far below the spread); ``eps * |f(x)|`` (the
    rounding of the loss itself) when there are none.
    """
    return loss_noise_from(eps(dtype) * abs(base_loss), fourth)


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


def noise_median(values: torch.Tensor, segments: torch.Tensor | None = None, count: int = 1) -> torch.Tensor:
    """``(count,)``: the median of ``|fourth differences|`` that rounding noise gives, per segment (output entry).

    The plain (lower) median of ``values``, except where a segment holds ``RELIABLE_MEDIAN`` draws or more and most
    of them are outliers far above a bottom cluster -- kinks inside the stencils. There the median of the cluster
    is taken: sigma clipping at ``CLIP`` medians, started from the 10th percentile (which stays in the cluster while
    it holds 10% of the draws), and used when the cluster holds ``CLUSTER_MIN`` draws, its median is positive and
    the plain median is ``SEPARATION`` times larger. Gaussian noise keeps the plain median in all but 0.14% of
    segments (0.005% from 32 draws), and those estimates are not lower than the plain median's own scatter allows:
    the chance of halving the noise is 3.8% either way at 16 draws (simulated). Fourth differences of a smooth
    function spread over less than three decades keep the plain median too. One sort: the draws kept by a clip
    are a prefix of each segment's sorted run.

    Args:
        values: ``(n,)`` float64 absolute fourth differences.
        segments: ``(n,)`` int64 segment of each value; None: one segment.
        count: number of segments.
    """
    if segments is None:
        segments = torch.zeros(values.numel(), dtype=torch.int64, device=values.device)
    v, s, starts, counts = _sorted_segments(values, segments, count)
    median = _at(v, starts, counts, 0.5)
    clipped = _at(v, starts, counts, LOW_QUANTILE) * (MEDIAN_ABS_NORMAL / LOW_ABS_NORMAL)
    kept = counts
    for _ in range(3):
        kept = torch.bincount(s[v <= CLIP * clipped[s]], minlength=count)
        clipped = _at(v, starts, kept, 0.5)
    many = (counts >= RELIABLE_MEDIAN) & (kept >= CLUSTER_MIN)
    # (a cluster of exact zeros is no noise measurement: rounding to a few ulps gives many zero differences)
    return torch.where(many & (clipped > 0) & (SEPARATION * clipped < median), clipped, median)


def loss_noise_from(model: float, fourth: torch.Tensor | None) -> float:
    """:func:`loss_noise` with the model noise ``eps * |f(x)|`` given directly."""
    if fourth is None or fourth.numel() == 0:
        return model
    measured = float(noise_median(fourth.abs().to(torch.float64))[0]) * NOISE_FROM_FOURTH_DIFFERENCE
    if fourth.numel() < RELIABLE_MEDIAN:  # a median of a few draws can sit far below the spread
        return max(model, measured)
    return max(model / 4, measured)


def estimate_entries(ev: Evaluation, noise: float | None = None) -> EntryEstimates:
    """Numerical derivatives of an :class:`~gradfd.engine.Evaluation` with error estimates and kink measures.

    Args:
        ev: the engine's raw result.
        noise: the loss noise ``sigma`` to use instead of estimating it from ``ev``.
    """
    numerical, spread = ev.estimate()
    half = ev.half_spacing()[0].abs()  # realised half-spacing of the smallest level
    finite = ev.finite() & torch.isfinite(numerical)
    fourth = _fourth_difference(ev)
    if noise is None:
        noise = loss_noise(ev.dtype, float(ev.base_loss) + ev.loss_offset,
                           fourth[finite] if fourth is not None else None)
    rounding = ROUNDING_SAFETY * noise * ev.stencil.weight_norm / half
    truncation = spread if spread is not None else torch.zeros_like(numerical)
    if fourth is not None:
        kink = fourth.abs() / (2 * half)
    else:
        i_plus, i_minus = ev.stencil.offsets.index(1.0), ev.stencil.offsets.index(-1.0)
        kink = (ev.losses[i_plus] - 2 * ev.base_loss + ev.losses[i_minus]).abs() / half
    nan = torch.full_like(numerical, math.nan)
    return EntryEstimates(
        numerical=torch.where(finite, numerical, nan),
        truncation=torch.where(finite, truncation, nan),
        rounding=rounding,
        error=torch.where(finite, truncation + rounding, nan),
        kink=torch.where(finite, kink, nan),
        finite=finite,
        noise=noise,
        truncation_estimated=spread is not None,
    )
