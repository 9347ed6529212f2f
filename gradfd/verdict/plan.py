"""The plan of a coordinates check (full and sample mode): what is checked, with which steps, floors and chunks,
decided before anything is evaluated; and the one call through which every stage evaluates columns.

What lives here: :class:`Request` (the check's arguments for one input), :class:`Plan` (one attempt's decisions
and its base values), :func:`make_plan`, :func:`sample_coordinates`. What does not: the stages themselves
(:mod:`.first_round`, :mod:`.noise`, :mod:`.refine`, :mod:`.summary`), the driver (:mod:`.coordinates`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .. import budget as _budget
from .. import engine as _engine
from .. import stencils
from ..jacobian import Analytical
from .judge import Floors
from .policy import SAMPLE_LARGEST_SHARE, Policy

__all__ = ["Request", "Plan", "make_plan", "evaluate_base", "sample_coordinates"]


def sample_coordinates(analytical: torch.Tensor, samples: int, seed: int) -> torch.Tensor:
    """Flat indices to check in sample mode: the ``samples // SAMPLE_LARGEST_SHARE`` entries of largest
    |analytical| and a seeded uniform sample of the rest (all entries when ``samples >= numel``)."""
    flat = analytical.reshape(-1)
    n = flat.numel()
    if samples >= n:
        return torch.arange(n, device=flat.device)
    top = max(1, samples // SAMPLE_LARGEST_SHARE)
    chosen = flat.abs().topk(top).indices
    mask = torch.ones(n, dtype=torch.bool, device=flat.device)
    mask[chosen] = False
    rest = mask.nonzero().flatten()
    gen = torch.Generator().manual_seed(seed)
    pick = rest[torch.randperm(rest.numel(), generator=gen)[: samples - top].to(flat.device)]
    return torch.cat([chosen, pick]).sort().values


@dataclass
class Request:
    """What :func:`gradfd.check` asks of one input ``params[k]`` in full or sample mode (its arguments, resolved)."""

    func: Callable
    params: Sequence[torch.Tensor]
    k: int
    analytical: Analytical
    coords: torch.Tensor
    h: float | None
    stencil: stencils.Stencil
    engine: str
    batching: str
    chunk_size: int | None
    memory_budget: object
    atol: float | None
    rtol: float | None
    mode: str
    policy: Policy
    progress: Callable[[int], None] | None = None


@dataclass
class Plan:
    """One attempt's decisions: per-output epsilons and floors, steps, chunks, whether every entry's values are kept
    (``keep_all``), the shared record of func's errors at nodes, and the base values of the compared outputs."""

    request: Request
    size: int  # compared output entries O
    n: int  # entries of the input
    out_eps: torch.Tensor  # (O,) eps of each output's dtype
    out_tiny: torch.Tensor  # (O,) spacing of each output's subnormals: the model's absolute floor
    group: torch.Tensor  # (O,) the output tensor of each entry
    floors: Floors
    scales: list  # per output tensor: its Jacobian block's largest |entry| (None until seen)
    flat_x: torch.Tensor
    base_steps: torch.Tensor  # (n,) float64
    keep_all: bool
    chunk_size: int | None
    errors: _engine.NodeErrors
    base_values: torch.Tensor | None = None  # (O,) float64
    reliable_eps: torch.Tensor | None = None  # (O,) the noise floor's eps for a loss reduced in float64 (evaluate_base)

    @property
    def m(self) -> int:
        return self.request.coords.numel()

    def prepare(self, vector: bool | None = None) -> _engine.Problem:
        """A fresh problem for ``func`` around the input (its base evaluated), recording node errors."""
        r = self.request
        return _engine.prepare(r.func, r.params, r.k, vector=not r.analytical.scalar if vector is None else vector,
                               skip_outputs=r.analytical.nondifferentiable, node_errors=self.errors)

    def evaluate_columns(self, cols: torch.Tensor, factor: float, on_chunk: Callable, report: bool = False
                         ) -> dict | None:
        """Evaluate the stencils of input entries ``cols`` at steps ``1/factor`` as large; ``on_chunk(start, stop,
        values (S, c, O), displacement (S, c))`` receives each chunk. With ``report``, the progress is reported
        and the engine's choices are returned (the first round's details)."""
        r = self.request
        problem = self.prepare()

        def sink(start, stop, values, disp):
            if r.analytical.scalar:
                values = values.unsqueeze(-1)
            on_chunk(start, stop, values, disp)

        ev = _engine.evaluate(r.func, r.params, r.k, steps=self.base_steps[cols] / factor, stencil=r.stencil,
                              coords=cols, engine=r.engine, batching=r.batching, chunk_size=self.chunk_size,
                              memory_budget=r.memory_budget, problem=problem, sink=sink,
                              progress=r.progress if report else None)
        if report:
            return {"engine": ev.engine, "batching": ev.batching, "chunk_size": ev.chunk_size,
                    "notes": list(ev.notes)}
        return None


