"""Handlers of the products: ``mm``, ``addmm``, ``mv`` and ``bmm``, with the parameter on either side.

A product is linear in each operand: one moved entry ``W[i, j]`` moves column ``j`` of ``X @ W`` by
``delta * X[:, i]`` (kept lazy as a :class:`~gradfd.structured.values.Lineage` for the fused kernel); a replaced
column is recomputed alone; a replaced row of ``W`` (or column of ``X``) moves every output by an outer product, in
float64, kept lazy as an :class:`~gradfd.structured.values.Outer` for ``gradfd::outer_update_nll``.
"""

from __future__ import annotations

import torch

from ..unsupported import StructuredUnsupported, op_name
from ..values import (Lineage, Outer, Perturbed, base_value, columns, full, permute, squeeze, unit_axes, unsqueeze,
                      widen)
from .pointwise import pointwise

__all__ = ["mm", "mm_right", "handle_bmm", "handle_addmm", "handle_mv"]

aten = torch.ops.aten


def mm(an, node, base, a, b) -> Perturbed:
    """``a @ b`` with either operand (or both) perturbed; ``base`` is the product's base."""
    if isinstance(a, Perturbed) and isinstance(b, Perturbed):
        an.densified.add(node.name)
        slab = torch.matmul(full(a), full(b))
        return Perturbed(base, (), a.pos.new_zeros((a.batch, 0)), slab.to(base.dtype))
    if isinstance(b, Perturbed):
        return mm_right(an, node, base, a, b)
    # a @ b = (b^T @ a^T)^T: the parameter on the left is the right-hand case transposed
    out_t = mm_right(an, node, base.t(), b.t(), permute(a, [1, 0], a.base.t()))
    if isinstance(out_t.lineage, Outer) and out_t.slab_ is None:
        return Perturbed(base, (), out_t.pos, None, out_t.lineage.t(base))
    return permute(out_t, [1, 0], base)


def mm_right(an, node, base, a: torch.Tensor, p: Perturbed) -> Perturbed:
    """``a @ p`` with ``a`` (n, d) constant and ``p`` (d, k) perturbed; ``base`` (n, k)."""
    if p.promoted or a.dtype != p.base.dtype:
        raise StructuredUnsupported(op_name(node.target), "operands of different dtypes")
    p = unit_axes(p)
    b = p.batch
    dtype = base.dtype
    if p.axes == (0, 1):  # one entry W[i, j]: column j moves by delta * a[:, i]
        i, j = p.pos[:, 0], p.pos[:, 1]
        delta = p.slab.reshape(b).double() - p.base[i, j].double()
        features = an.cached((node.name, "a", base.shape), lambda: a.contiguous())
        z = an.cached((node.name, "z", base.shape), lambda: columns(base, (1,)))
        return Perturbed(base, (1,), j.unsqueeze(1), None, Lineage(z, features, j, i, delta))
    if p.axes == (1,):  # column j replaced: recompute that column of the product
        return Perturbed(base, (1,), p.pos, torch.mm(p.slab, a.t()).to(dtype))
    an.densified.add(node.name)
    if p.axes == (0,):  # row i replaced: every output moves by a[:, i] (x) (new row - old row), kept lazy
        i = p.pos[:, 0]
        drow = p.slab.to(torch.float64, copy=True)  # (a copy: the slab may be another value's, or a broadcast view)
        drow -= p.base[i]  # (B, k): new row - old row, in float64 (exact unless the two differ by more than 2^29x)
        a_t = an.cached((node.name, "a_t", base.shape), lambda: a.t().double().contiguous())
        return Perturbed(base, (), p.pos[:, :0], None, Outer(base, a_t[i], drow))
    return Perturbed(base, (), p.pos, torch.matmul(a, p.slab).to(dtype))


def handle_bmm(an, node, base, a, b) -> Perturbed:
    """``bmm(a, b)``, ``(T, n, d) @ (T, d, k)`` with one operand perturbed: a region of whole matrices ``t`` (the
    batch dim) is the op on those matrices alone.

    Rule: any other region (a feature column of every matrix, as attention written out as matmuls leaves a
    projection's column after merging heads with the batch) moves every output of every matrix, and every
    perturbation becomes the whole op and all that follows: refused, the generic engine evaluating whole layers
    faster (as for attention, :mod:`.attention`)."""
    name = op_name(node.target)
    if isinstance(a, Perturbed) and isinstance(b, Perturbed):
        raise StructuredUnsupported(name, "both operands depend on the checked parameter")
    p, left = (a, True) if isinstance(a, Perturbed) else (b, False)
    other = b if left else a
    if p.promoted or p.base.dtype != other.dtype:
        raise StructuredUnsupported(name, "operands of different dtypes")
    if 0 not in p.axes:
        raise StructuredUnsupported(name, "the changed region spans every matrix; the generic engine evaluates "
                                          "whole layers faster")
    p = widen(p, (0,))  # matrices t: the op on them, laid out as its batch
    mats = other[p.pos[:, 0]]
    return Perturbed(base, (0,), p.pos, torch.bmm(p.slab, mats) if left else torch.bmm(mats, p.slab))


def handle_addmm(an, node, base, bias, a, b, *, beta=1, alpha=1) -> Perturbed:
    """``bias + a @ b`` (``beta = alpha = 1`` only): the product, then the pointwise add."""
    if beta != 1 or alpha != 1:
        raise StructuredUnsupported(op_name(node.target), f"beta={beta}, alpha={alpha} (only 1 is supported)")
    mm_base = an.cached((node.name, "mm"), lambda: torch.mm(base_value(a), base_value(b)))
    product = mm(an, node, mm_base, a, b) if isinstance(a, Perturbed) or isinstance(b, Perturbed) else mm_base
    return pointwise(an, node, aten.add.Tensor, base, (product, bias), {})


def handle_mv(an, node, base, a, v) -> Perturbed:
    """``a @ v``: the product with ``v`` as a one-column matrix."""
    col = unsqueeze(v, 1, base_value(v).unsqueeze(1)) if isinstance(v, Perturbed) else v.unsqueeze(1)
    out = mm(an, node, base.unsqueeze(1), a, col)
    return squeeze(out, [1], base)
