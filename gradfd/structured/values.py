"""The structured engine's values: :class:`Perturbed` (a value under a batch of perturbations, stored as its base
plus the new values of the region that changed), :class:`Lineage` and :class:`Outer` (values kept lazy for the fused
kernels),
and the algebra on them -- gathering a region, re-describing it (widen, unit axes, broadcast) and the view-like
transforms (permute, squeeze, unsqueeze) that move a region without computing anything.

How each aten op acts on a value lives in :mod:`gradfd.structured.handlers`, not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .kernels import ACTIVATION_FUNCS, linear_update

__all__ = ["Lineage", "Outer", "Perturbed", "Unavailable", "gather", "columns", "ravel", "unravel_batch", "absolute",
           "full", "widen", "unit_axes", "broadcast_to", "with_unaffected", "common_region", "permute", "identity",
           "unsqueeze", "squeeze", "base_value"]


@dataclass
class Lineage:
    """How a region's new values follow from a column moved by a product linear in the parameter.

    For perturbation ``b`` the region's values are, in order:
    ``v = round(z[:, col[b]] + delta[b] * features[:, fi[b]])``; ``v = act(v)`` if ``activation``;
    ``v = v - target[:, col[b]]`` if ``target`` is given; ``v = v**2`` if ``squared``. The ``(n, K)`` layout of
    ``z``/``target`` is :func:`columns` of the value's base: the region's entries (in order) down a column.
    """

    z: torch.Tensor
    features: torch.Tensor
    col: torch.Tensor
    fi: torch.Tensor
    delta: torch.Tensor
    activation: str | None = None
    target: torch.Tensor | None = None
    squared: bool = False

    @property
    def stage(self) -> str:
        """The last step applied: ``"linear"``, ``"activated"``, ``"residual"`` or ``"squared"``."""
        if self.squared:
            return "squared"
        if self.target is not None:
            return "residual"
        return "activated" if self.activation else "linear"

    def materialize(self) -> torch.Tensor:
        """``(B, n)`` region values in z's dtype."""
        v = linear_update(self.z, self.features, self.col.contiguous(), self.fi.contiguous(),
                          self.delta.contiguous())
        if self.activation:
            v = ACTIVATION_FUNCS[self.activation](v)
        if self.target is not None:
            v = v - self.target[:, self.col].t()
        if self.squared:
            v = v.pow(2)
        return v


@dataclass
class Outer:
    """A product's whole output moved by an outer product, kept lazy for ``gradfd::outer_update_nll``.

    For perturbation ``b`` the values are ``round(base + rows[b, :, None] * cols[b, None, :])`` (the move in float64,
    rounded once: mm is linear in each operand), then ``+ bias`` in base's dtype if ``bias`` is given, then
    ``log_softmax`` along dim 1 if ``log_softmax``. ``base`` ``(n, K)`` is the product's unperturbed output (before the
    bias), ``rows`` ``(B, n)`` and ``cols`` ``(B, K)`` are float64: a replaced input column ``j`` of ``x @ w`` moves row
    ``r`` by its change times ``w[j]``; a replaced weight row ``i`` moves every row ``r`` by ``x[r, i]`` times the row's
    change.
    """

    base: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    bias: torch.Tensor | None = None
    log_softmax: bool = False

    def t(self, base: torch.Tensor) -> Outer:
        """The same move of the transposed product, whose unperturbed output is ``base``: the factors swap."""
        if self.bias is not None or self.log_softmax:
            raise ValueError("only a bare product's move transposes")
        return Outer(base, self.cols, self.rows)

    def materialize(self) -> torch.Tensor:
        """``(B, n * K)`` values in base's dtype."""
        v = torch.addcmul(self.base.double().unsqueeze(0), self.rows.unsqueeze(2), self.cols.unsqueeze(1))
        v = v.to(self.base.dtype)
        if self.bias is not None:
            v = v + self.bias
        if self.log_softmax:
            v = torch._log_softmax(v, 2, False)
        return v.reshape(v.shape[0], -1)


