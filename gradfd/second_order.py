"""Second order: the double backward checked as the first-order Jacobian of autograd's first-order gradient.

Rule: a second derivative is checked by finite differences of the *analytical* first-order gradient, never by second
differences of ``func``. :func:`gradient_function` turns ``func`` into ``g(*params, *grad_outputs) = the vjp of
func at params with grad_outputs``, as ``torch.autograd.gradgradcheck`` does; the usual first-order check of ``g``
(any ``mode``) then compares its finite differences with autograd's derivative of ``g``, which is the double backward
(a vjp of the vjp), with respect to the params and to the output gradients (a backward that detaches its output
gradient is caught there). ``gradfd.check(..., order=2)`` and :func:`gradfd.gradgradcheck` are that check, so that
the verdicts, error estimates and float32 trust of first order carry over unchanged: full mode checks one Hessian
(double-vjp) column per input entry, sample mode sampled columns, directional mode ``uᵀ H v`` for random ``u``,
``v``.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Callable, Iterator, Sequence

import torch
import torch.autograd.forward_ad as fwAD

from . import engine as _engine
from .errors import FallbackWarning

__all__ = ["gradient_function", "differentiable_outputs", "output_gradients", "rename", "unbatchable"]


@contextlib.contextmanager
def unbatchable() -> Iterator[None]:
    """Around a check of :func:`gradient_function`: its function makes its own autograd leaves, which vmap and a
    stacked batch cannot run, so the engine's fallback to the loop is expected and not warned about (the records'
    ``details["batching"]`` still say which ran; the colored pass, which batches on its own, is unaffected)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="gradfd: func cannot be evaluated batched", category=FallbackWarning)
        yield


