"""Handlers of layers: convolution, batch, layer and group normalisation, pooling and embedding.

- **Convolution** is linear in each operand. One moved weight entry ``W[o, i, kh, kw]`` moves output channel ``o``
  by ``delta`` times input channel ``g * Cin_g + i`` shifted by ``(kh, kw)`` through stride, padding and dilation:
  a column of the im2col matrix. That is a Linear weight's column, kept lazy as a
  :class:`~gradfd.structured.values.Lineage` (``round(z + delta * feature)`` from the forward's own output ``z``,
  and the fused kernel where a squared error follows). A moved bias entry moves channel ``o`` by ``delta``. A changed
  input channel ``c`` (a first conv's perturbation reaching a second conv) moves the output channels of its group
  by the convolution of the change alone with ``W[:, c]``, added to the base (in the op's dtype: the change's own
  rounding is ``eps * |change|``, far below the output's). A changed sample runs the op's own forward on that
  sample.
- **Normalisation and pooling** act per (sample, channel) plane, per channel or per sample. The op's own forward runs
  on the region, laid out as the op's batch or channels (a changed channel ``c`` of every sample is one channel of
  ``(N, B, ...)``, with ``c``'s statistics and affine parameters): batch norm in eval and in train mode (the batch
  statistics per channel are part of the function), layer norm over its normalised dims, group norm per sample,
  max, average and adaptive pooling per plane.
- **Embedding**: a moved ``W[t, d]`` replaces column ``d`` wherever the index is ``t``.

The other outputs of these ops (saved statistics, pooling indices) are :class:`Unavailable` where they depend on the
parameter: an op that reads one is refused, naming it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..unsupported import StructuredUnsupported, op_name
from ..values import Lineage, Perturbed, Unavailable, base_value, columns, full, gather, ravel, unit_axes, widen

__all__ = ["LAYERS"]

aten = torch.ops.aten


def _same_dtype(node, base: torch.Tensor, *values) -> None:
    """Refuse operands whose dtypes differ from the output's, or a promoted (float64-reduced) operand."""
    for v in values:
        if isinstance(v, Perturbed) and v.promoted:
            raise StructuredUnsupported(op_name(node.target), "an operand reduced in float64 upstream")
        if isinstance(v, (torch.Tensor, Perturbed)) and base_value(v).dtype != base.dtype:
            raise StructuredUnsupported(op_name(node.target), "operands of different dtypes")


def _as_2d(t: torch.Tensor, spatial: int) -> torch.Tensor:
    """A 1-d convolution's ``(..., C, L)`` as ``(..., C, 1, L)``; 2-d unchanged."""
    return t.unsqueeze(-2) if spatial == 1 else t


def _conv_geometry(stride, padding, dilation, spatial: int) -> tuple[tuple, tuple, tuple]:
    """Stride, padding and dilation as 2-d tuples (a 1-d convolution as a 2-d one of height 1)."""
    def two(v):
        v = tuple(v) if isinstance(v, (list, tuple)) else (v,) * spatial
        return (1,) + v if spatial == 1 else v
    s, p, d = two(stride), two(padding), two(dilation)
    if spatial == 1:
        p = (0,) + p[1:]
    return s, p, d


def _im2col(x: torch.Tensor, weight_shape, stride, padding, dilation) -> torch.Tensor:
    """``(N * L, Cin * kk)`` contiguous: row ``n * L + l`` holds the input values output position ``l`` of sample
    ``n`` reads, in the weight's ``(channel, kh, kw)`` order (``L`` output positions in row-major order)."""
    spatial = len(weight_shape) - 2
    kernel = tuple(weight_shape[2:]) if spatial == 2 else (1, weight_shape[2])
    s, p, d = _conv_geometry(stride, padding, dilation, spatial)
    cols = F.unfold(_as_2d(x, spatial), kernel, dilation=d, padding=p, stride=s)  # (N, Cin * kk, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).contiguous()


