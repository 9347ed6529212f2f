"""One loop: ``func`` called once per node, in order, on the problem's private arguments. The coordinate path and the
point path differ only in how a node reaches ``func`` (:class:`CoordinateNodes`: the entry written into the private
copy in place; :class:`PointNodes`: a row of a points tensor passed as the parameter) and in where the values go.

The loop is pure PyTorch: it is the fallback when ``func`` cannot be batched, the "auto" strategy's choice for small
problems, and what records the nodes where ``func`` raises (:class:`gradfd.errors.NodeErrors`). Batched calls live in
:mod:`.batched`.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from ..errors import NodeErrors, note
from ..report import entry_name
from ..validation import validate_scalar_output
from .evaluation import Evaluation
from .problem import Problem

__all__ = ["Nodes", "CoordinateNodes", "PointNodes", "run_loop", "loop_coordinates", "loop_points", "delivery_groups"]

_NUMPY_DTYPES = (torch.float64, torch.float32, torch.float16)
LOOP_BLOCK_VALUES = 1 << 22  # values (nodes x outputs) the loop collects before handing them over


class Nodes(Protocol):
    """The nodes one loop visits: ``count`` of them, node ``k`` presented to ``func`` by ``enter(k)`` (which returns
    ``func``'s arguments) and taken away by ``leave(k)``."""

    count: int

    def enter(self, k: int) -> list: ...

    def leave(self, k: int) -> None: ...

    def where(self, k: int) -> str: ...

    def unperturbed(self, k: int) -> None: ...


def python_values(problem: Problem) -> bool:
    """The loop reads a loss as a Python float and writes the private copy through numpy: on the CPU, in a dtype numpy
    has (about 20x cheaper per element than tensor indexing)."""
    return problem.flat.device.type == "cpu" and problem.flat.dtype in _NUMPY_DTYPES


class CoordinateNodes:
    """The nodes of columns ``start:stop`` of ``result``: node ``k`` is coordinate ``k // S`` at its stencil node
    ``k % S``, written into the private copy in place, so ``func`` always gets the same tensors.

    ``moved`` is the ``(S, M)`` tensor of node values from :func:`~.evaluation.node_values`, ``x`` the ``(M,)``
    unperturbed values.
    """

    def __init__(self, problem: Problem, result: Evaluation, start: int, stop: int, moved: torch.Tensor,
                 x: torch.Tensor):
        self.problem = problem
        self.offsets = result.stencil.offsets
        self.per_coordinate = len(self.offsets)
        self.index = result.coords[start:stop].tolist()
        self.values = moved[:, start:stop].t().tolist()  # (M, S) python floats, exact in the dtype
        self.original = x[start:stop].tolist()
        self.target = problem.flat.numpy() if python_values(problem) else problem.flat
        self.args = problem.with_param(problem.flat.view(problem.shape))
        self.count = len(self.index) * self.per_coordinate

    def enter(self, k: int) -> list:
        j, s = divmod(k, self.per_coordinate)
        self.target[self.index[j]] = self.values[j][s]
        return self.args

    def leave(self, k: int) -> None:
        j = k // self.per_coordinate
        self.target[self.index[j]] = self.original[j]

    def where(self, k: int) -> str:
        j, s = divmod(k, self.per_coordinate)
        problem = self.problem
        return f"{entry_name(problem.param_idx, problem.shape, self.index[j])} {self.offsets[s]:+g}*h"

    def unperturbed(self, k: int) -> None:
        """``func`` at the unperturbed point (the next node perturbs its entry again)."""
        self.leave(k)
        self.problem.rng.reset()
        self.problem.func(*self.args)


class PointNodes:
    """The ``(P, N)`` ``points``, points ``first ..`` of ``total``: node ``k`` is ``points[k]`` passed as the
    parameter."""

    def __init__(self, problem: Problem, points: torch.Tensor, first: int, total: int):
        self.problem, self.points, self.first, self.total = problem, points, first, total
        self.count = points.shape[0]

    def enter(self, k: int) -> list:
        return self.problem.with_param(self.points[k].view(self.problem.shape))

    def leave(self, k: int) -> None:
        pass

    def where(self, k: int) -> str:
        return f"perturbed point {self.first + k} of {self.total} of params[{self.problem.param_idx}]"

    def unperturbed(self, k: int) -> None:
        self.problem.rng.reset()
        self.problem.func(*self.problem.args)


def run_loop(problem: Problem, nodes: Nodes, deliver: Callable[[int, int, torch.Tensor], None], group: int = 1) -> None:
    """Call ``func`` at every node, one call each, and hand the values over in blocks.

    Args:
        problem: the prepared problem; with ``problem.node_errors``, a node where ``func`` raises a domain error gets
            NaN values (see :class:`NodeErrors`), else the exception propagates.
        nodes: what the nodes are (:class:`CoordinateNodes`, :class:`PointNodes`).
        deliver: ``deliver(first, stop, values)`` receives nodes ``first:stop`` as ``(stop - first,)`` float64 losses
            or ``(stop - first, size)`` float64 outputs, in node order. A loss's block is every node; a tensor-valued
            ``func``'s blocks are whole groups of ``group`` nodes, with at most ``LOOP_BLOCK_VALUES`` values.
        group: nodes that belong together (a coordinate's ``S`` stencil nodes; 1 for points).

    Raises:
        Whatever ``func`` raises (or its output's validation), with a note naming the node; the private copy is
        restored first.
    """
    func = problem.func
    as_floats = python_values(problem)
    # copy each value out at once: an output may be a view of the buffer perturbed in place
    record = problem.spec.flatten if problem.vector else (lambda out: _scalar_now(out, as_floats))
    errors = problem.node_errors
    nan = problem.nan_values(as_floats) if errors is not None else None
    reset = problem.rng.reset if problem.rng.consumed else None
    block = group * delivery_groups(problem, group) if problem.vector else max(1, nodes.count)
    k = 0
    try:
        for first in range(0, nodes.count, block):
            outs = []
            with torch.no_grad():
                for k in range(first, min(first + block, nodes.count)):
                    args = nodes.enter(k)
                    if reset is not None:
                        reset()
                    if errors is None:
                        outs.append(record(func(*args)))
                    else:
                        outs.append(_recorded(func, args, record, errors, nodes, k, nan))
                    nodes.leave(k)
            if problem.vector:
                values = torch.stack(outs)
            else:
                values = torch.tensor(outs, dtype=torch.float64) if as_floats else torch.stack(outs).to(torch.float64)
            deliver(first, first + len(outs), values)
    except BaseException as exc:
        nodes.leave(k)
        note(exc, f"gradfd: raised while evaluating func at {nodes.where(k)}")
        raise


def delivery_groups(problem: Problem, group: int) -> int:
    """Groups of ``group`` nodes per block a tensor-valued ``func``'s loop hands over (at most ``LOOP_BLOCK_VALUES``
    values, at least one group); a loss's loop hands all its nodes over at once."""
    return max(1, LOOP_BLOCK_VALUES // max(1, group * problem.spec.size))


def _recorded(func: Callable, args: list, record: Callable, errors: NodeErrors, nodes: Nodes, k: int, nan):
    """``record(func(*args))``, or ``nan`` when ``func`` raises what ``errors`` takes for a domain edge."""
    try:
        out = func(*args)
    except Exception as exc:  # (what func raised; its output is still validated)
        if not errors.take(exc, nodes.where(k), lambda: nodes.unperturbed(k)):
            raise
        return nan
    return record(out)


def _scalar_now(out, as_float: bool):
    """One loss value, copied out of ``out`` now (a Python float when ``as_float``); TypeError/ValueError naming
    ``func`` for anything but a one-element floating tensor."""
    if isinstance(out, torch.Tensor) and out.numel() == 1 and out.is_floating_point():
        return out.item() if as_float else out.detach().reshape(()).clone()
    validate_scalar_output(out)  # raises, saying what it got
    raise AssertionError("unreachable")


def loop_coordinates(problem: Problem, result: Evaluation, start: int, stop: int, moved: torch.Tensor,
                     x: torch.Tensor) -> None:
    """Fill columns ``start:stop`` of ``result`` (``(S, c)`` losses, or ``(S, c, size)`` outputs to its sink) by the
    loop over :class:`CoordinateNodes` (arguments as there)."""
    nodes = CoordinateNodes(problem, result, start, stop, moved, x)
    s = nodes.per_coordinate

    def deliver(first: int, last: int, values: torch.Tensor) -> None:
        count = (last - first) // s
        column = start + first // s
        if problem.vector:
            values = values.view(count, s, -1).permute(1, 0, 2)
        else:
            values = values.view(count, s).t()
        result.store(column, column + count, values)

    run_loop(problem, nodes, deliver, group=s)


def loop_points(problem: Problem, points: torch.Tensor, first: int, total: int) -> torch.Tensor:
    """``func`` at each of the ``(P, N)`` ``points`` (points ``first ..`` of ``total``), one call each: ``(P,)`` or
    ``(P, size)`` float64; a point where ``func`` raises is NaN when ``problem.node_errors`` records it."""
    out = torch.empty(points.shape[0], *((problem.spec.size,) if problem.vector else ()), dtype=torch.float64,
                      device=points.device)

    def deliver(a: int, b: int, values: torch.Tensor) -> None:
        out[a:b] = values

    run_loop(problem, PointNodes(problem, points, first, total), deliver)
    return out
