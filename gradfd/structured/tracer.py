"""Tracing for the structured engine: ``func`` recorded once to an aten-level ``torch.fx`` graph by
:class:`_GraphRecorder` (a light stand-in for ``make_fx``) under ``torch.func.functionalize``, and
:func:`functional_variant`, which rewrites an in-place node that functionalization left in the graph.

What the graph's nodes do to a perturbation lives in :mod:`gradfd.structured.handlers`; running the graph lives in
:mod:`gradfd.structured.analysis`.
"""

from __future__ import annotations

import operator
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import autograd_would_have_decomposed
from torch.utils._pytree import tree_flatten, tree_map

from ..dispatch import LightDispatchMode
from ..errors import CANNOT_RUN_THAT_WAY, note
from .unsupported import StructuredUnsupported, op_name

__all__ = ["trace", "functional_variant"]

aten = torch.ops.aten

_MESSAGE_CHARS = 300  # a tracing failure's message is quoted in StructuredUnsupported up to this many characters


class _GraphRecorder(LightDispatchMode):
    """Records the aten ops that run while it is active into a ``torch.fx`` graph of the shape ``make_fx`` builds in
    real mode: a placeholder per input, a ``get_attr`` per tensor the function closes over (or creates from Python
    data), a ``call_function`` node per ``OpOverload`` (``operator.getitem`` nodes for ops returning several tensors)
    and one output node. Unlike ``make_fx`` it never imports ``torch._inductor``, ``torch._dynamo`` or sympy (about
    3.5 s on a first call;
    tests/test_first_call.py::test_a_structured_first_call_imports_neither_dynamo_nor_inductor_nor_sympy).

    Tensors are matched to nodes by identity, through weak references: the recorder keeps no intermediate alive (a
    trace's peak memory is the function's own), and an identity reused after a tensor died never matches the dead
    tensor's node (tests/test_first_call.py::test_the_recorder_keeps_no_intermediate_alive). What ``make_fx`` does
    to an op that reaches it, the recorder does too: a ``CompositeImplicitAutograd`` op that autograd would have
    decomposed is decomposed (and its parts recorded), ``lift_fresh`` becomes ``lift_fresh_copy``, and reading the
    value of a tensor that depends on an input (``.item()``, ``if tensor:``) raises, since the graph would bake the
    value in (tests/test_first_call.py::test_reading_a_traced_value_is_refused_naming_the_op). (``make_fx`` also
    refuses to read values computed from constants alone; the recorder lets the graph hold those, which are the same
    at every point.) The graphs are those ``make_fx`` builds
    (tests/test_first_call.py::test_the_recorder_builds_make_fxs_graph and
    ::test_structured_gradients_are_bitwise_those_of_the_make_fx_trace).
    """

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.graph = torch.fx.Graph()
        self.constants: dict[str, torch.Tensor] = {}
        self._nodes: dict[int, tuple[weakref.ref, torch.fx.Node]] = {}  # id(tensor) -> (weak tensor, node)
        self._traced: set[torch.fx.Node] = set()  # nodes whose value depends on an input
        for k, t in enumerate(inputs):
            node = self.graph.placeholder(f"arg{k}_1")
            self._track(t, node, traced=True)

    def _track(self, t: torch.Tensor, node: torch.fx.Node, traced: bool) -> None:
        self._nodes[id(t)] = (weakref.ref(t), node)
        if traced:
            self._traced.add(node)

    def node_of(self, t: torch.Tensor) -> torch.fx.Node:
        """The node that produced ``t``, or a new ``get_attr`` constant for a tensor the trace did not produce."""
        entry = self._nodes.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        name = f"_tensor_constant{len(self.constants)}"
        self.constants[name] = t
        node = self.graph.get_attr(name)
        self._track(t, node, traced=False)
        return node

    def _arg(self, v):
        return self.node_of(v) if isinstance(v, torch.Tensor) else v

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = tree_flatten((args, kwargs))[0]
        if func not in (aten.size.default, aten.stride.default, aten.storage_offset.default) \
                and autograd_would_have_decomposed(func, flat):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if func is aten.is_nonzero.default:
            with self:
                return bool((args[0] != 0).item())
        node_args, node_kwargs = tree_map(self._arg, (args, kwargs))
        traced = any(isinstance(v, torch.fx.Node) and v in self._traced
                     for v in tree_flatten((node_args, node_kwargs))[0])
        if torch.Tag.data_dependent_output in func.tags:
            if traced:
                raise RuntimeError(f"func reads the value of a traced tensor with {func} (data-dependent control "
                                   "flow or .item()): the graph would bake that value in")
            return func(*args, **kwargs)  # a value of constants only: the same at every point
        if func is aten.lift_fresh.default:  # as make_fx: the lifted constant is copied, so it is never mutated
            func = aten.lift_fresh_copy.default
        node = self.graph.create_node("call_function", func, tuple(node_args), node_kwargs,
                                      name=self.graph._target_to_str(func.overloadpacket.__name__))
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self._track(out, node, traced)
        elif isinstance(out, (tuple, list)):
            for k, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    self._track(t, self.graph.call_function(operator.getitem, (node, k)), traced)
        return out

    def module(self, outputs) -> torch.fx.GraphModule:
        """The graph module, its output node made from ``outputs`` (a pytree of tensors and constants)."""
        self.graph.output(tree_map(self._arg, outputs))
        return torch.fx.GraphModule(self.constants, self.graph)