def handle_convolution(an, node, base, x, weight, bias, stride, padding, dilation, transposed, output_padding,
                       groups) -> Perturbed:
    """``aten.convolution`` (1-d and 2-d, not transposed, batched input) with one operand perturbed."""
    name = op_name(node.target)
    w0 = base_value(weight)
    spatial = w0.dim() - 2
    if transposed:
        raise StructuredUnsupported(name, "a transposed convolution")
    if spatial not in (1, 2) or base_value(x).dim() != w0.dim():
        raise StructuredUnsupported(name, f"a {spatial}-d convolution of a {base_value(x).dim()}-d input (1-d and "
                                          "2-d convolutions of batched inputs are supported)")
    _same_dtype(node, base, x, weight, bias)
    perturbed = [v for v in (x, weight, bias) if isinstance(v, Perturbed)]
    if len(perturbed) > 1:
        raise StructuredUnsupported(name, "more than one operand depends on the checked parameter")
    geometry = (stride, padding, dilation)
    if isinstance(weight, Perturbed):
        return _conv_weight(an, node, base, base_value(x), weight, base_value(bias), groups, geometry)
    if isinstance(bias, Perturbed):
        return _conv_bias(an, node, base, bias)
    return _conv_input(an, node, base, x, w0, bias, groups, geometry)


def _conv(inp: torch.Tensor, weight: torch.Tensor, bias, groups: int, geometry) -> torch.Tensor:
    """The convolution itself (``F.conv2d``, a 1-d one as a 2-d one of height 1)."""
    spatial = weight.dim() - 2
    out = F.conv2d(_as_2d(inp, spatial), _as_2d(weight, spatial), bias, *_conv_geometry(*geometry, spatial), groups)
    return out.squeeze(-2) if spatial == 1 else out


