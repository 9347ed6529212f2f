"""Compatibility shim: the estimator moved to :mod:`gradfd.verdict.estimates` (``gradfd/bench.py`` imports it from
here). New code imports from there."""

from .verdict.estimates import (NOISE_FROM_FOURTH_DIFFERENCE, Entries, estimate_entries, loss_noise,
                                loss_noise_from, noise_median, segment_quantile)

__all__ = ["NOISE_FROM_FOURTH_DIFFERENCE", "Entries", "estimate_entries", "loss_noise", "loss_noise_from", "noise_median",
           "segment_quantile"]
