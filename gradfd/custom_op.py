"""A real custom op to check: fused bias + GELU, with C++/CUDA kernels (float32 only) and its backward registered
through ``torch.library.register_autograd`` -- and a deliberately broken twin for demos and tests.

``bias_gelu(x, bias) = gelu(x + bias)`` (exact, erf-based GELU), ``bias`` broadcast over ``x``'s last dimension.
This is the kind of op custom-kernel authors write; being float32-only, ``torch.autograd.gradcheck`` (which wants
float64) cannot check it, while :func:`gradfd.check` can.

``bias_gelu_buggy`` runs the same forward kernel, but its backward has a planted bug: the sign of the input
gradient is flipped on one branch (``x + bias < -1``), as a misplaced minus sign in a piecewise formula would.
"""

from __future__ import annotations

import threading

import torch

from . import ops

__all__ = ["bias_gelu", "bias_gelu_buggy", "bias_gelu_reference", "BUGGY_BRANCH"]

BUGGY_BRANCH = -1.0  # the buggy backward flips the sign where x + bias < BUGGY_BRANCH
_lock = threading.Lock()
_registered = False


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    grad_x = torch.ops.gradfd.bias_gelu_backward(grad.contiguous(), x, bias)
    return grad_x, grad_x.reshape(-1, bias.numel()).sum(0)


def _register() -> None:
    """Register the autograd formula and the fake kernel of ``gradfd::bias_gelu`` (once, after the kernels load)."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        ops.require_kernels()
        torch.library.register_autograd("gradfd::bias_gelu", _backward, setup_context=_setup_context)

        @torch.library.register_fake("gradfd::bias_gelu")
        def _fake(x, bias):
            torch._check(x.dtype == torch.float32, lambda: f"gradfd::bias_gelu: x must be float32, got {x.dtype}")
            return torch.empty_like(x)

        @torch.library.register_fake("gradfd::bias_gelu_backward")
        def _fake_backward(grad, x, bias):
            return torch.empty_like(x)

        _registered = True


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``gelu(x + bias)`` by the fused kernel, differentiable.

    Args:
        x: float32 tensor ``(..., d)``, contiguous (CPU, or CUDA when the CUDA kernels are built).
        bias: float32 ``(d,)``.

    Returns:
        float32 tensor of ``x``'s shape.

    Raises:
        RuntimeError: naming ``gradfd::bias_gelu`` on a non-float32 input, mismatched shapes or devices.
        gradfd.ops.KernelsUnavailableError: when the extension cannot be loaded.
    """
    _register()
    return torch.ops.gradfd.bias_gelu(x, bias)


def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch twin of :func:`bias_gelu` (any floating dtype)."""
    return torch.nn.functional.gelu(x + bias)


@torch.library.custom_op("gradfd_examples::bias_gelu_buggy", mutates_args=())
def bias_gelu_buggy(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The same forward as :func:`bias_gelu`, with a planted bug in its backward (see the module docstring)."""
    _register()
    return torch.ops.gradfd.bias_gelu(x, bias)


@bias_gelu_buggy.register_fake
def _(x, bias):
    return torch.empty_like(x)


def _buggy_backward(ctx, grad):
    x, bias = ctx.saved_tensors
    grad_x = torch.ops.gradfd.bias_gelu_backward(grad.contiguous(), x, bias)
    grad_x = torch.where(x + bias < BUGGY_BRANCH, -grad_x, grad_x)  # the planted bug: a wrong sign on one branch
    return grad_x, grad_x.reshape(-1, bias.numel()).sum(0)


bias_gelu_buggy.register_autograd(_buggy_backward, setup_context=_setup_context)
