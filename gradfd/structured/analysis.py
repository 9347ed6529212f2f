"""The structured engine's interpreter: :class:`Analysis` traces ``func`` once, evaluates the base value of every
node, and :meth:`Analysis.run` interprets the graph on a chunk of perturbations, handing each node whose inputs
depend on the checked parameter to :func:`gradfd.structured.handlers.propagate`.

How each op acts on a perturbation lives in :mod:`gradfd.structured.handlers`; chunking the coordinates and filling
the engine's ``Evaluation`` live in :mod:`gradfd.structured.evaluate`.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten

from .handlers import propagate
from .handlers.attention import draws_random_numbers
from .tracer import functional_variant, trace
from .unsupported import StructuredUnsupported, op_name
from .values import Outer, Perturbed, Unavailable, unravel_batch

__all__ = ["Analysis"]

# The traced graph must reproduce func's base loss to REPRODUCE_EPS machine epsilons of the parameter's dtype,
# relative to the loss (at least TINY_LOSS, so a zero loss still has a tolerance): the graph runs func's own aten ops,
# so a larger difference means the graph is not func.
REPRODUCE_EPS = 16
TINY_LOSS = 1e-300


def _held(v) -> list[torch.Tensor]:
    """The per-perturbation tensors a value holds: its slab, or the factors of a lazy :class:`Outer`."""
    if not isinstance(v, Perturbed):
        return []
    if v.slab_ is not None:
        return [v.slab_]
    return [v.lineage.rows, v.lineage.cols] if isinstance(v.lineage, Outer) else []


class Analysis:
    """``func`` traced once, with the base value of every node; :meth:`run` evaluates a chunk of perturbations.

    Args:
        problem: the engine's :class:`gradfd.engine.Problem` (private copies of the arguments, base loss evaluated).

    Raises:
        StructuredUnsupported: the trace failed, uses random numbers, or does not reproduce ``func``'s loss.
    """

    def __init__(self, problem) -> None:
        if problem.rng.consumed:
            raise StructuredUnsupported("random numbers", "func draws random numbers; the generic engine replays the "
                                        "same draws at every point")
        self.problem = problem
        t0 = time.perf_counter()
        self.gm = trace(problem.plain_func, problem.args)  # func as written (this engine reduces in float64 itself)
        problem.rng.reset()
        self.trace_seconds = time.perf_counter() - t0
        self.nodes = list(self.gm.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != len(problem.args):
            raise StructuredUnsupported("tracing", f"the trace has {len(placeholders)} inputs for "
                                        f"{len(problem.args)} params")
        self.param_node = placeholders[problem.param_idx]
        self._make_functional()
        self.env: dict = {}  # node -> its base value
        self._evaluate_base(dict(zip(placeholders, problem.args)))
        problem.rng.reset()
        self.last_use = {}  # node -> index of the last node that reads it
        for i, node in enumerate(self.nodes):
            for inp in node.all_input_nodes:
                self.last_use[inp] = i
        self._check_reproduces()
        self.cache: dict = {}
        self.fused: dict[str, set[str]] = {}  # fused kernel -> the nodes it evaluated
        self.densified: set[str] = set()
        self.bytes = 0

    def _make_functional(self) -> None:
        """Refuse ops that draw random numbers; rewrite the in-place ops left in the graph out of place."""
        for node in self.nodes:
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                if torch.Tag.nondeterministic_seeded in node.target.tags and draws_random_numbers(node):
                    raise StructuredUnsupported(op_name(node.target), "func draws random numbers")
                if node.target._schema.is_mutable:
                    node.target = functional_variant(node)

    def _evaluate_base(self, inputs: dict) -> None:
        """Fill :attr:`env` with the base value of every node, and :attr:`output` with the graph's output."""
        with torch.no_grad():
            for node in self.nodes:
                if node.op == "placeholder":
                    self.env[node] = inputs[node]
                elif node.op == "get_attr":
                    self.env[node] = functools.reduce(getattr, node.target.split("."), self.gm)
                elif node.op == "call_function":
                    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), self.env.__getitem__)
                    self.env[node] = node.target(*args, **kwargs)
                elif node.op == "output":
                    self.output = torch.fx.node.map_arg(node.args[0], self.env.__getitem__)
                else:
                    raise StructuredUnsupported(node.op, "unexpected graph node")

    def _check_reproduces(self) -> None:
        """Refuse a graph whose output is not one loss equal to func's (see :data:`REPRODUCE_EPS`)."""
        problem = self.problem
        out = self.output
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise StructuredUnsupported("output", f"the trace returned {type(out).__name__}, not one loss")
        want, got = float(problem.plain_base if problem.plain_base is not None else problem.base_loss), float(out)
        tol = REPRODUCE_EPS * torch.finfo(problem.dtype).eps * max(abs(want), TINY_LOSS)
        if not (abs(want - got) <= tol or (math.isnan(want) and math.isnan(got))):
            raise StructuredUnsupported("tracing", f"the traced graph gives {got!r} where func gives {want!r}")

    def run(self, coords: torch.Tensor, moved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses at the stencil nodes of ``coords``.

        Args:
            coords: ``(C,)`` int64 flat indices into the parameter.
            moved: ``(S, C)`` node values in the parameter's dtype (``engine.node_values``).

        Returns:
            ``(S*C,)`` float64 changes of the loss from its base (node-major: ``s*C + c``), and that base (float64
            0-d): the loss at a node is their sum.
        """
        problem = self.problem
        s, c = moved.shape
        self.s, self.c = s, c
        self.bytes = 0
        shape = problem.shape
        flat = coords.repeat(s)
        pos = unravel_batch(flat, shape)
        param = Perturbed(self.env[self.param_node], tuple(range(len(shape))), pos, moved.reshape(-1), scalar=True)
        values: dict = {}
        with torch.no_grad():
            for i, node in enumerate(self.nodes):
                if node.op == "placeholder":
                    values[node] = param if node is self.param_node else self.env[node]
                elif node.op == "get_attr":
                    values[node] = self.env[node]
                elif node.op == "call_function":
                    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
                    if not any(isinstance(v, (Perturbed, Unavailable)) for v in tree_flatten((args, kwargs))[0]):
                        values[node] = self.env[node]
                    else:
                        lazy = [v for v in tree_flatten((args, kwargs))[0]
                                if isinstance(v, Perturbed) and v.slab_ is None]
                        values[node] = propagate(self, node, args, kwargs)
                        self._count(values[node], (args, kwargs), lazy)
                elif node.op == "output":
                    out = torch.fx.node.map_arg(node.args[0], values.__getitem__)
                    return self._losses(out)
                for inp in node.all_input_nodes:
                    if self.last_use.get(inp) == i and inp is not self.param_node:
                        values.pop(inp, None)
        raise StructuredUnsupported("output", "the graph has no output")

    def _count(self, out, inputs, lazy: list) -> None:
        """Add to :attr:`bytes` the bytes of the new slabs among ``out``'s perturbed values, and of the slabs the
        handler wrote out for the ``lazy`` inputs (an outer product's with its float64 intermediate).

        Rule: a slab (or a lazy outer product's factors) is new unless it shares the storage of a perturbed input of
        the same node (a view) or of another output. Only live values are compared, so the count does not depend on
        whether the allocator reuses a freed address (tests/test_structured.py::test_the_slab_count_is_repeatable)."""
        seen = set()
        for v in lazy:
            if v.slab_ is not None and v.slab_.untyped_storage().data_ptr() not in seen:
                seen.add(v.slab_.untyped_storage().data_ptr())
                self.bytes += v.slab_.untyped_storage().nbytes()
                if isinstance(v.lineage, Outer):
                    self.bytes += v.slab_.numel() * 8  # (float64)
        seen |= {t.untyped_storage().data_ptr() for v in tree_flatten(inputs)[0] for t in _held(v)}
        for v in tree_flatten(out)[0]:
            for t in _held(v):
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    self.bytes += storage.nbytes()

    def _losses(self, out) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,)`` float64 changes of the loss from the base, and the float64 base."""
        b = self.s * self.c
        if isinstance(out, Unavailable):
            raise StructuredUnsupported(out.op, f"the loss depends on {out.what}, which the structured engine does "
                                        "not compute under a perturbation")
        if isinstance(out, Perturbed):
            if out.base.numel() != 1:
                raise StructuredUnsupported("output", f"the loss has shape {tuple(out.base.shape)}")
            base = out.base.reshape(()).to(torch.float64)
            if out.relative:
                return out.slab.reshape(b), base
            return out.slab.reshape(b).to(torch.float64) - base, base
        base = out.reshape(()).to(torch.float64)
        return torch.zeros(b, dtype=torch.float64, device=base.device), base

    def cached(self, key, make: Callable[[], Any]):
        """``make()``, computed once per analysis under ``key`` (handlers' constants: bases, columns, targets)."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]
