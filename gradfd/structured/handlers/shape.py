"""Handlers of the ops that move values without computing them -- views, reshapes, slicing, broadcasting,
dtype conversions -- and the sets of ops that keep a value (:data:`VIEW_IDENTITY`) or depend only on its shape
(:data:`SHAPE_ONLY`).

Each handler re-describes the changed region in the output's dims; the lineage survives where the order of the
region's entries is unchanged.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..unsupported import StructuredUnsupported, op_name
from ..values import (Perturbed, broadcast_to, identity, permute, ravel, squeeze, unravel_batch, unsqueeze, widen,
                      with_unaffected)

__all__ = ["VIEW_IDENTITY", "SHAPE_ONLY", "handle_permute", "handle_t", "handle_transpose", "handle_identity",
           "handle_to_copy", "handle_unsqueeze", "handle_squeeze", "handle_expand", "handle_view", "handle_slice",
           "handle_select"]

aten = torch.ops.aten

VIEW_IDENTITY = {aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default}
SHAPE_ONLY = {aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
              aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
              aten.sym_size.int, aten.sym_numel.default}


def handle_permute(an, node, base, p, dims):
    """``permute``: the region's axes follow their dims."""
    return permute(p, list(dims), base)


def handle_t(an, node, base, p):
    """``t``: a transpose of a 2-D value (the identity below 2-D)."""
    return permute(p, [1, 0], base) if p.base.dim() == 2 else identity(p, base)


def handle_transpose(an, node, base, p, dim0, dim1):
    """``transpose``: a permutation swapping two dims."""
    nd = p.base.dim()
    if nd == 0:
        return identity(p, base)
    perm = list(range(nd))
    d0, d1 = dim0 % nd, dim1 % nd
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return permute(p, perm, base)


def handle_identity(an, node, base, p, *args, **kwargs):
    """``clone``, ``alias``, ``detach``, ``lift_fresh_copy``: the same values."""
    return identity(p, base)


def handle_to_copy(an, node, base, p, **kwargs):
    """``_to_copy``: a dtype conversion of the region (a move to another device is refused)."""
    if kwargs.get("device") is not None and torch.device(kwargs["device"]) != p.base.device:
        raise StructuredUnsupported(op_name(node.target), "moves the value to another device")
    return Perturbed(base, p.axes, p.pos, p.slab.to(base.dtype), scalar=p.scalar, promoted=p.promoted)


def handle_unsqueeze(an, node, base, p, dim):
    """``unsqueeze``."""
    return unsqueeze(p, dim, base)


def handle_squeeze(an, node, base, p, dims=None):
    """``squeeze`` (all size-1 dims, one dim or several)."""
    if dims is None:
        dims = list(range(p.base.dim()))
    elif isinstance(dims, int):
        dims = [dims]
    return squeeze(p, dims, base)


def handle_expand(an, node, base, p, sizes, *, implicit=False):
    """``expand``: a broadcast of the value."""
    if tuple(base.shape) == tuple(p.base.shape):
        return identity(p, base)
    q = broadcast_to(p, base.shape)
    return replace(q, base=base)


def _groups(old, new) -> list[tuple[list[int], list[int]]]:
    """Pair runs of dims of ``old`` and ``new`` with equal element counts (a reshape maps each run onto its pair)."""
    shapes, at = (old, new), [0, 0]  # side 0: old, side 1: new; the next dim of each

    def take(side: int, group: list[int], product: int) -> int:
        """Add side's next dim to ``group``; return the group's element count with it."""
        group.append(at[side])
        product *= shapes[side][at[side]]
        at[side] += 1
        return product

    groups = []
    while at[0] < len(old) or at[1] < len(new):
        go, gn, po, pn = [], [], 1, 1
        if at[0] < len(old):
            po = take(0, go, po)
        if at[1] < len(new):
            pn = take(1, gn, pn)
        while po != pn:
            if po < pn and at[0] < len(old):
                po = take(0, go, po)
            elif at[1] < len(new):
                pn = take(1, gn, pn)
            else:
                raise ValueError("shapes do not match")
        groups.append((go, gn))
    return groups


