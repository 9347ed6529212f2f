"""The structured engine's entry point for :mod:`gradfd.engine`: :func:`evaluate_into` runs an
:class:`~gradfd.structured.analysis.Analysis` over the coordinates in chunks sized from the memory budget, and fills
the engine's ``Evaluation`` with the losses and notes.

Whether ``engine="auto"`` tries this engine at all is :func:`gradfd.structured.worthwhile`, in the package's
``__init__``.
"""

from __future__ import annotations

import torch

from .. import distributed
from ..budget import STRUCTURED_CPU_WORKING_SET
from .analysis import Analysis
from .unsupported import StructuredUnsupported

__all__ = ["evaluate_into", "PROBE_COORDS", "INDEX_BYTES_PER_NODE"]

# The first chunk has PROBE_COORDS coordinates (fewer when there are fewer); it measures the bytes of perturbed values
# per coordinate, from which the later chunks are sized to the budget. Each stencil node of a coordinate also holds
# INDEX_BYTES_PER_NODE bytes of indices, positions and displacements.
PROBE_COORDS = 64
INDEX_BYTES_PER_NODE = 96


def evaluate_into(problem, result, moved: torch.Tensor, chunk_size: int | None, budget: int | None) -> None:
    """Fill ``result.losses`` (an :class:`gradfd.engine.Evaluation`) with the structured engine.

    Args:
        problem: the prepared :class:`gradfd.engine.Problem`.
        result: the Evaluation to fill (coords, steps, displacement set). On success its ``engine`` is
            ``"structured"``, its ``losses`` and ``base_loss`` (0) are changes from the loss at the base point, and
            ``loss_offset`` is that loss (float64 reductions).
        moved: ``(S, M)`` node values in the parameter's dtype (``engine.node_values``).
        chunk_size: coordinates per chunk (honoured as given); default from ``budget``.
        budget: bytes of perturbed values per chunk; default from free memory (capped on a CPU).

    Raises:
        StructuredUnsupported: naming the op (or step) that stopped the analysis; ``result`` is then incomplete.
    """
    analysis = Analysis(problem)
    s, m = moved.shape
    device = problem.device
    if budget is None:
        budget = distributed.memory_budget(device)
        if device.type == "cpu":
            budget = min(budget, STRUCTURED_CPU_WORKING_SET)
    chunk = chunk_size or min(m, PROBE_COORDS)
    start = 0
    base = None

    def fill(a: int, b: int) -> float:
        vals, base = analysis.run(result.coords[a:b], moved[:, a:b])
        if result.sink is not None:  # a sink (gradfd.check) takes whole losses: the change plus the float64 base
            result.store(a, b, vals.view(s, b - a) + float(base))
        else:
            result.store(a, b, vals.view(s, b - a))
        return base

    try:
        while start < m:
            if start > 0 and distributed.sharing() is not None:  # the chunk size is settled: deal the rest out
                distributed.share_columns(result, None, distributed.blocks_of(start, m, chunk), fill)
                break
            this = min(chunk, m - start)
            base = fill(start, start + this)
            if start == 0 and chunk_size is None:
                per_coord = analysis.bytes / this + INDEX_BYTES_PER_NODE * s
                chunk = int(max(1, min(m, budget // max(per_coord, 1))))
            start += this
    except StructuredUnsupported as exc:  # a sink keeps what it took; stored changes are overwritten by the fallback
        # (in a distributed share, every block before the failing one was applied: Session.share)
        first = getattr(exc, "__dict__", {}).pop("_gradfd_block_start", start)
        exc.delivered = first if result.sink is not None else 0
        raise
    if result.sink is None:  # losses are changes from the float64 base loss, which is the offset
        result.loss_offset = float(base) if base is not None else float(problem.base_loss)
        result.base_loss = torch.zeros((), dtype=torch.float64, device=device)
    result.engine, result.batching, result.chunk_size = "structured", None, chunk
    traced = "" if distributed.active() else f" in {analysis.trace_seconds * 1e3:.0f} ms"  # (ranks' clocks differ)
    result.notes.append(f"structured: traced {sum(n.op == 'call_function' for n in analysis.nodes)} aten ops{traced}; "
                        f"chunks of {chunk} coordinates")
    for kernel, nodes in sorted(analysis.fused.items()):
        result.notes.append(f"structured: fused kernel {kernel} at " + ", ".join(sorted(nodes)))
    if analysis.densified:
        result.notes.append("structured: region widened to whole tensors at " + ", ".join(sorted(analysis.densified)))
    result.notes.append(f"structured: losses are changes from the base loss {result.loss_offset!r} (loss_offset), "
                        "summed over the changed terms in float64")
