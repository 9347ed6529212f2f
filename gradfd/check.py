"""``gradfd.check``: numerical against analytical gradients, with a verdict per entry that can be trusted.

Each checked entry gets

    tolerance = atol + rtol * |analytical| + TOLERANCE_SAFETY * error_estimate

where the error estimate is the finite difference's own (:mod:`gradfd.accuracy`) and ``atol``/``rtol`` default to
floors of the dtype (``FLOOR_EPS`` machine epsilons, relative to the entry and to the tensor's largest analytical
entry), which cover the rounding of the analytical gradient itself. ``|numerical - analytical| <= tolerance`` is
*agree*; otherwise the entry is *unresolved* when the finite difference cannot be trusted there (a non-finite loss at
a node, or a kink/jump whose size explains the discrepancy), and *disagree* otherwise. Only disagreements fail.

Every entry that does not agree gets a second opinion: it is re-evaluated with a step ``REFINE`` times smaller
(``REFINE_ROUNDS`` times at most -- up to ``CURVATURE_ROUNDS`` more while its fourth difference falls like curvature,
not a kink -- and once more to reproduce a disagreement first seen at the last). A
disagreement stands only when the smaller step reproduces the first estimate (lies closer to it than to the
analytical value) without a kink of its own; otherwise the first stencil straddled something -- a ReLU switching, a
jump -- and the smaller step's verdict replaces it. Correct ReLU networks in float32 are where this matters: at
float32's steps, most entries of a first layer have a ReLU switching somewhere inside the stencil (which is also
why the rounding noise is measured robustly: :func:`gradfd.accuracy.noise_median`, :func:`gradfd.jacobian.probe_noise`).

An entry whose stencil has a non-finite value -- a node outside ``func``'s domain: ``log(x - 2h)`` for a small
positive ``x``, or a node where ``func`` raised (``Normal(0, s)`` validating ``s > 0``; recorded by
:class:`gradfd.engine.NodeErrors` as NaN) -- is first retried at steps REFINE times smaller until its stencil is
finite, then :func:`domain_margin` REFINE-fold steps smaller again, and judged from there (``refine``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from . import accuracy, stencils
from . import jacobian as _jacobian
from . import engine as _engine
from .errors import note
from .validation import check_checkable, check_choice, check_params, check_positive_int, check_step, describe
from .report import AGREE, DISAGREE, UNRESOLVED, CheckReport, GradientCheckError, TensorReport, relative_errors

__all__ = ["check", "MODES", "FLOOR_EPS", "TOLERANCE_SAFETY", "no_tf32", "analytical_gradients"]

MODES = ("full", "sample", "directional")
DEFAULT_SAMPLES = 256
DEFAULT_DIRECTIONS = 8
# The constants below were calibrated on benchmarks/bench_accuracy.py's suites (smooth functions, planted 1e-3
# errors, ReLU networks), float32 and float64; docs/benchmarks.md has the measured rates.
FLOOR_EPS = 64  # the dtype floor: 64 eps relative to the entry, and to the tensor's largest analytical entry
TOLERANCE_SAFETY = 1.5  # margin over the estimated finite-difference error
# kink > KINK_NOISE_FACTOR * rounding estimate: non-smooth. For a smooth function the kink statistic is noise,
# about 1.5|z| rounding estimates for z ~ N(0, 1), so 6 is exceeded by chance at ~1 entry in 25000.
KINK_NOISE_FACTOR = 6.0
KINK_EXPLAINS = 0.5  # unresolved when kink >= KINK_EXPLAINS * |numerical - analytical|
KINK_BAND = 3.0  # unresolved when |numerical - analytical| <= KINK_BAND * truncation spread (+ rounding allowance)
REFINE = 4  # entries that do not agree are re-evaluated with steps this many times smaller ...
REFINE_ROUNDS = 3  # ... up to this many times (and once more to reproduce a disagreement first seen there)
CURVATURE_ROUNDS = 5  # ... plus up to this many while the fourth difference falls like curvature, not a kink:
CURVATURE_FALL = 64.0  # by this factor a round or more, relative to the rounding (curvature: REFINE**4, a kink: REFINE)
STRUCTURE = 0.1  # an entry whose noise no reliable median measured shows structure where its kink exceeds this
# share of its estimate (and the model's rounding): see _unsettled
INFORMATIVE = 0.01  # ... and then agrees only within an allowance below this fraction of its analytical value
CLEAN_KINK = 3.0  # a refined stencil is kink-free when its kink statistic is below this many rounding estimates
DOMAIN_ROUNDS = 16  # an entry whose stencil has a non-finite loss (or a node where func raised: a node outside
# its domain, log(x - 2h) for 0 < x < 2h) is retried at steps REFINE times smaller, up to this many times (4^16 ~ 4e9:
# float32's automatic step of 2^-5 down to ~1e-11); the first finite stencil's step is the entry's step from there
MIN_STEP_ULPS = 16  # ... and never below this many ulps of its input (below 1 the nodes would not move)
SECOND_LOOK = 0.25  # an agreeing entry whose discrepancy exceeds this fraction of its tolerance, and whose error
# estimate is mostly the truncation spread, is evaluated again at a REFINE times smaller step: the spread of the
# 4-point stencil is the error of central differences, generous enough to hide a 1e-3 error in float32


def domain_margin(stencil: stencils.Stencil, dtype: torch.dtype) -> int:
    """How many REFINE-fold steps a retreat from a domain's edge takes past the first finite stencil (see refine).

    The first finite stencil's outer node sits within a step of the edge (log at 0 < x: h in [x/8, x/2)); the
    stencil's best step at distance x from it is its automatic relative step times x (``~eps**(1/4) x`` for the
    4-point stencil: x/32 in float32, x/8192 in float64), about ``log_REFINE(1 / (REFINE * relative step))``
    REFINE-fold steps below h ~ x/4: 2 in float32, 6 in float64 (4-point stencil)."""
    relative = stencil.step_scale * stencils.eps(dtype) ** stencil.step_exponent
    return max(1, round(math.log(1.0 / relative, REFINE) - 1))


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Turn TF32 matmul/cuDNN off (and float32 matmul precision to "highest"); restore the settings on exit.

    cuDNN's flag goes through ``torch.backends.cudnn.flags``, which also works where the global flags are frozen
    (``torch.backends.disable_global_flags()``, as in PyTorch's own test harness)."""
    cudnn = torch.backends.cudnn
    cuda_matmul = torch.backends.cuda.matmul.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = cuda_matmul
        torch.set_float32_matmul_precision(precision)


