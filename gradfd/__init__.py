"""gradfd: a finite-difference gradient checker for PyTorch with batched C++/CUDA kernels.

Public API:
    numerical_gradient  the batched engine, with the signature of gradfd.reference.numerical_gradient
    reference           the naive per-element loop (the lesson's algorithm), the baseline
"""

from . import reference, stencils
from .engine import FallbackWarning, GradfdWarning, NonFiniteLossError, numerical_gradient

__version__ = "0.1.0"

__all__ = [
    "numerical_gradient",
    "reference",
    "stencils",
    "GradfdWarning",
    "FallbackWarning",
    "NonFiniteLossError",
    "__version__",
]
