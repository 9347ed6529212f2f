"""Directional mode: random directions of one input, ``d/dt uᵀf(x + t v)`` at ``t = 0`` against ``(uᵀJ) v``,
judged and refined like coordinates, summarised in one :class:`~gradfd.report.TensorReport`.

What does not live here: the estimator (:mod:`.estimates`), the verdict rule (:mod:`.judge`) and the refinement
(:mod:`.refine`), which this mode shares with full and sample mode.
"""

from __future__ import annotations

import math

import torch

from .. import engine as _engine
from .. import stencils
from ..errors import note
from ..jacobian import Analytical
from ..report import AGREE, DISAGREE, TINY, UNRESOLVED, TensorReport, relative_errors
from .detection import allowances, detection_generator, directional_limit
from .estimates import Entries, fourth_difference, loss_noise_from, second_difference
from .judge import DirectionalFloor, Judgement, judge
from .policy import SEEDS, Policy
from .refine import domain_margin, refine

__all__ = ["Directions", "directional_report"]


class Directions:
    """Evaluates random directions of one input: Gaussian input directions ``v`` scaled entry-wise by the per-entry
    steps and (for tensor-valued functions) Gaussian output cotangents ``u``; the nodes of as many directions as
    ``budget`` bytes hold go to ``func`` in one batched call, the analytical side costs one backward per direction.
    Called as an evaluator of :func:`~gradfd.verdict.refine.refine`: ``(direction numbers, step divisor) ->``
    :class:`Entries`."""

    def __init__(self, func, params, k, analytical: Analytical, count, h, stencil, batching, seed, budget: int,
                 policy: Policy):
        self.func, self.params, self.k, self.stencil, self.batching = func, params, k, stencil, batching
        self.budget, self.policy = budget, policy
        self.scalar = analytical.scalar
        self.skip_outputs = analytical.nondifferentiable
        x = params[k].detach().reshape(-1)
        coarse = stencils.coarsest([x.dtype, *analytical.spec.dtypes])
        self.steps = (stencils.automatic_steps(x, stencil, dtype=coarse) if h is None
                      else torch.full(x.shape, h, dtype=torch.float64, device=x.device))
        self.seed = SEEDS.directions(seed, k)
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

    def _losses(self, problem, which: torch.Tensor, factor: float):
        """``(S, D)`` cotangent-weighted outputs at the nodes, ``(S, D)`` the analytical side's, ``(D,)`` whether
        every output at a direction's nodes is finite, and the base outputs."""
        offsets = torch.tensor(self.stencil.offsets, dtype=torch.float64, device=self.steps.device)  # (S,)
        losses = torch.empty(len(offsets), len(which), dtype=torch.float64, device=self.steps.device)
        ana = torch.empty_like(losses)
        finite_values = torch.ones(len(which), dtype=torch.bool, device=self.steps.device)
        x = problem.flat
        x64 = x.to(torch.float64)
        base_vec = problem.base_loss.to(torch.float64).reshape(-1)
        S, ds = len(offsets), which.tolist()
        # the S nodes of `per` directions per call: float64 staging plus the points and func's outputs, within
        # the budget
        node_bytes = (torch.float64.itemsize + x.element_size()) * (x.numel() + base_vec.numel())
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
        return losses, ana, finite_values, base_vec

    def __call__(self, which: torch.Tensor, factor: float) -> Entries:
        stencil, policy = self.stencil, self.policy
        problem = _engine.prepare(self.func, self.params, self.k, vector=not self.scalar,
                                  skip_outputs=self.skip_outputs, node_errors=self.errors)
        try:
            losses, ana, finite_values, base_vec = self._losses(problem, which, factor)
        finally:
            problem.rng.close()
        u = self.u[which]  # (D, O)
        base = (u * base_vec).sum(-1)  # (D,)
        half = torch.tensor(stencil.multiples, dtype=torch.float64, device=base.device).view(-1, 1).expand(
            -1, len(which))
        numerical, spread = stencils.extrapolate((losses[0::2] - losses[1::2]) / (2 * half), half)
        analytical, _ = stencils.extrapolate((ana[0::2] - ana[1::2]) / (2 * half), half)
        finite = finite_values & torch.isfinite(numerical)
        fourth = fourth_difference(losses, base, stencil.offsets)
        kink = fourth.abs() / 2 if fourth is not None else second_difference(losses, base, stencil.offsets)
        if self.noise is None:
            # the model: the rounding of every output entry, weighted by the cotangent
            # (a loss reduced in float64 still sums terms rounded in func's dtype: that dtype's eps)
            eps_out = max(stencils.eps(dt) for dt in problem.spec.dtypes) if problem.spec else stencils.eps(
                problem.plain_base.dtype)
            model = eps_out * float((u.abs() * base_vec.abs()).sum(-1).max())
            self.noise = loss_noise_from(model, fourth[finite] if fourth is not None else None, policy)
            self.details.update(loss_noise=self.noise, truncation_estimated=spread is not None)
        rounding = torch.full_like(numerical, policy.rounding_safety * self.noise * stencil.weight_norm)
        truncation = spread if spread is not None else torch.zeros_like(numerical)
        # derivatives along v / factor: scale them back to the base direction v, so rounds compare directly
        return Entries(which, numerical * factor, analytical * factor, (truncation + rounding) * factor,
                       rounding * factor, kink * factor, finite, torch.zeros_like(numerical))