def _resolve_wrt(params: list[torch.Tensor], wrt) -> list[int]:
    if wrt is None:
        chosen = [k for k, p in enumerate(params) if p.is_floating_point() and p.requires_grad]
        if not chosen:
            raise ValueError(
                "no tensor to check: none of params is a floating tensor with requires_grad=True; set "
                "requires_grad on the tensors to check, or pass wrt=(index, ...)"
            )
        return chosen
    if isinstance(wrt, int) and not isinstance(wrt, bool):
        wrt = (wrt,)
    if not isinstance(wrt, (tuple, list)) or not all(isinstance(k, int) and not isinstance(k, bool) for k in wrt):
        raise TypeError(f"wrt must be an int or a tuple of ints indexing params, got {describe(wrt)}")
    if not wrt:
        raise ValueError("no tensor to check: wrt is empty")
    out = []
    for k in wrt:
        if not -len(params) <= k < len(params):
            raise IndexError(f"wrt entries must be in [0, {len(params)}) for {len(params)} params, got {k}")
        k %= len(params)
        check_checkable(params[k], f"wrt={k}: params[{k}]")
        if k not in out:
            out.append(k)
    return out


def analytical_gradients(func: Callable, params: Sequence[torch.Tensor], wrt: Sequence[int]) -> list[torch.Tensor]:
    """Autograd's gradients of the scalar ``func(*params)`` for ``params[k]``, ``k`` in ``wrt``, computed on clones
    (the caller's ``.grad`` is untouched); zeros where ``func`` does not depend on a tensor.

    Raises:
        TypeError / ValueError naming ``func`` when it does not return a single floating-point value.
    """
    clones = [p.detach().clone().requires_grad_(k in wrt) for k, p in enumerate(params)]
    with torch.enable_grad():
        with _engine.noting("gradfd: raised while computing autograd's gradient (func and its backward at the "
                            "unperturbed params, on clones)"):
            out = _engine.validate_scalar_output(func(*clones), detach=False)
        inputs = [clones[k] for k in wrt]
        if out.requires_grad:
            with _engine.noting("gradfd: raised in autograd's backward of func at the unperturbed params"):
                grads = torch.autograd.grad(out, inputs, allow_unused=True)
        else:
            grads = [None] * len(inputs)
    return [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(inputs, grads)]


