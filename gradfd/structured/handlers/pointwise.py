"""Handlers of elementwise ops: the region's new values by the op's own forward (:func:`pointwise`); the lazy
lineage the fused kernel consumes (:func:`start_lineage`, :func:`extend_lineage`); ops linear in the changes that
float64 reductions return (:func:`relative_linear`); and the output's base when an input's base was promoted
(:func:`output_base`).

``an`` is the running :class:`gradfd.structured.analysis.Analysis` (see :mod:`gradfd.structured.handlers`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ..kernels import ACTIVATION_OPS
from ..values import Lineage, Outer, Perturbed, broadcast_to, columns, common_region, gather, ravel, widen

__all__ = ["RELATIVE_LINEAR", "is_pointwise", "output_base", "pointwise", "extend_lineage", "start_lineage",
           "add_row_bias", "relative_linear"]

aten = torch.ops.aten

# ops whose change is linear in the changes of their perturbed operands (neg, add, sub; mul and div by a constant)
RELATIVE_LINEAR = {aten.neg.default, aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar,
                   aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}


def is_pointwise(op) -> bool:
    """Whether ``op`` is an aten op tagged pointwise, deterministic, out of place, with one output."""
    return (isinstance(op, torch._ops.OpOverload) and torch.Tag.pointwise in op.tags
            and torch.Tag.nondeterministic_seeded not in op.tags and not op._schema.is_mutable
            and len(op._schema.returns) == 1)


def output_base(an, node, op, base, args, kwargs) -> tuple[torch.Tensor, bool]:
    """The output's base: the traced one, or re-evaluated when an input's base was promoted."""
    leaves = tree_flatten((args, kwargs))[0]
    if not any(isinstance(v, Perturbed) and v.promoted for v in leaves):
        return base, False

    def make():
        a, k = tree_map(lambda v: v.base if isinstance(v, Perturbed) else v, (args, kwargs))
        return op(*a, **k)

    return an.cached((node.name, "base"), make), True


def pointwise(an, node, op, base, args, kwargs) -> Perturbed:
    """An elementwise op: the lineage extended when the fused kernel reproduces the op, else the op's own forward on
    the region the operands share (each operand widened to it, constants gathered over it)."""
    base, promoted = output_base(an, node, op, base, args, kwargs)
    if not promoted:
        fused = extend_lineage(an, node, op, base, args, kwargs)
        if fused is not None:
            return fused
    shape = tuple(base.shape)
    perturbed = [v for v in tree_flatten((args, kwargs))[0] if isinstance(v, Perturbed)]
    perturbed = [broadcast_to(p, shape) if p.base.dim() <= len(shape) else p for p in perturbed]
    axes, pos = common_region(perturbed)
    it = iter(perturbed)
    scalar = all(p.scalar for p in perturbed)

    def leaf(v):
        if isinstance(v, Perturbed):
            p = widen(next(it), axes)
            return p.slab
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            nonlocal scalar
            scalar = False
            return gather(v.expand(shape), axes, pos)
        return v

    a, k = tree_map(leaf, (args, kwargs))
    slab = op(*a, **k)
    if slab.dtype != base.dtype:
        slab = slab.to(base.dtype)
    rest_shape = [shape[d] for d in range(len(shape)) if d not in axes]
    b = pos.shape[0]
    if tuple(slab.shape) != (b, *rest_shape):
        slab = slab.expand(b, *rest_shape)
    return Perturbed(base, axes, pos, slab, scalar=scalar, promoted=promoted)


def extend_lineage(an, node, op, base, args, kwargs) -> Perturbed | None:
    """The fused path: keep the perturbed values lazy while the op is one the fused kernel reproduces."""
    leaves = tree_flatten((args, kwargs))[0]
    perturbed = list({id(v): v for v in leaves if isinstance(v, Perturbed)}.values())
    if len(perturbed) != 1 or base.dtype != perturbed[0].base.dtype:
        return None
    p = perturbed[0]
    alpha = kwargs.get("alpha", 1)
    if isinstance(p.lineage, Outer):
        return add_row_bias(node, op, base, p, args, alpha)
    if p.lineage is None:
        return start_lineage(an, node, op, base, p, args, alpha)
    if tuple(p.base.shape) != tuple(base.shape):
        return None
    L = p.lineage
    if op in (aten.add.Tensor, aten.sub.Tensor) and alpha == 1 and len(args) == 2:
        other = args[1] if args[0] is p else args[0]
        if isinstance(other, torch.Tensor) and other.dtype != base.dtype:
            return None
        if op is aten.sub.Tensor and args[0] is not p:
            return None
        if L.stage == "linear":  # a constant shift before any activation: fold it into z
            z = an.cached((node.name, "z"), lambda: columns(base, p.axes))
            return replace(p, base=base, lineage=replace(L, z=z), slab_=None)
        if L.stage == "activated":  # a target after the activation
            def make_target():
                t = other if isinstance(other, torch.Tensor) else torch.tensor(other, dtype=base.dtype,
                                                                                device=base.device)
                t = columns(t.to(base.dtype).expand(base.shape), p.axes)
                return t if op is aten.sub.Tensor else -t

            target = an.cached((node.name, "target"), make_target)
            return replace(p, base=base, lineage=replace(L, target=target), slab_=None)
        return None
    if op in ACTIVATION_OPS and L.stage == "linear":
        return replace(p, base=base, lineage=replace(L, activation=ACTIVATION_OPS[op]), slab_=None)
    squares = (op is aten.pow.Tensor_Scalar and args[1] == 2) or (op is aten.mul.Tensor and args[0] is args[1])
    if squares and L.stage != "squared":
        return replace(p, base=base, lineage=replace(L, squared=True), slab_=None)
    return None


def add_row_bias(node, op, base, p: Perturbed, args, alpha) -> Perturbed | None:
    """``product + bias`` with ``bias`` a constant row (``(K,)`` or ``(1, K)``, the product's dtype) added once to a
    bare :class:`~gradfd.structured.values.Outer`: kept lazy, for ``gradfd::outer_update_nll`` to add."""
    L = p.lineage
    if op is not aten.add.Tensor or alpha != 1 or len(args) != 2 or L.bias is not None or L.log_softmax or \
            p.slab_ is not None or tuple(base.shape) != tuple(L.base.shape):
        return None
    bias = args[1] if args[0] is p else args[0]
    if isinstance(bias, Perturbed) or not isinstance(bias, torch.Tensor) or bias.dtype != base.dtype or \
            tuple(bias.shape) not in ((base.shape[1],), (1, base.shape[1])):
        return None
    return Perturbed(base, (), p.pos, None, replace(L, bias=bias.reshape(-1).contiguous()))


def start_lineage(an, node, op, base, p: Perturbed, args, alpha) -> Perturbed | None:
    """``parameter * feature`` or ``feature + parameter`` (the parameter broadcast over a region): the region moves
    by ``delta * feature`` (or ``delta``), mul and add being linear in each operand."""
    if op not in (aten.mul.Tensor, aten.add.Tensor) or not p.scalar or alpha != 1 or len(args) != 2:
        return None
    other = args[1] if args[0] is p else args[0]
    if not isinstance(other, torch.Tensor) or other.dtype != base.dtype or base.dim() == 0:
        return None
    if p.base.dim() > base.dim():
        return None
    q = broadcast_to(p, base.shape)
    first = (slice(None),) + (0,) * (p.slab.dim() - 1)
    new = p.slab[first].double()
    old = gather(p.base, p.axes, p.pos)[first].double()
    col = ravel(q.pos, [base.shape[a] for a in q.axes])
    z = an.cached((node.name, "z"), lambda: columns(base, q.axes))
    if op is aten.mul.Tensor:  # the region moves by delta * feature
        features = an.cached((node.name, "features"), lambda: columns(other.expand(base.shape), q.axes))
        fi = col
    else:  # the region moves by delta
        features = an.cached((node.name, "features"), lambda: torch.ones(
            z.shape[0], 1, dtype=base.dtype, device=base.device))
        fi = torch.zeros_like(col)
    return Perturbed(base, q.axes, q.pos, None, Lineage(z, features, col, fi, (new - old).expand_as(col)))


def relative_linear(an, node, op, args, kwargs) -> Perturbed | None:
    """Ops linear in their perturbed operands (add, sub, neg, multiplication or division by a constant) applied to
    relative values (the changes that float64 reductions return): the change of the output is the op's linear
    action on the changes. None when the op is not linear in the way it is used here."""
    leaves = tree_flatten((args, kwargs))[0]
    perturbed = [v for v in leaves if isinstance(v, Perturbed)]
    if not all(v.relative for v in perturbed):
        return None
    base = output_base(an, node, op, an.env[node], args, kwargs)[0]
    nd = base.dim()
    b = perturbed[0].batch

    def change(v):
        if isinstance(v, Perturbed):
            return v.slab.reshape(b, *([1] * (nd - v.base.dim())), *v.base.shape)
        return None

    if op is aten.neg.default:
        rel = -change(args[0])
    elif op in (aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar):
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        a, c = change(args[0]), change(args[1]) if len(args) > 1 else None
        sign = -1 if op in (aten.sub.Tensor, aten.sub.Scalar) else 1
        if a is None:
            rel = sign * alpha * c
        elif c is None:
            rel = a
        else:
            rel = a + sign * alpha * c
    elif op in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
        if kwargs or len(perturbed) != 1 or (op in (aten.div.Tensor, aten.div.Scalar) and args[0] is not
                                              perturbed[0]):
            return None
        factor = args[1] if args[0] is perturbed[0] else args[0]
        if isinstance(factor, torch.Tensor):
            factor = factor.to(torch.float64)
        rel = change(perturbed[0])
        rel = rel * factor if op in (aten.mul.Tensor, aten.mul.Scalar) else rel / factor
    else:
        return None
    rel = rel.to(torch.float64).expand(b, *base.shape)
    return Perturbed(base.to(torch.float64), (), perturbed[0].pos[:, :0], rel, promoted=True, relative=True)