class Unavailable:
    """An output of a multi-output op that depends on the checked parameter but that its handler does not compute
    (a normalisation's saved statistics, a pooling's indices). What an op computes from it is unavailable too
    (:func:`gradfd.structured.handlers.propagate`); a loss that is unavailable is refused, naming the op that
    produced it (:meth:`gradfd.structured.analysis.Analysis.run`). Graphs keep such outputs even where nothing
    reads them (``max_pool1d`` squeezes its indices)."""

    def __init__(self, op: str, what: str) -> None:
        self.op, self.what = op, what


@dataclass
class Perturbed:
    """A value of the graph under a batch of ``B`` perturbations of the checked parameter.

    Attributes:
        base: the unperturbed value (shape ``T``).
        axes: sorted dims of ``T`` that locate the changed region: for perturbation ``b`` the entries whose index along
            ``axes[a]`` is ``pos[b, a]`` may differ from ``base``; every other entry equals ``base``. ``()`` means the
            whole tensor may differ.
        pos: ``(B, len(axes))`` int64.
        slab_: ``(B, *T[rest])`` new values of the region (``rest``: the dims not in ``axes``, in order), or None while
            ``lineage`` describes them lazily.
        lineage: see :class:`Lineage` and :class:`Outer`; an ``Outer`` is read only while ``slab_`` is None.
        scalar: every row of the slab is one value broadcast over the region.
        promoted: ``base`` was re-evaluated (a float64 reduction) and differs from the traced base.
        relative: (float64 reductions) the slab holds the change from ``base``, not the new values; ``axes`` is ``()``.
    """

    base: torch.Tensor
    axes: tuple[int, ...]
    pos: torch.Tensor
    slab_: torch.Tensor | None
    lineage: Lineage | Outer | None = None
    scalar: bool = False
    promoted: bool = False
    relative: bool = False

    @property
    def batch(self) -> int:
        """``B``, the number of perturbations."""
        return self.pos.shape[0]

    @property
    def rest(self) -> list[int]:
        """The dims of ``base`` not in ``axes``, in order: the dims of the slab after the batch dim."""
        return [d for d in range(self.base.dim()) if d not in self.axes]

    @property
    def rest_shape(self) -> list[int]:
        """The sizes of :attr:`rest`."""
        return [self.base.shape[d] for d in self.rest]

    @property
    def slab(self) -> torch.Tensor:
        """The new values of the region, ``(B, *rest_shape)``, materialised from the lineage on first use."""
        if self.slab_ is None:
            self.slab_ = self.lineage.materialize().reshape(self.batch, *self.rest_shape)
        return self.slab_


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def gather(t: torch.Tensor, axes: tuple[int, ...], pos: torch.Tensor) -> torch.Tensor:
    """``t``'s region per perturbation: ``(B, *t.shape[rest])`` (``(1, *t.shape)`` when ``axes`` is empty)."""
    if not axes:
        return t.unsqueeze(0)
    rest = [d for d in range(t.dim()) if d not in axes]
    moved = t.permute(*axes, *rest)
    return moved[tuple(pos[:, a] for a in range(len(axes)))]


