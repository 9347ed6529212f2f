"""Helpers shared by the tests (device/dtype lists, state snapshots)."""

from __future__ import annotations

import textwrap

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float64, torch.float32]
ALL_FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def device_param(device: str):
    """A pytest param for ``device``, skipped when that device is not present."""
    return pytest.param(
        device, marks=pytest.mark.skipif(device == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")
    )


ALL_DEVICES = [device_param("cpu"), device_param("cuda")]


def snapshot(tensors):
    """Bitwise copies of tensors plus their grad, requires_grad and version counter, for state-preservation tests."""
    return [
        (t.detach().clone(), None if t.grad is None else t.grad.clone(), t.requires_grad, t._version) for t in tensors
    ]


def assert_unchanged(tensors, snap) -> None:
    """Assert that ``tensors`` are bitwise as in ``snap`` (values, grads, requires_grad, version counters)."""
    for k, (t, (value, grad, req, version)) in enumerate(zip(tensors, snap)):
        assert bitwise_equal(t.detach(), value), f"params[{k}] changed"
        assert (t.grad is None) == (grad is None), f"params[{k}].grad changed"
        if grad is not None:
            assert bitwise_equal(t.grad, grad), f"params[{k}].grad changed"
        assert t.requires_grad == req, f"params[{k}].requires_grad changed"
        assert t._version == version, f"params[{k}]._version changed ({version} -> {t._version})"


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` have the same shape, dtype and bytes (NaN payloads included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


# Targets of `gradfd check FILE:FUNCTION` for the CLI tests (test_cli.py, test_plot.py): write them to a file.
CLI_TARGETS = textwrap.dedent('''
    import torch
    import gradfd

    def good():
        x = torch.randn(20, dtype=torch.float64, requires_grad=True)
        return (lambda x: torch.sin(x).sum()), (x,)

    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.sin()

        @staticmethod
        def backward(ctx, g):
            return -g  # wrong: should be g * cos(x)

    def bad():
        x = torch.randn(6, dtype=torch.float64, requires_grad=True)
        return (lambda x: Wrong.apply(x).sum()), (x,)

    def ready_report():
        x = torch.randn(4, dtype=torch.float64, requires_grad=True)
        return gradfd.check(lambda x: (x ** 2).sum(), (x,))

    def not_a_problem():
        return 42

    def module_only():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh()), torch.randn(2, 3)

    def module_and_loss():
        torch.manual_seed(0)
        return torch.nn.Linear(3, 2), (torch.randn(5, 3),), lambda out: out.pow(2).mean()

    def softmax_against_reference():
        x = torch.randn(6, 16, requires_grad=True)
        return (lambda x: torch.softmax(x.float(), -1).to(x.dtype)), (x,), (lambda x: torch.softmax(x, -1))

    def nothing_compared():
        x = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # sqrt at 0: every stencil leaves the domain
        return (lambda x: torch.sqrt(x).sum()), (x,)
''')
