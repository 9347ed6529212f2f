"""The structured engine's native ops: typed wrappers over ``torch.ops.gradfd.linear_update``,
``torch.ops.gradfd.linear_update_mse`` and ``torch.ops.gradfd.outer_update_nll`` (csrc/structured.cpp), their fake
kernels, and a pure-PyTorch reference for each.

The activations the fused kernel knows live here too (:data:`ACTIVATIONS`, the aten ops that are those activations,
and their PyTorch functions). How the engine decides to use a kernel lives with the values and handlers, not here.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import ops

__all__ = ["ACTIVATIONS", "ACTIVATION_OPS", "ACTIVATION_FUNCS", "MAX_NODES", "linear_update",
           "linear_update_reference", "linear_update_mse", "linear_update_mse_reference", "outer_update_nll",
           "outer_update_nll_reference"]

aten = torch.ops.aten

ACTIVATIONS = {None: 0, "tanh": 1, "relu": 2, "sigmoid": 3}  # activation name -> the kernel's activation code
ACTIVATION_OPS = {aten.tanh.default: "tanh", aten.relu.default: "relu", aten.sigmoid.default: "sigmoid"}
ACTIVATION_FUNCS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}
MAX_NODES = 16  # stencil nodes per coordinate in linear_update_mse at most (kMaxNodes in csrc/structured.h)

_fakes_registered = False


def _ensure_fakes() -> None:
    """Register the fake (meta) kernels of this module's ops (once the extension is loaded)."""
    global _fakes_registered
    if _fakes_registered or not ops.kernels_available():
        return

    @torch.library.register_fake("gradfd::linear_update")
    def _linear_update_fake(base, features, column, feature, delta):
        return base.new_empty((column.shape[0], base.shape[0]))

    @torch.library.register_fake("gradfd::linear_update_mse")
    def _linear_update_mse_fake(base, features, target, column, feature, delta, activation):
        return base.new_empty((delta.shape[0], column.shape[0]), dtype=torch.float64)

    @torch.library.register_fake("gradfd::outer_update_nll")
    def _outer_update_nll_fake(base, bias, rows, cols, target, weight, ignore_index):
        return base.new_empty((rows.shape[0],), dtype=torch.float64)

    _fakes_registered = True


def linear_update(base: torch.Tensor, features: torch.Tensor, column: torch.Tensor, feature: torch.Tensor,
                  delta: torch.Tensor) -> torch.Tensor:
    """Moved output columns of a product linear in the perturbed parameter, without re-running the product.

    Args:
        base: ``(n, K)`` floating, contiguous: the product's unperturbed output, one column per region.
        features: ``(n, D)``, base's dtype, contiguous: the columns the outputs move along.
        column: ``(C,)`` int64 in ``[0, K)``: the moved output column of each perturbation.
        feature: ``(C,)`` int64 in ``[0, D)``: the feature column it moves along.
        delta: ``(C,)`` float64: how far (the parameter's realised displacement).

    Returns:
        ``(C, n)`` in base's dtype: ``round(base[:, column[c]] + delta[c] * features[:, feature[c]])``, computed in
        float64 and rounded once.

    Raises:
        RuntimeError from the op, naming ``gradfd::linear_update``, on wrong shapes, dtypes, devices or indices;
        :class:`gradfd.ops.KernelsUnavailableError` when the extension could not be loaded.
    """
    ops.require_kernels()
    _ensure_fakes()
    return torch.ops.gradfd.linear_update(base, features, column, feature, delta)