def _record(func: Callable, args: list[torch.Tensor]) -> torch.fx.GraphModule:
    """``func(*args)`` recorded by a :class:`_GraphRecorder`; exceptions propagate as raised."""
    recorder = _GraphRecorder(args)
    try:
        with recorder:
            out = func(*args)
        return recorder.module(out)
    finally:
        recorder._nodes.clear()  # a raised exception's traceback holds this frame: let it hold no map either


def trace(func: Callable, args: list[torch.Tensor]) -> torch.fx.GraphModule:
    """``func`` traced to an aten-level graph on ``args`` (functionalized where possible: in-place ops of ``func``
    become out-of-place ops), by :class:`_GraphRecorder` (a light stand-in for ``make_fx``).

    Raises:
        StructuredUnsupported: when tracing fails (data-dependent control flow, ``.item()``, ...).
    """
    try:
        with torch.no_grad():
            try:
                return _record(torch.func.functionalize(func, remove="mutations"), args)
            except CANNOT_RUN_THAT_WAY as exc:
                if "_local_scalar_dense" in str(exc):
                    raise
            # functionalization is unavailable for some calls (autograd.Function): trace as is; the in-place ops
            # left in the graph are rewritten out of place or refused by Analysis
            return _record(func, args)
    except CANNOT_RUN_THAT_WAY as exc:  # the trace is only a means: say why it failed and let the caller fall back
        text = str(exc).strip().splitlines()[0][:_MESSAGE_CHARS] if str(exc).strip() else type(exc).__name__
        op = "aten._local_scalar_dense (data-dependent control flow or .item())" if "_local_scalar_dense" in text \
            else "tracing"
        raise StructuredUnsupported(op, f"func could not be traced to an aten graph ({type(exc).__name__}: {text})") \
            from exc
    except Exception as exc:  # not a tracing failure (CANNOT_RUN_THAT_WAY): func's own, propagated with a note
        # (tests/test_engine.py::test_an_exception_of_another_kind_is_not_taken_for_a_batching_failure)
        note(exc, "gradfd: raised while tracing func for the structured engine (at the unperturbed params)")
        raise


def functional_variant(node: torch.fx.Node) -> torch._ops.OpOverload:
    """The out-of-place twin of an in-place node that functionalization left in the graph (decompositions such as
    cross-entropy's label smoothing mutate fresh intermediates in place). Allowed only when the mutated tensor is
    a fresh intermediate (not an input, a constant or a view) used by nothing else, so the rewrite cannot be seen.

    Raises:
        StructuredUnsupported: naming the op otherwise.
    """
    op = node.target
    name = op_name(op)
    schema = op._schema
    mutated = [k for k, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    packet = schema.name.split("::")[-1]
    functional = None
    if mutated == [0] and packet.endswith("_") and node.args and isinstance(node.args[0], torch.fx.Node):
        target = node.args[0]
        fresh = (target.op == "call_function" and isinstance(target.target, torch._ops.OpOverload)
                 and all(r.alias_info is None for r in target.target._schema.returns))
        if fresh and len(target.users) == 1:
            functional = getattr(getattr(aten, packet[:-1], None), op._overloadname, None)
    if functional is None or functional._schema.is_mutable:
        raise StructuredUnsupported(name, "an in-place op the structured engine cannot rewrite out of place")
    return functional
