"""Second order: the double backward checked as the first-order Jacobian of autograd's first-order gradient.

Rule: a second derivative is checked by finite differences of the *analytical* first-order gradient, never by second
differences of ``func``. :func:`gradient_function` turns ``func`` into ``g(*params) = vjp of func at params``; the
usual first-order check of ``g`` (any ``mode``) then compares its finite differences with autograd's derivative of
``g``, which is the double backward (a vjp of the vjp). ``gradfd.check(..., order=2)`` and
:func:`gradfd.gradgradcheck` are that check, so that the verdicts, error estimates and float32 trust of first order
carry over unchanged: full mode checks one Hessian (double-vjp) column per input entry, sample mode sampled columns,
directional mode ``uᵀ H v`` for random ``u`` and ``v``.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD

from . import engine as _engine

__all__ = ["gradient_function", "SeededCotangents", "rename"]


def _tensors(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def gradient_function(func: Callable, wrt: Sequence[int], cotangents: int | Callable[[list], list] = 0) -> Callable:
    """``g(*args)``: autograd's gradient of ``func``'s differentiable outputs, weighted by cotangents, with respect to
    ``args[k]`` for ``k`` in ``wrt``, as a tuple of tensors (zeros where ``func`` does not depend on an input).

    Args:
        func: ``func(*args[:len(args) - cotangents])`` when ``cotangents`` is an int; else ``func(*args)``.
        wrt: positions of the inputs to differentiate.
        cotangents: an int ``c``: the last ``c`` arguments of ``g`` are the output gradients, one per
            differentiable output of ``func`` in order (``torch.autograd.gradgradcheck``'s ``grad_outputs``); or a
            callable mapping the list of differentiable outputs to their gradients (fixed ones). One-element outputs
            with no cotangent given (``c == 0``) take 1.

    Where ``g``'s inputs require grad (autograd's side of a check), the gradient is taken with ``create_graph=True``
    so that it can be differentiated again; at the finite differences' points (no input requires grad, grad mode may
    be off) the inputs are made leaves of a private graph and the gradient is a plain value. A ``func`` whose
    backward does not build a graph (a ``detach`` in a hand-written backward) gives a gradient without ``grad_fn``
    that still moves with the inputs: the check then compares the finite differences with zeros and fails.
    """
    wrt = list(wrt)

    def g(*args):
        n = len(args) - cotangents if isinstance(cotangents, int) else len(args)
        inputs, given = list(args[:n]), list(args[n:])
        outer = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        with torch.enable_grad():
            for k in wrt:
                if not inputs[k].requires_grad:  # a private leaf (keeping a forward-mode tangent: fwd-over-rev)
                    primal, tangent = fwAD.unpack_dual(inputs[k])
                    leaf = primal.detach().requires_grad_()
                    inputs[k] = leaf if tangent is None else fwAD.make_dual(leaf, tangent)
            outs = [o for o in _tensors(func(*inputs)) if isinstance(o, torch.Tensor) and o.requires_grad]
            xs = [inputs[k] for k in wrt]
            if not outs:
                return tuple(torch.zeros_like(x) for x in xs)
            if callable(cotangents):
                cots = cotangents(outs)
            elif given:
                cots = given
            else:
                cots = [torch.ones_like(o) for o in outs]
            if len(cots) != len(outs):
                raise ValueError(f"grad_outputs: expected one per differentiable output ({len(outs)}), got "
                                 f"{len(cots)}")
            with _engine.noting("gradfd: raised in the backward of func, computing the first-order gradient that "
                                "order 2 differentiates"):
                grads = torch.autograd.grad(outs, xs, cots, create_graph=outer, allow_unused=True)
        grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(xs, grads)]
        if outer:
            for i, gr in enumerate(grads):
                if not gr.requires_grad:  # no graph: a detach lost the double backward (or func is linear)
                    g.lost.add(wrt[i])
                    grads[i] = _ZeroDerivative.apply(gr, *xs)
        return tuple(grads)

    g.lost = set()
    return g


class _ZeroDerivative(torch.autograd.Function):
    """``value`` itself, attached to ``inputs`` with a zero derivative.

    Rule: a first-order gradient without a graph, although its inputs require grad, is what autograd says it is -- a
    constant -- so its derivative is compared as zero, never left out: where it does move with the inputs (a
    ``detach`` in a hand-written backward lost the double backward), the finite differences disagree and name it."""

    @staticmethod
    def forward(ctx, value, *inputs):
        ctx.count = len(inputs)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return (None,) * (1 + ctx.count)


class SeededCotangents:
    """Fixed Gaussian output gradients for ``gradfd.check(..., order=2)`` of a tensor-valued ``func``: one per
    differentiable output, in its dtype and device, drawn once from ``seed`` (1 for a one-element output)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.values: list[torch.Tensor] | None = None

    def __call__(self, outs: list) -> list:
        if self.values is None or [v.shape for v in self.values] != [o.shape for o in outs]:
            gen = torch.Generator().manual_seed(self.seed)
            self.values = [torch.ones_like(o) if o.numel() == 1 else
                           torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype).to(o.device)
                           for o in outs]
        return [v.to(o.dtype) for v, o in zip(self.values, outs)]


def rename(report, wrt: Sequence[int], lost: set) -> None:
    """Name ``order=2``'s records by the gradient they differentiate: ``output[i]`` of the gradient function is
    ``grad(params[wrt[i]])``; mark them ``details["order"] = 2``; note the gradients ``lost`` (of ``params[k]``, for
    ``k`` in it) that had no graph."""
    for t in report.tensors:
        t.name = re.sub(r"output\[(\d+)\]", lambda m: f"grad(params[{wrt[int(m.group(1))]}])", t.name)
        t.name = t.name.replace("outputs wrt", "grads wrt").replace("(u^T J v)", "(u^T H v)")
        t.details["order"] = 2
    report.notes = [re.sub(r"output\[(\d+)\]", lambda m: f"grad(params[{wrt[int(m.group(1))]}])", n)
                    for n in report.notes]
    report.notes += [f"the first-order gradient of params[{k}] has no autograd graph (a backward that builds none: "
                     f"a detach, or a function linear in the inputs); its derivatives were compared as zero"
                     for k in sorted(lost)]
