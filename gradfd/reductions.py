"""Float64 reductions for the scalar losses of low-precision functions.

Float32, float16 and bfloat16 functions are evaluated in their own dtype, but their differences and the full
reductions of their losses are taken in float64. The reduction matters most: a float32 loss that sums or averages many
terms is rounded to ``eps32 * |loss|`` (6e-8 relative), and a step of one parameter entry moves it by little more than
that for most entries. Without this module that rounding alone holds the float32 median error on the smooth suite of
``benchmarks/bench_accuracy.py`` at 1.8e-5 (4-point stencil) and 5.7e-6 (Richardson extrapolation) at every step.

Under :class:`Float64Reductions`, the *full* reductions of a float32, float16 or bfloat16 tensor return a float64
0-d tensor; everything before them runs in ``func``'s dtype as ``func`` wrote it, and a 0-d float64 result combined
with a dimensioned tensor does not promote it (type promotion's rule for 0-d tensors), so the rest of ``func`` keeps
its dtypes too. The reductions:

- ``torch.sum`` / ``Tensor.sum`` / ``torch.mean`` / ``Tensor.mean`` over every dimension (``dim`` None or all of
  them, ``keepdim`` False, no ``dtype``);
- the ``"mean"`` and ``"sum"`` reductions of ``torch.nn.functional``'s elementwise losses (``mse_loss``,
  ``l1_loss``, ``smooth_l1_loss``, ``huber_loss``, ``binary_cross_entropy``,
  ``binary_cross_entropy_with_logits``) and of ``nll_loss`` / ``cross_entropy`` without class weights: the loss is
  computed with ``reduction="none"`` and the terms are reduced in float64 (the mean of ``nll_loss`` /
  ``cross_entropy`` over the targets not equal to ``ignore_index``).

The engine uses this only for scalar losses, and only after checking at the unperturbed point that the float64
loss equals ``func``'s own within ``max(1e-3, 16 eps)`` relative (so a reduction read wrongly can never change what is
checked: the engine then evaluates ``func`` as it is). Autograd's gradient always comes from ``func`` as it is.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)

_FULL = {torch.sum, torch.Tensor.sum, torch.mean, torch.Tensor.mean}
_MEANS = {torch.mean, torch.Tensor.mean}
_ELEMENTWISE_LOSSES = {F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy,
                       F.binary_cross_entropy_with_logits}
_CLASS_LOSSES = {F.nll_loss, F.cross_entropy}
_SIGNATURES = {f: inspect.signature(f) for f in _ELEMENTWISE_LOSSES | _CLASS_LOSSES}


def _full_reduction(args: tuple, kwargs: dict, batch_dims: int = 0, batch: int | None = None) -> torch.Tensor | None:
    """The input of a ``sum``/``mean`` call that reduces a low-precision tensor over every dimension (every one after
    the ``batch_dims`` leading batch dimensions, the first of size ``batch``), else None."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dtype not in LOW_PRECISION:
        return None
    x = args[0]
    if batch_dims and (x.dim() <= batch_dims or x.shape[0] != batch):  # a tensor without the batch: as written
        return None
    if set(kwargs) - {"dim", "keepdim"} or len(args) > 3:  # dtype=, out=: as written
        return None
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if keepdim:
        return None
    if dim is None:
        return None if batch_dims else x  # over the batch too: not one loss per row
    dims = (dim,) if isinstance(dim, int) else tuple(dim) if isinstance(dim, (list, tuple)) else None
    if not dims or not all(isinstance(d, int) for d in dims):
        return None
    n = max(x.dim(), 1)
    covered = {d % n for d in dims}
    return x if len(covered) == len(dims) and covered == set(range(batch_dims, n)) and n > batch_dims else None


