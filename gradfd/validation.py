"""Argument checks shared by every entry point: each error names the argument, what was expected and what came.

Imports nothing of gradfd's.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["describe", "check_params", "check_checkable", "check_positive_int", "check_step", "check_choice",
           "validate_scalar_output"]


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    return f"{type(x).__name__} {x!r}" if not isinstance(x, (list, tuple)) else type(x).__name__


def check_params(params, param_idx: int | None = None) -> tuple[list[torch.Tensor], int | None]:
    """Validate ``params`` (and ``param_idx``); return them as a list and the normalised index.

    Raises:
        TypeError / ValueError / IndexError naming the argument, what was expected and what was passed.
    """
    if isinstance(params, torch.Tensor) or not isinstance(params, (tuple, list)):
        raise TypeError(
            f"params must be a tuple or list of tensors (the arguments of func), got {describe(params)}; "
            "wrap a single tensor as (tensor,)"
        )
    params = list(params)
    for k, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{k}] must be a torch.Tensor, got {describe(p)}")
        if p.layout != torch.strided or p.is_nested or p.is_quantized:
            raise TypeError(f"params[{k}] is a {p.layout} tensor; gradfd supports dense (strided) tensors only")
    devices = {p.device for p in params}
    if len(devices) > 1:
        where = ", ".join(f"params[{k}] on {p.device}" for k, p in enumerate(params))
        raise ValueError(f"params must all be on one device, got {where}; move them with .to(device)")
    if param_idx is None:
        return params, None
    if isinstance(param_idx, bool) or not isinstance(param_idx, int):
        raise TypeError(f"param_idx must be an int, got {describe(param_idx)}")
    if not -len(params) <= param_idx < len(params):
        raise IndexError(f"param_idx must be in [0, {len(params)}) for {len(params)} params, got {param_idx}")
    param_idx %= len(params)
    check_checkable(params[param_idx], f"params[{param_idx}]")
    return params, param_idx


def check_checkable(p: torch.Tensor, name: str) -> None:
    """Raise unless ``p`` is a real floating-point tensor that finite differences can perturb."""
    if p.is_complex():
        raise TypeError(
            f"{name} is complex ({p.dtype}); this entry point differentiates real tensors: gradfd.check, the "
            "drop-ins and gradfd.numerical_gradient take complex ones (as real pairs), or pass "
            f"torch.view_as_real({name}) and adapt func"
        )
    if not p.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float64, float32, float16 or bfloat16) to be "
            f"differentiated, got dtype {p.dtype}"
        )


def check_positive_int(value, name: str, allow_none: bool = True) -> int | None:
    """``value`` as an int > 0 (or None when allowed); TypeError/ValueError naming ``name`` otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {describe(value)}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def check_step(h, name: str = "h") -> float:
    """``h`` as a finite float > 0; TypeError/ValueError naming the argument otherwise."""
    if isinstance(h, bool) or not isinstance(h, (int, float)):
        raise TypeError(f"{name} must be a positive finite float, got {describe(h)}")
    h = float(h)
    if not math.isfinite(h) or h <= 0:
        raise ValueError(f"{name} must be a positive finite float, got {h}")
    return h


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; ValueError naming the argument otherwise."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def validate_scalar_output(out, detach: bool = True) -> torch.Tensor:
    """``out`` as a 0-d tensor (detached unless ``detach=False``); TypeError/ValueError naming ``func`` when it is
    not one floating value."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"func must return a scalar tensor (the loss), got {describe(out)}")
    if out.numel() != 1:
        raise ValueError(
            f"func must return a scalar tensor (one element), got shape {tuple(out.shape)}; reduce it (e.g. "
            ".sum() or .mean()), or use gradfd.check for tensor-valued functions"
        )
    if not out.is_floating_point():
        raise TypeError(f"func must return a floating-point loss, got dtype {out.dtype}")
    return (out.detach() if detach else out).reshape(())
