"""Reference mode: a low-precision op's gradient judged, entry by entry, against a plain-PyTorch reference.

``gradfd.check(op, params, reference=ref)`` (docs/half-precision.md). A finite difference of a float16 or bfloat16
op cannot resolve small errors: one rounding of its output is 0.05% (float16) or 0.4% (bfloat16) of it, divided by
a step of a few percent. The field compares the kernel with a reference instead (FlashAttention's tests allow
the kernel twice the error of the same reference run in the kernel's dtype, one maximum per tensor). This module
does that per entry:

1. **Sides** (:func:`run`). For ``K`` seeded Gaussian cotangents ``v`` (rounded to the outputs' dtypes; ``1``
   for a one-element output), the op's vjp ``v^T J_op`` at ``params``; the truth, the reference's vjp in float64
   at the same values (the reference itself is validated by finite differences in float64 by the caller,
   :func:`gradfd.check`); and the reference's own rounding: ``|vjp of ref in the op's dtype - truth|`` at
   ``params`` and at ``D - 1`` points one ulp away (each entry moved up or down at random, each against its own
   float64 truth), whose roundings are independent draws.
2. **Tolerance** (:func:`judge`): ``factor * (S_i + R) + floor_i``, with ``S_i`` the largest of the ``D`` rounding
   samples at entry ``i``, ``R`` their RMS over the tensor (so that an entry where the reference happened to
   round well is not held to zero), and the floor ``floor_eps * eps * (|truth_i| + rel_floor * max|truth|)``
   (one rounding of the op's output and its inputs). ``factor``, ``floor_eps``, ``K`` and ``D`` are
   :class:`~gradfd.verdict.policy.Policy` fields, measured by ``benchmarks/bench_reference.py``.
3. **Report**: per tensor, the op's error, the reference-in-dtype error and their ratio, the worst entries, and
   the detection limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .. import stencils
from ..errors import noting
from ..report import AGREE, DISAGREE, TINY, UNRESOLVED, TensorReport, relative_errors, unravel
from ..validation import describe
from .policy import DETECTION_PROBABILITY, SEEDS, Policy

__all__ = ["Sides", "Run", "outputs_of", "match_outputs", "cotangents", "run", "judge", "forward_note", "REFUSED_DTYPE"]

REFUSED_DTYPE = torch.float64  # an op judged in float64 (outputs and checked params) is checked by finite differences


def outputs_of(value, who: str) -> list[torch.Tensor]:
    """``value`` (a tensor, or a tuple/list of tensors) as a list.

    Raises:
        TypeError: naming ``who`` when ``value`` is neither.
    """
    outs = list(value) if isinstance(value, (tuple, list)) else [value]
    for j, o in enumerate(outs):
        if not isinstance(o, torch.Tensor):
            where = f"{who}'s output" if len(outs) == 1 and not isinstance(value, (tuple, list)) else \
                f"{who}'s output[{j}]"
            raise TypeError(f"{where} must be a tensor, got {describe(o)}")
    return outs


def _family(t: torch.Tensor) -> str:
    return "complex" if t.is_complex() else "floating" if t.is_floating_point() else "integer or bool"


def match_outputs(op_outs: Sequence[torch.Tensor], ref_outs: Sequence[torch.Tensor], run: str) -> None:
    """Raise unless the reference's outputs match the op's in number, shape, dtype family and device; and in dtype:
    float64 in the float64 run (``run == "float64"``); in the run at the op's params (``run == "dtype"``), no finer
    than the op's (a reference that upcasts would measure a rounding the op's dtype cannot reach, and fail correct
    kernels; a coarser one, a loss the op reduces in float32, only loosens the tolerance).

    Args:
        op_outs: the op's outputs (tensors of any dtype and device).
        ref_outs: the reference's, from the run ``run``.

    Raises:
        ValueError: naming ``reference`` and the first mismatch (what the op returned and what the reference did).
    """
    if len(op_outs) != len(ref_outs):
        raise ValueError(f"reference must return what func returns: func returned {len(op_outs)} tensor(s), the "
                         f"reference {len(ref_outs)}")
    for j, (o, r) in enumerate(zip(op_outs, ref_outs)):
        name = "output" if len(op_outs) == 1 else f"output[{j}]"
        if o.shape != r.shape:
            raise ValueError(f"reference: its {name} has shape {tuple(r.shape)}, func's has {tuple(o.shape)}; the "
                             "reference must compute the same function")
        if _family(o) != _family(r):
            raise ValueError(f"reference: its {name} is {r.dtype} ({_family(r)}), func's is {o.dtype} "
                             f"({_family(o)}); the reference must compute the same function")
        if o.device != r.device:
            raise ValueError(f"reference: its {name} is on {r.device}, func's on {o.device}; run the reference on "
                             "the op's device (it is called with the same params)")
        if o.is_complex():
            raise TypeError(f"func's {name} is complex ({o.dtype}); reference mode compares real tensors only")
        if not o.is_floating_point():
            continue
        if run == "float64" and r.dtype != torch.float64:
            raise ValueError(f"reference: given float64 params, its {name} is {r.dtype}; reference mode takes its "
                             "truth from the reference in float64, so it must compute in its inputs' dtype")
        if run == "dtype" and stencils.eps(r.dtype) < stencils.eps(o.dtype):
            raise ValueError(f"reference: given func's params, its {name} is {r.dtype}, finer than func's {o.dtype}; "
                             "reference mode measures what the reference achieves in func's dtype, so it must "
                             "compute in its inputs' dtype (no internal upcast)")


def cotangents(outs: Sequence[torch.Tensor], differentiable: Sequence[bool], count: int,
               seed: int) -> list[list[torch.Tensor | None]]:
    """``count`` cotangent draws, one list per draw with one entry per output: standard Gaussian, seeded, rounded to
    the output's dtype, where ``differentiable[j]``; None elsewhere. A lone one-element output (a loss) takes ``1``,
    and one draw (the others would be its multiples)."""
    gen = torch.Generator().manual_seed(SEEDS.reference(seed))
    if sum(differentiable) == 1 and outs[list(differentiable).index(True)].numel() == 1:
        count = 1
    draws = []
    for _ in range(count):
        draws.append([torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)
                      if d and o.numel() != 1 else torch.ones_like(o) if d else None
                      for o, d in zip(outs, differentiable)])
    return draws


def _run(func: Callable, params: Sequence[torch.Tensor], wrt: Sequence[int], to64: bool, what: str):
    """``(clones, outputs)``: ``func`` run with autograd on clones of ``params`` (in float64 when ``to64``), the
    inputs ``wrt`` requiring grad."""
    clones = [(p.detach().to(torch.float64, copy=True) if to64 and p.is_floating_point() else p.detach().clone())
              .requires_grad_(k in wrt) for k, p in enumerate(params)]
    with torch.enable_grad(), noting(f"gradfd: raised while running {what}"):
        outs = outputs_of(func(*clones), what.split(" ")[0])
    return clones, outs


def _grads(clones: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], wrt: Sequence[int], cots, what: str):
    """Per cotangent draw, the float64 vjps of ``outs`` for ``clones[k]``, ``k`` in ``wrt`` (zeros where an input
    is unused); cotangents are cast to each output's dtype."""
    inputs = [clones[k] for k in wrt]
    grads = []
    with torch.enable_grad(), noting(f"gradfd: raised in the backward of {what}"):
        for draw in cots:
            pairs = [(o, c.to(o.dtype)) for o, c in zip(outs, draw) if c is not None and o.requires_grad]
            g = (torch.autograd.grad([o for o, _ in pairs], inputs, [c for _, c in pairs], retain_graph=True,
                                     allow_unused=True) if pairs else [None] * len(inputs))
            grads.append([torch.zeros(x.shape, dtype=torch.float64, device=x.device) if gi is None
                          else gi.detach().to(torch.float64) for x, gi in zip(inputs, g)])
    return grads