class Float64Reductions(TorchFunctionMode):
    """A torch function mode in which full reductions of low-precision tensors return float64 (see the module).

    Args:
        batch_dims: leading batch dimensions a full reduction leaves (``func`` given the parameter stacked along a
            leading batch dimension reduces every other one: one float64 loss per row); the losses of
            ``torch.nn.functional`` are then left as written.
        batch: the size of the leading batch dimension: a tensor without it (a constant of ``func``'s) is reduced
            as written.

        measure: record ``quantum`` (reads values: not under vmap; the unperturbed evaluation does).

    Attributes:
        count: reductions taken in float64 so far.
        quantum: with ``measure``, the rounding of one term of the reductions taken: ``eps * mean |term|`` of the
            terms' dtype, over the number of terms for a mean; the finest over the reductions (0: none measured).
            A step that moves a few terms moves the loss in such quanta, however finely float64 sums them
            (:func:`gradfd.verdict.plan.evaluate_base` floors the measured noise there; the finest, since an
            intermediate reduction's units need not be the loss's).
    """

    def __init__(self, batch_dims: int = 0, batch: int | None = None, measure: bool = False) -> None:
        super().__init__()
        self.count = 0
        self.quantum = 0.0
        self.batch_dims, self.batch, self.measure = batch_dims, batch, measure

    def _took(self, terms: torch.Tensor, dtype: torch.dtype, count) -> None:
        """Count one reduction of ``terms`` (float64, of ``dtype``) over ``count`` terms (1 for a sum)."""
        self.count += 1
        if self.measure and terms.numel():
            quantum = torch.finfo(dtype).eps * float(terms.abs().sum()) / terms.numel() / max(float(count), 1.0)
            if quantum > 0:
                self.quantum = quantum if self.quantum == 0 else min(self.quantum, quantum)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FULL:
            x = _full_reduction(args, kwargs, self.batch_dims, self.batch)
            if x is not None:
                wide = x.to(torch.float64)
                self._took(wide, x.dtype, wide.numel() if func in _MEANS else 1)
                if self.batch_dims:
                    dims = tuple(range(self.batch_dims, wide.dim()))
                    return wide.mean(dim=dims) if func in _MEANS else wide.sum(dim=dims)
                return wide.mean() if func in _MEANS else wide.sum()
        elif func in _SIGNATURES and not self.batch_dims:
            out = self._loss(func, args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)

    def _loss(self, func, args: tuple, kwargs: dict) -> torch.Tensor | None:
        try:
            bound = _SIGNATURES[func].bind(*args, **kwargs)
        except TypeError:
            return None
        a = bound.arguments
        inp = a.get("input")
        reduction = a.get("reduction", "mean")
        if (not isinstance(inp, torch.Tensor) or inp.dtype not in LOW_PRECISION or reduction not in ("mean", "sum")
                or a.get("size_average") is not None or a.get("reduce") is not None):
            return None
        target = a.get("target")
        if func in _CLASS_LOSSES and a.get("weight") is not None:
            return None  # the weighted mean divides by the targets' weights: left as written
        a["reduction"] = "none"
        terms = func(*bound.args, **bound.kwargs).to(torch.float64)
        if reduction == "sum":
            self._took(terms, inp.dtype, 1)
            return terms.sum()
        if func in _CLASS_LOSSES and isinstance(target, torch.Tensor) and not target.is_floating_point():
            ignore = a.get("ignore_index", -100)
            count = (target != ignore).sum()
            self._took(terms, inp.dtype, count)
            return terms.sum() / count
        self._took(terms, inp.dtype, terms.numel())
        return terms.mean()


def wrap(func: Callable, mode_factory: Callable[[], Float64Reductions] = Float64Reductions) -> Callable:
    """``func`` evaluated under a fresh :class:`Float64Reductions` at every call."""

    def in_float64(*args):
        with mode_factory():
            return func(*args)

    return in_float64


# How far the float64-reduced loss may be from func's own for the reduction to be taken as read right: a relative
# CONSISTENT_REL, or CONSISTENT_EPS roundings of func's dtype where that is more (float16, bfloat16). A reduction read
# wrongly changes the loss by far more
# (tests/test_reductions.py::test_a_func_whose_value_changes_under_the_mode_is_evaluated_as_written).
CONSISTENT_REL = 1e-3
CONSISTENT_EPS = 16


def consistent(plain: torch.Tensor, wide: torch.Tensor) -> bool:
    """Whether the float64-reduced loss ``wide`` is ``func``'s own loss ``plain`` up to ``plain``'s rounding:
    within ``max(CONSISTENT_REL, CONSISTENT_EPS eps)`` relative (both one-element; NaN never)."""
    if not (isinstance(wide, torch.Tensor) and wide.numel() == 1 and wide.is_floating_point()):
        return False
    p, w = float(plain), float(wide)
    tol = max(CONSISTENT_REL, CONSISTENT_EPS * torch.finfo(plain.dtype).eps) * max(abs(p), abs(w))
    return abs(p - w) <= tol
