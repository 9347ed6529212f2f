"""What an evaluation produces and where its nodes are: :class:`Evaluation` (the losses at every stencil node around
a set of coordinates, their realised displacements, and how they were computed), :func:`node_values` (the nodes
rounded to the parameter's dtype) and :func:`resolve_steps` (the nominal step of each coordinate).

How the nodes are evaluated lives in :mod:`.batched`, :mod:`.loop` and the drivers; what the differences mean
(estimates, tolerances, verdicts) lives in :mod:`gradfd.stencils`, :mod:`gradfd.verdict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .. import ops, stencils
from ..stencils import Stencil
from ..validation import check_step
from .problem import Problem

__all__ = ["Evaluation", "node_values", "resolve_steps"]


@dataclass
class Evaluation:
    """The raw result of evaluating ``func`` at the stencil's nodes around a set of coordinates.

    Attributes:
        param_idx, shape, dtype: the differentiated parameter.
        coords: ``(M,)`` int64 flat indices that were perturbed (on the parameter's device).
        steps: ``(M,)`` float64 nominal steps ``h_i``.
        stencil: the stencil; its ``offsets`` order the rows below.
        losses: ``(S, M)`` float64 losses at the nodes ``x + offsets[s]*h_i*e_i``, less ``loss_offset`` (None when a
            ``sink`` receives the values instead, as for tensor-valued functions).
        displacement: ``(S, M)`` float64 steps actually taken after rounding to ``dtype``.
        base_loss: ``func`` at the unperturbed point (float64 0-d tensor), less ``loss_offset``.
        engine: ``"batched"``, ``"loop"`` or ``"structured"`` (what actually ran; a mix reports ``"batched"`` with a
            note).
        batching: ``"vmap"``, ``"vmap+forms"`` (:mod:`.forms`), ``"stack"`` or None.
        chunk_size: coordinates per batched call (after any out-of-memory halving), or None.
        notes: human-readable decisions (probe timings, fallbacks).
        sink: optional ``callable(start, stop, values, displacement)`` receiving each chunk's values.
        progress: optional ``callable(coordinates done)`` called after each chunk.
        loss_offset: ``losses`` and ``base_loss`` are relative to this value: the loss is their sum. 0 except for the
            structured engine, which reports changes from the base loss to keep the full loss's rounding out of them.
    """

    param_idx: int
    shape: tuple
    dtype: torch.dtype
    coords: torch.Tensor
    steps: torch.Tensor
    stencil: Stencil
    losses: torch.Tensor
    displacement: torch.Tensor
    base_loss: torch.Tensor
    engine: str
    batching: str | None
    chunk_size: int | None
    notes: list[str] = field(default_factory=list)
    sink: Callable | None = field(default=None, repr=False)
    progress: Callable[[int], None] | None = field(default=None, repr=False)
    loss_offset: float = 0.0

    def store(self, start: int, stop: int, values: torch.Tensor) -> None:
        """Record the values of columns ``start:stop``: ``(S, c)`` losses, or ``(S, c, size)`` for a tensor-valued
        ``func``, which go to ``sink(start, stop, values, displacement)`` instead of being kept."""
        if self.sink is not None:
            self.sink(start, stop, values, self.displacement[:, start:stop])
        else:
            self.losses[:, start:stop] = values
        if self.progress is not None:
            self.progress(stop - start)

    def levels(self) -> torch.Tensor:
        """``(K, M)`` float64 central differences, one row per step level."""
        if ops.kernels_available():
            return ops.central_differences(self.losses, self.displacement)
        return ops.central_differences_reference(self.losses, self.displacement)

    def half_spacing(self) -> torch.Tensor:
        """``(K, M)`` float64 realised half-spacings ``(d+ - d-)/2`` of the levels."""
        return (self.displacement[0::2] - self.displacement[1::2]) / 2

    def finite(self) -> torch.Tensor:
        """``(M,)`` bool: every node loss of the coordinate is finite."""
        return torch.isfinite(self.losses).all(dim=0)

    def estimate(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Extrapolated derivative ``(M,)`` and truncation spread (or None), see :func:`stencils.extrapolate`."""
        return stencils.extrapolate(self.levels(), self.half_spacing())


def resolve_steps(problem: Problem, steps: float | torch.Tensor | None, stencil: Stencil, coords: torch.Tensor,
                  x: torch.Tensor) -> torch.Tensor:
    """``(M,)`` float64 nominal steps for the ``(M,)`` coordinates ``coords`` whose values are ``x``.

    ``steps``: None (:func:`stencils.automatic_steps`), a float (the same step everywhere), or a float tensor with one
    entry per coordinate or per element of the parameter. Raises TypeError/ValueError naming ``h`` otherwise.
    """
    if steps is None:
        return stencils.automatic_steps(x, stencil)
    if isinstance(steps, torch.Tensor):
        h = steps.to(device=problem.device, dtype=torch.float64).reshape(-1)
        if h.numel() == problem.numel and h.numel() != coords.numel():
            h = h[coords]
        elif h.numel() != coords.numel():
            raise ValueError(f"h must be a float or have one entry per element ({problem.numel}), got {h.numel()}")
        if not bool((torch.isfinite(h) & (h > 0)).all()):
            raise ValueError("h must be positive and finite everywhere")
        return h
    return torch.full((coords.numel(),), check_step(steps), dtype=torch.float64, device=problem.device)


def node_values(x: torch.Tensor, h: torch.Tensor, offsets: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The stencil's nodes ``round(x + o*h)`` in ``x``'s dtype, ``(S, M)``, and their exact float64 displacement.

    The same arithmetic as ``gradfd::perturb_rows_`` (which computes them per row on the device).
    """
    x64 = x.to(torch.float64)
    off = torch.tensor(offsets, dtype=torch.float64, device=x.device)
    moved = torch.addcmul(x64.unsqueeze(0), off.unsqueeze(1), h.unsqueeze(0)).to(x.dtype)
    return moved, moved.to(torch.float64) - x64

