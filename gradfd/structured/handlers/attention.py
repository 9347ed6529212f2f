"""Handler of scaled dot-product attention (``F.scaled_dot_product_attention``, which a CPU trace records as
``aten._scaled_dot_product_flash_attention_for_cpu``).

Attention mixes whole rows and columns of its ``(L, E)`` and ``(S, E)`` operands, but each (sample, head) plane on
its own. A perturbation whose region is a set of such planes (a head moved by a projection's column: the
``(head, feature)`` region a ``view`` splits off, widened to the head) changes only those planes of the output:
the op's own forward runs on them alone, laid out as its batch. Query, key and value regions are widened to the
batch dims they share (a grouped-query attention's head dim, whose sizes differ, is not one); a constant operand
(or mask) is gathered at the same planes. A region of every plane is refused: the generic engine evaluates whole
layers faster. The op runs with dropout 0 only (else it draws random numbers). Only the CPU kernel's cases reach it
(4-d query, key and value of one head dim, no dropout): others run torch's math path, ``bmm`` and softmax
(:func:`.linalg.handle_bmm`); the GPU's attention kernels have no handler yet.

The log-sum-exp output is :class:`Unavailable`: an op that reads it is refused, naming it.
"""

from __future__ import annotations

import math

import torch

from ..unsupported import StructuredUnsupported, op_name
from ..values import Perturbed, Unavailable, base_value, common_region, gather, widen

__all__ = ["ATTENTION", "draws_random_numbers"]

aten = torch.ops.aten

# dropout_p's position in the schemas of the fused attention ops (tagged as drawing random numbers for it)
_DROPOUT_ARG = {aten._scaled_dot_product_flash_attention_for_cpu.default: 3,
                aten._scaled_dot_product_flash_attention.default: 3,
                aten._scaled_dot_product_efficient_attention.default: 5,
                aten._scaled_dot_product_cudnn_attention.default: 5}


def draws_random_numbers(node: torch.fx.Node) -> bool:
    """Whether a node tagged ``nondeterministic_seeded`` draws random numbers: a fused attention op does only for
    its dropout, off at ``dropout_p == 0`` (the default). (The GPU's attention ops then reach the engine and are
    refused for want of a handler, not as random.)"""
    at = _DROPOUT_ARG.get(node.target)
    if at is None:
        return True
    return node.kwargs.get("dropout_p", node.args[at] if len(node.args) > at else 0.0) != 0


def _as_rank(t: torch.Tensor, rank: int) -> torch.Tensor:
    """``(B, *rest)`` with the leading dims merged (or a unit dim inserted after B) to ``rank`` dims: the
    perturbations laid out as the op's batch."""
    if t.dim() < rank:
        return t.unsqueeze(1)
    lead = t.dim() - rank + 1
    return t.reshape(math.prod(t.shape[:lead]), *t.shape[lead:])


def _region(t, axes: tuple[int, ...], pos: torch.Tensor) -> torch.Tensor:
    """An operand's planes ``(B, *rest)`` at the region: a perturbed one's new values, a constant's gathered."""
    if isinstance(t, Perturbed):
        return widen(t, axes).slab
    got = gather(t, axes, pos)  # ((1, *t.shape) for no axes)
    return got.expand(pos.shape[0], *got.shape[1:])


def handle_attention(an, node, base, query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None,
                     scale=None):
    """``_scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal, attn_mask=, scale=)``
    with any of query, key and value perturbed; ``base`` is ``(output, logsumexp)``."""
    name = op_name(node.target)
    if dropout_p != 0:
        raise StructuredUnsupported(name, f"dropout_p={dropout_p} draws random numbers")
    if isinstance(attn_mask, Perturbed):
        raise StructuredUnsupported(name, "an attention mask that depends on the checked parameter")
    out = base[0]
    operands = (query, key, value)
    for v in operands:
        if isinstance(v, Perturbed) and v.promoted:
            raise StructuredUnsupported(name, "an operand reduced in float64 upstream")
        if base_value(v).dtype != out.dtype:
            raise StructuredUnsupported(name, "operands of different dtypes")
    rank = out.dim()
    shared = tuple(d for d in range(rank - 2) if all(base_value(v).shape[d] == out.shape[d] for v in operands))
    perturbed = [widen(v, tuple(a for a in v.axes if a in shared)) if isinstance(v, Perturbed) else v
                 for v in operands]
    moved = [v for v in perturbed if isinstance(v, Perturbed)]
    if not set.intersection(*(set(v.axes) for v in moved)):
        # Rule: a region of every plane (a head merged with the batch, as nn.MultiheadAttention's reshapes leave a
        # projection's column) makes every perturbation a whole attention and all that follows: the generic engine
        # evaluates that faster (a Transformer layer's in-projection: 7x, benchmarks/bench_models.py's model). Read
        # from the regions' axes, as the graph sets them, never from a chunk's positions: a refusal is the same for
        # every chunk (a refusal after the first would hand the generic engine columns already delivered)
        raise StructuredUnsupported(name, "the changed region spans every (sample, head) plane, where the generic "
                                          "engine is faster")
    axes, pos = common_region(moved)
    if not axes:  # the operands' planes differ for some perturbation (a slice it misses sits at 0): every plane
        an.densified.add(node.name)
    b = pos.shape[0]
    # (the kernel reads the head dim as contiguous: a slab laid out by a permute is copied)
    q, k, v = (_as_rank(_region(t, axes, pos), rank).contiguous() for t in perturbed)
    mask = attn_mask
    if mask is not None and any(s != 1 for s in mask.shape[:-2]):  # (a mask with batch dims: gathered alike)
        full_mask = mask.expand(*out.shape[:-2], *mask.shape[-2:])
        mask = _as_rank(_region(full_mask, axes, pos), rank)
    elif mask is not None:
        mask = mask.reshape(mask.shape[-2:])
    new = node.target(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)[0]
    rest = [out.shape[d] for d in range(rank) if d not in axes]
    return Perturbed(out, axes, pos, new.reshape(b, *rest)), Unavailable(name, "its logsumexp")


ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu.default: handle_attention}
