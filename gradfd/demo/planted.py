"""A custom op with every rule an op author writes, and one planted mistake per rule (issue 23's bars).

``sin_mul(x, w) = sin(x * w)`` (elementwise; ``x`` and ``w`` of one shape) is a ``torch.autograd.Function`` with a
hand-written backward, forward-mode rule (``jvp``) and double backward (the backward is itself a Function,
``_SinMulGrad``, with its own hand-written backward and jvp, for reverse- and forward-over-reverse). Its first-order
backward is right in every variant. Each entry of :data:`BUGS` plants one mistake, the kind an op author makes, and
:data:`OPTIONS` names the check of its rule:

- ``"jvp_one_input"``: the jvp leaves out ``x`` in ``w``'s term (``cos(xw) (t_x w + t_w)``): forward AD;
- ``"double_backward"``: the double backward drops the ``cos`` of the cross derivative ``d(g_x)/dw``: gradgrad;
- ``"detached"``: the backward computes from detached tensors, so that the double backward is lost: gradgrad;
- ``"undefined_as_ones"``: an undefined output gradient is taken as ones (``set_materialize_grads(False)``):
  the undefined-gradient check;
- ``"backward_not_batchable"``: the backward exits early when the output gradient is all zeros, reading it with
  ``.item()``, which vmap cannot batch: the batched-gradient check;
- ``"jvp_not_batchable"``: the jvp does the same with its tangent: the batched forward check;
- ``"undefined_tangent_as_ones"``: an undefined tangent of ``w`` is taken as ones: forward AD and the
  undefined-tangent check;
- ``"jvp_wrong_dtype"``: the jvp returns its tangent in another floating dtype (float64, or float32 for a float64
  op), which forward AD lets through: the gradient-dtype check (torch's checks only complex against real).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["sin_mul", "BUGS", "OPTIONS", "TORCH_MISSES", "complex_op", "COMPLEX_OPS"]

# each planted mistake, and the gradcheck options (of torch's and gradfd's drop-ins) that check its rule; "gradgrad"
# means gradgradcheck, with these options
OPTIONS: dict[str, dict] = {
    "jvp_one_input": {"check_forward_ad": True},
    "double_backward": {"gradgrad": True},
    "detached": {"gradgrad": True},
    "undefined_as_ones": {"check_undefined_grad": True},
    "backward_not_batchable": {"check_batched_grad": True},
    "jvp_not_batchable": {"check_forward_ad": True, "check_batched_forward_grad": True},
    "undefined_tangent_as_ones": {"check_forward_ad": True, "check_undefined_grad": True},
    "jvp_wrong_dtype": {"check_forward_ad": True, "check_grad_dtypes": True},
}
TORCH_MISSES = ("jvp_wrong_dtype",)  # planted mistakes torch's own checks let through (by design: see above)
BUGS = tuple(OPTIONS)


def _all_zero(t: torch.Tensor) -> bool:
    return float(t.abs().sum()) == 0.0  # (.item(): a host read, which vmap cannot batch)


@functools.cache
def _op(bug: str | None) -> type:
    """The Function of ``sin_mul`` with ``bug`` planted (None: correct)."""

    class _SinMulGrad(torch.autograd.Function):
        """``(g cos(xw) w, g cos(xw) x)`` with its own hand-written backward (sin_mul's double backward)."""

        @staticmethod
        def forward(ctx, x, w, g):
            ctx.save_for_backward(x, w, g)
            ctx.save_for_forward(x, w, g)
            c = torch.cos(x * w)
            return g * c * w, g * c * x

        @staticmethod
        def jvp(ctx, tx, tw, tg):  # (forward over reverse)
            x, w, g = ctx.saved_tensors
            tx, tw, tg = (torch.zeros_like(x) if t is None else t for t in (tx, tw, tg))
            c, s = torch.cos(x * w), torch.sin(x * w)
            moved = -g * s * (tx * w + x * tw)  # the tangent of g cos(xw)
            return tg * c * w + moved * w + g * c * tw, tg * c * x + moved * x + g * c * tx

        @staticmethod
        def backward(ctx, ggx, ggw):
            x, w, g = ctx.saved_tensors
            c, s = torch.cos(x * w), torch.sin(x * w)
            cross = g * (c - s * x * w)  # d(g_x)/dw = d(g_w)/dx
            cross_x = g * (-s * x * w) if bug == "double_backward" else cross
            dx = ggx * (-g * s * w * w) + ggw * cross_x
            dw = ggx * cross + ggw * (-g * s * x * x)
            dg = ggx * c * w + ggw * c * x
            return dx, dw, dg

    class SinMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            if bug in ("undefined_as_ones", "undefined_tangent_as_ones"):
                ctx.set_materialize_grads(False)  # (undefined gradients and tangents then reach the rules as None)
            ctx.save_for_backward(x, w)
            ctx.save_for_forward(x, w)
            return torch.sin(x * w)

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            if g is None:  # (only where grads are not materialized): undefined means zero
                if bug != "undefined_as_ones":
                    return None, None
                g = torch.ones_like(x)
            if bug == "backward_not_batchable" and _all_zero(g):
                return torch.zeros_like(x), torch.zeros_like(w)
            if bug == "detached":
                x, w = x.detach(), w.detach()
                c = torch.cos(x * w)
                return g * c * w, g * c * x
            return _SinMulGrad.apply(x, w, g)

        @staticmethod
        def jvp(ctx, tx, tw):
            x, w = ctx.saved_tensors
            tx = torch.zeros_like(x) if tx is None else tx
            tw = (torch.ones_like(w) if bug == "undefined_tangent_as_ones" else torch.zeros_like(w)) if tw is None \
                else tw
            if bug == "jvp_not_batchable" and _all_zero(tx) and _all_zero(tw):
                return torch.zeros_like(x)
            if bug == "jvp_one_input":
                return torch.cos(x * w) * (tx * w + tw)
            if bug == "jvp_wrong_dtype":
                other = torch.float32 if x.dtype == torch.float64 else torch.float64
                return (torch.cos(x * w) * (tx * w + x * tw)).to(other)
            return torch.cos(x * w) * (tx * w + x * tw)

    SinMul.__name__ = f"SinMul_{bug}" if bug else "SinMul"
    return SinMul


def sin_mul(x: torch.Tensor, w: torch.Tensor, bug: str | None = None) -> torch.Tensor:
    """``sin(x * w)``, elementwise, through hand-written rules (the module docstring).

    Args:
        x, w: floating tensors of one shape, dtype and device.
        bug: None (default: every rule right), or one of :data:`BUGS`.

    Returns:
        ``sin(x * w)``, shaped like ``x``.

    Raises:
        ValueError: ``bug`` not None nor in :data:`BUGS`, or ``x`` and ``w`` of different shapes.
    """
    if bug is not None and bug not in BUGS:
        raise ValueError(f"bug must be None or one of {BUGS}, got {bug!r}")
    if x.shape != w.shape:
        raise ValueError(f"x and w must have one shape, got {tuple(x.shape)} and {tuple(w.shape)}")
    return _op(bug).apply(x, w)


# ---- complex ops with hand-written backward (issue 24): each right, or with its conjugate missing ----------------
# Each entry: (forward, backward with conjugates, backward without). PyTorch's convention for y = f(z, ...) and a
# real loss: grad_z = conj(dy/dz) * g + (dy/dz̄) * conj(g) (the conjugate Wirtinger vjp); the planted mistake drops
# a conjugate, the slip an author porting a real backward makes (that of dy/dz; for |z|^2, whose dy/dz̄ is z, it
# conjugates z instead).
COMPLEX_OPS: dict[str, tuple] = {
    "mul": (lambda z, w: z * w, lambda g, z, w: (g * w.conj(), g * z.conj()), lambda g, z, w: (g * w, g * z.conj())),
    "mul_conj": (lambda z, w: z * w.conj(), lambda g, z, w: (g * w, z * g.conj()),
                 lambda g, z, w: (g * w.conj(), z * g.conj())),
    "exp": (lambda z, w: torch.exp(z) * w, lambda g, z, w: (g * (torch.exp(z) * w).conj(), g * torch.exp(z).conj()),
            lambda g, z, w: (g * torch.exp(z) * w, g * torch.exp(z).conj())),
    "square": (lambda z, w: z * z + w, lambda g, z, w: (g * (2 * z).conj(), g), lambda g, z, w: (g * 2 * z, g)),
    "sin": (lambda z, w: torch.sin(z) * w, lambda g, z, w: (g * (torch.cos(z) * w).conj(), g * torch.sin(z).conj()),
            lambda g, z, w: (g * torch.cos(z) * w, g * torch.sin(z).conj())),
    "abs2": (lambda z, w: (z * z.conj()).real * w,
             lambda g, z, w: (2 * z * (g * w.conj()).real, g * (z * z.conj()).real),
             lambda g, z, w: (2 * z.conj() * (g * w.conj()).real, g * (z * z.conj()).real)),
}


@functools.cache
def _complex_op(name: str, conjugated: bool) -> type:
    forward, right, wrong = COMPLEX_OPS[name]
    backward = right if conjugated else wrong

    class ComplexOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z, w):
            ctx.save_for_backward(z, w)
            return forward(z, w)

        @staticmethod
        def backward(ctx, g):
            z, w = ctx.saved_tensors
            return backward(g, z, w)

    ComplexOp.__name__ = f"{name}{'' if conjugated else '_missing_conj'}"
    return ComplexOp


def complex_op(name: str, z: torch.Tensor, w: torch.Tensor, missing_conj: bool = False) -> torch.Tensor:
    """``COMPLEX_OPS[name]`` of the complex tensors ``z`` and ``w`` (one shape, dtype and device) through a hand-written
    backward, right or (``missing_conj``) without the conjugate of ``z``'s derivative.

    Raises:
        KeyError: ``name`` not in :data:`COMPLEX_OPS`.
    """
    return _complex_op(name, not missing_conj).apply(z, w)
