"""The verdict policy: every threshold of :func:`gradfd.check`'s verdicts, with why it has its value and which
benchmark calibrated it, in one frozen dataclass (:class:`Policy`), plus the seeds and the statistics of Gaussian
noise that the pipeline uses.

What lives here: :class:`Policy` and :data:`DEFAULT_POLICY`; :func:`resolve_policy` (``check(..., policy=...)``'s
validation); :func:`policy_table` (the table of docs/verdicts.md, generated from the fields); :class:`Seeds`
(every seed offset and random weight of the pipeline); the constants of |N(0, 1)| the noise measurement divides by;
check()'s argument defaults. What does not: memory and performance constants (:mod:`gradfd.budget`), the
guard :data:`gradfd.report.TINY` (re-exported here).

The pipeline reads thresholds only from the Policy it is handed, never from module globals.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..report import TINY
from ..validation import describe

__all__ = ["Policy", "DEFAULT_POLICY", "resolve_policy", "policy_table", "Seeds", "SEEDS", "TINY",
           "DEFAULT_SAMPLES", "DEFAULT_DIRECTIONS", "SAMPLE_LARGEST_SHARE", "MEDIAN_ABS_NORMAL", "MEDIAN_QUANTILE",
           "NOISE_FROM_FOURTH_DIFFERENCE"]

ACCURACY = "benchmarks/bench_accuracy.py"
DOMAIN = "benchmarks/bench_domain.py"
POLES = "benchmarks/bench_poles.py"
JACOBIAN = "benchmarks/bench_jacobian.py"
KINKS = "benchmarks/bench_kinks.py"
DIRECTIONAL = "benchmarks/bench_directional.py"
REFERENCE = "benchmarks/bench_reference.py"
RULES = "benchmarks/bench_rules.py"

# check()'s argument defaults (not thresholds)
DEFAULT_SAMPLES = 256  # entries per tensor in sample mode
DEFAULT_DIRECTIONS = 8  # directions in directional mode
SAMPLE_LARGEST_SHARE = 4  # sample mode takes samples // this of the largest-|gradient| entries, the rest uniformly

# The detection limit a report states (gradfd/verdict/detection.py; a statement, not a threshold: no verdict reads it)
DETECTION_PROBABILITY = 0.95  # the limit is the error flagged with this probability
DETECTION_DRAWS = 4096  # draws of the entry and the directions' coefficients behind a directional limit
DETECTION_SAMPLE = 4096  # thresholds computed per chunk and output at most (a regular sample of the pairs)
DETECTION_BINS_PER_OCTAVE = 8  # thresholds are kept as a histogram of log2: exact to 1/8 octave (9%)
DETECTION_LOG2_RANGE = 1100  # ... over 2^-1100 .. 2^1100 (float64 spans 2^-1074 .. 2^1024)

# Statistics of Gaussian noise (facts, not thresholds): median |N(0,1)| = 0.6745, and the |fourth difference| of
# i.i.d. noise sigma has spread sqrt(1 + 16 + 36 + 16 + 1) = sqrt(70) sigma
MEDIAN_ABS_NORMAL = 0.6745
MEDIAN_QUANTILE = 0.5  # the (lower) median is this quantile
NOISE_FROM_FOURTH_DIFFERENCE = 1.0 / (math.sqrt(70.0) * 0.6745)


def _f(default, why: str, calibrated_by: str = ACCURACY, *, minimum: float = 0.0, strict: bool = True,
       maximum: float = math.inf):
    """A policy field: its default, the rule behind its value, the benchmark that calibrated it and its range
    (``> minimum`` when ``strict``, else ``>= minimum``; ``<= maximum``: a share or a quantile is at most 1)."""
    return field(default=default, metadata={"why": why, "calibrated_by": calibrated_by, "minimum": minimum,
                                            "strict": strict, "maximum": maximum})


@dataclass(frozen=True)
class Policy:
    """Every verdict threshold (docs/verdicts.md explains the rules; ``policy_table()`` lists them).

    Pass an instance, or a mapping of field overrides, as ``gradfd.check(..., policy=...)``. Integer fields take
    ints; float fields take ints or floats. An explicit ``atol``/``rtol`` of ``check`` replaces the dtype floors
    that ``floor_eps`` sets.
    """

    # tolerance
    floor_eps: int = _f(64, "the dtype floor: this many eps relative to the entry and to the tensor's largest "
                            "analytical entry, covering the rounding of the analytical gradient itself")
    tolerance_safety: float = _f(1.5, "margin over the estimated finite-difference error")
    rounding_safety: float = _f(3.0, "sigma multiples of the rounding part: bounds ~99.7% of Gaussian-like noise")
    # kinks
    kink_noise_factor: float = _f(6.0, "kink > this x rounding estimate is non-smooth: a smooth function's kink "
                                       "statistic is ~1.5|z| rounding estimates, exceeded by chance at ~1 in 25000")
    kink_explains: float = _f(0.5, "unresolved when kink >= this x |numerical - analytical|")
    kink_band: float = _f(3.0, "unresolved when |numerical - analytical| <= this x truncation spread (+ rounding): "
                               "a kink the fourth difference cannot see moves the extrapolant up to 2 spreads")
    clean_kink: float = _f(3.0, "a refined stencil is kink-free below this many rounding estimates (1.5|z| exceeds "
                                "3 for ~4% of smooth entries)")
    walk_separation: float = _f(6.0, "most stencils of a loss straddle switches where most first-round fourth "
                                     "differences (counted one by one over every chunk) stand this x the probe's "
                                     "noise (the probe's own rule, `separation`, is stricter) ...", KINKS)
    walk_signature: float = _f(1.0, "... and most of its kinks exceed this x their truncation spread (curvature's "
                                    "are ~3h f4/f3 of it: a small share where h is small against f's scale)", KINKS)
    isolated_switches: float = _f(0.6, "... unless the switches are isolated: the first refined stencil holds this "
                                       "many or fewer on average (-ln(clean share) / refine), and at least half the "
                                       "kinked stencils stand clean_kink * refine^refine_rounds rounding estimates "
                                       "or more (set between the tuned conv weights' and ReLU MLPs': bench_kinks.py)",
                                  KINKS)
    walk_quantile: float = _f(0.9, "there, switches near an entry are measured by this quantile of the first "
                                   "round's kinks over the output's entries", KINKS, maximum=1.0)
    walk_reach: float = _f(2.5, "... and a disagreement stands only beyond this x that quantile (the float64 table "
                                "of bench_kinks.py: the largest error of a conv net at a float32 check's steps)",
                           KINKS)
    walk_explains: float = _f(8.0, "... and beyond this x its own (larger step's kink / 2 + the smaller's + the move "
                                   "between the two estimates; same table)", KINKS)
    # directional mode's step ladder (gradfd/verdict/directional.py)
    ladder_low: int = _f(-12, "its lowest rung is 2^this times the automatic step: the 4-point stencil's truncation "
                             "is 2^(4 x this) of the automatic step's, and what is left is rounding (the noise is "
                             "measured there)", DIRECTIONAL,
                         minimum=-30, maximum=0, strict=False)
    ladder_high: int = _f(3, "its highest rung is 2^this times the automatic step: rounding falls as 1/t where the "
                             "function is smooth", DIRECTIONAL, minimum=0, maximum=30, strict=False)
    ladder_noise_rungs: int = _f(3, "the noise is measured from the differences between this many lowest rungs and "
                                    "the next (x the directions)", DIRECTIONAL, minimum=1, strict=False)
    noise_rise: float = _f(4.0, "... and up the ladder while a rung's median stays within this x theirs (truncation "
                                "sets in 32-fold a rung)", DIRECTIONAL, minimum=1.0)
    ladder_structure: float = _f(2.0, "a rung-to-rung difference, a fourth difference or the switches' part of the "
                                      "second differences beyond this x its rounding (rounding_safety sigmas) that "
                                      "does not grow as truncation does is structure: a switch", DIRECTIONAL)
    ladder_drift: float = _f(1.0, "a rung is judged only where the weighted mean of the misses below agrees with "
                                  "its own within this x rounding_safety sigmas (switches spread along the line move "
                                  "larger steps more; an error moves every rung alike)", DIRECTIONAL)
    kink_growth: float = _f(8.0, "the switches' part of the second difference doubles a level, curvature's remainder "
                                 "grows 64-fold: growth below this is switches", DIRECTIONAL)
    ladder_margin: int = _f(3, "where switches stop the ladder right above its rung of least error, the rung judged "
                               "is this many lower", DIRECTIONAL, strict=False)
    fall_slack: float = _f(2.0, "a rung's difference to the next is its truncation x (2^order - 1) where the next "
                                "difference is 2^order times it within this factor", DIRECTIONAL, minimum=1.0)
    # refinement
    refine: int = _f(4, "entries that do not agree are re-evaluated at steps this many times smaller", minimum=1)
    refine_rounds: int = _f(3, "... up to this many times (and once more to reproduce a disagreement seen there)")
    curvature_rounds: int = _f(5, "... plus up to this many while the fourth difference falls like curvature",
                               POLES, strict=False)
    curvature_fall: float = _f(64.0, "curvature's fourth difference (relative to the rounding) falls refine**3 "
                                     "a round, a kink's refine-fold: a fall by this factor or more is curvature",
                               POLES)
    second_look: float = _f(0.25, "an agreeing entry whose discrepancy exceeds this share of its tolerance, with an "
                                  "estimate mostly truncation spread, is looked at again at a smaller step")
    # entries whose noise no reliable median measured
    structure: float = _f(0.1, "such an entry shows structure where its kink exceeds this share of its estimate",
                          POLES)
    informative: float = _f(0.01, "... and then agrees only within an allowance below this share of its "
                                  "analytical value", POLES)
    # domain edges
    domain_rounds: int = _f(16, "a non-finite stencil is retried at refine-fold smaller steps up to this many "
                                "times (4^16 ~ 4e9: float32's automatic 2^-5 down to ~1e-11)", DOMAIN)
    min_step_ulps: int = _f(16, "a refined step is never below this many ulps of its input (below 1 the nodes "
                                "would not move)", DOMAIN)
    # noise measurement
    reliable_median: int = _f(8, "a median of fewer fourth differences can sit far below the noise: fewer draws "
                                 "fall back on the model eps * (|f| + terms)")
    noise_floor_divisor: float = _f(4.0, "a measured noise is never taken below eps * (|f| + terms) / this (the "
                                         "rounding of the loss itself)")
    low_quantile: float = _f(0.1, "sigma clipping starts at this quantile of the draws (tolerates 90% outliers)",
                             maximum=1.0)
    low_abs_normal: float = _f(0.1257, "|N(0,1)|'s low_quantile quantile, scaling that start to a median")
    clip: float = _f(6.0, "sigma clipping keeps draws within this many medians (~4 standard deviations)")
    clip_iterations: int = _f(3, "rounds of sigma clipping")
    cluster_min: int = _f(5, "a clipped cluster needs this many draws to measure the noise")
    separation: float = _f(16.0, "the clipped median (or the probe's) replaces the median when that is this many "
                                 "times larger: a kinked majority (62% of a float32 ReLU net's W1 stencils)")
    # the noise probe (scalar losses)
    noise_probe: int = _f(256, "the probe's steps are this many times smaller than the first round's", minimum=1)
    noise_probe_columns: int = _f(32, "... on this many columns (a seeded choice)")
    probe_zeros: float = _f(0.1, "an output whose probe fourth differences are exactly 0 for more than this share "
                                 "is not measured by the probe (a rounding pattern, not noise)", strict=False,
                             maximum=1.0)
    probe_grid_tolerance: float = _f(1e-3, "probe columns whose nodes are off the stencil's grid by more than this "
                                           "share of a step are left out", maximum=1.0)
    # reference mode (gradfd/verdict/against_reference.py; docs/half-precision.md)
    reference_factor: float = _f(4.0, "an op's gradient entry disagrees beyond this x (the reference's rounding "
                                      "there, the largest of its samples, + that rounding's RMS over the tensor); "
                                      "FlashAttention's tests allow 2x one maximum per tensor", REFERENCE)
    reference_floor_eps: float = _f(1.0, "... plus this many eps of the judged dtype, relative to the entry and "
                                         "(x rel_floor) to the tensor's largest: the rounding of the op's output",
                                    REFERENCE)
    reference_truth_share: float = _f(1 / 16, "the reference's own float64 finite-difference check allows this "
                                              "share of the finest judged dtype's eps relative to each entry (a "
                                              "finer error in the truth cannot move a verdict whose floor is "
                                              "reference_floor_eps eps; a design bound, not tuned)", REFERENCE,
                                      maximum=1.0)
    reference_cotangents: int = _f(3, "seeded Gaussian cotangents per check (1 for a one-element output; a design "
                                      "choice, not tuned)", REFERENCE)
    reference_rounding_samples: int = _f(8, "the reference's rounding is sampled at the point and this many - 1 "
                                            "points one ulp away (independent roundings; with 4, the tuned draws of "
                                            "a half-arithmetic softmax gave 4 false alarms in 40, with 8 one: an ad "
                                            "hoc run)", REFERENCE)
    forward_probes: int = _f(16, "forward AD in directional mode: jvps along each direction with seeded random "
                                 "signs, whose mean square estimates ||(u^T J) * v||_2^2 (the floor's scale) and the "
                                 "detection limit's RMS: about a chi-square estimate with this many degrees of "
                                 "freedom, under half the true scale in 1 direction of 1,000 (9 in 100 with 4; a "
                                 "design choice, not tuned)",
                             RULES)
    # report
    rel_floor: float = _f(1e-3, "relative errors are taken over entries at least this share of the tensor's "
                                "largest (most Jacobian entries are zero)", JACOBIAN, maximum=1.0)


DEFAULT_POLICY = Policy()


def _check_value(name: str, value, kind: type, meta: Mapping) -> None:
    """Raise a TypeError/ValueError naming the field, what was expected and what came."""
    ok_type = (isinstance(value, int) if kind is int else isinstance(value, (int, float))) and not isinstance(
        value, bool)
    expected = "an int" if kind is int else "a float"
    if not ok_type:
        raise TypeError(f"policy field {name!r} must be {expected}, got {describe(value)}")
    bound, top = meta["minimum"], meta["maximum"]
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite or (value <= bound if meta["strict"] else value < bound) or value > top:
        relation = ">" if meta["strict"] else ">="
        within = f" and <= {top:g}" if math.isfinite(top) else ""
        raise ValueError(f"policy field {name!r} must be finite, {relation} {bound:g}{within}, got {value!r}")


_TYPES = {"int": int, "float": float}


def resolve_policy(policy) -> Policy:
    """``check``'s ``policy`` argument as a :class:`Policy`: None -> :data:`DEFAULT_POLICY`; a Policy (validated);
    or a mapping of field overrides applied to the default.

    Raises:
        TypeError: ``policy`` is neither, a field name is not a string, or a value has the wrong type.
        ValueError: an unknown field (the message lists the valid ones), or a value out of range.
    """
    if policy is None:
        return DEFAULT_POLICY
    fields = {f.name: f for f in dataclasses.fields(Policy)}
    if isinstance(policy, Policy):
        overrides = {name: getattr(policy, name) for name in fields}
    elif isinstance(policy, Mapping):
        overrides = dict(policy)
    else:
        raise TypeError(f"policy must be a gradfd.verdict.policy.Policy, a mapping of field overrides or None, "
                        f"got {describe(policy)}")
    for name, value in overrides.items():
        if not isinstance(name, str):
            raise TypeError(f"policy field names must be strings, got {describe(name)}")
        if name not in fields:
            raise ValueError(f"policy has no field {name!r}; valid fields: {', '.join(fields)}")
        f = fields[name]
        _check_value(name, value, _TYPES[f.type] if isinstance(f.type, str) else f.type, f.metadata)
    return policy if isinstance(policy, Policy) else dataclasses.replace(DEFAULT_POLICY, **overrides)


def policy_table(policy: Policy = DEFAULT_POLICY) -> str:
    """A markdown table of the policy's fields: field, value, rule, calibrated by (docs/verdicts.md's generated
    section)."""
    rows = ["| field | value | rule | calibrated by |", "|---|---|---|---|"]
    for f in dataclasses.fields(Policy):
        rows.append(f"| `{f.name}` | {getattr(policy, f.name)!r} | {f.metadata['why']} | "
                    f"`{f.metadata['calibrated_by']}` |")
    return "\n".join(rows)


@dataclass(frozen=True)
class Seeds:
    """The seeds and random weights of the pipeline (none of them a threshold).

    Rule: every seeded draw uses its own ``torch.Generator`` seeded from the caller's ``seed``, the input's index
    ``k`` and ``stride``, a prime, so that the draws of different inputs and purposes never share a seed for fewer
    than ``stride`` inputs; random weights lie in ``[weight_low, weight_low + weight_span)``, within 30% of 1, so
    that weighted sums never cancel and every step stays within 1.3 of the automatic one.
    """

    stride: int = 7919
    probe: int = 7  # the noise probe's column choice
    detection: int = 20261206  # the detection limits' draws
    weight_low: float = 0.7
    weight_span: float = 0.6

    def directions(self, seed: int, k: int) -> int:
        """The seed of input ``k``'s directions (directional mode)."""
        return seed + self.stride * k

    def reference(self, seed: int) -> int:
        """The seed of reference mode's cotangents (its one-ulp moves use this + 1): past every other seed's reach
        (they lie within a few strides of ``seed``)."""
        return seed + self.stride ** 2

    def second_order(self, seed: int) -> int:
        """The seed of ``order=2``'s output gradients (a tensor-valued func): past reference mode's."""
        return seed + 2 * self.stride ** 2

    def batched(self, seed: int) -> int:
        """The seed of the batched and gradient-dtype checks' cotangents and tangents (:mod:`gradfd.rules`)."""
        return seed + 3 * self.stride ** 2

    def reentrancy(self, seed: int) -> int:
        """The seed of the reentrancy check's output gradients."""
        return seed + self.stride

    def colored_inputs(self, k: int, whole: int) -> int:
        """The seed of the colored pass's input weights (pattern ``whole``)."""
        return self.stride * (k + 1) + whole

    def colored_tangents(self, k: int) -> int:
        """The seed of forward mode's colored tangent weights (their own: not the input steps' weights)."""
        return 4 * self.stride ** 2 + self.stride * k

    def colored_outputs(self, k: int) -> int:
        """The seed of the colored pass's cotangent weights."""
        return self.stride * (k + 2)

    def weights(self, n: int, seed: int) -> torch.Tensor:
        """``(n,)`` float64 (CPU) random weights in ``[weight_low, weight_low + weight_span)``."""
        gen = torch.Generator().manual_seed(seed)
        return self.weight_low + self.weight_span * torch.rand(n, generator=gen, dtype=torch.float64)


SEEDS = Seeds()
