"""Handlers of the losses: the elementwise ones (``mse_loss``, BCE with logits, BCE, smooth L1, Huber) and
``nll_loss_forward`` (cross-entropy after ``log_softmax``). Each is the op's own forward with reduction 'none' on the
region, then the float64 changed-terms sum of :mod:`.reductions`; ``mse_loss`` of a lineage goes to the fused kernel,
and ``nll_loss_forward`` of a lazy outer product's log-softmax to ``gradfd::outer_update_nll``.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
from torch.utils._pytree import tree_flatten

from ..unsupported import StructuredUnsupported, op_name
from ..kernels import outer_update_nll
from ..values import Lineage, Outer, Perturbed, columns, widen
from .pointwise import pointwise
from .reductions import full_sum, fused_sum

__all__ = ["LOSSES", "handle_loss", "handle_nll"]

aten = torch.ops.aten

# elementwise losses: op -> position of the reduction argument (none=0, mean=1, sum=2)
LOSSES = {aten.mse_loss.default: 2, aten.binary_cross_entropy_with_logits.default: 4,
          aten.binary_cross_entropy.default: 3, aten.smooth_l1_loss.default: 2, aten.huber_loss.default: 2}


def _broadcasts_to(small: tuple, shape: tuple) -> bool:
    """Whether ``small`` broadcasts to exactly ``shape`` (``torch.broadcast_shapes(small, shape) == shape``, without
    the sympy import that ``torch.broadcast_shapes`` costs on its first call)."""
    if len(small) > len(shape):
        return False
    return all(a in (1, b) for a, b in zip(small[::-1], shape[::-1]))


def handle_loss(an, node, base, p, target, *args, **kwargs):
    """Elementwise losses (mse, BCE-with-logits, BCE, smooth L1, Huber): the op's own forward with reduction 'none' on
    the region, then a float64 changed-terms sum (or mean)."""
    op = node.target
    name = op_name(op)
    if isinstance(target, Perturbed) or any(isinstance(v, Perturbed) for v in tree_flatten((args, kwargs))[0]):
        raise StructuredUnsupported(name, "the target (or a weight) depends on the checked parameter")
    where = LOSSES[op]
    all_args = [p, target, *args]
    names = [a.name for a in op._schema.arguments]
    for key, value in kwargs.items():
        idx = names.index(key)
        while len(all_args) <= idx:
            all_args.append(op._schema.arguments[len(all_args)].default_value)
        all_args[idx] = value
    while len(all_args) <= where:
        all_args.append(op._schema.arguments[len(all_args)].default_value)
    reduction = int(all_args[where])
    if p.promoted:
        raise StructuredUnsupported(name, "a loss of a float64-reduced value")
    shape = tuple(p.base.shape)
    if op is aten.mse_loss.default and isinstance(p.lineage, Lineage) and p.slab_ is None and \
            p.lineage.stage in ("linear", "activated") and reduction in (1, 2) and \
            _broadcasts_to(tuple(target.shape), shape) and target.dtype == p.base.dtype:
        tcols = an.cached((node.name, "target"), lambda: columns(target.expand(shape), p.axes))
        return fused_sum(an, node, replace(p, lineage=replace(p.lineage, squared=True)), tcols, reduction == 1, [])
    none_args = list(all_args)
    none_args[where] = 0
    elementwise_base = an.cached((node.name, "none"), lambda: op(p.base, *none_args[1:]))
    loss_none = functools.partial(_loss_none, op, where)
    value = pointwise(an, node, loss_none, elementwise_base, tuple(none_args[:where]), {})
    if reduction == 0:
        return value
    return full_sum(an, node, value, reduction == 1, [])


def _loss_none(op, where, *args):
    """``op`` with reduction 'none' inserted at position ``where``."""
    args = list(args)
    args.insert(where, 0)
    return op(*args)


def handle_nll(an, node, base, p, target, weight, reduction, ignore_index):
    """``nll_loss_forward``: per row ``-weight[t] * logp[row, t]`` (0 where ignored), then the float64 changed-terms
    sum, divided by the (constant) total weight for the mean. The log-probabilities of a product moved by an outer
    product (a lazy :class:`~gradfd.structured.values.Outer` marked by :func:`.reductions.handle_softmax`) under a
    mean or sum go to the fused kernel, which never writes them out."""
    name = op_name(node.target)
    if isinstance(target, Perturbed) or isinstance(weight, Perturbed):
        raise StructuredUnsupported(name, "the target or weight depends on the checked parameter")
    if p.base.dim() != 2 or p.promoted:
        raise StructuredUnsupported(name, f"log-probabilities of shape {tuple(p.base.shape)} (only (N, C) is "
                                    "supported)")
    out_base, total_weight = base
    n = p.base.shape[0]
    keep = an.cached((node.name, "keep"), lambda: target != ignore_index)
    safe = an.cached((node.name, "safe"), lambda: torch.where(keep, target, torch.zeros_like(target)))
    w = an.cached((node.name, "w"), lambda: (weight[safe] if weight is not None else torch.ones(
        n, dtype=p.base.dtype, device=p.base.device)) * keep.to(p.base.dtype))
    zero = an.cached((node.name, "zero"), lambda: p.base.new_zeros(()))
    # an ignored row is 0, never -logp * 0 (NaN where its safe class's logp is -inf), as in nll_loss
    rows_base = an.cached((node.name, "rows"), lambda: torch.where(
        keep, -p.base.gather(1, safe.unsqueeze(1)).squeeze(1) * w, zero))
    L = p.lineage
    if isinstance(L, Outer) and L.log_softmax and p.slab_ is None and reduction in (1, 2) and \
            tuple(p.base.shape) == tuple(L.base.shape) and target.dtype == torch.int64 and \
            (weight is None or weight.dtype == p.base.dtype):  # the fused kernel: the logits are never written out
        an.fused.setdefault("gradfd::outer_update_nll", set()).add(node.name)
        z = an.cached((node.name, "z"), lambda: L.base.contiguous())
        change = outer_update_nll(z, L.bias, L.rows.contiguous(), L.cols.contiguous(), target.contiguous(),
                                  None if weight is None else weight.contiguous(), ignore_index)
        total = an.cached((node.name, "total"), lambda: rows_base.double().sum())
        summed = Perturbed(total, (), p.pos[:, :0], change, promoted=True, relative=True)
        return _nll_reduced(summed, reduction, total_weight)
    p = widen(p, tuple(a for a in p.axes if a != 1))
    if p.axes == (0,):
        r = p.pos[:, 0]
        picked = p.slab.gather(1, safe[r].unsqueeze(1)).squeeze(1)
        rows = Perturbed(rows_base, (0,), p.pos, torch.where(keep[r], -picked * w[r], zero).to(p.base.dtype))
    else:
        idx = safe.view(1, n, 1).expand(p.batch, n, 1)
        picked = p.slab.expand(p.batch, *p.base.shape).gather(2, idx).squeeze(2)
        rows = Perturbed(rows_base, (), p.pos, torch.where(keep, -picked * w, zero).to(p.base.dtype))
    if reduction == 0:
        return (rows, total_weight)
    return _nll_reduced(full_sum(an, node, rows, False, []), reduction, total_weight)


def _nll_reduced(summed: Perturbed, reduction: int, total_weight: torch.Tensor) -> tuple:
    """``nll_loss_forward``'s outputs from the relative sum of its rows: divided by the (constant) total weight for
    the mean."""
    if reduction == 1:  # the total weight does not depend on the parameter
        tw = total_weight.double()
        summed = replace(summed, base=summed.base / tw, slab_=summed.slab / tw)
    return (summed, total_weight)