def columns(t: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """``t`` as ``(n, K)`` contiguous: one column per region (the region's entries in order down the column)."""
    rest = [d for d in range(t.dim()) if d not in axes]
    n, k = _prod(t.shape[d] for d in rest), _prod(t.shape[a] for a in axes)
    return t.permute(*rest, *axes).reshape(n, k).contiguous()


def ravel(pos: torch.Tensor, sizes) -> torch.Tensor:
    """Flat (row-major) index of ``pos`` ``(B, len(sizes))`` in a tensor of ``sizes``."""
    flat = torch.zeros(pos.shape[0], dtype=torch.int64, device=pos.device)
    for a, size in enumerate(sizes):
        flat = flat * int(size) + pos[:, a]
    return flat


def unravel_batch(flat: torch.Tensor, sizes) -> torch.Tensor:
    """Inverse of :func:`ravel`: ``(B, len(sizes))`` int64."""
    out = []
    for size in reversed(list(sizes)):
        out.append(flat % int(size))
        flat = torch.div(flat, int(size), rounding_mode="floor")
    return torch.stack(list(reversed(out)), 1) if out else flat.new_zeros((flat.shape[0], 0))


def absolute(v):
    """``v`` with a relative slab turned into new values (``base + change``); anything else unchanged."""
    if isinstance(v, Perturbed) and v.relative:
        return Perturbed(v.base, (), v.pos, v.base.unsqueeze(0) + v.slab, promoted=True)
    return v


def full(p: Perturbed) -> torch.Tensor:
    """The whole perturbed value, ``(B, *T)`` (densified)."""
    return widen(p, ()).slab.expand(p.batch, *p.base.shape)


def widen(p: Perturbed, keep: tuple[int, ...]) -> Perturbed:
    """The same value with its region described by the axes ``keep`` only (a subset of ``p.axes``): the dropped axes
    become whole dims of the slab, filled from ``base`` outside the old region."""
    keep = tuple(sorted(keep))
    drop = [a for a in p.axes if a not in keep]
    if not drop:
        return p
    b = p.batch
    keep_i = [p.axes.index(a) for a in keep]
    drop_i = [p.axes.index(a) for a in drop]
    new_pos = p.pos[:, keep_i]
    new_rest = [d for d in range(p.base.dim()) if d not in keep]
    slab = gather(p.base, keep, new_pos).expand(b, *[p.base.shape[d] for d in new_rest]).clone()
    old_rest = p.rest
    view = slab.permute(0, *[new_rest.index(a) + 1 for a in drop], *[new_rest.index(d) + 1 for d in old_rest])
    view[(torch.arange(b, device=slab.device), *[p.pos[:, i] for i in drop_i])] = p.slab.to(slab.dtype)
    unit = all(p.base.shape[a] == 1 for a in drop)
    return Perturbed(p.base, keep, new_pos, slab, scalar=p.scalar and unit, promoted=p.promoted)


def unit_axes(p: Perturbed) -> Perturbed:
    """Add the size-1 dims of the region to ``axes`` (at position 0): the same region, described more narrowly."""
    units = [d for d in p.rest if p.base.shape[d] == 1]
    if not units:
        return p
    axes = tuple(sorted(p.axes + tuple(units)))
    zeros = p.pos.new_zeros((p.batch, 1))
    cols = [p.pos[:, p.axes.index(a):p.axes.index(a) + 1] if a in p.axes else zeros for a in axes]
    pos = torch.cat(cols, 1) if cols else p.pos
    slab = p.slab.reshape(p.batch, *[p.base.shape[d] for d in range(p.base.dim()) if d not in axes])
    return Perturbed(p.base, axes, pos, slab, scalar=p.scalar, promoted=p.promoted)


def broadcast_to(p: Perturbed, shape) -> Perturbed:
    """``p`` broadcast (``expand``) to ``shape``."""
    shape = tuple(shape)
    if tuple(p.base.shape) == shape:
        return p
    lead = len(shape) - p.base.dim()
    grown = [a for a in p.axes if p.base.shape[a] == 1 and shape[a + lead] != 1]
    p = widen(p, tuple(a for a in p.axes if a not in grown))
    rest_new = [d for d in range(len(shape)) if d - lead not in p.axes or d < lead]
    slab = p.slab.reshape(p.batch, *([1] * lead), *p.rest_shape).expand(p.batch, *[shape[d] for d in rest_new])
    return Perturbed(p.base.expand(shape), tuple(a + lead for a in p.axes), p.pos, slab, scalar=p.scalar,
                     promoted=p.promoted)


def with_unaffected(p: Perturbed, affected: torch.Tensor) -> Perturbed:
    """Set the slab of perturbations that do not reach this value (``~affected``) to the base region."""
    if bool(affected.all()):
        return p
    base_region = gather(p.base, p.axes, p.pos).expand_as(p.slab)
    mask = affected.view(-1, *([1] * (p.slab.dim() - 1)))
    return replace(p, slab_=torch.where(mask, p.slab, base_region.to(p.slab.dtype)), lineage=None)


def common_region(perturbed: list[Perturbed]) -> tuple[tuple[int, ...], torch.Tensor]:
    """The axes (and positions) on which every operand's region agrees for every perturbation."""
    first = perturbed[0]
    axes = list(first.axes)
    for p in perturbed[1:]:
        keep = []
        for a in axes:
            if a in p.axes and torch.equal(first.pos[:, first.axes.index(a)], p.pos[:, p.axes.index(a)]):
                keep.append(a)
        axes = keep
    axes = tuple(axes)
    pos = first.pos[:, [first.axes.index(a) for a in axes]]
    return axes, pos


def permute(p: Perturbed, perm, base: torch.Tensor) -> Perturbed:
    """``p.permute(perm)`` (``base`` is the permuted base). Keeps the lineage when the order of the region's entries
    and of its axes is unchanged."""
    nd = p.base.dim()
    perm = [d % nd for d in perm] if nd else []
    new_of_old = [perm.index(a) for a in p.axes]
    order = sorted(range(len(new_of_old)), key=new_of_old.__getitem__)
    axes = tuple(new_of_old[k] for k in order)
    pos = p.pos[:, order]
    new_rest = [e for e in range(nd) if perm[e] not in p.axes]
    old_rest = p.rest
    keeps_order = order == sorted(order) and [perm[e] for e in new_rest] == sorted(perm[e] for e in new_rest)
    if p.slab_ is None and keeps_order:
        return Perturbed(base, axes, pos, None, p.lineage, p.scalar, p.promoted)
    slab = p.slab.permute(0, *[old_rest.index(perm[e]) + 1 for e in new_rest])
    return Perturbed(base, axes, pos, slab, scalar=p.scalar, promoted=p.promoted)


def identity(p: Perturbed, base: torch.Tensor) -> Perturbed:
    """``p`` unchanged but for its base (an op that leaves every value where it is)."""
    return replace(p, base=base)


def unsqueeze(p: Perturbed, dim: int, base: torch.Tensor) -> Perturbed:
    """``p.unsqueeze(dim)`` (``base`` is the unsqueezed base); keeps the lineage."""
    nd = p.base.dim() + 1
    dim %= nd
    axes = tuple(a + (a >= dim) for a in p.axes)
    new_rest = [d for d in range(nd) if d not in axes]
    if p.slab_ is None:
        return Perturbed(base, axes, p.pos, None, p.lineage, p.scalar, p.promoted)
    return Perturbed(base, axes, p.pos, p.slab.unsqueeze(new_rest.index(dim) + 1), scalar=p.scalar,
                     promoted=p.promoted)


def squeeze(p: Perturbed, dims, base: torch.Tensor) -> Perturbed:
    """``p.squeeze(dims)`` (``base`` is the squeezed base; dims not of size 1 are left); keeps the lineage."""
    nd = p.base.dim()
    if nd == 0:
        return identity(p, base)
    dims = sorted({d % nd for d in dims if p.base.shape[d % nd] == 1})
    if not dims:
        return identity(p, base)
    keep_axes = [k for k, a in enumerate(p.axes) if a not in dims]
    axes = tuple(a - sum(d < a for d in dims) for a in p.axes if a not in dims)
    pos = p.pos[:, keep_axes]
    if p.slab_ is None:
        return Perturbed(base, axes, pos, None, p.lineage, p.scalar, p.promoted)
    old_rest = p.rest
    slab = p.slab
    for d in sorted((d for d in dims if d in old_rest), reverse=True):
        slab = slab.squeeze(old_rest.index(d) + 1)
    return Perturbed(base, axes, pos, slab, scalar=p.scalar, promoted=p.promoted)


def base_value(v):
    """The unperturbed value of ``v`` (its base if it is :class:`Perturbed`, else ``v`` itself)."""
    return v.base if isinstance(v, Perturbed) else v