def _tensors(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def differentiable_outputs(func: Callable, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``func``'s outputs that autograd can differentiate (they require grad), from one forward on clones of
    ``params`` (those requiring grad keep requiring it), from the caller's RNG state, with TF32 off; the caller's
    tensors and RNG state are unchanged."""
    rng = _engine.RngGuard()
    try:
        with _engine.no_tf32(), torch.enable_grad(), _engine.noting(
                "gradfd: raised while evaluating func to find its differentiable outputs (on clones)"):
            out = func(*[p.detach().clone().requires_grad_(p.requires_grad and (p.is_floating_point() or
                                                                                  p.is_complex()))
                         if isinstance(p, torch.Tensor) else p for p in params])
    finally:
        rng.close()
    return [o.detach() for o in _tensors(out) if isinstance(o, torch.Tensor) and o.requires_grad]


def output_gradients(func: Callable, params: Sequence[torch.Tensor], seed: int) -> tuple[torch.Tensor, ...]:
    """``order=2``'s output gradients: one per differentiable output, seeded Gaussian in its dtype and device (1 for
    a one-element real output: a loss's gradient is its vjp with 1; a complex output's has both parts random, so
    that a double backward wrong in the imaginary part of its output gradient is seen), requiring grad, so that the
    check differentiates them too."""
    gen = torch.Generator().manual_seed(seed)
    return tuple((torch.ones_like(o) if o.numel() == 1 and not o.is_complex() else
                  torch.randn(o.shape, generator=gen, dtype=torch.complex128 if o.is_complex() else torch.float64
                              ).to(o.dtype).to(o.device)).requires_grad_()
                 for o in differentiable_outputs(func, params))


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a non-contiguous layout (every other element of a doubled last dimension), out of place
    (differentiable, batchable), as ``torch.testing.make_tensor(noncontiguous=True)`` lays them out."""
    return torch.stack((t, torch.zeros_like(t)), dim=-1)[..., 0] if t.dim() else t


def gradient_function(func: Callable, wrt: Sequence[int], count: int, noncontiguous: bool = False) -> Callable:
    """``g(*inputs, *grad_outputs)``: autograd's gradient of ``func(*inputs)``'s differentiable outputs, with the last
    ``count`` arguments as their output gradients (``torch.autograd.gradgradcheck``'s ``new_func``), with respect to
    ``inputs[k]`` for ``k`` in ``wrt``, as a tuple of tensors (zeros where ``func`` does not use an input).

    Args:
        func: the function; its differentiable outputs must be ``count``.
        wrt: positions (among ``inputs``) of the inputs to differentiate.
        count: how many trailing arguments are output gradients.
        noncontiguous: hand the backward its output gradients in a non-contiguous layout (every evaluation,
            whatever layout the check's private copies have): ``gen_non_contig_grad_outputs``.

    Where an input requires grad or carries a forward-mode tangent (autograd's side of a check, forward over
    reverse), the gradient is taken with ``create_graph=True`` so that it can be differentiated again; at the finite
    differences' points the inputs are made leaves of a private graph and the gradient is a plain value. A gradient
    without a graph although its inputs require grad (a ``detach`` in a hand-written backward, or a ``func`` linear
    in them) is attached with a zero derivative (:class:`_ZeroDerivative`), so that the check compares its finite
    differences with zero, and its input is added to ``g.lost``.

    Raises:
        ValueError: naming ``grad_outputs``, when ``func``'s differentiable outputs are not ``count``.
    """
    wrt = list(wrt)

    def g(*args):
        n = len(args) - count
        inputs, cots = list(args[:n]), list(args[n:])
        graph = any(isinstance(a, torch.Tensor) and (a.requires_grad or fwAD.unpack_dual(a).tangent is not None)
                    for a in args)
        outer = torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        with torch.enable_grad():
            for k in wrt:
                if not inputs[k].requires_grad:  # a private leaf (keeping a forward-mode tangent: fwd-over-rev)
                    primal, tangent = fwAD.unpack_dual(inputs[k])
                    leaf = primal.detach().requires_grad_()
                    inputs[k] = leaf if tangent is None else fwAD.make_dual(leaf, tangent)
            outs = [o for o in _tensors(func(*inputs)) if isinstance(o, torch.Tensor) and o.requires_grad]
            xs = [inputs[k] for k in wrt]
            if len(cots) != len(outs):
                raise ValueError(f"grad_outputs: expected one per differentiable output of func ({len(outs)}), got "
                                 f"{len(cots)}")
            if noncontiguous:
                cots = [_noncontiguous(c) for c in cots]
            grads = (torch.autograd.grad(outs, xs, cots, create_graph=graph, allow_unused=True) if outs
                     else [None] * len(xs))
        out = []
        for k, x, gr in zip(wrt, xs, grads):
            if gr is None:  # func does not use the input: a zero gradient, whose derivative is zero
                gr = torch.zeros_like(x)
            elif outer and not gr.requires_grad:
                g.lost.add(k)
            out.append(_ZeroDerivative.apply(gr, *xs, *cots) if outer and not gr.requires_grad else gr)
        return tuple(out)

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


def rename(report, wrt: Sequence[int], n: int, lost: set) -> None:
    """Name the records of a check of :func:`gradient_function` by what they differentiate: its output ``i`` is
    ``grad(params[wrt[i]])``, its input ``params[n + i]`` is ``grad_outputs[i]``; in every text of the report (names,
    notes, findings). Mark the records ``details["order"] = 2`` and note the gradients (of ``params[k]``, ``k`` in
    ``lost``) that had no graph."""
    def sub(text: str) -> str:
        text = re.sub(r"params\[(\d+)\]", lambda m: f"grad_outputs[{int(m.group(1)) - n}]"
                      if int(m.group(1)) >= n else m.group(0), text)
        text = re.sub(r"output\[(\d+)\]", lambda m: f"grad(params[{wrt[int(m.group(1))]}])", text)
        text = re.sub(r"output (\d+)", lambda m: f"grad(params[{wrt[int(m.group(1))]}])", text)
        return text.replace("outputs wrt", "grads wrt").replace("(u^T J v)", "(u^T H v)")

    for t in report.tensors:
        t.name = sub(t.name)
        t.undefined_grad = sub(t.undefined_grad) if t.undefined_grad else t.undefined_grad
        t.findings = {rule: sub(text) for rule, text in t.findings.items()}
        t.details = {key: sub(v) if isinstance(v, str) else v for key, v in t.details.items()}
        t.details["order"] = 2
    report.notes = [sub(note) for note in report.notes] + [
        f"the first-order gradient of params[{k}] has no autograd graph (its backward builds none: a detach, or a "
        f"function linear in the inputs); its derivatives were compared as zero" for k in sorted(lost)]
