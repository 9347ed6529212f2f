"""Test functions for engine-vs-reference agreement: (name, builder(device, dtype) -> (func, params, idx))."""

from __future__ import annotations

import math

import torch

from gradfd.demo import problems


def _lin(device, dtype):
    d = int(torch.randint(2, 40, ()))
    f, p = problems.linear_regression(d=d, n=int(torch.randint(5, 30, ())), dtype=dtype, device=device,
                                      seed=int(torch.randint(0, 2**30, ())))
    return f, p, 0


def _lesson(device, dtype):
    f, p = problems.linear_regression(d=1, dtype=dtype, device=device)
    return f, p, 1


def _quad(device, dtype):
    f, p = problems.quadratic_regression(dtype=dtype, device=device, seed=int(torch.randint(0, 2**30, ())))
    return f, p, int(torch.randint(0, 3, ()))


def _mlp(device, dtype):
    f, p = problems.mlp(d=7, k=5, c=3, n=11, dtype=dtype, device=device, seed=int(torch.randint(0, 2**30, ())))
    return f, p, int(torch.randint(0, 4, ()))


def _elementwise(device, dtype):
    x = torch.randn(4, 5, dtype=dtype, device=device)
    return (lambda x: (torch.exp(0.3 * x) * torch.sin(x)).sum() / 20), (x,), 0


def _softmax_ce(device, dtype):
    X = torch.randn(12, 6, dtype=dtype, device=device)
    y = torch.randint(0, 3, (12,), device=device)
    W = torch.randn(6, 3, dtype=dtype, device=device) / math.sqrt(6)
    return (lambda W, y: torch.nn.functional.cross_entropy(X @ W, y)), (W, y), 0


def _scalar_param(device, dtype):
    a = torch.randn((), dtype=dtype, device=device)
    return (lambda a: torch.tanh(a) * a), (a,), 0


def _transposed_param(device, dtype):
    W = torch.randn(5, 4, dtype=dtype, device=device).t()  # non-contiguous (4, 5)
    X = torch.randn(3, 4, dtype=dtype, device=device)
    return (lambda W: torch.sigmoid(X @ W).pow(2).mean()), (W,), 0


def _batched_matmul_param(device, dtype):
    A = torch.randn(2, 3, 4, dtype=dtype, device=device) / 2
    B = torch.randn(2, 4, 5, dtype=dtype, device=device)
    return (lambda A: torch.tanh(A @ B).sum() / 10), (A,), 0


def _linear_layer(device, dtype):
    W = torch.randn(3, 6, dtype=dtype, device=device) / math.sqrt(6)
    b = torch.randn(3, dtype=dtype, device=device)
    X = torch.randn(8, 6, dtype=dtype, device=device)
    return (lambda W, b: torch.nn.functional.linear(X, W, b).tanh().mean()), (W, b), 0


FUNCTIONS = {
    "lesson_linear_b": _lesson,
    "linear_regression_w": _lin,
    "quadratic_regression": _quad,
    "mlp": _mlp,
    "elementwise": _elementwise,
    "softmax_cross_entropy": _softmax_ce,
    "scalar_param": _scalar_param,
    "transposed_param": _transposed_param,
    "batched_matmul_param": _batched_matmul_param,
    "linear_layer": _linear_layer,
}
