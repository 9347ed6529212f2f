"""The CUDA sources compiled to PTX for sm_90, no GPU needed (benchmarks/cuda_evidence.py): nvcc contracted no multiply
and add into an FMA on a line whose result is promised bitwise (csrc/rounding.h), and the structured kernels keep
everything in registers (ptxas -v: 0 bytes stack frame and spills).

Skipped, with the reason, where nvcc cannot compile torch's CUDA headers (no toolkit, or one without the headers torch
includes). To run it here, point CUDA_HOME at the toolkit of ../shared/tools/cuda-compile-check:

    CUDA_HOME=~/.cache/gradfd-cuda-check/venv/lib/python3.11/site-packages/nvidia/cu13 \\
        uv run pytest tests/test_cuda_sources.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "cuda_evidence.py"
_spec = importlib.util.spec_from_file_location("cuda_evidence", _PATH)
evidence = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("cuda_evidence", evidence)  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(evidence)


@pytest.fixture(scope="module")
def kernels():
    reason = evidence.probe()
    if reason:
        pytest.skip(f"cannot compile the CUDA sources here: {reason}")
    result = evidence.analyse(evidence.ROOT / "csrc")
    return result, [k for ks in result.values() for k in ks.values() if k.base.endswith("_kernel")]


def test_every_bitwise_kernel_is_analysed_in_every_dtype(kernels):
    _, found = kernels
    for base in evidence.BITWISE_KERNELS + evidence.OWN_LINE_KERNELS:
        names = {k.name for k in found if k.base == base}
        for dtype in ("double", "float", "Half", "BFloat16"):
            assert any(f"<{dtype}" in name for name in names), (base, dtype, names)


def test_no_fma_on_a_line_promised_bitwise(kernels):
    result, _ = kernels
    broken = [p for p in evidence.problems(result) if "fma" in p or "calls" in p]
    assert not broken, "nvcc fused a multiply and an add that PyTorch rounds separately:\n" + "\n".join(broken)


def test_structured_kernels_use_no_local_memory(kernels):
    _, found = kernels
    structured = [k for k in found if k.base in evidence.NO_LOCAL_MEMORY_KERNELS]
    assert structured
    for k in structured:
        assert (k.stack, k.spill_stores, k.spill_loads) == (0, 0, 0), k
