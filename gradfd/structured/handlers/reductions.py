"""Handlers of reductions along dims -- ``sum``, ``mean``, ``amax``, ``amin``, ``logsumexp`` -- and of softmax and
log-softmax, which mix a whole dim; and the full float64 sums every loss ends in (:func:`full_sum`, and
:func:`fused_sum`, the fused kernel ``gradfd::linear_update_mse``).

A full sum of a value whose region changed is ``sum(base) - sum(base over the region) + sum(new values over the
region)``: only the changed terms are summed per perturbation, in float64, and the result is relative (the change
from the float64 base sum).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..kernels import ACTIVATION_FUNCS, MAX_NODES, linear_update_mse
from ..values import Lineage, Outer, Perturbed, gather, widen
from .pointwise import output_base

SHORT_LAST_DIM = 32  # on a CPU, softmax along a last dim this short runs laid out along the first (handle_softmax)

__all__ = ["REDUCTIONS", "FULL_SUMS", "full_sum", "fused_sum", "handle_reduction", "handle_softmax"]

aten = torch.ops.aten

REDUCTIONS = {aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim, aten.amax.default,
              aten.amin.default, aten.logsumexp.default}
FULL_SUMS = {aten.sum.default: "sum", aten.sum.dim_IntList: "sum", aten.mean.default: "mean", aten.mean.dim: "mean"}


def _reduce_dims(p: Perturbed, dims) -> list[int]:
    """The reduced dims, sorted and non-negative (all of them for ``None`` or ``[]``)."""
    nd = p.base.dim()
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(nd))
    if isinstance(dims, int):
        dims = [dims]
    return sorted({d % nd for d in dims}) if nd else []


def full_sum(an, node, p: Perturbed, mean: bool, keep_shape) -> Perturbed:
    """A full sum (or mean) over the changed terms only, in float64: the change of each perturbation is
    ``sum(new values - base values)`` over its region, every term the element's new value minus its base value.
    Returns a relative value (its base the float64 sum of the base)."""
    b = p.batch
    count = max(p.base.numel(), 1)
    total = an.cached((node.name, "total"), lambda: p.base.double().sum())
    slab = p.slab
    old = gather(p.base, p.axes, p.pos)
    terms = slab.double() - old.double()
    rel = terms.sum(list(range(1, terms.dim()))) if terms.dim() > 1 else terms.reshape(b)
    base = total
    if mean:
        rel, base = rel / count, base / count
    shape = tuple(keep_shape)
    return Perturbed(base.reshape(shape), (), p.pos[:, :0], rel.expand(b).reshape(b, *shape), promoted=True,
                     relative=True)


def fused_sum(an, node, p: Perturbed, target: torch.Tensor | None, mean: bool, keep_shape) -> Perturbed:
    """The fused kernel: how every perturbation changes the squared-error sum of the lineage, in one pass."""
    L = p.lineage
    s, c = an.s, an.c
    col, fi = L.col.view(s, c), L.fi.view(s, c)
    if s > MAX_NODES or not (torch.equal(col, col[:1].expand_as(col)) and torch.equal(fi, fi[:1].expand_as(fi))):
        return full_sum(an, node, p, mean, keep_shape)
    if target is None:
        target = an.cached((node.name, "zeros"), lambda: torch.zeros_like(L.z))
    an.fused.setdefault("gradfd::linear_update_mse", set()).add(node.name)

    def base_total():
        a = ACTIVATION_FUNCS[L.activation](L.z) if L.activation else L.z
        return ((a.double() - target.double()) ** 2).sum()

    total = an.cached((node.name, "fused_total"), base_total)
    rel = linear_update_mse(L.z, L.features, target, col[0].contiguous(), fi[0].contiguous(),
                            L.delta.view(s, c).contiguous(), L.activation).reshape(-1)
    base = total
    if mean:
        count = max(p.base.numel(), 1)
        rel, base = rel / count, base / count
    shape = tuple(keep_shape)
    return Perturbed(base.reshape(shape), (), p.pos[:, :0], rel.reshape(-1, *shape), promoted=True, relative=True)


def handle_reduction(an, node, base, p, dims=None, keepdim=False, *, dtype=None) -> Perturbed:
    """``sum``, ``mean`` (a full one in float64 over the changed terms, fused where the lineage allows), and
    partial ``sum``/``mean``/``amax``/``amin``/``logsumexp``: the op on the region widened to the reduced dims."""
    op = node.target
    if op in (aten.sum.default, aten.mean.default):
        dims, keepdim = None, False
    red = _reduce_dims(p, dims)
    nd = p.base.dim()
    if op in FULL_SUMS and len(red) == nd:
        keep_shape = [1] * nd if keepdim else []
        mean = FULL_SUMS[op] == "mean"
        if isinstance(p.lineage, Lineage) and p.slab_ is None and p.lineage.squared and not p.promoted:
            return fused_sum(an, node, p, p.lineage.target, mean, keep_shape)
        return full_sum(an, node, p, mean, keep_shape)
    base, promoted = output_base(an, node, op, base, (p, dims, keepdim), {"dtype": dtype} if dtype else {})
    p = widen(p, tuple(a for a in p.axes if a not in red))
    slab_dims = [p.rest.index(d) + 1 for d in red]
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if op in (aten.sum.default, aten.mean.default):
        op = aten.sum.dim_IntList if op is aten.sum.default else aten.mean.dim
    slab = op(p.slab, slab_dims, keepdim, **kwargs)
    axes = p.axes if keepdim else tuple(a - sum(d < a for d in red) for a in p.axes)
    return Perturbed(base, axes, p.pos, slab.to(base.dtype), promoted=promoted)


def handle_softmax(an, node, base, p, dim, half_to_float) -> Perturbed:
    """``_softmax``/``_log_softmax``: the op on the region widened to the whole softmax dim. The log-softmax over the
    classes of a lazy outer product (:class:`~gradfd.structured.values.Outer`) stays lazy, marked for
    ``gradfd::outer_update_nll`` (whatever else reads it writes it out)."""
    nd = p.base.dim()
    dim = dim % nd if nd else 0
    L = p.lineage
    if isinstance(L, Outer) and p.slab_ is None and not L.log_softmax and node.target is aten._log_softmax.default \
            and not half_to_float and nd == 2 and dim == 1 and tuple(p.base.shape) == tuple(L.base.shape):
        return Perturbed(base, (), p.pos, None, replace(L, log_softmax=True))  # for gradfd::outer_update_nll
    if nd:
        p = widen(p, tuple(a for a in p.axes if a != dim))
        d = p.rest.index(dim) + 1
    else:
        d = 1
    slab = p.slab if nd else p.slab.unsqueeze(1)
    if (slab.device.type == "cpu" and d == slab.dim() - 1 and slab.shape[d] <= SHORT_LAST_DIM
            and slab.numel() >= slab.shape[d] * SHORT_LAST_DIM):
        # on a CPU, the op along a short last dim (classes) is several times faster laid out along the first (the
        # MLP of bench_models, 32 x 10 logits per perturbation: 4x): the same op, whose kernel for an inner dim may
        # sum in another order (equal bitwise on that MLP's float32 logits, not in general)
        moved = slab.movedim(d, 0).contiguous()
        slab = node.target(moved, 0, half_to_float).movedim(0, d)
    else:
        slab = node.target(slab, d, half_to_float)
    if not nd:
        slab = slab.squeeze(1)
    return Perturbed(base, p.axes, p.pos, slab.to(base.dtype), promoted=p.promoted)