def _vjps(func: Callable, params: Sequence[torch.Tensor], wrt: Sequence[int], cots, to64: bool, what: str):
    """:func:`_run` then :func:`_grads`: ``(outputs, grads)``."""
    clones, outs = _run(func, params, wrt, to64, what)
    return [o.detach() for o in outs], _grads(clones, outs, wrt, cots, what)


def _dithered(params: Sequence[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """``params`` with every finite floating entry moved one ulp up or down at random, the unchecked ones too (they
    are rounded in the op's dtype as well); non-finite entries and other tensors unchanged."""
    out = []
    for p in params:
        if not p.is_floating_point():
            out.append(p)
            continue
        up = torch.randint(0, 2, p.shape, generator=gen).bool()
        far = torch.full_like(p.detach(), torch.finfo(p.dtype).max)
        moved = torch.nextafter(p.detach(), torch.where(up.to(p.device), far, -far))
        out.append(torch.where(torch.isfinite(p.detach()), moved, p.detach()))
    return out


@dataclass
class Sides:
    """What is compared for one checked input ``params[k]``, each ``(K, n)`` float64 over the ``K`` cotangent draws
    and the ``n`` flattened entries.

    Attributes:
        op: the op's vjps.
        truth: the reference's float64 vjps at the same values.
        spread: ``S``: the largest ``|reference in the op's dtype - its float64 truth|`` over the rounding samples (at
            ``params`` and at points one ulp away), non-finite samples left out.
        rms: ``(K, 1)``: ``R``, the RMS of those samples over the samples and the tensor's entries.
        own: ``(K, n)``: the sample at ``params`` itself (FlashAttention's "reference in the kernel's dtype").
        unmeasured: ``(n,)`` bool: a sample was not finite there (the reference overflows in the op's dtype).
        samples: how many rounding samples were taken.
        dtype: the precision judged: the coarsest of the input's and the compared outputs' dtypes.
        input_dtype: the input's own dtype.
    """

    op: torch.Tensor
    truth: torch.Tensor
    spread: torch.Tensor
    rms: torch.Tensor
    own: torch.Tensor
    unmeasured: torch.Tensor
    samples: int
    dtype: torch.dtype
    input_dtype: torch.dtype


class _Rounding:
    """The reference's rounding samples for one input, accumulated one at a time (no ``(D, K, n)`` array)."""

    def __init__(self):
        self.spread = self.sumsq = self.unmeasured = self.first = None
        self.count = 0

    def add(self, low: torch.Tensor, truth: torch.Tensor) -> None:
        r = (low - truth).abs()
        finite = torch.isfinite(r)
        r = torch.where(finite, r, torch.zeros_like(r))
        if self.count == 0:
            self.spread, self.sumsq, self.unmeasured = r, r.pow(2).sum(1, keepdim=True), ~finite.all(0)
            self.first = r
        else:
            self.spread = torch.maximum(self.spread, r)
            self.sumsq += r.pow(2).sum(1, keepdim=True)
            self.unmeasured |= ~finite.all(0)
        self.count += 1

    def rms(self) -> torch.Tensor:
        n = self.spread.shape[1]
        return (self.sumsq / max(1, self.count * n)).sqrt()


@dataclass
class Run:
    """The op's and the reference's runs at ``params``: ``sides`` per checked input, the cotangent draws, the
    forward values (the op's, the reference's in float64 and in the op's dtype), and ``again``: per checked input,
    the op's first-draw vjp from a second backward (None unless asked for)."""

    sides: dict[int, Sides]
    cots: list
    op_outs: list[torch.Tensor]
    ref64_outs: list[torch.Tensor]
    low_outs: list[torch.Tensor]
    again: dict[int, torch.Tensor] | None = None


def run(op: Callable, reference: Callable, params: Sequence[torch.Tensor], wrt: Sequence[int], policy: Policy,
        seed: int, fresh: Callable[[], None], twice: bool = False) -> Run:
    """Run the op once and the reference ``2 D`` times (``D`` rounding samples, each in float64 and in the op's
    dtype), each with every cotangent draw (:class:`Sides`); with ``twice``, the op's backward a second time on the
    same graph with the first draw (``Run.again``: the reentrancy check).

    Args:
        op, reference: the two functions, called as ``f(*params)``.
        params: the caller's tensors (cloned, never modified).
        wrt: the checked indices.
        policy: ``reference_cotangents`` (``K``) and ``reference_rounding_samples`` (``D``).
        seed: seeds the cotangents and the one-ulp moves.
        fresh: called before every run of either function: puts the caller's RNG state back, so that every run
            draws the same random numbers.

    Raises:
        TypeError / ValueError: naming ``reference`` where its outputs do not match the op's
            (:func:`match_outputs`), where the op is float64 (:data:`REFUSED_DTYPE`), or where neither side has a
            differentiable floating output.
        Exception: what the op or the reference raised, with a note saying which run.
    """
    fresh()
    clones, op_live = _run(op, params, wrt, False, "func (the op) on clones")
    floating = [o.dtype for o in op_live if o.is_floating_point()]
    if stencils.coarsest([*floating, *(params[k].dtype for k in wrt)]) == REFUSED_DTYPE:
        raise ValueError("reference: func and its checked params are float64; reference mode judges float32, float16 "
                         "and bfloat16 ops against their float64 reference, and a float64 op is checked by finite "
                         "differences directly: drop reference=")
    op_outs = [o.detach() for o in op_live]
    fresh()
    clones64, ref64_live = _run(reference, params, wrt, True, "reference in float64")
    match_outputs(op_outs, ref64_live, "float64")
    fresh()
    clones_low, low_live = _run(reference, params, wrt, False, "reference in the op's dtype")
    match_outputs(op_outs, low_live, "dtype")
    # an output the reference differentiates and the op does not (a lost gradient path) is compared too: the op's
    # vjp gets nothing from it
    for j, (r64, lo) in enumerate(zip(ref64_live, low_live)):
        if r64.is_floating_point() and r64.requires_grad != lo.requires_grad:
            raise ValueError(f"reference: its output[{j}] has a gradient in float64 but not in func's dtype, or the "
                             "reverse; its rounding in func's dtype cannot be measured: the reference must be one "
                             "differentiable function in every dtype")
    differentiable = [o.is_floating_point() and (o.requires_grad or r.requires_grad)
                      for o, r in zip(op_live, ref64_live)]
    if not any(differentiable):
        raise ValueError("func returned no differentiable floating output, and neither did the reference: nothing "
                         "to compare (does a checked param have requires_grad=True, and does func use it?)")
    cots = cotangents(op_live, differentiable, policy.reference_cotangents, seed)
    op_grads = _grads(clones, op_live, wrt, cots, "func (the op)")
    again = _grads(clones, op_live, wrt, cots[:1], "func (the op), run again")[0] if twice else None
    truth = _grads(clones64, ref64_live, wrt, cots, "reference in float64")
    low = _grads(clones_low, low_live, wrt, cots, "reference in the op's dtype")
    ref64_outs, low_outs = [o.detach() for o in ref64_live], [o.detach() for o in low_live]
    stack = lambda grads, j: torch.stack([g[j].reshape(-1) for g in grads])  # noqa: E731  (K, n) of input j
    rounding = [_Rounding() for _ in wrt]
    for j, r in enumerate(rounding):
        r.add(stack(low, j), stack(truth, j))
    gen = torch.Generator().manual_seed(SEEDS.reference(seed) + 1)
    for _ in range(policy.reference_rounding_samples - 1):
        moved = _dithered(params, gen)
        fresh()
        _, t_d = _vjps(reference, moved, wrt, cots, True, "reference in float64 at a point one ulp away")
        fresh()
        _, l_d = _vjps(reference, moved, wrt, cots, False, "reference in the op's dtype at a point one ulp away")
        for j, r in enumerate(rounding):
            r.add(stack(l_d, j), stack(t_d, j))
    out_dtypes = [o.dtype for o, c in zip(op_outs, cots[0]) if c is not None]
    result = {k: Sides(stack(op_grads, j), stack(truth, j), r.spread, r.rms(), r.first, r.unmeasured, r.count,
                       stencils.coarsest([params[k].dtype, *out_dtypes]), params[k].dtype)
              for j, (k, r) in enumerate(zip(wrt, rounding))}
    return Run(result, cots, op_outs, ref64_outs, low_outs,
               None if again is None else {k: g.reshape(-1) for k, g in zip(wrt, again)})


def forward_note(op_outs: Sequence[torch.Tensor], ref64_outs: Sequence[torch.Tensor],
                 low_outs: Sequence[torch.Tensor]) -> str:
    """One line on the forward values: the op's largest error against the float64 reference, beside the
    reference's own in the op's dtype (informative; no verdict reads it)."""
    parts = []
    for j, (o, t, lo) in enumerate(zip(op_outs, ref64_outs, low_outs)):
        if not o.is_floating_point():
            continue
        err = (o.to(torch.float64) - t).abs().nan_to_num(nan=math.inf)
        own = (lo.to(torch.float64) - t).abs().nan_to_num(nan=math.inf)
        name = "output" if len(op_outs) == 1 else f"output[{j}]"
        parts.append(f"{name}: func {float(err.max()) if err.numel() else 0.0:.3g}, reference in {o.dtype} "
                     f"{float(own.max()) if own.numel() else 0.0:.3g}".replace("torch.", ""))
    return "forward values, largest |value - reference in float64|: " + "; ".join(parts)


def judge(s: Sides, k: int, shape: tuple, policy: Policy, atol: float | None, rtol: float | None,
          unconfirmed: torch.Tensor | None, validation: str) -> TensorReport:
    """The verdict per entry of ``params[k]`` (module docstring, step 2) and its record.

    Args:
        s: the two sides and the reference's rounding.
        k: the input's index (the record is named ``params[k]``).
        shape: ``params[k]``'s shape.
        policy: ``reference_factor``, ``reference_floor_eps``, ``rel_floor``.
        atol, rtol: replace the floor (``atol + rtol * |truth|``) when either is given.
        unconfirmed: flat indices where the reference's own finite-difference check was unresolved (a kink): a
            disagreement there is unresolved; None when that check was not per entry.
        validation: how the reference was validated (a sentence for ``details``).

    Returns:
        The record (``mode="reference"``). Per entry, the values of its worst cotangent draw: ``numerical`` the
        truth, ``analytical`` the op's, ``error_estimate`` the reference's rounding ``S_i + R``, ``tolerance``.
        Unresolved entries (the truth or a rounding sample not finite, or unconfirmed) take no part in the largest
        errors, the worst entry or the ratio.
    """
    n = s.op.shape[1]
    eps = torch.finfo(s.dtype).eps
    e = (s.op - s.truth).abs().nan_to_num(nan=math.inf)
    finite_truth = s.truth.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    big = finite_truth.amax(1, keepdim=True) if n else finite_truth.new_zeros(s.op.shape[0], 1)
    if atol is None and rtol is None:
        floor = policy.reference_floor_eps * eps * (s.truth.abs() + policy.rel_floor * big)
    else:
        floor = (atol or 0.0) + (rtol or 0.0) * s.truth.abs()
    rounding = s.spread + s.rms
    tol = policy.reference_factor * rounding + floor
    ratio = e / tol.clamp(min=TINY)
    unresolved = (~torch.isfinite(s.truth)).any(0) | s.unmeasured
    bad = (ratio > 1).any(0) & ~unresolved
    if unconfirmed is not None and unconfirmed.numel():
        unconfirmed = unconfirmed.to(bad.device)
        unresolved[unconfirmed] |= bad[unconfirmed]
        bad[unconfirmed] = False
    verdict = torch.full((n,), AGREE, dtype=torch.int8)
    verdict[bad.cpu()] = DISAGREE
    verdict[unresolved.cpu()] = UNRESOLVED
    pick = ratio.argmax(0, keepdim=True)  # the draw where each entry is worst
    take = lambda t: t.gather(0, pick).squeeze(0).cpu()  # noqa: E731
    entries = {"index": torch.arange(n), "numerical": take(s.truth), "analytical": take(s.op),
               "error_estimate": take(rounding), "tolerance": take(tol), "verdict": verdict}
    judged = ~unresolved  # the headline numbers are over the entries compared
    e_judged = torch.where(judged, e, torch.zeros_like(e))
    worst = int(torch.where(judged, ratio.amax(0), -1.0).argmax()) if bool(judged.any()) else None
    rel = relative_errors(e_judged, s.truth, float(big.max()) if n else 0.0, policy.rel_floor)
    op_error = float(e_judged.max()) if n else 0.0
    reference_error = float(torch.where(judged, s.own, torch.zeros_like(s.own)).max()) if n else 0.0
    details = {"reference": {
        "op_error": op_error, "reference_error": reference_error,
        "ratio": op_error / reference_error if reference_error > 0 else (math.inf if op_error > 0 else 1.0),
        "dtype": str(s.dtype).replace("torch.", ""), "factor": policy.reference_factor,
        "cotangents": s.op.shape[0], "rounding_samples": s.samples, "validation": validation}}
    at = (lambda name: float(entries[name][worst])) if worst is not None else (lambda name: math.nan)  # noqa: E731
    return TensorReport(
        name=f"params[{k}]", shape=tuple(shape), dtype=s.input_dtype, mode="reference", checked=n, total=n,
        max_abs_error=op_error, max_rel_error=float(rel.max()) if n else 0.0,
        worst_index=unravel(worst, shape) if worst is not None else None,
        worst_analytical=at("analytical"), worst_numerical=at("numerical"),
        worst_error_estimate=at("error_estimate"), worst_tolerance=at("tolerance"),
        agree=int((verdict == AGREE).sum()), disagree=int((verdict == DISAGREE).sum()),
        unresolved=int((verdict == UNRESOLVED).sum()), entries=entries, details=details,
        detection_limit=_detection_limit(e_judged, tol, s.truth, unresolved))


def _detection_limit(e: torch.Tensor, tol: torch.Tensor, truth: torch.Tensor, unresolved: torch.Tensor) -> float:
    """The smallest error on one entry of the op's gradient, relative to the tensor's RMS gradient, flagged with
    95% probability when the wrong entry is any one entry (uniformly): entry ``i`` is flagged by an error beyond
    ``tol_i + e_i`` (its tolerance, plus what the op's rounding may take off) in one draw; the limit is that
    threshold's 95% quantile over entries, inf where more than 5% are unresolved, NaN for a zero gradient."""
    rms = truth.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).pow(2).mean(1, keepdim=True).sqrt()
    if e.shape[1] == 0 or not bool((rms > 0).any()):
        return math.nan
    each = ((tol + e) / rms).nan_to_num(nan=math.inf).amin(0)
    each[unresolved] = math.inf
    q = torch.sort(each.double().cpu()).values[min(each.numel() - 1, math.ceil(DETECTION_PROBABILITY * each.numel())
                                                    - 1)]
    return float(q)