def linear_update_reference(base: torch.Tensor, features: torch.Tensor, column: torch.Tensor, feature: torch.Tensor,
                            delta: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch twin of :func:`linear_update` (same arguments, same result)."""
    moved = base[:, column].t().double() + delta.unsqueeze(1) * features[:, feature].t().double()
    return moved.to(base.dtype)


def linear_update_mse(base: torch.Tensor, features: torch.Tensor, target: torch.Tensor, column: torch.Tensor,
                      feature: torch.Tensor, delta: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """How each perturbation changes the squared-error sum of a moved column, summing the changed terms only, in one
    pass that reads each input once per coordinate.

    Args:
        base, features, column, feature: as in :func:`linear_update` (``C`` coordinates).
        target: ``(n, K)``, base's dtype, contiguous: subtracted after the activation.
        delta: ``(S, C)`` float64, ``1 <= S <= 16``: the displacement at each stencil node of each coordinate.
        activation: None, ``"tanh"``, ``"relu"`` or ``"sigmoid"``, evaluated in base's dtype.

    Returns:
        ``(S, C)`` float64: ``sum_r [(act(round(base[r, j] + delta[s, c] * features[r, i])) - target[r, j])**2
        - (act(base[r, j]) - target[r, j])**2]`` with ``j = column[c]``, ``i = feature[c]``: every term is an element's
        squared error at the perturbed point minus the same at the base point, both evaluated; differences, squares
        and the sum in float64.

    Raises:
        RuntimeError from the op, naming ``gradfd::linear_update_mse``, on bad arguments; ValueError for an unknown
        activation; :class:`gradfd.ops.KernelsUnavailableError` when the extension could not be loaded.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    ops.require_kernels()
    _ensure_fakes()
    return torch.ops.gradfd.linear_update_mse(base, features, target, column, feature, delta, ACTIVATIONS[activation])


def linear_update_mse_reference(base: torch.Tensor, features: torch.Tensor, target: torch.Tensor,
                                column: torch.Tensor, feature: torch.Tensor, delta: torch.Tensor,
                                activation: str | None = None) -> torch.Tensor:
    """Pure-PyTorch twin of :func:`linear_update_mse` (same arguments, same result)."""
    s, c = delta.shape
    moved = (base[:, column].t().double().unsqueeze(0)
             + delta.unsqueeze(2) * features[:, feature].t().double().unsqueeze(0)).to(base.dtype)  # (S, C, n)
    at_base = base[:, column].t()  # (C, n)
    if activation is not None:
        moved, at_base = ACTIVATION_FUNCS[activation](moved), ACTIVATION_FUNCS[activation](at_base)
    y = target[:, column].t().double()
    diff, diff0 = moved.double() - y.unsqueeze(0), at_base.double() - y
    return (diff * diff - (diff0 * diff0).unsqueeze(0)).sum(-1)


def outer_update_nll(base: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor,
                     target: torch.Tensor, weight: torch.Tensor | None = None,
                     ignore_index: int = -100) -> torch.Tensor:
    """How each perturbation changes the summed negative log-likelihood of a product's output moved by an outer
    product (a replaced input column, or a replaced weight row), a bias and a log-softmax over classes, in one pass
    that never writes the moved logits out.

    Args:
        base: ``(n, K)`` floating, contiguous, ``K >= 1``: the product's unperturbed output (before the bias).
        bias: ``(K,)`` in base's dtype, contiguous, or None.
        rows: ``(B, n)`` float64, contiguous; cols: ``(B, K)`` float64, contiguous: perturbation ``b`` moves
            ``base[r, k]`` by ``rows[b, r] * cols[b, k]``.
        target: ``(n,)`` int64: each row's class, in ``[0, K)`` or equal to ``ignore_index``.
        weight: ``(K,)`` class weights in base's dtype, or None (all 1).
        ignore_index: the target value of rows left out (default -100, as in ``cross_entropy``).

    Returns:
        ``(B,)`` float64: ``sum_r [nll(logits_b[r], target[r]) - nll(logits[r], target[r])]`` with
        ``logits_b = round(round(base + rows[b, :, None] * cols[b, None, :]) + bias)`` (the move in float64, rounded
        once to base's dtype; the bias added in the op-math type and rounded), ``logits`` the same at a zero move, and
        ``nll(x, t) = round(-weight[t] * round(log_softmax(x)[t]))``, 0 on ignored rows. The log-softmax runs in
        base's op-math type (on a CPU, float exp by a polynomial within 1.5 ulp); differences and the sum in float64.

    Raises:
        RuntimeError from the op, naming ``gradfd::outer_update_nll``, on wrong shapes, dtypes, devices or targets;
        :class:`gradfd.ops.KernelsUnavailableError` when the extension could not be loaded.
    """
    ops.require_kernels()
    _ensure_fakes()
    return torch.ops.gradfd.outer_update_nll(base, bias, rows, cols, target, weight, ignore_index)


def outer_update_nll_reference(base: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor,
                               target: torch.Tensor, weight: torch.Tensor | None = None,
                               ignore_index: int = -100) -> torch.Tensor:
    """Pure-PyTorch twin of :func:`outer_update_nll` (same arguments; the same result up to the log-softmax's
    rounding, which PyTorch's kernel sums in another order)."""

    def terms(moved: torch.Tensor) -> torch.Tensor:  # (B, n, K) logits before the bias -> (B, n) float64 terms
        logits = moved if bias is None else moved + bias
        logp = torch.log_softmax(logits, -1)
        keep = target != ignore_index
        safe = torch.where(keep, target, torch.zeros_like(target))
        w = weight[safe] if weight is not None else torch.ones_like(logp[0, :, 0])
        picked = logp.gather(2, safe.view(1, -1, 1).expand(logp.shape[0], -1, 1)).squeeze(2)
        return torch.where(keep, -picked * w, torch.zeros_like(picked)).double()  # an ignored row is 0

    moved = (base.double().unsqueeze(0) + rows.unsqueeze(2) * cols.unsqueeze(1)).to(base.dtype)
    return (terms(moved) - terms(base.unsqueeze(0))).sum(1)
