"""The lesson's algorithm, made runnable: the naive per-element central-difference loop.

This module is gradfd's baseline. It is deliberately the obvious loop -- clone every parameter, nudge one
element by ``+h`` and ``-h``, call ``func`` twice, divide by ``2h`` -- so that the batched engine
(:mod:`gradfd.engine`) can be tested and timed against something whose correctness is evident by reading it.
The lesson iterated with ``torch.nditer``, which does not exist; here the loop walks ``itertools.product``
over the parameter's index space instead.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch

__all__ = ["numerical_gradient"]


def numerical_gradient(
    func: Callable[..., torch.Tensor],
    params: Sequence[torch.Tensor],
    param_idx: int,
    h: float = 1e-5,
) -> torch.Tensor:
    """Central-difference gradient of ``func(*params)`` with respect to ``params[param_idx]``, one element at a time.

    Args:
        func: called as ``func(*params)``; must return a tensor with a single element (the loss).
        params: the arguments of ``func``. They are never modified: every evaluation gets fresh clones.
        param_idx: index into ``params`` of the floating-point or complex tensor to differentiate. For a complex
            one (and a real loss) the gradient is PyTorch's: ``dL/da + i dL/db`` for ``z = a + ib``, each part by
            its own central difference (twice the calls).
        h: absolute step (default ``1e-5``, the lesson's). The estimate is
            ``(f(x + h e_i) - f(x - h e_i)) / (2 h)``.

    Returns:
        A tensor with the shape, dtype and device of ``params[param_idx]``.

    Cost: ``2 * numel`` calls of ``func``, each on ``len(params)`` cloned tensors. Use
    :func:`gradfd.numerical_gradient` for the batched engine with the same signature.
    """
    target = params[param_idx]
    grad = torch.zeros_like(target)
    for idx in itertools.product(*(range(n) for n in target.shape)):
        value = 0.0
        for unit in (1, 1j) if target.is_complex() else (1,):  # a complex entry: its real, then imaginary part
            with torch.no_grad():
                plus = [p.detach().clone() for p in params]
                minus = [p.detach().clone() for p in params]
                plus[param_idx][idx] += unit * h
                minus[param_idx][idx] -= unit * h
                f_plus = func(*plus).item()
                f_minus = func(*minus).item()
            value += unit * (f_plus - f_minus) / (2 * h)
        grad[idx] = value
    return grad
