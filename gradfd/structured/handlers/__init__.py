"""How a perturbation propagates through one aten op: :func:`propagate` routes a node whose inputs depend on the
checked parameter to its handler in :data:`HANDLERS` (one table for every op the engine understands), or to the
generic elementwise rule.

Handlers are grouped by kind: :mod:`.linalg` (products), :mod:`.shape` (views, reshapes, slicing, conversions),
:mod:`.reductions` (sums, means, softmax), :mod:`.losses`, :mod:`.layers` (convolution, normalisation, pooling,
embedding), :mod:`.attention` and :mod:`.pointwise` (elementwise ops, the fused lineage, ops on float64 changes). A
handler is ``handler(an, node, base, *args, **kwargs) -> value``: ``an`` is the running
:class:`gradfd.structured.analysis.Analysis` (handlers read ``an.env``, the base value of every node; ``an.s`` and
``an.c``, the chunk's stencil nodes and coordinates; memoise per-analysis constants with ``an.cached(key, make)``;
and record ``an.fused`` / ``an.densified``), ``node`` the graph node, ``base`` its base value, and the op's
arguments with :class:`~gradfd.structured.values.Perturbed` in place of perturbed values. The rule every handler
keeps: a region's new values come from the op's own forward on them (or from an identity exact for the op), never
from a derivative.

Handlers never import :mod:`gradfd.structured.analysis`: it imports them.
"""

from __future__ import annotations

import operator

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ..unsupported import StructuredUnsupported, op_name
from ..values import Unavailable, absolute
from .attention import ATTENTION
from .layers import LAYERS
from .linalg import handle_addmm, handle_bmm, handle_mv, mm
from .losses import LOSSES, handle_loss, handle_nll
from .pointwise import RELATIVE_LINEAR, is_pointwise, pointwise, relative_linear
from .reductions import REDUCTIONS, handle_reduction, handle_softmax
from .shape import (SHAPE_ONLY, VIEW_IDENTITY, handle_expand, handle_identity, handle_permute, handle_select,
                    handle_slice, handle_squeeze, handle_t, handle_to_copy, handle_transpose, handle_unbind,
                    handle_unsqueeze, handle_view)

__all__ = ["HANDLERS", "propagate"]

aten = torch.ops.aten

HANDLERS: dict = {
    aten.mm.default: mm,
    aten.addmm.default: handle_addmm,
    aten.mv.default: handle_mv,
    aten.bmm.default: handle_bmm,
    aten.t.default: handle_t,
    aten.transpose.int: handle_transpose,
    aten.permute.default: handle_permute,
    aten.unsqueeze.default: handle_unsqueeze,
    aten.squeeze.dim: handle_squeeze,
    aten.squeeze.dims: handle_squeeze,
    aten.squeeze.default: handle_squeeze,
    aten.expand.default: handle_expand,
    aten.view.default: handle_view,
    aten._unsafe_view.default: handle_view,
    aten.reshape.default: handle_view,
    aten.slice.Tensor: handle_slice,
    aten.select.int: handle_select,
    aten.unbind.int: handle_unbind,
    aten._to_copy.default: handle_to_copy,
    aten._log_softmax.default: handle_softmax,
    aten._softmax.default: handle_softmax,
    aten.nll_loss_forward.default: handle_nll,
    **{op: handle_identity for op in VIEW_IDENTITY},
    **{op: handle_reduction for op in REDUCTIONS},
    **{op: handle_loss for op in LOSSES},
    **LAYERS,
    **ATTENTION,
}


def propagate(an, node: torch.fx.Node, args: tuple, kwargs: dict):
    """The value of ``node`` under the chunk's perturbations, given its arguments (at least one of them
    :class:`~gradfd.structured.values.Perturbed`).

    Raises:
        StructuredUnsupported: naming the op, when no rule covers it.
    """
    op = node.target
    name = op_name(op)
    if op is operator.getitem:  # (an unavailable op's outputs are all unavailable)
        return args[0] if isinstance(args[0], Unavailable) else args[0][args[1]]
    unavailable = [v for v in tree_flatten((args, kwargs))[0] if isinstance(v, Unavailable)]
    if unavailable:  # (what it computes stays unavailable: refused if it reaches the loss)
        return unavailable[0]
    if not isinstance(op, torch._ops.OpOverload):
        raise StructuredUnsupported(name, "a Python-level call on a value that depends on the checked parameter")
    base = an.env[node]
    if op in SHAPE_ONLY:
        return base
    if op in RELATIVE_LINEAR:
        linear = relative_linear(an, node, op, args, kwargs)
        if linear is not None:
            return linear
    args, kwargs = tree_map(absolute, (args, kwargs))
    handler = HANDLERS.get(op)
    if handler is not None:
        return handler(an, node, base, *args, **kwargs)
    if is_pointwise(op):
        return pointwise(an, node, op, base, args, kwargs)
    raise StructuredUnsupported(
        name, f"applied (node '{node.name}') to a value that depends on params[{an.problem.param_idx}], and the "
              "structured engine does not know how this op propagates a perturbation")
