"""The native kernels against their pure-PyTorch twins, on fresh random inputs, and their input checks."""

from __future__ import annotations

import pytest
import torch
from helpers import ALL_DEVICES, ALL_FLOAT_DTYPES

from gradfd import ops

pytestmark = pytest.mark.skipif(not ops.kernels_available(), reason=f"kernels unavailable: {ops.unavailable_reason()}")

OFFSETS = [(1.0, -1.0), (1.0, -1.0, 2.0, -2.0), (0.5, -3.0, 4.0)]


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES)
@pytest.mark.parametrize("offsets", OFFSETS)
@pytest.mark.parametrize("shape", [(37,), (6, 5), (2, 3, 4)])
def test_perturb_rows_matches_reference_over_several_chunks(seed, device, dtype, offsets, shape):
    n = int(torch.tensor(shape).prod())
    inner = shape[-1] if len(shape) > 1 else None
    base = (torch.randn(n, dtype=torch.float64) * 3).to(dtype).to(device)
    rows_k, cols_k = ops.new_rows(base, len(offsets) * 9, inner)
    rows_r, cols_r = ops.new_rows(base, len(offsets) * 9, inner)
    for c in (9, 4, 9, 1):  # chunks of different sizes re-target the same buffer
        index = torch.randint(0, n, (c,), device=device)
        step = torch.rand(c, dtype=torch.float64, device=device) * 0.1 + 1e-3
        disp_k = ops.perturb_rows_(rows_k, cols_k, base, index, step, offsets)
        disp_r = ops.perturb_rows_reference(rows_r, cols_r, base, index, step, offsets)
        assert torch.equal(rows_k, rows_r)
        assert torch.equal(cols_k, cols_r)
        assert torch.equal(disp_k, disp_r)
        # every used row is base with exactly the requested entry moved, by the recorded displacement
        view = ops.row_view(rows_k, len(offsets) * c).reshape(len(offsets) * c, n)
        for s, o in enumerate(offsets):
            for j in range(c):
                row = view[s * c + j]
                i = int(index[j])
                expected = (base[i].double() + o * step[j]).to(dtype)
                assert row[i] == expected
                assert float(disp_k[s, j]) == float(row[i].double() - base[i].double())
                others = torch.ones(n, dtype=torch.bool, device=device)
                others[i] = False
                assert torch.equal(row[others], base[others])


@pytest.mark.parametrize("device", ALL_DEVICES)
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES)
def test_central_differences_matches_reference(seed, device, dtype):
    k, c = 3, 50
    losses = torch.randn(2 * k, c, dtype=torch.float64).to(dtype).to(device)
    disp = torch.randn(2 * k, c, dtype=torch.float64, device=device)
    out = ops.central_differences(losses, disp)
    ref = ops.central_differences_reference(losses, disp)
    assert out.dtype == torch.float64 and out.shape == (k, c)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_perturb_convenience_builds_fresh_rows(seed):
    base = torch.randn(10, dtype=torch.float64)
    index = torch.tensor([0, 9])
    rows, disp = ops.perturb(base, index, torch.tensor([1e-3, 2e-3], dtype=torch.float64), (1, -1))
    assert rows.shape == (4, 10) and disp.shape == (2, 2)
    torch.testing.assert_close(rows[0, 0] - base[0], torch.tensor(1e-3, dtype=torch.float64))
    torch.testing.assert_close(rows[3, 9] - base[9], torch.tensor(-2e-3, dtype=torch.float64))


def _good():
    base = torch.randn(8, dtype=torch.float64)
    rows, cols = ops.new_rows(base, 4)
    return dict(rows=rows, columns=cols, base=base, index=torch.tensor([1, 2]),
                step=torch.tensor([1e-3, 1e-3], dtype=torch.float64), offsets=[1.0, -1.0])


BAD_PERTURB = [
    ("base 2-D", dict(base=torch.randn(2, 4, dtype=torch.float64)), "base must be 1-D"),
    ("base int", dict(base=torch.arange(8)), "base must be floating point"),
    ("base non-contiguous", dict(base=torch.randn(16, dtype=torch.float64)[::2]), "base must be contiguous"),
    ("index float", dict(index=torch.tensor([1.0, 2.0])), "index must be a 1-D int64"),
    ("index out of range", dict(index=torch.tensor([1, 8])), "index values must lie in [0, 8)"),
    ("index negative", dict(index=torch.tensor([-1, 2])), "index values must lie in [0, 8)"),
    ("step float32", dict(step=torch.tensor([1e-3, 1e-3])), "step must be a 1-D float64"),
    ("step length", dict(step=torch.tensor([1e-3], dtype=torch.float64)), "one entry per index (2), got shape [1]"),
    ("offsets empty", dict(offsets=[]), "offsets must not be empty"),
    ("offsets nan", dict(offsets=[1.0, float("nan")]), "offsets must be finite"),
    ("rows too few", dict(rows=torch.zeros(3, 8, dtype=torch.float64), columns=torch.zeros(3, dtype=torch.int64)),
     "R >= len(offsets) * len(index) = 4, got [3, 8]"),
    ("rows wrong width", dict(rows=torch.zeros(4, 7, dtype=torch.float64)), "rows must have shape (R, 8)"),
    ("rows dtype", dict(rows=torch.zeros(4, 8)), "rows must have base's dtype Double, got Float"),
    ("columns length", dict(columns=torch.zeros(3, dtype=torch.int64)), "one entry per row (4), got shape [3]"),
    ("columns range", dict(columns=torch.full((4,), 99, dtype=torch.int64)), "columns values must lie in [0, 8)"),
]


@pytest.mark.parametrize("name,override,message", BAD_PERTURB, ids=[b[0] for b in BAD_PERTURB])
def test_perturb_rows_rejects_bad_input_with_a_message(name, override, message):
    args = {**_good(), **override}
    rows_before = args["rows"].clone()
    with pytest.raises(RuntimeError) as err:
        torch.ops.gradfd.perturb_rows_(args["rows"], args["columns"], args["base"], args["index"], args["step"],
                                       args["offsets"])
    assert "gradfd::perturb_rows_" in str(err.value)
    assert message in str(err.value)
    assert torch.equal(args["rows"], rows_before)  # nothing written on failure


BAD_CENTRAL = [
    ("odd rows", torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64),
     "losses must have shape (2K, C)"),
    ("int losses", torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.float64), "floating point"),
    ("shape mismatch", torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64),
     "displacement must have the shape of losses"),
    ("disp float32", torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 2), "contiguous float64"),
]


@pytest.mark.parametrize("name,losses,disp,message", BAD_CENTRAL, ids=[b[0] for b in BAD_CENTRAL])
def test_central_differences_rejects_bad_input_with_a_message(name, losses, disp, message):
    with pytest.raises(RuntimeError) as err:
        torch.ops.gradfd.central_differences(losses, disp)
    assert "gradfd::central_differences" in str(err.value) and message in str(err.value)


def test_ops_pass_opcheck():
    base = torch.randn(6, dtype=torch.float64)
    rows, cols = ops.new_rows(base, 4)
    index, step = torch.tensor([0, 5]), torch.tensor([1e-3, 1e-3], dtype=torch.float64)
    torch.library.opcheck(torch.ops.gradfd.perturb_rows_.default, (rows, cols, base, index, step, [1.0, -1.0]),
                          test_utils=("test_schema", "test_faketensor"))
    losses = torch.randn(4, 3, dtype=torch.float64)
    disp = torch.randn(4, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.gradfd.central_differences.default, (losses, disp))
