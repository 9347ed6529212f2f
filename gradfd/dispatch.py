"""The light dispatch mode that the engine's meters and the structured engine's recorder derive from.

Imports nothing of gradfd's.
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LightDispatchMode"]


class LightDispatchMode(TorchDispatchMode):
    """A dispatch mode whose handler is not wrapped to disable TorchDynamo (which would import torch._dynamo,
    about 3 s, on first use); gradfd's handlers never compile anything."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False