def _conv_weight(an, node, base, x, p: Perturbed, bias, groups: int, geometry) -> Perturbed:
    """One moved weight entry per perturbation: its output channel moves along an im2col column (a Lineage); a whole
    changed weight runs the op's own forward per perturbation."""
    w0 = p.base
    p = unit_axes(p)
    b = p.batch
    if p.axes != tuple(range(w0.dim())):
        an.densified.add(node.name)
        slab = torch.stack([_conv(x, w, bias, groups, geometry) for w in full(p)])
        return Perturbed(base, (), p.pos[:, :0], slab.to(base.dtype))
    o, ci = p.pos[:, 0], p.pos[:, 1]
    kk = math.prod(w0.shape[2:])
    cout_g, cin_g = w0.shape[0] // groups, w0.shape[1]
    fi = ((o // cout_g) * cin_g + ci) * kk + ravel(p.pos[:, 2:], w0.shape[2:])
    delta = p.slab.reshape(b).double() - w0[tuple(p.pos.t())].double()
    features = an.cached((node.name, "im2col"), lambda: _im2col(x, w0.shape, *geometry))
    z = an.cached((node.name, "z"), lambda: columns(base, (1,)))
    return Perturbed(base, (1,), o.unsqueeze(1), None, Lineage(z, features, o, fi, delta))


def _conv_bias(an, node, base, p: Perturbed) -> Perturbed:
    """One moved bias entry per perturbation: its output channel moves by the displacement (a Lineage along a
    column of ones)."""
    p = unit_axes(p)
    if p.axes != (0,):
        raise StructuredUnsupported(op_name(node.target), "a bias changed in more than one entry")
    o = p.pos[:, 0]
    delta = p.slab.reshape(p.batch).double() - p.base[o].double()
    z = an.cached((node.name, "z"), lambda: columns(base, (1,)))
    ones = an.cached((node.name, "ones"), lambda: torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device))
    return Perturbed(base, (1,), o.unsqueeze(1), None, Lineage(z, ones, o, torch.zeros_like(o), delta))


def _conv_input(an, node, base, p: Perturbed, w0: torch.Tensor, bias, groups: int, geometry) -> Perturbed:
    """A changed input: one sample runs the op's own forward; one channel of every sample moves the output by the
    convolution of its change alone, added to the base; anything else runs the op on every perturbation's whole
    input."""
    spatial = w0.dim() - 2
    s, pad, d = _conv_geometry(*geometry, spatial)
    bias = base_value(bias)
    b = p.batch
    if 0 in p.axes:  # one sample per perturbation (and maybe one channel of it): the op on that sample
        q = widen(p, (0,))
        return Perturbed(base, (0,), q.pos, _conv(q.slab, w0, bias, groups, geometry).to(base.dtype))
    if 1 not in p.axes:
        an.densified.add(node.name)
        slab = _conv(full(p).reshape(-1, *p.base.shape[1:]), w0, bias, groups, geometry)
        return Perturbed(base, (), p.pos[:, :0], slab.reshape(b, *base.shape).to(base.dtype))
    # one input channel c of every sample: out += conv(change of channel c, W[:, c]) over its group's outputs
    an.densified.add(node.name)
    q = widen(p, (1,))
    c = q.pos[:, 0]
    change = q.slab - gather(p.base, (1,), q.pos)  # (B, N, *S); exact where the two are within 2x (Sterbenz)
    cout_g, cin_g = w0.shape[0] // groups, w0.shape[1]
    in_group = (torch.arange(w0.shape[0], device=c.device).unsqueeze(0) // cout_g) == (c // cin_g).unsqueeze(1)
    kernels = w0[:, c % cin_g].transpose(0, 1) * in_group.view(b, -1, *[1] * spatial).to(w0.dtype)  # (B, Cout, *k)
    n = change.shape[1]
    cols = F.unfold(_as_2d(change.reshape(b * n, 1, *change.shape[2:]), spatial),
                    (1, w0.shape[2]) if spatial == 1 else tuple(w0.shape[2:]), dilation=d, padding=pad, stride=s)
    cols = cols.view(b, n, cols.shape[1], cols.shape[2])  # (B, N, kk, L)
    moved = torch.einsum("bnkl,bok->bnol", cols, kernels.reshape(b, w0.shape[0], -1))  # (B, N, Cout, L)
    slab = base.unsqueeze(0) + moved.reshape(b, *base.shape).to(base.dtype)
    return Perturbed(base, (), p.pos[:, :0], slab)


def _planes(q: Perturbed):
    """The region of ``q`` (its axes within ``{0, 1}``: sample, channel) laid out for a per-channel op as
    ``(inp, channel, restore)``: ``inp`` ``(N', C', *S)``, ``channel`` the base channel of each of its ``C'``
    channels, and ``restore`` mapping the op's ``(N', C', *S')`` output back to a slab ``(B, *rest')``. Each
    perturbation's planes are channels of their own, so per-channel statistics stay per perturbation."""
    b, c_all = q.batch, q.base.shape[1]
    dev = q.base.device
    if q.axes == ():  # (B, N, C, *S) -> (N, B * C, *S)
        n = q.base.shape[0]
        inp = q.slab.transpose(0, 1).reshape(n, b * c_all, *q.base.shape[2:])
        return (inp, torch.arange(c_all, device=dev).repeat(b),
                lambda out: out.reshape(n, b, c_all, *out.shape[2:]).transpose(0, 1))
    if q.axes == (1,):  # (B, N, *S): channel pos[b] of every sample -> (N, B, *S)
        return q.slab.transpose(0, 1).contiguous(), q.pos[:, 0], lambda out: out.transpose(0, 1)
    if q.axes == (0,):  # (B, C, *S): one sample -> B samples of C channels
        return q.slab, torch.arange(c_all, device=dev), lambda out: out
    return q.slab.unsqueeze(0), q.pos[:, 1], lambda out: out.squeeze(0)  # (0, 1): one plane each


def handle_batch_norm(an, node, base, x, weight, bias, running_mean, running_var, training, momentum, eps):
    """``native_batch_norm`` with the input perturbed: eval mode per element with its channel's statistics, train
    mode with each perturbation's own batch statistics of its changed channels."""
    name = op_name(node.target)
    if any(isinstance(v, Perturbed) for v in (weight, bias, running_mean, running_var)):
        raise StructuredUnsupported(name, "the normalisation's weight, bias or statistics depend on the checked "
                                          "parameter")
    if base_value(x).dim() < 2:
        raise StructuredUnsupported(name, "an input without a channel dim")
    _same_dtype(node, base[0], x)
    # train mode mixes every sample of a channel into its statistics: the region keeps the channel axis only
    q = widen(x, tuple(a for a in x.axes if a == 1 or (a == 0 and not training)))
    inp, channel, restore = _planes(q)
    pick = lambda t: None if t is None else t[channel]  # noqa: E731
    out = node.target(inp, pick(weight), pick(bias), pick(running_mean), pick(running_var), training, momentum, eps)
    value = Perturbed(base[0], q.axes, q.pos, restore(out[0]).to(base[0].dtype))
    if not training:  # (eval mode saves nothing that depends on the input)
        return value, base[1], base[2]
    return value, Unavailable(name, "its saved batch mean"), Unavailable(name, "its saved inverse deviation")


def handle_layer_norm(an, node, base, x, normalized_shape, weight, bias, eps):
    """``native_layer_norm`` with the input perturbed: the op on the region widened to the normalised dims."""
    name = op_name(node.target)
    if any(isinstance(v, Perturbed) for v in (weight, bias)):
        raise StructuredUnsupported(name, "the normalisation's weight or bias depends on the checked parameter")
    _same_dtype(node, base[0], x)
    nd, k = x.base.dim(), len(normalized_shape)
    q = widen(x, tuple(a for a in x.axes if a < nd - k))
    out = node.target(q.slab, normalized_shape, weight, bias, eps)[0]
    return (Perturbed(base[0], q.axes, q.pos, out.to(base[0].dtype)), Unavailable(name, "its saved mean"),
            Unavailable(name, "its saved inverse deviation"))


def handle_group_norm(an, node, base, x, weight, bias, n, c, hxw, group, eps):
    """``native_group_norm`` with the input perturbed: the op on each perturbation's changed sample (or every
    sample)."""
    name = op_name(node.target)
    if any(isinstance(v, Perturbed) for v in (weight, bias)):
        raise StructuredUnsupported(name, "the normalisation's weight or bias depends on the checked parameter")
    _same_dtype(node, base[0], x)
    q = widen(x, tuple(a for a in x.axes if a == 0))
    inp = q.slab if q.axes else q.slab.reshape(-1, *x.base.shape[1:])
    out = node.target(inp, weight, bias, inp.shape[0], c, hxw, group, eps)[0]
    slab = out if q.axes else out.reshape(q.batch, *x.base.shape)
    return (Perturbed(base[0], q.axes, q.pos, slab.to(base[0].dtype)), Unavailable(name, "its saved mean"),
            Unavailable(name, "its saved inverse deviation"))


# pooling ops and how many trailing spatial dims each pools over (each plane on its own)
POOLS = {aten.max_pool2d_with_indices.default: 2, aten.avg_pool2d.default: 2, aten._adaptive_avg_pool2d.default: 2,
         aten.adaptive_max_pool2d.default: 2, aten.max_pool1d_with_indices.default: 1, aten.avg_pool1d.default: 1,
         aten.adaptive_max_pool1d.default: 1, aten.max_pool2d.default: 2, aten.max_pool1d.default: 1}


def handle_pool(an, node, base, x, *args, **kwargs):
    """Pooling: each plane on its own, so the op runs on the region's planes (the region widened to whole planes)."""
    name = op_name(node.target)
    multi = isinstance(base, (tuple, list))
    out_base = base[0] if multi else base
    _same_dtype(node, out_base, x)
    sp = POOLS[node.target]
    lead = x.base.dim() - sp
    q = widen(x, tuple(a for a in x.axes if a < lead))
    planes = q.slab.reshape(-1, 1, *x.base.shape[lead:])
    out = node.target(planes, *args, **kwargs)
    first = out[0] if multi else out
    rest_lead = [x.base.shape[d] for d in q.rest if d < lead]
    slab = first.reshape(q.batch, *rest_lead, *first.shape[2:]).to(out_base.dtype)
    value = Perturbed(out_base, q.axes, q.pos, slab)
    if multi:
        return (value,) + tuple(Unavailable(name, "its indices") for _ in base[1:])
    return value


def handle_embedding(an, node, base, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    """``embedding`` with the weight perturbed: a moved ``W[t, d]`` replaces column ``d`` wherever the index is
    ``t``; a whole changed weight is looked up per perturbation."""
    if isinstance(indices, Perturbed):
        raise StructuredUnsupported(op_name(node.target), "the indices depend on the checked parameter")
    _same_dtype(node, base, weight)
    p = unit_axes(weight)
    nd = base.dim()
    if p.axes != (0, 1):
        an.densified.add(node.name)
        return Perturbed(base, (), p.pos[:, :0], full(p)[:, indices].to(base.dtype))
    t, d = p.pos[:, 0], p.pos[:, 1]
    shape = (-1,) + (1,) * indices.dim()
    column = gather(base, (nd - 1,), d.unsqueeze(1))  # (B, *indices.shape)
    slab = torch.where(indices.unsqueeze(0) == t.view(shape), p.slab.reshape(shape).to(base.dtype), column)
    return Perturbed(base, (nd - 1,), d.unsqueeze(1), slab)


LAYERS = {
    aten.convolution.default: handle_convolution,
    aten.native_batch_norm.default: handle_batch_norm,
    aten.native_layer_norm.default: handle_layer_norm,
    aten.native_group_norm.default: handle_group_norm,
    aten.embedding.default: handle_embedding,
    **{op: handle_pool for op in POOLS},
}
