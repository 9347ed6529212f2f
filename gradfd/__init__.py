"""gradfd: a finite-difference gradient checker for PyTorch with batched C++/CUDA kernels.

Public API:
    check               numerical vs analytical gradients (or Jacobians) with a per-entry verdict and a report
    check_module        check on a torch.nn.Module's parameters (and inputs), rows named by parameter
    gradcheck           a drop-in for torch.autograd.gradcheck backed by check
    gradgradcheck       a drop-in for torch.autograd.gradgradcheck (the double backward, checked per entry)
    testing             assert_gradients_match, for op authors' test suites
    numerical_gradient  the batched engine, with the signature of gradfd.reference.numerical_gradient
    reference           the naive per-element loop (the lesson's algorithm), the baseline
"""

from . import reference, stencils, testing
from .check import check
from .dropin import GradcheckError, gradcheck, gradgradcheck
from .engine import numerical_gradient
from .errors import CostWarning, FallbackWarning, GradfdWarning, NonFiniteLossError
from .module import check_module
from .report import CheckReport, GradientCheckError, InvalidReferenceError, TensorReport
from .sweep import SweepResult, step_sweep

__version__ = "0.1.0"

__all__ = [
    "check",
    "check_module",
    "gradcheck",
    "gradgradcheck",
    "GradcheckError",
    "testing",
    "CheckReport",
    "TensorReport",
    "GradientCheckError",
    "InvalidReferenceError",
    "numerical_gradient",
    "step_sweep",
    "SweepResult",
    "reference",
    "stencils",
    "GradfdWarning",
    "FallbackWarning",
    "CostWarning",
    "NonFiniteLossError",
    "__version__",
]
