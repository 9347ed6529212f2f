"""Complex tensors, in PyTorch's convention: every complex input and output is checked as its real pairs.

Rule: a complex tensor ``z = a + ib`` is its real view ``torch.view_as_real(z)`` (last dimension 2: ``a``, ``b``),
and a complex output its real view too, so that every check, mode and engine runs unchanged on a real function of
real tensors (:func:`as_pairs`). Autograd through ``view_as_complex``/``view_as_real`` is PyTorch's own convention:
for a real loss ``L``, the gradient autograd gives a complex leaf is ``dL/da + i dL/db`` (twice the conjugate
Wirtinger derivative ``dL/dz̄``), and a tensor-valued function's vector-Jacobian product is the conjugate Wirtinger
vjp that ``torch.autograd.gradcheck`` checks; the real Jacobian of the pairs is therefore what autograd's complex rules
imply, entry by entry, and a custom backward that drops a conjugate or gets an imaginary part wrong disagrees with
the finite differences of the real and imaginary parts it perturbs. Real-valued steps perturb ``a`` and ``b`` each;
a complex64 tensor's pairs are float32 and keep float32's trust.

Reports keep the real view's shape (last index 0 the real part, 1 the imaginary part), show the complex dtype, and
name the part of an entry (``[2, 1].im``); :func:`mark` sets that on the records.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["as_pairs", "has_complex", "mark", "to_complex"]


def has_complex(params: Sequence) -> bool:
    """Whether any of ``params`` is a complex tensor."""
    return any(isinstance(p, torch.Tensor) and p.is_complex() for p in params)


def _real(p: torch.Tensor) -> torch.Tensor:
    """The real pairs of a complex tensor, as a fresh leaf that requires grad where ``p`` does."""
    return torch.view_as_real(p.detach().resolve_conj()).clone().requires_grad_(p.requires_grad)


def _pairs_out(out):
    """``func``'s output with every complex tensor as its real pairs (the structure kept)."""
    def one(o):
        return torch.view_as_real(o.resolve_conj()) if isinstance(o, torch.Tensor) and o.is_complex() else o
    if isinstance(out, (tuple, list)):
        return [one(o) for o in out] if isinstance(out, list) else tuple(one(o) for o in out)
    return one(out)


def as_pairs(func: Callable, params: Sequence) -> tuple[Callable, tuple]:
    """``(pairs_func, pairs_params)``: ``params`` with every complex tensor as its real pairs (fresh leaves; the
    caller's are untouched), and ``pairs_func(*pairs_params)``, which views them back as complex for ``func`` and
    returns ``func``'s outputs with every complex one as its real pairs. ``pairs_func.complex_outputs`` collects the
    positions of the outputs that were complex (in a tuple, or 0 for a single tensor)."""
    complex_in = {k for k, p in enumerate(params) if isinstance(p, torch.Tensor) and p.is_complex()}

    def pairs_func(*args):
        out = func(*[torch.view_as_complex(a) if k in complex_in else a for k, a in enumerate(args)])
        outs = out if isinstance(out, (tuple, list)) else (out,)
        pairs_func.complex_outputs.update(j for j, o in enumerate(outs) if isinstance(o, torch.Tensor)
                                          and o.is_complex())
        return _pairs_out(out)

    pairs_func.complex_outputs = set()
    return pairs_func, tuple(_real(p) if k in complex_in else p for k, p in enumerate(params))


def to_complex(grad: torch.Tensor) -> torch.Tensor:
    """A gradient of a complex tensor's real pairs as the complex gradient PyTorch gives it: ``dL/da + i dL/db``."""
    return torch.view_as_complex(grad.contiguous())


def mark(report, params: Sequence, complex_outputs: set) -> None:
    """Mark ``report``'s records of complex inputs (``params[k]`` complex: the record shows its complex dtype) and of
    complex outputs (``output[j]``), so that their indices name the part (``.re``/``.im``)."""
    import re

    def complex_param(m) -> torch.dtype | None:
        p = params[int(m.group(1))] if m is not None else None
        return p.dtype if isinstance(p, torch.Tensor) and p.is_complex() else None

    for t in report.tensors:  # names: "params[k]", "output[j] wrt params[k]", "grad(params[j]) wrt params[k]" ...
        dtype = complex_param(re.search(r"(?:^|wrt )params\[(\d+)\]", t.name))  # (grad_outputs[i]: not a param)
        if dtype is not None:
            t.dtype, t.complex_input = dtype, True
        j = re.match(r"output\[(\d+)\]", t.name)
        if (j is not None and int(j.group(1)) in complex_outputs) or complex_param(
                re.match(r"grad\(params\[(\d+)\]\)", t.name)) is not None:
            t.complex_output = True
