"""The driver for arbitrary points: ``func`` at a ``(P, N)`` batch of points of the checked parameter, as the Jacobian
and directional checks need (each point may move many entries at once). Chunks of :data:`POINTS_PER_CALL` points
go through the one batched call (:func:`~.batched.call_batched`); when ``func`` cannot run batched, the one loop
(:func:`~.loop.loop_points`) takes over.

Points along coordinates (the numerical gradient) have their own driver, :mod:`.coordinates`.
"""

from __future__ import annotations

import torch

from .. import distributed
from ..errors import CANNOT_RUN_THAT_WAY, OOM_ERRORS, first_line, note, warn_fallback
from .batched import call_batched, strategies
from .loop import loop_points
from .problem import Problem

__all__ = ["evaluate_points", "POINTS_PER_CALL"]

POINTS_PER_CALL = 256  # points per batched call


def evaluate_points(problem: Problem, points: torch.Tensor, batching: str = "auto", *,
                    warn: bool = True) -> tuple[torch.Tensor, str]:
    """``func`` at arbitrary points of the checked parameter: ``points`` is ``(P, N)`` in the parameter's dtype.

    Batched in chunks of at most 256 points: ``batching="auto"`` tries ``torch.func.vmap``, then stacking the
    points along a leading dimension (checked against single calls at three points of the first chunk), then one
    call per point -- with a :class:`FallbackWarning` naming why, unless ``warn=False``. ``"vmap"`` and
    ``"stack"`` try only that strategy before the loop; ``"loop"`` goes straight to it.

    Returns:
        ``(values, strategy)``: ``(P,)`` float64 losses, or ``(P, size)`` for a tensor-valued ``func``, and the
        strategy used (``"vmap"``, ``"vmap+forms"``, ``"stack"`` or ``"loop"``).

    Raises:
        Whatever ``func`` raises that is no failure to run batched, or any exception once batching has worked
        (unless ``problem.node_errors`` records it), with a note naming the points.
    """
    count = points.shape[0]
    width = (problem.spec.size,) if problem.vector else ()
    out = torch.empty(count, *width, dtype=torch.float64, device=points.device)
    failures = []
    for strategy in strategies(batching) if count > 1 else ():
        start = 0
        try:
            for start in range(0, count, POINTS_PER_CALL):
                if start > 0 and distributed.sharing() is not None:  # the strategy ran: deal the rest out
                    blocks = distributed.blocks_of(start, count, POINTS_PER_CALL)
                    distributed.share_rows(out, problem.node_errors, blocks,
                                           lambda a, b: call_batched(problem, points[a:b], strategy, verify=False))
                    break
                rows = points[start:start + POINTS_PER_CALL]
                out[start:start + rows.shape[0]] = call_batched(problem, rows, strategy, verify=start == 0)
            return out, strategy
        except CANNOT_RUN_THAT_WAY + OOM_ERRORS + (MemoryError,) as exc:
            start = _failed_chunk(exc, start)
            if start > 0 and not isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
                if problem.node_errors is not None:  # the rest one point at a time: those that raise are recorded
                    out[start:] = loop_points(problem, points[start:], start, count)
                    return out, strategy
                # batching worked on earlier chunks: a genuine error of func
                note(exc, _where(problem, start, count))
                raise
            failures.append(f"{strategy}: {type(exc).__name__}: {first_line(exc)}")
        except Exception as exc:
            # not a failure to run batched: func's own, propagated at once
            # (tests/test_engine.py::test_an_exception_of_another_kind_is_not_taken_for_a_batching_failure)
            note(exc, _where(problem, _failed_chunk(exc, start), count))
            raise
    if failures and warn:
        warn_fallback(f"gradfd: func cannot be evaluated batched ({'; '.join(failures)}); falling back to one call per "
                      "point", stacklevel=3)
    out[:] = loop_points(problem, points, 0, count)
    return out, "loop"


def _failed_chunk(exc: BaseException, start: int) -> int:
    """The first point of the chunk that raised ``exc``: a shared chunk's in a distributed check (every rank raises
    it, :meth:`gradfd.distributed.Session.share`), else ``start``."""
    return getattr(exc, "__dict__", {}).pop("_gradfd_block_start", start)


def _where(problem: Problem, start: int, count: int) -> str:
    return (f"gradfd: raised while evaluating func at perturbed points {start} .. "
            f"{min(start + POINTS_PER_CALL, count) - 1} of {count} of params[{problem.param_idx}]")