def handle_view(an, node, base, p, *args):
    """``view``/``_unsafe_view``/``reshape``: runs of dims that are wholly region map onto their new dims; a run mixing
    region axes with whole dims widens to whole."""
    old, new = tuple(p.base.shape), tuple(base.shape)
    if old == new:
        return identity(p, base)
    if 0 in old:
        raise StructuredUnsupported(op_name(node.target), "a reshape of an empty tensor")
    groups = _groups(old, new)
    # a run of dims that mixes region axes with whole dims becomes whole
    mixed = {a for go, _ in groups if not all(d in p.axes for d in go) for a in go if a in p.axes}
    p = widen(p, tuple(a for a in p.axes if a not in mixed))
    axes, cols = [], []
    for go, gn in groups:
        if go and all(d in p.axes for d in go):
            flat = ravel(p.pos[:, [p.axes.index(d) for d in go]], [old[d] for d in go])
            new_pos = unravel_batch(flat, [new[e] for e in gn])
            axes += gn
            cols += [new_pos[:, k] for k in range(len(gn))]
    rest_shape = [new[e] for e in range(len(new)) if e not in axes]
    pos = torch.stack(cols, 1) if cols else p.pos[:, :0]
    return Perturbed(base, tuple(axes), pos, p.slab.reshape(p.batch, *rest_shape), scalar=p.scalar,
                     promoted=p.promoted)


def handle_slice(an, node, base, p, dim=0, start=None, end=None, step=1):
    """``slice``: slicing a whole dim slices the slab; slicing a region axis renumbers the positions, and
    perturbations whose region falls outside the slice leave the value at its base."""
    nd = p.base.dim()
    dim %= nd
    size = p.base.shape[dim]
    r = range(size)[slice(start, end, step)]
    if len(r) == size:
        return identity(p, base)
    if dim not in p.axes:
        k = p.rest.index(dim) + 1
        idx = [slice(None)] * p.slab.dim()
        idx[k] = slice(r.start, r.stop, r.step)
        return Perturbed(base, p.axes, p.pos, p.slab[tuple(idx)], scalar=p.scalar, promoted=p.promoted)
    if len(r) == 0:
        raise StructuredUnsupported(op_name(node.target), "an empty slice")
    a = p.axes.index(dim)
    pk = p.pos[:, a]
    inside = (pk >= r.start) & (pk < r.stop) & ((pk - r.start) % r.step == 0)
    new_pk = torch.where(inside, torch.div(pk - r.start, r.step, rounding_mode="floor"), torch.zeros_like(pk))
    pos = p.pos.clone()
    pos[:, a] = new_pk
    q = Perturbed(base, p.axes, pos, p.slab, scalar=p.scalar, promoted=p.promoted)
    return with_unaffected(q, inside)


def handle_unbind(an, node, base, p, dim=0):
    """``unbind``: one :func:`handle_select` per index (``base`` is the tuple of the slices' bases)."""
    return tuple(handle_select(an, node, b, p, dim, k) for k, b in enumerate(base))


def handle_select(an, node, base, p, dim, index):
    """``select``: as :func:`handle_slice`, one index."""
    nd = p.base.dim()
    dim %= nd
    index %= p.base.shape[dim]
    if dim not in p.axes:
        return Perturbed(base, tuple(a - (a > dim) for a in p.axes), p.pos, p.slab.select(p.rest.index(dim) + 1, index),
                         scalar=p.scalar, promoted=p.promoted)
    a = p.axes.index(dim)
    inside = p.pos[:, a] == index
    keep = [k for k in range(len(p.axes)) if k != a]
    axes = tuple(x - (x > dim) for x in p.axes if x != dim)
    q = Perturbed(base, axes, p.pos[:, keep], p.slab, scalar=p.scalar, promoted=p.promoted)
    return with_unaffected(q, inside)