def _record(name: str, p: torch.Tensor, e: Entries, j: Judgement, details: dict, policy: Policy) -> TensorReport:
    """The summary record of one tensor's judged directions."""
    diff = (e.numerical - e.analytical).abs()
    rel = relative_errors(diff, e.analytical, float(e.analytical.abs().max()) if e.analytical.numel() else 0.0,
                          policy.rel_floor)
    finite_diff = torch.where(e.finite, diff, torch.zeros_like(diff))
    excess = torch.where(j.verdict == UNRESOLVED, torch.zeros_like(diff), diff / j.tol.clamp(min=TINY))
    checked = diff.numel()
    w = int(excess.argmax()) if checked else None
    entries = {"index": e.index.cpu(), "numerical": e.numerical.cpu(), "analytical": e.analytical.cpu(),
               "error_estimate": e.error.cpu(), "tolerance": j.tol.cpu(), "verdict": j.verdict.cpu()}
    pick = (lambda t: float(t[w])) if w is not None else (lambda t: math.nan)
    return TensorReport(
        name=name, shape=tuple(p.shape), dtype=p.dtype, mode="directional", checked=checked, total=p.numel(),
        max_abs_error=float(finite_diff.max()) if checked else 0.0,
        max_rel_error=float(torch.where(e.finite, rel, torch.zeros_like(rel)).max()) if checked else 0.0,
        worst_index=int(e.index[w]) if w is not None else None, worst_analytical=pick(e.analytical),
        worst_numerical=pick(e.numerical), worst_error_estimate=pick(e.error), worst_tolerance=pick(j.tol),
        agree=int((j.verdict == AGREE).sum()), disagree=int((j.verdict == DISAGREE).sum()),
        unresolved=int((j.verdict == UNRESOLVED).sum()), entries=entries, details=details,
    )


def directional_report(evaluator: Directions, k: int, p: torch.Tensor, directions: int, atol, rtol,
                       stencil: stencils.Stencil, h, analytical: Analytical, policy: Policy) -> TensorReport:
    """Judge the directions of one input (first round, then :func:`~gradfd.verdict.refine.refine`) and summarise
    them in a record.

    Raises:
        Exception: what ``func`` raised at every perturbed node at every step tried (with a note saying so).
    """
    index = torch.arange(directions, device=p.device)
    floor = DirectionalFloor(policy.floor_eps * stencils.eps(p.dtype), atol, rtol)
    e = evaluator(index, 1.0)
    refined = refine(e, judge(e, floor(e), policy), evaluator, floor, policy,
                     margin=domain_margin(stencil, p.dtype, policy))
    e = refined.entries
    details = {**evaluator.details, "stencil": stencil.name, "step": "automatic" if h is None else h,
               "rtol": floor.rtol, "atol": floor.absolute(), "refined": refined.evaluations}
    errors = evaluator.errors
    if errors.count and not bool(e.finite.any()):
        note(errors.first, f"gradfd: raised while evaluating func at {errors.where}, and at every "
                           f"perturbed node of params[{k}] ({errors.count} nodes) at every step tried")
        raise errors.first
    notes = ([errors.describe()] if errors.count else []) + (
        [f"{refined.retreated} directions had a non-finite value or an error of func at a node (outside its "
         f"domain): checked at steps down to 1/{refined.smallest:.0f} of the automatic ones"]
        if refined.retreated else [])
    if notes:
        details["notes"] = details.get("notes", []) + notes
    name = f"params[{k}]" if analytical.scalar else f"outputs wrt params[{k}] (u^T J v)"
    record = _record(name, p, e, refined.judgement, details, policy)
    record.detection_limit = _limit(evaluator, e, refined.judgement, floor)
    return record


def _limit(evaluator: Directions, e: Entries, j: Judgement, floor: DirectionalFloor) -> float:
    """The detection limit of the judged directions (:func:`~.detection.directional_limit`)."""
    allowance = allowances(e, j, floor(e), evaluator.policy, detection_generator())
    # the RMS over the gradient's nonzero entries for a loss (as full mode counts the entries it depends on); for a
    # tensor-valued function over every Jacobian entry: E[(u_dᵀJ)_i^2] = sum_o J_oi^2
    if evaluator.scalar:
        g = evaluator.grads[0]
        g = g[g.isfinite() & (g != 0)]
        rms = math.sqrt(float(g.pow(2).mean())) if g.numel() else 0.0
    else:
        rms = math.sqrt(float(evaluator.grads.pow(2).mean()) / evaluator.u.shape[1])
    return directional_limit(allowance, evaluator.steps, rms, None if evaluator.scalar else evaluator.u[e.index])
