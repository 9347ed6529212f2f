"""Helpers for test suites of custom ops: an assertion whose failure message is gradfd's report."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .check import check
from .report import CheckReport

__all__ = ["assert_gradients_match"]


def assert_gradients_match(op: Callable, inputs: torch.Tensor | Sequence[torch.Tensor], **check_options) -> CheckReport:
    """Assert that autograd's gradients of ``op(*inputs)`` match finite differences.

    Args:
        op: a function or custom op returning a tensor, a tuple of tensors, or a loss.
        inputs: a tensor or a tuple of tensors; floating ones with ``requires_grad=True`` are checked (or pass
            ``wrt=``).
        **check_options: passed to :func:`gradfd.check` (``mode``, ``samples``, ``nondet_tol``, ``atol`` ...).

    Returns:
        The :class:`CheckReport` when it passes and is verified (``report.verified``).

    Raises:
        AssertionError: with the report's table as its message, when an entry disagrees (or the backward is
            non-deterministic beyond ``nondet_tol``, or mishandles undefined output gradients with
            ``check_undefined_grad=True``), or when nothing could be compared for a tensor (every entry
            unresolved: ``sqrt`` at 0), naming that tensor. Partly unresolved tensors (kinks) pass.

    Example (pytest)::

        def test_my_op_backward():
            x = torch.randn(8, 16, requires_grad=True)
            gradfd.testing.assert_gradients_match(my_op, (x,))
    """
    params = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    report = check(op, params, raise_on_failure=False, **check_options)
    if not report.passed:
        raise AssertionError("gradients do not match finite differences\n" + str(report))
    if not report.verified:
        raise AssertionError(report.uncompared_message() + "\n" + str(report))
    return report
