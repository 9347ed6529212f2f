"""The structured kernels on shapes that reach every code path of their CUDA versions, against the pure-PyTorch twins:
every node-count bucket of linear_update_mse (kNodes = 2, 4, 8, 16 in csrc/cuda/structured_cuda.cu) and both edges of
linear_update's 32 x 32 shared-memory tiles. The moved values are promised bitwise in every dtype (csrc/rounding.h).
CPU cases run everywhere; CUDA cases where a GPU is present (benchmarks/gpu.sh also runs them under compute-sanitizer)."""

from __future__ import annotations

import pytest
import torch
from helpers import ALL_DEVICES, ALL_FLOAT_DTYPES

from gradfd import ops, structured

pytestmark = pytest.mark.skipif(not ops.kernels_available(), reason=f"kernels unavailable: {ops.unavailable_reason()}")


def _inputs(device, dtype, n, k, d, c, s):
    base = torch.randn(n, k, dtype=torch.float64).to(dtype).to(device)
    features = torch.randn(n, d, dtype=torch.float64).to(dtype).to(device)
    target = torch.randn(n, k, dtype=torch.float64).to(dtype).to(device)
    column = torch.randint(0, k, (c,), device=device)
    feature = torch.randint(0, d, (c,), device=device)
    # steps over many scales, so that the product and the sum round at different positions
    delta = (torch.randn(s, c, dtype=torch.float64) * 10.0 ** torch.randint(-8, 0, (s, c))).to(device)
    return base, features, target, column, feature, delta


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES)
@pytest.mark.parametrize("n,c", [(1, 1), (31, 33), (32, 32), (33, 31), (65, 97)])  # inside, on and past tile edges
def test_linear_update_is_bitwise_on_tile_edges(seed, device, dtype, n, c):
    base, features, _, column, feature, delta = _inputs(device, dtype, n, 6, 5, c, 1)
    got = structured.linear_update(base, features, column, feature, delta[0].contiguous())
    want = structured.linear_update_reference(base, features, column, feature, delta[0])
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES)
@pytest.mark.parametrize("s", [1, 2, 3, 4, 5, 8, 9, 16])  # the first and last node count of each bucket
@pytest.mark.parametrize("activation", [None, "sigmoid"])
def test_linear_update_mse_every_node_count(seed, device, dtype, s, activation):
    base, features, target, column, feature, delta = _inputs(device, dtype, 37, 4, 6, 45, s)
    got = structured.linear_update_mse(base, features, target, column, feature, delta, activation)
    want = structured.linear_update_mse_reference(base, features, target, column, feature, delta, activation)
    scale = float(((1 + base.double().abs() + target.double().abs()) ** 2).sum(0).max())
    eps = 1e-15 if activation is None else 8 * torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=0, atol=eps * scale)
