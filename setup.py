"""Build gradfd's extension when torch is importable at build time.

* ``pip install --no-build-isolation -e .`` (torch already installed) compiles ``gradfd._C``: the CPU kernels
  always, the CUDA kernels when torch is a CUDA build and a toolkit is found, or when ``FORCE_CUDA=1``.
  ``FORCE_ONLY_CPU=1`` turns CUDA off. No GPU needs to be visible.
* An isolated build without torch (``uv sync``, the default ``pip install .``) installs the pure-Python
  package; :mod:`gradfd.ops` then compiles the same sources on first use with ``torch.utils.cpp_extension.load``.
Both paths take their flags from ``gradfd/_build.py``.
"""

import importlib.util
from pathlib import Path

from setuptools import setup

_spec = importlib.util.spec_from_file_location("_gradfd_build", Path(__file__).parent / "gradfd" / "_build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

ext_modules, cmdclass = [], {}
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    torch = None

if torch is not None and not build.env_flag("GRADFD_SKIP_BUILD"):
    with_cuda = build.want_cuda(torch.version.cuda, CUDA_HOME)
    extension = CUDAExtension if with_cuda else CppExtension
    kwargs = build.extension_kwargs(with_cuda)
    here = Path(__file__).resolve().parent
    kwargs["sources"] = [str(Path(src).relative_to(here)) for src in kwargs["sources"]]
    ext_modules = [extension("gradfd._C", **kwargs)]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
