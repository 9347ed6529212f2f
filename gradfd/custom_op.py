"""Real custom ops to check, each with C++/CUDA kernels, its backward registered through
``torch.library.register_autograd``, a plain-PyTorch reference, and a deliberately broken twin for demos and tests:
fused bias + GELU (float32 only), RMSNorm (float16, bfloat16, float32, float64), and a softmax with a
hand-written backward (a Python ``torch.autograd.Function``, any floating dtype).

``bias_gelu(x, bias) = gelu(x + bias)`` (exact, erf-based GELU), ``bias`` broadcast over ``x``'s last dimension.
This is the kind of op custom-kernel authors write; being float32-only, ``torch.autograd.gradcheck`` (which wants
float64) cannot check it, while :func:`gradfd.check` can.

``bias_gelu_buggy`` runs the same forward kernel, but its backward has a planted bug: the sign of the input
gradient is flipped on one branch (``x + bias < -1``), as a misplaced minus sign in a piecewise formula would.

``rms_norm(x, weight, eps) = x / sqrt(mean(x**2, -1) + eps) * weight``: the kind of fused half-precision kernel
that :func:`gradfd.check`'s reference mode is for (``reference=rms_norm_reference``; docs/half-precision.md). Its
kernels read and write the tensors' dtype and accumulate in float32. ``rms_norm_buggy`` runs the same forward; its
backward leaves the weight out of the projection term of ``grad_x`` (``mean(g * xhat)`` for ``mean(g * weight *
xhat)``), a slip that costs an error proportional to ``weight - 1``: small where the weight stays near its
initial ones.

``softmax(x)`` is softmax over the last dimension with a hand-written backward that computes in float32 and rounds
once, as fused half-precision kernels do; ``softmax_planted(x, rows)`` has planted errors on chosen rows of its
backward. Issue 22's bars are stated on this op (benchmarks/bench_reference.py).
"""

from __future__ import annotations

import threading

import torch

from . import ops

__all__ = ["bias_gelu", "bias_gelu_buggy", "bias_gelu_reference", "BUGGY_BRANCH", "rms_norm", "rms_norm_buggy",
           "rms_norm_reference", "RMS_NORM_EPS", "softmax", "softmax_planted", "softmax_reference"]

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
    """Register the autograd formulas and fake kernels of ``gradfd::bias_gelu`` and ``gradfd::rms_norm`` (once,
    after the kernels load)."""
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

        torch.library.register_autograd("gradfd::rms_norm", _rms_norm_backward, setup_context=_rms_norm_setup)

        @torch.library.register_fake("gradfd::rms_norm")
        def _fake_rms_norm(x, weight, eps):
            stat = torch.float64 if x.dtype == torch.float64 else torch.float32
            return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=stat)

        @torch.library.register_fake("gradfd::rms_norm_backward")
        def _fake_rms_norm_backward(grad, x, weight, rstd, planted_bug):
            return torch.empty_like(x), torch.empty_like(weight)

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


RMS_NORM_EPS = 1e-6  # rms_norm's default eps


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.mark_non_differentiable(output[1])  # rstd: an internal statistic, saved for the backward
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, grad, grad_rstd, planted_bug: bool = False):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_w = torch.ops.gradfd.rms_norm_backward(grad.contiguous(), x, weight, rstd, planted_bug)
    return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = RMS_NORM_EPS) -> torch.Tensor:
    """RMSNorm over the last dimension by the fused kernel, differentiable in ``x`` and ``weight``.

    Args:
        x: ``(..., d)`` float16, bfloat16, float32 or float64, contiguous (CPU, or CUDA when the CUDA kernels are
            built).
        weight: ``(d,)``, of ``x``'s dtype and device.
        eps: added to the mean square (default :data:`RMS_NORM_EPS`).

    Returns:
        ``x / sqrt(mean(x**2, -1) + eps) * weight``, of ``x``'s shape and dtype; computed in float32 (float64 for
        float64) and rounded once.

    Raises:
        RuntimeError: naming ``gradfd::rms_norm`` on mismatched dtypes, shapes or devices, or a non-contiguous
            tensor.
        gradfd.ops.KernelsUnavailableError: when the extension cannot be loaded.
    """
    _register()
    return torch.ops.gradfd.rms_norm(x, weight, float(eps))[0]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = RMS_NORM_EPS) -> torch.Tensor:
    """Plain-PyTorch RMSNorm, the same function as :func:`rms_norm`: ``x`` ``(..., d)`` and ``weight`` ``(d,)`` of
    any one floating dtype and device; each op rounds in that dtype. Returns ``x``'s shape and dtype."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@torch.library.custom_op("gradfd_examples::rms_norm_buggy", mutates_args=())
def _rms_norm_buggy(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _register()
    y, rstd = torch.ops.gradfd.rms_norm(x, weight, eps)
    return y, rstd


@_rms_norm_buggy.register_fake
def _(x, weight, eps):
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=stat)


_rms_norm_buggy.register_autograd(lambda ctx, grad, grad_rstd: _rms_norm_backward(ctx, grad, grad_rstd, True),
                                  setup_context=_rms_norm_setup)


def rms_norm_buggy(x: torch.Tensor, weight: torch.Tensor, eps: float = RMS_NORM_EPS) -> torch.Tensor:
    """:func:`rms_norm` (same arguments, forward, errors) with the planted bug in its backward (see the module
    docstring): ``grad_x`` leaves ``weight`` out of its projection term; ``grad_weight`` is right."""
    return _rms_norm_buggy(x, weight, float(eps))[0]


class _Softmax(torch.autograd.Function):
    """Softmax over the last dimension; backward ``y * (g - sum(g * y))`` in float32, rounded once to the input's
    dtype, with each row ``r`` of ``planted`` (``...``: every row) multiplied by ``1 + planted[r]``."""

    @staticmethod
    def forward(ctx, x, planted):
        y = torch.softmax(x.float(), -1).to(x.dtype)
        ctx.save_for_backward(y)
        ctx.planted = planted
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        yf, gf = y.float(), g.float()
        out = yf * (gf - (gf * yf).sum(-1, keepdim=True))
        for row, rel in ctx.planted.items():
            out[row] *= 1 + rel
        return out.to(g.dtype), None


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension with a hand-written backward.

    Args:
        x: ``(..., d)`` floating tensor (any floating dtype and device).

    Returns:
        ``softmax(x, -1)`` of ``x``'s shape and dtype, computed in float32 and rounded once; its backward computes
        in float32 and rounds once too.
    """
    return _Softmax.apply(x, {})


def softmax_planted(x: torch.Tensor, rows: dict) -> torch.Tensor:
    """:func:`softmax` whose backward multiplies the rows ``r`` of its ``(..., d)`` input gradient (indices into its
    leading dimension; ``...`` for every row) by ``1 + rows[r]``: a planted error (``-2``: a sign error)."""
    return _Softmax.apply(x, dict(rows))


def softmax_reference(x: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: ``torch.softmax(x, -1)``."""
    return torch.softmax(x, -1)
