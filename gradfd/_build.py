"""The single source of gradfd's build configuration, shared by ``setup.py`` and the JIT loader in
:mod:`gradfd.ops`. It imports nothing from torch so that ``setup.py`` can load it by path.

Environment switches (read at build time):
    FORCE_CUDA=1       build the CUDA kernels even when no GPU is visible (a CUDA toolkit is still required).
    FORCE_ONLY_CPU=1   never build the CUDA kernels.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CSRC = PACKAGE_DIR.parent / "csrc"

__all__ = ["CSRC", "env_flag", "want_cuda", "sources", "extension_kwargs"]


def env_flag(name: str) -> bool:
    """True when the environment variable ``name`` is set to anything but ``""``, ``"0"`` or ``"false"``."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def want_cuda(torch_cuda_version: str | None, cuda_home: str | None, gpu_visible: bool | None = None) -> bool:
    """Whether to compile the CUDA kernels.

    ``FORCE_ONLY_CPU`` wins, then ``FORCE_CUDA``; otherwise CUDA is built when torch is a CUDA build and a
    toolkit is found (``cuda_home``), and -- for the JIT path, which passes ``gpu_visible`` -- a GPU is there
    to use them.
    """
    if env_flag("FORCE_ONLY_CPU"):
        return False
    if env_flag("FORCE_CUDA"):
        return True
    if not torch_cuda_version or cuda_home is None:
        return False
    return True if gpu_visible is None else gpu_visible


def sources(with_cuda: bool) -> list[str]:
    """Absolute paths of the C++ (and, with CUDA, .cu) sources, in a stable order."""
    cpp = sorted(CSRC.glob("*.cpp")) + sorted((CSRC / "cpu").glob("*.cpp"))
    cu = sorted((CSRC / "cuda").glob("*.cu")) if with_cuda else []
    return [str(p) for p in cpp + cu]


def extension_kwargs(with_cuda: bool) -> dict:
    """Keyword arguments for ``CppExtension``/``CUDAExtension`` and ``torch.utils.cpp_extension.load``.

    No fast-math anywhere, and no contraction of ``a + b*c`` into one fused multiply-add (``-ffp-contract=off``; the
    CUDA kernels use the separately rounded helpers of ``csrc/rounding.h``): the finite differences depend on
    correctly rounded perturbations, promised bitwise equal to PyTorch's separate multiply and add.
    """
    defines = ["-DGRADFD_WITH_CUDA"] if with_cuda else []
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", *defines]
    kwargs: dict = {
        "sources": sources(with_cuda),
        "extra_compile_args": {"cxx": cxx},
        "extra_link_args": ["-fopenmp"],
        "include_dirs": [str(CSRC)],
    }
    if with_cuda:
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--expt-relaxed-constexpr", *defines]
    return kwargs
