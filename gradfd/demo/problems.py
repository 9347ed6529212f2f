"""Loss functions used by the demo, the tests and the benchmarks: the lesson's models and a few more.

Each builder returns ``(func, params)`` with ``func(*params)`` a scalar loss, seeded so that a problem is the
same on every call. Parameters are created with ``requires_grad=True`` (for :func:`gradfd.check`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["lesson_data", "linear_regression", "quadratic_regression", "mlp", "Problem"]

Problem = tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lesson_data(n: int = 20, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The lesson's data: ``X = linspace(-1, 1, n)`` as ``(n, 1)``, ``y = 2X + 3 + 0.1*noise``."""
    g = _generator(seed)
    x = torch.linspace(-1, 1, n, dtype=torch.float64).unsqueeze(1)
    y = 2 * x + 3 + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def linear_regression(
    d: int = 1, n: int = 20, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu", seed: int = 0
) -> Problem:
    """The lesson's linear regression ``mean((X @ w + b - y)**2)`` with ``w`` of shape ``(d, 1)``.

    ``d = 1`` uses the lesson's data exactly; larger ``d`` draws ``X ~ N(0, 1/d)`` with ``n`` rows.
    Params: ``(w, b)``, shapes ``(d, 1)`` and ``(1,)``.
    """
    g = _generator(seed)
    if d == 1:
        X, y = lesson_data(n, torch.float64, seed)
    else:
        X = torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        y = X @ torch.randn(d, 1, generator=g, dtype=torch.float64) + 0.1 * torch.randn(n, 1, generator=g,
                                                                                       dtype=torch.float64)
    w = torch.randn(d, 1, generator=g, dtype=torch.float64)
    b = torch.randn(1, generator=g, dtype=torch.float64)
    X, y = X.to(device, dtype), y.to(device, dtype)

    def loss(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((X @ w + b - y) ** 2).mean()

    return loss, tuple(t.to(device, dtype).requires_grad_() for t in (w, b))


def quadratic_regression(n: int = 20, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu",
                         seed: int = 0) -> Problem:
    """The lesson's exercise 1: ``y = w2 * x**2 + w1 * x + b`` on the lesson's data, MSE loss.

    Params: ``(w1, w2, b)``, each of shape ``(1,)``.
    """
    X, y = lesson_data(n, torch.float64, seed)
    g = _generator(seed + 1)
    w1, w2, b = (torch.randn(1, generator=g, dtype=torch.float64) for _ in range(3))
    X, y = X.to(device, dtype), y.to(device, dtype)

    def loss(w1: torch.Tensor, w2: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((w2 * X**2 + w1 * X + b - y) ** 2).mean()

    return loss, tuple(t.to(device, dtype).requires_grad_() for t in (w1, w2, b))


def mlp(d: int = 16, k: int = 16, c: int = 4, n: int = 64, activation: str = "tanh",
        dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu", seed: int = 0) -> Problem:
    """A one-hidden-layer MLP ``Linear(d, k) -> tanh|relu -> Linear(k, c)`` with an MSE loss.

    Params: ``(W1, b1, W2, b2)`` with shapes ``(d, k)``, ``(k,)``, ``(k, c)``, ``(c,)`` (used as ``X @ W1``).
    """
    g = _generator(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.randn(n, c, generator=g, dtype=torch.float64)
    W1 = torch.randn(d, k, generator=g, dtype=torch.float64) / math.sqrt(d)
    b1 = 0.1 * torch.randn(k, generator=g, dtype=torch.float64)
    W2 = torch.randn(k, c, generator=g, dtype=torch.float64) / math.sqrt(k)
    b2 = 0.1 * torch.randn(c, generator=g, dtype=torch.float64)
    act = {"tanh": torch.tanh, "relu": torch.relu}[activation]
    X, Y = X.to(device, dtype), Y.to(device, dtype)

    def loss(W1: torch.Tensor, b1: torch.Tensor, W2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        return ((act(X @ W1 + b1) @ W2 + b2 - Y) ** 2).mean()

    return loss, tuple(t.to(device, dtype).requires_grad_() for t in (W1, b1, W2, b2))


def resnet_block(c: int = 8, n: int = 4, s: int = 8, dtype: torch.dtype = torch.float64,
                 device: str | torch.device = "cpu", seed: int = 0) -> Problem:
    """A ResNet basic block ``relu(x + bn2(conv2(relu(bn1(conv1(x))))))`` (3x3 convolutions, padding 1, BatchNorm
    in eval mode with running statistics of a trained network) under a mean-square loss; ``x`` is ``(n, c, s, s)``.

    Params: ``(W1, W2)``, the two convolution weights, each ``(c, c, 3, 3)``.
    """
    g = _generator(seed)
    x = torch.randn(n, c, s, s, generator=g, dtype=torch.float64)
    W1, W2 = (torch.randn(c, c, 3, 3, generator=g, dtype=torch.float64) / math.sqrt(9 * c) for _ in range(2))
    def normal() -> torch.Tensor:
        return torch.randn(c, generator=g, dtype=torch.float64)

    # (running mean, running variance, weight, bias) of each BatchNorm
    stats = [(0.2 * normal(), 0.5 + torch.rand(c, generator=g, dtype=torch.float64), 1 + 0.1 * normal(), 0.1 * normal())
             for _ in range(2)]
    x = x.to(device, dtype)
    (m1, v1, g1, b1), (m2, v2, g2, b2) = [tuple(t.to(device, dtype) for t in st) for st in stats]
    F = torch.nn.functional

    def loss(W1: torch.Tensor, W2: torch.Tensor) -> torch.Tensor:
        h = torch.relu(F.batch_norm(F.conv2d(x, W1, padding=1), m1, v1, g1, b1, training=False))
        out = torch.relu(x + F.batch_norm(F.conv2d(h, W2, padding=1), m2, v2, g2, b2, training=False))
        return (out ** 2).mean()

    return loss, tuple(t.to(device, dtype).requires_grad_() for t in (W1, W2))
