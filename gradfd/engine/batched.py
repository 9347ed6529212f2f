"""One batched call of ``func``: every row of a ``(P, N)`` batch of points of the checked parameter in one call, by
``torch.func.vmap`` (under :class:`~.modes.SharedOperandMatmul`) or by stacking the rows along a leading batch
dimension that ``func`` accepts (checked against single calls). The coordinate driver (:mod:`.coordinates`) and the
point driver (:mod:`.points`) both call it.

What to do when a call fails (the next strategy, the loop) is the drivers' business, not this module's.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

from .. import stencils
from ..errors import first_line
from .forms import batchable_forms
from .modes import SharedOperandMatmul
from .problem import Problem

__all__ = ["strategies", "call_batched", "verify_stacked"]


def strategies(batching: str) -> list[str]:
    """The batched strategies to try, in order, for ``batching``: ``"auto"`` tries vmap, then vmap with the ops
    that have no batching rule in their batchable forms (:mod:`.forms`), then stacking; ``"vmap"`` the first two;
    ``"loop"`` none. KeyError for anything else (the entry points validate ``batching``)."""
    return {"auto": ["vmap", "vmap+forms", "stack"], "vmap": ["vmap", "vmap+forms"], "stack": ["stack"],
            "loop": []}[batching]


def call_batched(problem: Problem, rows: torch.Tensor, strategy: str, *, in_dim: int = 0,
                 mode: SharedOperandMatmul | None = None, verify: bool = False) -> torch.Tensor:
    """``func`` at every row of ``rows`` in one call.

    Args:
        problem: the prepared problem (its base point evaluated).
        rows: the points, in the parameter's dtype, batched along ``in_dim``: ``(P, N)`` (or, for ``vmap``, any
            layout whose slices along ``in_dim`` view as the parameter's shape). ``"stack"`` takes ``in_dim=0`` only.
        strategy: ``"vmap"`` (``torch.func.vmap`` with the same random draws for every row), ``"vmap+forms"``
            (the same, with :func:`~.forms.batchable_forms`; the forms that ran are added to
            ``problem.forms_used``) or ``"stack"`` (``func`` given the parameter with a leading batch dimension).
        mode: the :class:`SharedOperandMatmul` to run ``vmap`` under (a fresh one by default); its ``copied`` counts
            what the folds copied.
        verify: for ``"stack"``, compare three rows with single calls (:func:`verify_stacked`).

    Returns:
        ``(P,)`` losses in ``func``'s dtype, or ``(P, size)`` float64 outputs for a tensor-valued ``func``.

    Raises:
        RuntimeError: vmap has no batching rule for an op of ``func`` (it would loop internally: not batched).
        ValueError: the batched output has the wrong shape, or a stacked call differs from single calls.
        Whatever ``func`` raises. The drivers tell a failure to run batched (:data:`gradfd.errors.CANNOT_RUN_THAT_WAY`)
        from ``func``'s own exceptions.
    """
    count = rows.shape[in_dim]
    mode = mode if mode is not None else SharedOperandMatmul()
    problem.rng.reset()
    with torch.no_grad():
        if strategy in ("vmap", "vmap+forms"):
            def single(row: torch.Tensor) -> torch.Tensor:
                return problem.func(*problem.with_param(row.view(problem.shape)))

            if strategy == "vmap+forms" and problem.rng.consumed:
                raise RuntimeError("func draws random numbers, which another formulation of an op would draw "
                                   "differently (dropout masks)")
            forms = batchable_forms() if strategy == "vmap+forms" else contextlib.nullcontext()
            with forms as used, mode, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = torch.func.vmap(single, in_dims=in_dim, randomness="same")(rows)
            if used is not None:
                problem.forms_used |= used.used
            slow = [w for w in caught if "batching rule" in str(w.message)]
            if slow:  # vmap ran a per-sample loop internally (an op without a batching rule): not batched
                raise RuntimeError(f"vmap has no batching rule for an op of func ({first_line(slow[0].message)})")
            for w in caught:  # func's own warnings, issued as if vmap had not caught them
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            return problem.batched_values(out, count, "vmap(func)")
        out = problem.stacked_func(count)(*problem.with_param(rows.reshape(count, *problem.shape)))
        out = problem.batched_values(out, count, f"func given params[{problem.param_idx}] with a leading batch "
                                                 "dimension")
        if verify:
            verify_stacked(problem, rows, out)
        return out


def verify_stacked(problem: Problem, rows: torch.Tensor, out: torch.Tensor) -> None:
    """Compare the first, middle and last of a stacked call's ``out`` with single calls of ``func`` at ``rows``
    (``(P, N)``); ValueError when one differs by more than ``sqrt(eps)`` relative."""
    tol = math.sqrt(stencils.eps(problem.dtype))
    for r in sorted({0, rows.shape[0] // 2, rows.shape[0] - 1}):
        problem.rng.reset()
        single = problem.output_values(problem.func(*problem.with_param(rows[r].reshape(problem.shape))))
        a, b = out[r].to(torch.float64), single.to(torch.float64)
        if not bool(((a - b).abs() <= tol * torch.maximum(a.abs(), b.abs()).clamp(min=1e-30)).all()):
            raise ValueError(
                f"row {r} of the stacked call differs from a single call at the same point (by up to "
                f"{float((a - b).abs().max()):.3g}): func does not treat the leading dimension as independent rows"
            )
