"""How the structured engine refuses a function: :class:`StructuredUnsupported`, and :func:`op_name`, which names
the op that stopped it in the message.

Nothing else lives here; every other module of the package may import this one.
"""

from __future__ import annotations

import torch

__all__ = ["StructuredUnsupported", "op_name"]


class StructuredUnsupported(RuntimeError):
    """The structured engine cannot evaluate ``func``; ``op`` names the aten op (or step) that stopped the analysis.

    ``engine="structured"`` raises it; ``engine="auto"`` falls back to the generic engine and records the message in
    ``Evaluation.notes``. ``delivered``: the leading columns whose losses a sink already took before the refusal (0
    without a sink); the fallback evaluates only the rest, so no column reaches the verdict twice.
    """

    delivered: int = 0

    def __init__(self, op: str, reason: str):
        super().__init__(
            f"the structured engine cannot evaluate func: {op}: {reason}. Use engine='auto' (falls back to the "
            "generic engine) or engine='batched'"
        )
        self.op = op
        self.reason = reason

    def __reduce__(self):  # (a distributed check sends it to every rank: each takes the same fallback)
        return type(self), (self.op, self.reason)


def op_name(target) -> str:
    """``aten.<overload>`` for an aten op, the qualified name of any other op, else the callable's ``__name__``."""
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.__name__}" if target.namespace == "aten" else str(target)
    return getattr(target, "__name__", str(target))