def _per_output(spec, fill: Callable[[int, torch.dtype], float], dtype: torch.dtype, device) -> torch.Tensor:
    """``(O,)``: ``fill(j, dtype_j)`` for every entry of output ``j``."""
    if not spec.size:
        return torch.zeros(0, dtype=dtype)
    return torch.cat([torch.full((spec.numels[j],), fill(j, dt), dtype=dtype)
                      for j, dt in enumerate(spec.dtypes)]).to(device)


def make_plan(r: Request) -> Plan:
    """Plan one attempt, and evaluate ``func`` at the unperturbed point for the base values."""
    analytical, p, policy = r.analytical, r.params[r.k], r.policy
    spec = analytical.spec
    n, size, m = p.numel(), spec.size, r.coords.numel()
    out_eps = _per_output(spec, lambda j, dt: stencils.eps(dt), torch.float64, p.device)
    out_tiny = _per_output(spec, lambda j, dt: torch.finfo(dt).smallest_normal * stencils.eps(dt), torch.float64,
                           p.device)
    group = _per_output(spec, lambda j, dt: j, torch.int64, p.device)
    # the dtype floor, of the coarser of each output and the input: backward rounds the Jacobian's entries to the
    # input's dtype (softmax(x, dtype=torch.float64) of a float32 x: float32 entries, 3.6e-8 off the float64 ones)
    floor = policy.floor_eps * torch.clamp(out_eps, min=stencils.eps(p.dtype))
    scales = [analytical.scale(r.k, j) for j in range(len(spec.kept))]
    flat_x = p.detach().reshape(-1)
    # steps sized for the coarser of the input and the compared outputs: a float16 output of a float64 input
    base_steps = (stencils.automatic_steps(flat_x, r.stencil, dtype=stencils.coarsest([p.dtype, *spec.dtypes]))
                  if r.h is None else torch.full(flat_x.shape, r.h, dtype=torch.float64, device=p.device))
    chunk_size = r.chunk_size
    if chunk_size is None and size * n * torch.float64.itemsize > analytical.budget:
        # the analytical rows are recomputed for every chunk: make the chunks few, as far as the budget allows
        per_coordinate = len(r.stencil.offsets) * torch.float64.itemsize * (_budget.NODE_ACTIVATIONS * size + n)
        chunk_size = max(1, min(max(_budget.MIN_RECOMPUTED_CHUNK, -(-m // _budget.RECOMPUTED_CHUNKS)),
                                analytical.budget // per_coordinate))
    plan = Plan(r, size, n, out_eps, out_tiny, group, Floors(floor, r.atol, r.rtol, scales, group), scales, flat_x,
                base_steps, m * size <= _budget.DENSE_ENTRIES, chunk_size, _engine.NodeErrors())
    return plan


def evaluate_base(plan: Plan) -> None:
    """The base values of the compared outputs at the unperturbed point (the engine evaluates them too).

    Rule: a loss reduced in float64 (gradfd.reductions) has its measured noise trusted down to float64's rounding,
    but never below the rounding of one of its low-precision terms (``Float64Reductions.quantum`` over
    ``noise_floor_divisor``, relative to ``|f|``, so that, as the model's floor, it scales with ``|f| + terms``;
    never above the floor of the loss not reduced in float64): a step that moves one sample's float32
    cross-entropy moves the loss in quanta of that, and a median of fourth differences that are mostly exactly 0
    measures far less (tests/test_check.py::test_a_float32_loss_that_moves_in_quanta_of_one_term_is_not_failed)."""
    problem = plan.prepare()
    problem.rng.close()
    plan.base_values = problem.base_loss.to(torch.float64).reshape(-1)
    plan.reliable_eps = None
    if problem.reduce64:
        quantum = problem.reduction_quantum / plan.request.policy.noise_floor_divisor
        relative = quantum / max(float(plan.base_values.abs().max()), torch.finfo(torch.float64).tiny)
        plan.reliable_eps = torch.minimum(torch.full_like(plan.out_eps, max(relative, stencils.eps(torch.float64))),
                                          plan.out_eps / plan.request.policy.noise_floor_divisor)

