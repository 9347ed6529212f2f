"""``gradfd.gradcheck``: a drop-in for ``torch.autograd.gradcheck`` backed by :func:`gradfd.check`.

Replacing ``from torch.autograd import gradcheck`` by ``from gradfd import gradcheck`` keeps the call sites and
the return value (True, or False / an exception on failure). Unlike torch's, it checks float32 (and half)
functions in their own dtype with tolerances derived from the finite difference's error estimate, and in
``fast_mode`` its directional check keeps full mode's per-entry sensitivity.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.autograd.gradcheck import GradcheckError as _TorchGradcheckError

from .check import check
from .report import GradientCheckError

__all__ = ["gradcheck", "GradcheckError"]


class GradcheckError(_TorchGradcheckError, GradientCheckError):
    """Raised by :func:`gradcheck` on failure: both torch's ``GradcheckError`` (so existing ``except`` clauses
    work) and gradfd's :class:`GradientCheckError` (``.report`` holds the :class:`CheckReport`)."""

    def __init__(self, report):
        GradientCheckError.__init__(self, report)


# torch.autograd.gradcheck's other options, with the values that mean "not asked for". gradfd checks the
# backward (reverse-mode) gradient only; asking for anything else raises NotImplementedError.
_UNSUPPORTED = {
    "check_undefined_grad": True,  # torch's default; gradfd does not test undefined output grads
    "check_grad_dtypes": False,
    "check_batched_grad": False,
    "check_batched_forward_grad": False,
    "check_forward_ad": False,
    "check_backward_ad": True,
    "masked": None,
}


def gradcheck(
    func: Callable[..., torch.Tensor | Sequence[torch.Tensor]],
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    eps: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    raise_exception: bool = True,
    fast_mode: bool = False,
    nondet_tol: float = 0.0,
    **options,
) -> bool:
    """Check the gradients of ``func`` at ``inputs`` with gradfd; same signature and return value as
    ``torch.autograd.gradcheck``.

    Args:
        func: returns a tensor or a tuple of tensors.
        inputs: a tensor or a tuple of tensors; those that are floating with ``requires_grad=True`` are checked.
        eps: finite-difference step; None (default) picks it per dtype and entry (torch's fixed 1e-6 is built for
            float64 only).
        atol, rtol: replace gradfd's dtype floors; the finite difference's own error estimate is always allowed.
        raise_exception: raise :class:`GradcheckError` on failure (default), else return False.
        fast_mode: compare random directional derivatives (``uᵀJv``) instead of the full Jacobian.
        nondet_tol: tolerance for non-determinism: the backward is run twice and must agree within it.
        **options: torch's other options (``check_forward_ad``, ``check_batched_grad``, ``masked`` ...). Values
            other than torch's "off" raise NotImplementedError; ``check_undefined_grad`` and ``check_backward_ad``
            are accepted at their defaults (gradfd checks the backward gradient itself).

    Returns:
        True when every entry agrees (unresolved entries -- kinks -- do not fail).

    Raises:
        GradcheckError: on failure, with ``raise_exception``.
        NotImplementedError: an option gradfd does not support.
        TypeError: an option torch's gradcheck does not have.
    """
    for name, value in options.items():
        if name not in _UNSUPPORTED:
            raise TypeError(f"gradcheck() got an unexpected keyword argument {name!r}")
        if value != _UNSUPPORTED[name]:
            raise NotImplementedError(
                f"gradfd.gradcheck does not support {name}={value!r} (it checks the reverse-mode gradient only); "
                "use torch.autograd.gradcheck for that check"
            )
    params = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    report = check(func, params, mode="directional" if fast_mode else "full", h=eps, atol=atol, rtol=rtol,
                   raise_on_failure=False, nondet_tol=nondet_tol if nondet_tol else None)
    if report.passed:
        return True
    if raise_exception:
        raise GradcheckError(report)
    return False
