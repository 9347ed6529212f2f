"""Helpers shared by the tests (device/dtype lists, state snapshots)."""

from __future__ import annotations

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