def sample_coordinates(analytical: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    """Flat indices to check in sample mode: the ``samples // 4`` entries of largest |analytical| and a seeded
    uniform sample of the rest (all entries when ``samples >= numel``)."""
    flat = analytical.reshape(-1)
    n = flat.numel()
    if samples >= n:
        return torch.arange(n, device=flat.device)
    top = max(1, samples // 4)
    largest = flat.abs().topk(top).indices
    mask = torch.ones(n, dtype=torch.bool, device=flat.device)
    mask[largest] = False
    rest = mask.nonzero().flatten()
    gen = torch.Generator().manual_seed(seed)
    pick = rest[torch.randperm(rest.numel(), generator=gen)[: samples - top].to(flat.device)]
    return torch.cat([largest, pick]).sort().values


@dataclass
class _Entries:
    """Numerical and analytical values of the checked entries (coordinates or directions) of one tensor."""

    index: torch.Tensor  # flat coordinates, or direction numbers
    numerical: torch.Tensor
    analytical: torch.Tensor
    error: torch.Tensor
    rounding: torch.Tensor
    kink: torch.Tensor
    finite: torch.Tensor
    # where no reliable median measured an entry's noise (a parameter of a few entries, an output of an elementwise
    # op), the rounding that the model eps * (|f| + terms) gives (at least the subnormals' spacing), in the units of
    # ``rounding``; 0 elsewhere. Such an entry's rounding comes from its own fourth difference, which "rounding" then
    # explains whatever the stencil straddles (a float32 tan's pole): see _unsettled
    model: torch.Tensor

    def take(self, j: torch.Tensor) -> "_Entries":
        return _Entries(*(getattr(self, f)[j] for f in self.__dataclass_fields__))

    def put(self, j: torch.Tensor, other: "_Entries", where: torch.Tensor) -> None:
        """Overwrite positions ``j[where]`` with ``other[where]``."""
        jj = j[where]
        for f in self.__dataclass_fields__:
            getattr(self, f)[jj] = getattr(other, f)[where]


class _Directions:
    """Evaluates random directions of one input (directional mode): ``d/dt uᵀf(x + t v)`` at ``t = 0`` against
    ``(uᵀJ) v``, for Gaussian input directions ``v`` scaled entry-wise by the per-entry steps and (for tensor-valued
    functions) Gaussian output cotangents ``u``; the nodes of as many directions as ``budget`` bytes hold go to
    ``func`` in one batched call, the analytical side costs one backward per direction."""

    def __init__(self, func, params, k, analytical: _jacobian.Analytical, count, h, stencil, batching, seed,
                 budget: int):
        self.func, self.params, self.k, self.stencil, self.batching = func, params, k, stencil, batching
        self.budget = budget
        self.scalar = analytical.scalar
        self.skip_outputs = analytical.nondifferentiable
        x = params[k].detach().reshape(-1)
        coarse = stencils.coarsest([x.dtype, *analytical.spec.dtypes])
        self.steps = (stencils.automatic_steps(x, stencil, dtype=coarse) if h is None
                      else torch.full(x.shape, h, dtype=torch.float64, device=x.device))
        self.seed = seed + 7919 * k
        gen = torch.Generator().manual_seed(self.seed)
        size = analytical.spec.size
        self.u = torch.randn(count, size, generator=gen, dtype=torch.float64).to(x.device)
        if self.scalar:
            self.u = torch.ones(count, 1, dtype=torch.float64, device=x.device)
            g = analytical.vjp(k, torch.ones(1, dtype=torch.float64, device=x.device))
            self.grads = g.expand(count, -1)
        else:
            self.grads = torch.stack([analytical.vjp(k, self.u[d]) for d in range(count)])  # (D, N): u_dᵀJ
        self.noise: float | None = None
        self.details: dict = {"directions": count}
        self.errors = _engine.NodeErrors()  # what func raised at perturbed nodes (NaN values: see refine)

    def direction(self, d: int) -> torch.Tensor:
        """``(N,)`` float64 input direction ``d``: Gaussian, scaled entry-wise by the steps (drawn on demand, so that
        memory stays one direction at a time)."""
        gen = torch.Generator().manual_seed(self.seed + 1 + d)
        return torch.randn(self.steps.numel(), generator=gen, dtype=torch.float64).to(self.steps.device) * self.steps

    def __call__(self, which: torch.Tensor, factor: float) -> _Entries:
        stencil = self.stencil
        problem = _engine.prepare(self.func, self.params, self.k, vector=not self.scalar,
                                  skip_outputs=self.skip_outputs, node_errors=self.errors)
        offsets = torch.tensor(stencil.offsets, dtype=torch.float64, device=self.steps.device)  # (S,)
        losses = torch.empty(len(offsets), len(which), dtype=torch.float64, device=self.steps.device)
        ana = torch.empty_like(losses)
        finite_values = torch.ones(len(which), dtype=torch.bool, device=self.steps.device)
        try:
            x = problem.flat
            x64 = x.to(torch.float64)
            base_vec = problem.base_loss.to(torch.float64).reshape(-1)
            S, ds = len(offsets), which.tolist()
            # the S nodes of `per` directions per call: float64 staging (8 bytes) plus the points and func's
            # outputs, within the budget
            node_bytes = (8 + x.element_size()) * (x.numel() + base_vec.numel())
            per = max(1, min(len(ds), self.budget // max(1, S * node_bytes)))
            for start in range(0, len(ds), per):
                group = ds[start:start + per]
                v = torch.stack([self.direction(d) for d in group]) / factor  # (G, N)
                points = (x64 + offsets.view(1, -1, 1) * v.unsqueeze(1)).to(x.dtype)  # (G, S, N)
                # <u_dᵀJ, displacement actually evaluated>, exact for the nodes
                moved = points.to(torch.float64) - x64
                ana[:, start:start + len(group)] = torch.einsum("gsn,gn->sg", moved, self.grads[group])
                del moved
                values, used = _engine.evaluate_points(problem, points.view(-1, x.numel()), self.batching)
                values = values.view(len(group), S, -1)  # (G, S, O)
                self.details["batching"] = used
                finite_values[start:start + len(group)] = torch.isfinite(values).flatten(1).all(1)
                losses[:, start:start + len(group)] = torch.einsum("gso,go->sg", values, self.u[group])
        finally:
            problem.rng.close()
        u = self.u[which]  # (D, O)
        base = (u * base_vec).sum(-1)  # (D,)
        half = torch.tensor(stencil.multiples, dtype=torch.float64, device=x.device).view(-1, 1).expand(-1, len(which))
        numerical, spread = stencils.extrapolate((losses[0::2] - losses[1::2]) / (2 * half), half)
        analytical, _ = stencils.extrapolate((ana[0::2] - ana[1::2]) / (2 * half), half)
        finite = finite_values & torch.isfinite(numerical)
        if len(stencil.multiples) >= 2:
            fourth = losses[2] - 4 * losses[0] + 6 * base - 4 * losses[1] + losses[3]
            kink = fourth.abs() / 2
        else:
            fourth, kink = None, (losses[0] - 2 * base + losses[1]).abs()
        if self.noise is None:
            # the model: the rounding of every output entry, weighted by the cotangent
            # (a loss reduced in float64 still sums terms rounded in func's dtype: that dtype's eps)
            eps_out = max(stencils.eps(dt) for dt in problem.spec.dtypes) if problem.spec else stencils.eps(
                problem.plain_base.dtype)
            model = eps_out * float((u.abs() * base_vec.abs()).sum(-1).max())
            self.noise = accuracy.loss_noise_from(model, fourth[finite] if fourth is not None else None)
            self.details.update(loss_noise=self.noise, truncation_estimated=spread is not None)
        rounding = torch.full_like(numerical, accuracy.ROUNDING_SAFETY * self.noise * stencil.weight_norm)
        truncation = spread if spread is not None else torch.zeros_like(numerical)
        # derivatives along v / factor: scale them back to the base direction v, so rounds compare directly
        return _Entries(which, numerical * factor, analytical * factor, (truncation + rounding) * factor,
                        rounding * factor, kink * factor, finite, torch.zeros_like(numerical))


def _unsettled(e: _Entries, settled: torch.Tensor | None = None) -> torch.Tensor:
    """Entries whose noise no reliable median measured (``e.model > 0``) and whose stencil shows structure: a kink
    above both KINK_NOISE_FACTOR times the model's rounding and STRUCTURE times the estimate itself. A pole inside the
    stencil gives a fourth difference of ~6 f(x) (kink 6e5 against an estimate of -1280 for a float32 tan 1.6e-4
    from its pole); rounding or curvature that large leaves the estimate no meaning either. Rounding above the
    model alone (a float32 gelu's tail, whose outputs are differences of terms ~1) is no structure while the
    estimate stands out of it. ``settled`` exempts the entries whose fourth difference fell like curvature."""
    out = (e.model > 0) & (e.kink > KINK_NOISE_FACTOR * e.model) & (e.kink > STRUCTURE * e.numerical.abs())
    return out if settled is None else out & ~settled


def _verdicts(e: _Entries, floor: torch.Tensor, settled: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-entry verdicts, tolerances and non-smoothness flags (see the module docstring); ``settled`` marks the
    entries whose fourth difference fell like curvature since their previous step (see :func:`refine`)."""
    diff = (e.numerical - e.analytical).abs()
    truncation = e.error - e.rounding
    # Non-smooth within the stencil (kink well above what rounding noise can produce): the truncation spread is
    # contaminated, so such an entry agrees only within the rounding allowance, and is otherwise unresolved.
    own = e.kink > KINK_NOISE_FACTOR * e.rounding
    tol = torch.where(own, floor + TOLERANCE_SAFETY * e.rounding, floor + TOLERANCE_SAFETY * e.error)
    # An entry whose noise no reliable median measured is not settled while its stencil shows structure (see
    # _unsettled: a pole or a jump inside it, strong curvature, or heavy rounding). It agrees only where the
    # allowance it is judged with is informative (within INFORMATIVE of the analytical value), and never fails.
    unsettled = _unsettled(e, settled)
    nonsmooth = own | unsettled
    # (the allowance it would agree within: its rounding where its own kink stands out of it -- a rounding measured
    # where an earlier stencil straddled a pole, 1.7e6 for a float32 1/x at 1.9e-3 whose derivative is -2.8e5)
    vague = unsettled & (torch.where(own, e.rounding, e.error) > INFORMATIVE * e.analytical.abs())
    tol = torch.where(vague, floor, tol)
    agree = e.finite & (diff <= tol)
    # A kink inside the stencil that the fourth difference cannot see (a ReLU switching at 2/3 of a step) makes
    # the extrapolant miss by up to twice the truncation spread; a discrepancy that small is ambiguous.
    ambiguous = diff <= floor + KINK_BAND * truncation + TOLERANCE_SAFETY * e.rounding
    unresolved = ~e.finite | (~agree & (nonsmooth | ambiguous | (e.kink >= KINK_EXPLAINS * diff)))
    verdict = torch.full(diff.shape, AGREE, dtype=torch.int8, device=diff.device)
    verdict[~agree] = DISAGREE
    verdict[unresolved] = UNRESOLVED
    return verdict, tol, nonsmooth


def second_look(e: _Entries, verdict: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the agreeing entries that :func:`refine` looks at again (see ``SECOND_LOOK``), and those
    whose noise no reliable median measured while their kink is far above the model's rounding: CURVATURE_FALL
    times it, or KINK_NOISE_FACTOR times it where the error estimate is not informative (above INFORMATIVE of the
    value). That is curvature that smaller steps shed (2.5% for a float32 tan 0.3 from its pole, where a 1% error
    went unseen; 1e-4 for float64 tans 1e-3 from it). A kink below CURVATURE_FALL times the model's, with a tight
    estimate, is rounding the model underestimates (a float64 gelu(x) * x rounds 6 to 50 times above it at 18% of
    its entries, whose second look doubled the check's time)."""
    diff = (e.numerical - e.analytical).abs()
    truncated = (diff > SECOND_LOOK * tol) & (e.error - e.rounding > e.rounding)
    curved = (e.model > 0) & ((e.kink > CURVATURE_FALL * e.model)
                              | ((e.kink > KINK_NOISE_FACTOR * e.model) & (e.error > INFORMATIVE * e.analytical.abs())))
    return (verdict == AGREE) & e.finite & (truncated | curved)


def _evaluate_at(evaluator, index: torch.Tensor, factors: torch.Tensor) -> _Entries:
    """``evaluator`` on the entries ``index``, each with its own step divisor ``factors`` (one call per value)."""
    values = torch.unique(factors)
    if values.numel() == 1:
        return evaluator(index, float(values[0]))
    groups = [(factors == f).nonzero().flatten() for f in values]
    parts = [evaluator(index[g], float(f)) for g, f in zip(groups, values)]
    order = torch.argsort(torch.cat(groups))
    return _Entries(*(torch.cat([getattr(part, name) for part in parts])[order]
                      for name in _Entries.__dataclass_fields__))


def _retreat(e: _Entries, verdict: torch.Tensor, tol: torch.Tensor, nonsmooth: torch.Tensor, evaluator,
             floor_of: Callable[[_Entries], torch.Tensor], limit: torch.Tensor | None, remeasure, margin: int):
    """The entries of ``e`` whose stencil is not finite (a node outside func's domain), retried at steps REFINE
    times smaller until it is (DOMAIN_ROUNDS times at most), then REFINE**margin times smaller again; ``e``,
    ``verdict``, ``tol`` and ``nonsmooth`` are updated in place. Returns ``(base, evaluations, retreated,
    smallest)``: each entry's step divisor from now on, the entries evaluated, how many needed a smaller step, and
    the largest divisor taken."""
    base = torch.ones(e.index.shape, dtype=torch.float64, device=e.index.device)
    evaluations, retreated, smallest = 0, 0, 1.0

    def take(which: torch.Tensor, e2: _Entries, factors: torch.Tensor) -> None:
        ok = e2.finite
        v2, tol2, ns2 = _verdicts(e2, floor_of(e2))
        e.put(which, e2, ok)
        got = which[ok]
        verdict[got], tol[got], nonsmooth[got] = v2[ok], tol2[ok], ns2[ok]
        base[got] = factors[ok]

    out = (~e.finite).nonzero().flatten()
    for round_ in range(1, DOMAIN_ROUNDS + 1):
        factor = float(REFINE**round_)
        if limit is not None:
            out = out[factor <= limit[out]]
        if out.numel() == 0:
            break
        evaluations += out.numel()
        e2 = evaluator(e.index[out], factor)
        take(out, e2, torch.full((out.numel(),), factor, dtype=torch.float64, device=base.device))
        if bool(e2.finite.any()):
            retreated, smallest = retreated + int(e2.finite.sum()), factor
        out = out[~e2.finite]
    moved = (base > 1).nonzero().flatten()
    factors = base[moved] * REFINE**margin
    if limit is not None:
        moved, factors = moved[factors <= limit[moved]], factors[factors <= limit[moved]]
    if moved.numel():  # a margin from the edge (see domain_margin)
        evaluations += moved.numel()
        e2 = _evaluate_at(evaluator, e.index[moved], factors)
        take(moved, remeasure(e2, factors) if remeasure is not None else e2, factors)
        smallest = max(smallest, float(base.max()))
    return base, evaluations, retreated, smallest


def refine(e: _Entries, verdict: torch.Tensor, tol: torch.Tensor, nonsmooth: torch.Tensor, evaluator,
           floor_of: Callable[[_Entries], torch.Tensor], limit: torch.Tensor | None = None,
           stats: dict | None = None, remeasure: Callable[[_Entries, torch.Tensor], _Entries] | None = None,
           margin: int = 2):
    """Re-evaluate every entry of ``e`` that did not agree at steps REFINE times smaller (up to REFINE_ROUNDS times,
    and up to CURVATURE_ROUNDS more for an entry whose stencil is not clean yet but whose fourth difference, relative
    to its rounding, fell by CURVATURE_FALL or more in its last round: curvature, which falls REFINE**4-fold a
    round, where a kink's falls REFINE-fold).

    First, an entry whose estimate is not finite (a node outside func's domain) is retried at steps REFINE times
    smaller until its stencil is finite (DOMAIN_ROUNDS times at most), then REFINE**margin times smaller again
    (:func:`domain_margin`); that step is the entry's from then on, and the rounds below divide it further.
    ``remeasure(entries, factors)``, when given, returns those entries with their rounding re-measured from their
    own fourth differences (the first round's noise measurement near a domain's edge is curvature, not rounding).

    A first-round disagreement stands when the estimate at the smaller step lies closer to the first estimate than
    to the analytical value (the discrepancy is reproduced) and the smaller stencil shows no kink; otherwise the
    first estimate was disturbed by something inside the larger stencil (a kink), and the smaller step's verdict
    replaces it. A disagreement first seen after a kinked step must be reproduced by a step that disagrees on its
    own; one first seen in the last round is evaluated once more at a REFINE times smaller step, and is unresolved
    unless that reproduces it. ``evaluator(index, factor)`` returns the entries ``index`` evaluated with steps
    ``1/factor`` as large; ``limit`` is each entry's largest factor (its step stays MIN_STEP_ULPS ulps of its
    input or more), None for no limit; a disagreement still to be reproduced (first seen after a kinked step, or
    at the last regular one) whose next step the limit forbids is unresolved. A step whose estimate is exactly 0
    where the larger, unkinked one's was not is below the resolution of the output (or of an intermediate): the
    entry keeps its verdict as if it had no such step.

    An entry whose noise no reliable median measured (``e.model > 0``: a parameter of a few entries, an output of
    an elementwise op) is not settled while its stencil shows structure (:func:`_unsettled`), or until its fourth
    difference fell REFINE**2-fold in a round, as curvature's does; while it is not settled it never fails and
    takes further rounds (up to CURVATURE_ROUNDS more: a float32 tan whose stencils straddled its pole), and once
    settled it takes them while its kink is still far above the model's rounding (its error estimate is that
    curvature's); a disagreement of such an entry first seen after it agreed must be reproduced by a step that
    disagrees on its own. ``stats``, when given, receives ``retreated`` (entries that needed a smaller step to be
    finite) and ``smallest`` (the largest factor they took). Returns the updated ``(entries, verdict, tolerance,
    number of re-evaluations)``.
    """
    base, refined, retreated, smallest = _retreat(e, verdict, tol, nonsmooth, evaluator, floor_of, limit, remeasure,
                                                  margin)
    if stats is not None:
        stats.update(retreated=retreated, smallest=smallest)
    allowed = (lambda idx, factor: idx) if limit is None else (lambda idx, factor: idx[factor[idx] <= limit[idx]])
    late = torch.zeros_like(nonsmooth)  # the disagreement was first seen at a step after a kinked one
    was_blind = torch.zeros_like(nonsmooth)  # the entry's last step measured no rounding of its own (see blind)
    # each entry's last regular round: REFINE_ROUNDS, or more while its fourth difference falls like curvature
    last = torch.full(e.index.shape, REFINE_ROUNDS, dtype=torch.long, device=e.index.device)
    # (a stencil still not finite was tried at smaller steps than the rounds below take)
    todo = (((verdict != AGREE) | second_look(e, verdict, tol)) & e.finite).nonzero().flatten()

    def unreproduced(which: torch.Tensor, round_: int) -> None:
        """Entries that get no step ``round_``: a disagreement that needed it to be reproduced (first seen after a
        kinked step, or at the last regular one) is unresolved."""
        pending = (verdict[which] == DISAGREE) & (late[which] | (round_ > last[which]))
        verdict[which[pending]] = UNRESOLVED

    for round_ in range(1, REFINE_ROUNDS + CURVATURE_ROUNDS + 2):
        kept = allowed(todo, base * REFINE**round_)
        unreproduced(todo[~torch.isin(todo, kept)], round_)  # (steps below MIN_STEP_ULPS ulps of the input)
        todo = kept
        if todo.numel() == 0:
            break
        refined += todo.numel()
        e2 = _evaluate_at(evaluator, e.index[todo], base[todo] * REFINE**round_)
        # An entry whose noise no reliable median measured bounds its rounding by its own fourth difference; where
        # that is exactly 0 (the five nodes' rounding errors cancelled, by chance: a sixth of draws where they are
        # an ulp or so) it measured nothing. The last step's bound, REFINE times larger at this step, stands -- not
        # the model's, which sees only |f| and the derivative's terms (not the 1e6 that (w + 1000)**2 - 2000 w - 1e6
        # is computed from), nor the first step's, which may have straddled a pole (float32 1/x at x = 0.03 from
        # steps of 2^-5) -- and the entry takes another step to measure it (see ``blind`` below)
        blind = (e2.model > 0) & e2.finite & (e2.kink == 0)
        if bool(blind.any()):
            # (one within the model's tolerance needs no other step: sort's outputs, exact at every step, agree)
            tight = floor_of(e2) + TOLERANCE_SAFETY * (e2.error - e2.rounding + e2.model)
            blind &= (e2.numerical - e2.analytical).abs() > tight
            bound = torch.maximum(e2.model, torch.minimum(e2.rounding, REFINE * e.rounding[todo]))
            e2.error = torch.where(blind, e2.error - e2.rounding + bound, e2.error)
            e2.rounding = torch.where(blind, bound, e2.rounding)
        # A step whose estimate is exactly 0 where the larger step's was not fell below the resolution of the output
        # or of an intermediate -- exp(0.3 x**2) in float32 at x = 0.07 does not move for steps below 3e-6; a
        # float64 log_softmax entry of 1.7e-11 whose row sums terms of 22.5 stops moving at 1/1024 of the steps --
        # and says nothing: the entry keeps its verdict as if it had no such step (a function that is constant,
        # where the backward is not, estimates 0 at every step and fails)
        # (a kinked larger step's nonzero estimate is no sign of that: ReLU's zero slope beside its kink is exact)
        stalled = (e2.numerical == 0) & (e.numerical[todo] != 0) & ~nonsmooth[todo]
        unreproduced(todo[stalled], round_)
        # an entry whose noise no reliable median measured (e.model) is settled once its fourth difference fell
        # REFINE**2-fold in derivative units: curvature's falls REFINE**3-fold; a kink's stays, and a jump's or
        # rounding's grows REFINE-fold (and falls so by chance for ~1% of noise draws)
        few = e2.model > 0
        fell = few & (REFINE**2 * e2.kink <= e.kink[todo])
        v2, tol2, ns2 = _verdicts(e2, floor_of(e2), fell)
        # the second estimate sides with the first (reproduced) or with the analytical value (an artefact) ...
        # (and within the two estimates' error bounds of each other: a function still far from its asymptotic
        # regime at these steps -- layer_norm of a constant row, whose scale is sqrt(its eps) -- moves its estimate
        # towards the analytical value by more than that at every smaller step, and is not a reproduced error)
        moved = (e.numerical[todo] - e2.numerical).abs()
        reproduced = (moved < (e2.numerical - e2.analytical).abs()) & (
            moved <= TOLERANCE_SAFETY * (e.error[todo] + e2.error))
        # ... and the smaller stencil shows no kink beyond what its rounding noise produces (1.5|z| rounding
        # estimates for z ~ N(0, 1): CLEAN_KINK = 3 is exceeded by chance for ~4% of smooth entries)
        clean = e2.finite & (e2.kink < CLEAN_KINK * e2.rounding) & ~_unsettled(e2, fell)
        # (a NaN or inf analytical entry against a finite estimate is no artefact of the step)
        reproduced |= ~torch.isfinite(e2.analytical) & torch.isfinite(e2.numerical)
        # A disagreement first seen at a step after one whose stencil straddled a kink has no larger step behind
        # it: the next step must disagree on its own (a weight of a float32 ReLU network whose switch sat
        # between the h/16 stencil's inner and outer nodes, where the fourth difference hardly sees it)
        confirmed = ((verdict[todo] == DISAGREE) & ~nonsmooth[todo] & reproduced & clean
                     & (~late[todo] | (v2 == DISAGREE)))
        confirmed &= ~stalled
        replace = ~confirmed & ~stalled
        # the extra step only reproduces the disagreements first seen at the last regular one; one it does not
        # reproduce, no step did: the estimates contradict each other and the finite difference is unreliable
        # there (a float32 layer_norm of a constant row: 37 -> 147 -> 468 -> 680 towards 689)
        extra = round_ > last[todo]
        # (unless it disagrees again, reproduces, and misses CLEAN_KINK by no more than noise does -- its kink
        # statistic is below KINK_NOISE_FACTOR rounding estimates, which 1.5|z| exceeds at 4% of smooth entries --
        # and takes another step: a planted error near a Normal's scale edge was left unresolved so)
        retry = extra & replace & (v2 == DISAGREE) & reproduced & ~ns2 & (round_ < REFINE_ROUNDS + CURVATURE_ROUNDS)
        last[todo[retry]] = round_
        extra &= ~retry
        verdict[todo[extra & replace]] = UNRESOLVED
        replace &= ~extra
        # Not clean yet, but the fourth difference (relative to the rounding) fell by CURVATURE_FALL or more in
        # this round: that is curvature (it falls REFINE**4-fold a round; a kink's REFINE-fold) -- an entry a few
        # steps from a domain's edge, log at x ~ 5e-4 in float64 -- and it gets another regular round
        curving = (replace & (v2 != AGREE) & ~clean
                   & (CURVATURE_FALL * e2.kink * e.rounding[todo] <= e.kink[todo] * e2.rounding))
        # (and so does an entry whose noise no reliable median measured while its stencil is not settled -- one that
        # straddled a float32 tan's pole 1.6e-4 away, which steps REFINE**5 times smaller leave -- or whose fourth
        # difference fell so, as curvature's does)
        curving |= replace & (v2 != AGREE) & (_unsettled(e2, fell) | fell)
        # (and one that agrees, or is ambiguous, where its fourth difference fell so but is still far above the
        # model's rounding: it was judged within an error of that curvature -- 41% for a float32 tan 0.03 from its
        # pole, right after its stencils stopped straddling the pole -- and takes the steps that tighten it)
        tighten = replace & (v2 != DISAGREE) & fell & (e2.kink > KINK_NOISE_FACTOR * e2.model)
        # (and one whose fourth difference was exactly 0: its bound is the last step's, curvature included -- 1.7e-3
        # of a float32 1/x at x = 0.03, where a 0.1% error went unseen -- and the next step measures its own)
        tighten |= replace & (v2 != DISAGREE) & blind
        curving |= tighten
        grow = todo[curving & (last[todo] == round_) & (round_ < REFINE_ROUNDS + CURVATURE_ROUNDS)]
        last[grow] += 1
        # A disagreement first seen after the entry agreed, where its noise no reliable median measured, has a
        # step behind it that contradicts it: the next step must disagree on its own, too (a float64 layer_norm of
        # sigmoid(sigmoid) entry agreed at h and h/16 and missed its tolerance by 2.8e-11 at h/4)
        # (an agreement within a bound carried over from a larger step, curvature included, is no such step)
        after_agreeing = (verdict[todo] == AGREE) & (e.model[todo] > 0) & ~was_blind[todo]
        e.put(todo, e2, replace)
        verdict[todo[replace]] = v2[replace]
        tol[todo[replace]] = tol2[replace]
        late[todo[replace]] = (v2[replace] == DISAGREE) & (nonsmooth[todo[replace]] | after_agreeing[replace])
        late[todo[retry]] = True  # (the next step, too, must disagree on its own)
        nonsmooth[todo[replace]] = ns2[replace]
        was_blind[todo[replace]] = blind[replace]
        # what is unresolved at its last regular step stays so; a disagreement first seen there (the larger
        # stencils straddled a kink, 2.4e-3 from a float32 ReLU network's weight) gets one more step to be
        # reproduced at
        keep = replace & ((v2 != AGREE) | tighten) & ((round_ < last[todo]) | (v2 == DISAGREE))
        todo = todo[keep]
    unreproduced(todo, REFINE_ROUNDS + CURVATURE_ROUNDS + 2)
    return e, verdict, tol, refined


def _run(evaluator, index: torch.Tensor, floor_of: Callable[[_Entries], torch.Tensor], stats: dict, margin: int):
    """Evaluate the entries ``index`` (a few: directions), judge them, and :func:`refine` those that do not agree."""
    e = evaluator(index, 1.0)
    verdict, tol, nonsmooth = _verdicts(e, floor_of(e))
    return refine(e, verdict, tol, nonsmooth, evaluator, floor_of, stats=stats, margin=margin)


def _record(name: str, shape: tuple, dtype: torch.dtype, mode: str, total: int, e: _Entries, verdict: torch.Tensor,
            tol: torch.Tensor, details: dict) -> TensorReport:
    """The summary record of one tensor's checked entries."""
    diff = (e.numerical - e.analytical).abs()
    rel = relative_errors(diff, e.analytical, float(e.analytical.abs().max()) if e.analytical.numel() else 0.0)
    finite_diff = torch.where(e.finite, diff, torch.zeros_like(diff))
    excess = torch.where(verdict == UNRESOLVED, torch.zeros_like(diff), diff / tol.clamp(min=1e-300))
    checked = diff.numel()
    j = int(excess.argmax()) if checked else None
    worst = None
    if j is not None:
        worst = int(e.index[j]) if mode == "directional" else _engine.unravel(int(e.index[j]), shape)
    entries = {
        "index": e.index.cpu(), "numerical": e.numerical.cpu(), "analytical": e.analytical.cpu(),
        "error_estimate": e.error.cpu(), "tolerance": tol.cpu(), "verdict": verdict.cpu(),
    }
    pick = (lambda t: float(t[j])) if j is not None else (lambda t: math.nan)
    return TensorReport(
        name=name, shape=tuple(shape), dtype=dtype, mode=mode, checked=checked, total=total,
        max_abs_error=float(finite_diff.max()) if checked else 0.0,
        max_rel_error=float(torch.where(e.finite, rel, torch.zeros_like(rel)).max()) if checked else 0.0,
        worst_index=worst, worst_analytical=pick(e.analytical), worst_numerical=pick(e.numerical),
        worst_error_estimate=pick(e.error), worst_tolerance=pick(tol),
        agree=int((verdict == AGREE).sum()), disagree=int((verdict == DISAGREE).sum()),
        unresolved=int((verdict == UNRESOLVED).sum()), entries=entries, details=details,
    )


def _progress(progress, total: int):
    """``(tick(n), close())`` for ``check``'s ``progress`` argument."""
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="coord", desc="gradfd.check", leave=False)
        return bar.update, bar.close
    if callable(progress):
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            progress(done[0], total)

        return tick, lambda: None
    return (lambda n: None), (lambda: None)


def _cotangents(analytical: _jacobian.Analytical, seed: int) -> list[torch.Tensor | None]:
    """The output gradients of the reentrancy check, one per compared output (None where it has no gradient): 1 for a
    one-element output, else torch's fast-mode vector -- uniform in [0, 1), scaled to unit norm -- in the output's
    dtype, so that ``nondet_tol`` bounds the same absolute differences as in ``torch.autograd.gradcheck``."""
    gen = torch.Generator().manual_seed(seed + 7919)
    cots: list[torch.Tensor | None] = []
    for o in analytical.outputs:
        if not o.requires_grad:
            cots.append(None)
        elif o.numel() == 1:
            cots.append(torch.ones_like(o))
        else:
            v = torch.rand(o.numel(), generator=gen, dtype=torch.float64)
            cots.append((v / v.norm()).to(dtype=o.dtype, device=o.device).view(o.shape))
    return cots


def _difference(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """Largest ``|a - b|`` over entries, in float64: identical values (equal infinities, NaN at the same place) differ
    by 0, a NaN against a number by inf (torch's ``(a - b).abs().max() > tol`` would let that NaN through)."""
    if a is None and b is None:
        return 0.0
    a = torch.zeros_like(b) if a is None else a
    b = torch.zeros_like(a) if b is None else b
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    if a.numel() == 0:
        return 0.0
    same = (a == b) | (a.isnan() & b.isnan())
    d = torch.where(same, torch.zeros_like(a), (a - b).abs())
    return float(torch.nan_to_num(d, nan=math.inf).max())


def _backward_spreads(analytical: _jacobian.Analytical, wrt: Sequence[int], seed: int) -> dict[int, float]:
    """Reentrancy, as ``torch.autograd.gradcheck`` checks it: the backward of the same graph run twice with the same
    output gradients (:func:`_cotangents`), and for each checked input the largest absolute difference between the
    two results (0.0: identical). A backward that accumulates with atomics can differ run to run. torch compares
    every row of the Jacobian in its slow mode and this one combination of rows in its fast mode; both backwards
    here cover every checked input at once (two backward passes in all)."""
    outs, cots = [], []
    for o, c in zip(analytical.outputs, _cotangents(analytical, seed)):
        if c is not None:
            outs.append(o)
            cots.append(c)
    if not outs:
        return {k: 0.0 for k in wrt}
    inputs = [analytical.clones[k] for k in wrt]

    def backward():
        with _engine.noting("gradfd: raised in autograd's backward of func at the unperturbed params (the "
                            "reentrancy check, nondet_tol)"):
            grads = _jacobian.grad(outs, inputs, cots)
        return [g if g is None or g.layout == torch.strided else g.to_dense() for g in grads]

    first, second = backward(), backward()
    return {k: _difference(a, b) for k, a, b in zip(wrt, first, second)}


def _nondeterminism(spread: float, nondet_tol: float) -> str:
    """The report's sentence for a backward whose two runs differ by ``spread > nondet_tol``."""
    if nondet_tol == 0:
        bound = ("nondet_tol=0.0 (the default of gradfd.gradcheck and torch.autograd.gradcheck) asks for identical "
                 "results; pass nondet_tol=<tol> where the backward is non-deterministic by design (atomics)")
    else:
        bound = f"> nondet_tol={nondet_tol:g}"
    return (f"two backward passes of the same graph, with the same output gradients, differ by {spread:.3g} "
            f"(largest absolute difference); {bound}")


def _directional_report(evaluator: _Directions, k: int, p: torch.Tensor, directions: int, atol, rtol, stencil, h,
                        analytical: _jacobian.Analytical) -> TensorReport:
    """Judge the directions of one input and summarise them in a record."""
    index = torch.arange(directions, device=p.device)
    floor = FLOOR_EPS * stencils.eps(p.dtype)
    rtol_ = floor if rtol is None else rtol
    state: dict = {"scale": None}

    def floor_of(e: _Entries) -> torch.Tensor:
        if state["scale"] is None:  # the scale of the directional derivatives
            state["scale"] = float(e.analytical.abs().max()) if e.analytical.numel() else 0.0
        atol_ = floor * state["scale"] if atol is None else atol
        return atol_ + rtol_ * e.analytical.abs()

    domain: dict = {}
    e, verdict, tol, refined = _run(evaluator, index, floor_of, domain, domain_margin(stencil, p.dtype))
    details = {**evaluator.details, "stencil": stencil.name, "step": "automatic" if h is None else h, "rtol": rtol_,
               "atol": floor * state["scale"] if atol is None else atol, "refined": refined}
    errors = evaluator.errors
    if errors.count and not bool(e.finite.any()):
        note(errors.first, f"gradfd: raised while evaluating func at {errors.where}, and at every "
                                    f"perturbed node of params[{k}] ({errors.count} nodes) at every step tried")
        raise errors.first
    notes = ([errors.describe()] if errors.count else []) + (
        [f"{domain['retreated']} directions had a non-finite value or an error of func at a node (outside its "
         f"domain): checked at steps down to 1/{domain['smallest']:.0f} of the automatic ones"]
        if domain["retreated"] else [])
    if notes:
        details["notes"] = details.get("notes", []) + notes
    name = f"params[{k}]" if analytical.scalar else f"outputs wrt params[{k}] (u^T J v)"
    return _record(name, tuple(p.shape), p.dtype, "directional", p.numel(), e, verdict, tol, details)


def check(
    func: Callable[..., torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    wrt: int | Sequence[int] | None = None,
    mode: str = "full",
    samples: int | None = None,
    directions: int | None = None,
    h: float | None = None,
    stencil: str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    engine: str = "auto",
    seed: int = 0,
    raise_on_failure: bool = True,
    batching: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    nondet_tol: float | None = None,
    progress: bool | Callable[[int, int], None] = False,
) -> CheckReport:
    """Check autograd's gradient of ``func(*params)`` against finite differences, entry by entry.

    Args:
        func: called as ``func(*params)``; returns a one-element floating tensor (the loss).
        params: tuple or list of tensors on one device. Never modified (nor their ``.grad``): autograd and the
            finite differences run on private copies.
        wrt: indices into ``params`` to check; default every floating tensor with ``requires_grad=True``.
        mode: ``"full"`` (every entry; for tensor-valued functions with an elementwise, broadcasting or row-wise
            Jacobian, checked by colors -- many inputs perturbed together, a few backward passes -- when both sides
            confirm the pattern, else by exact columns), ``"sample"`` (``samples`` entries per tensor: the largest
            |gradient| entries and a seeded uniform sample of the rest) or ``"directional"`` (``directions``
            random Gaussian directions, comparing d/dt f(x + t u) with <grad, u>; cost independent of the size; an
            error on one of N entries moves each directional derivative by that entry's share only, which a float32
            loss's rounding can hide: docs/benchmarks.md, "What directional mode can see").
        samples: entries per tensor in sample mode (default 256). directions: directions in directional mode
            (default 8).
        h: absolute step, or None (default) for the automatic per-entry step ``~eps**(1/(order+1)) * max(1, |x|)``.
        stencil: ``"four_point"`` (default: the most accurate within 2x the cost of central differences),
            ``"central"`` or ``"richardson"``.
        atol, rtol: replace the dtype floors (64 eps, relative to the entry and to the tensor's largest entry);
            the finite difference's own error estimate is always added to the tolerance.
        engine, batching, chunk_size, memory_budget: as in :func:`gradfd.numerical_gradient`.
        seed: seeds the sample and the directions.
        raise_on_failure: raise :class:`GradientCheckError` (carrying the report) when an entry disagrees.
        nondet_tol: None (default) skips the reentrancy check. A float runs the backward twice on the same graph,
            with the same output gradients (1 for a loss; a fixed random unit vector per output otherwise), and fails
            the tensors whose two results differ by more than this, absolutely, in any entry (atomics in CUDA
            backward kernels); ``0.0`` asks for identical results, as ``torch.autograd.gradcheck``'s default
            does. Each record's ``details["backward_spread"]`` holds the measured difference. Costs two backward
            passes in all.
        progress: True for a progress bar with the time left (tqdm, on stderr), or a ``callable(done, total)``
            counting checked coordinates (directions in directional mode).

    Returns:
        A :class:`CheckReport`: ``str(report)`` is a table, ``report.passed`` the verdict: no entry disagrees and no
        backward was non-deterministic beyond ``nondet_tol``. Unresolved entries do not fail, so a tensor whose
        every entry is unresolved passes (the headline says "PASSED (but nothing could be compared for ...)");
        ``report.uncompared`` lists such tensors and ``report.verified`` is ``passed`` without any, the verdict of
        :func:`gradfd.gradcheck` and :func:`gradfd.testing.assert_gradients_match`.

    float32, float16 and bfloat16 functions are evaluated in their own dtype; differences and reductions are in
    float64 (a scalar loss's full ``sum``/``mean`` and loss reductions are widened while the finite differences
    evaluate it, when that reproduces ``func``'s own loss: :mod:`gradfd.reductions`); TF32 is off during the check.
    The caller's RNG state is restored.

    An entry whose stencil reaches outside ``func``'s domain (a NaN/inf value, or a node where ``func`` raises) is
    checked at smaller steps, where its stencil is finite (see the module docstring); the report's notes say so.

    Raises:
        GradientCheckError: a gradient entry disagrees, or the backward is non-deterministic beyond ``nondet_tol``
            (and ``raise_on_failure``); not when nothing could be compared (see Returns).
        Exception: what ``func`` raised, when it raised at the unperturbed point, or at every perturbed node of a
            tensor at every step tried (with a note saying so).
        TypeError / ValueError / IndexError: bad arguments, naming the argument and what was passed.
    """
    params, _ = check_params(params)
    wrt_idx = _resolve_wrt(params, wrt)
    check_choice(mode, "mode", MODES)
    samples = check_positive_int(samples, "samples") or DEFAULT_SAMPLES
    directions = check_positive_int(directions, "directions") or DEFAULT_DIRECTIONS
    sten = stencils.get_stencil(stencil if stencil is not None else stencils.DEFAULT_STENCIL)
    if h is not None:
        h = check_step(h)
    for name, value in (("atol", atol), ("rtol", rtol), ("nondet_tol", nondet_tol)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise ValueError(f"{name} must be a finite float >= 0 or None, got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {describe(seed)}")
    if not callable(func):
        raise TypeError(f"func must be callable, got {describe(func)}")

    budget = _engine.parse_memory_budget(memory_budget) or _engine.default_memory_budget(params[wrt_idx[0]].device)
    rng = _engine.RngGuard()
    records = []
    total = sum(directions if mode == "directional" else min(samples, params[k].numel()) if mode == "sample"
                else params[k].numel() for k in wrt_idx)
    tick, close_bar = _progress(progress, total)
    try:
        with no_tf32(), _engine.warnings_once():
            analytical = _jacobian.Analytical(func, params, wrt_idx, budget // 2)
            if analytical.scalar:
                _engine.validate_scalar_output(analytical.outputs[0], detach=False)
            elif not analytical.spec.kept:
                raise ValueError(f"func returned no floating-point output to compare (outputs "
                                 f"{[d for _, d in analytical.spec.skipped]} have no gradient)")
            nondet = _backward_spreads(analytical, wrt_idx, seed) if nondet_tol is not None else {}
            rng.close()  # the finite differences see the random draws autograd saw
            for k in wrt_idx:
                p = params[k]
                if mode == "directional":
                    evaluator = _Directions(func, params, k, analytical, directions, h, sten, batching, seed,
                                            budget // 2)
                    reports = [_directional_report(evaluator, k, p, directions, atol, rtol, sten, h, analytical)]
                    tick(directions)
                else:
                    if mode == "full":
                        coords = torch.arange(p.numel(), device=p.device)
                    else:
                        score = (analytical.columns(k, torch.arange(p.numel(), device=p.device))[:, 0]
                                 if analytical.scalar else analytical.vjp(k, torch.randn(
                                     analytical.spec.size, generator=torch.Generator().manual_seed(seed + k),
                                     dtype=torch.float64).to(p.device)))
                        coords = sample_coordinates(score, samples, seed + k)
                    reports = _jacobian.check_coordinates(
                        func, params, k, analytical, coords, h=h, stencil=sten, engine=engine, batching=batching,
                        chunk_size=chunk_size, memory_budget=memory_budget, atol=atol, rtol=rtol, mode=mode,
                        progress=tick)
                if k in nondet:
                    for r in reports:
                        r.details["backward_spread"] = nondet[k]
                        if nondet[k] > nondet_tol:
                            r.nondeterminism = _nondeterminism(nondet[k], nondet_tol)
                records.extend(reports)
    finally:
        rng.close()
        close_bar()
    notes = []
    if not analytical.scalar and analytical.spec.skipped:
        notes.append("skipped outputs without gradient: " + ", ".join(
            f"output[{i}] ({d})" for i, d in analytical.spec.skipped))
    report = CheckReport(records, notes)
    if raise_on_failure and not report.passed:
        raise GradientCheckError(report)
    return report
