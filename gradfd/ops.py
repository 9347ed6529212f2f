"""Typed wrappers over gradfd's native ops (``torch.ops.gradfd.*``), their fake kernels, and a pure-PyTorch
reference for each.

The extension is found in this order: a compiled ``gradfd._C`` (``pip install --no-build-isolation -e .``),
then a JIT build of the same sources with the same flags (``torch.utils.cpp_extension.load``), in a build
directory keyed to this environment (:func:`build_directory`): switching between virtual environments never
rebuilds. Once built, later processes import the built module directly while the sources are unchanged. If neither
works -- no compiler, say -- importing gradfd still works; :func:`kernels_available` returns False and
:func:`unavailable_reason` says why. Nothing falls back silently: callers that need the
kernels call :func:`require_kernels`, which raises :class:`KernelsUnavailableError` with that reason.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Sequence

import torch

from . import _build

__all__ = [
    "KernelsUnavailableError",
    "kernels_available",
    "unavailable_reason",
    "require_kernels",
    "cuda_kernels_available",
    "perturb_rows_",
    "perturb_rows_reference",
    "new_rows",
    "row_view",
    "perturb",
    "central_differences",
    "central_differences_reference",
]


class KernelsUnavailableError(RuntimeError):
    """The native kernels could not be imported or compiled; the message carries the reason."""


_lock = threading.Lock()
_state: dict = {"loaded": False, "module": None, "reason": None}


def _load_compiled():
    from . import _C  # noqa: F401  (importing registers the ops)

    return _C


# What a failed JIT build raises: torch.utils.cpp_extension.load raises RuntimeError when ninja or the compiler fails
# (or ninja is missing), subprocess.CalledProcessError from the compiler probes, OSError when a tool or a directory is
# missing, ImportError when the built module cannot be loaded. Anything else (a KeyboardInterrupt, a signal handler's
# timeout, a bug) is not a build failure: it propagates and leaves the loader unlatched, so a later call retries
# (tests/test_first_call.py::test_jit_loader_lets_unrelated_exceptions_through_and_retries).
_BUILD_FAILURES = (RuntimeError, subprocess.CalledProcessError, OSError, ImportError)
_NOT_BUILD_FAILURES = (TimeoutError, InterruptedError)  # OSError subclasses that say nothing about the build

_STAMP = "gradfd-build.json"
# environment variables that change what torch's JIT build produces or which variant gradfd picks
_BUILD_ENV = ("CXX", "CC", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH", "FORCE_CUDA", "FORCE_ONLY_CPU")


def _extensions_root() -> Path:
    """``TORCH_EXTENSIONS_DIR`` when set, else torch's default extensions root (``~/.cache/torch_extensions``)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch import _appdirs  # what torch.utils.cpp_extension.get_default_build_root uses, without its imports

    return Path(os.path.realpath(_appdirs.user_cache_dir(appname="torch_extensions")))


def build_key(name: str, with_cuda: bool, kwargs: dict) -> str:
    """A short hash of everything that makes a JIT build of the extension usable in this process but not in
    another: the environment (``sys.prefix``), the Python and torch builds, the sources' paths and compiler flags,
    and the build's environment variables. Source *contents* are not in it: ninja rebuilds when they change."""
    parts = {
        "prefix": os.path.realpath(sys.prefix),
        "python": sys.version,
        "abi": sys.implementation.cache_tag,
        "torch": [torch.__version__, torch.version.cuda, torch.version.hip, torch.version.git_version],
        "name": name,
        "with_cuda": with_cuda,
        "kwargs": kwargs,
        "env": {v: os.environ.get(v) for v in _BUILD_ENV},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def build_directory(name: str, with_cuda: bool, kwargs: dict) -> Path:
    """Where the JIT build of the extension lives: ``<root>/gradfd/<name>-<key>``, ``root`` as torch's
    (``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``) and ``key`` from :func:`build_key`. torch's own
    ``<root>/py311_cu132/<name>`` is shared by every environment with the same Python and CUDA versions, so two
    virtual environments (or two checkouts) would rebuild each other's extension at every switch (~30 s each)
    (tests/test_first_call.py::test_jit_builds_are_keyed_to_the_environment_and_reused)."""
    return _extensions_root() / "gradfd" / f"{name}-{build_key(name, with_cuda, kwargs)}"


def _sources_digest(key_dir: Path) -> str:
    """Hash of every file under ``csrc/`` (names and contents) and the build directory's key."""
    h = hashlib.sha256(str(key_dir).encode())
    for path in sorted(p for p in _build.CSRC.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(_build.CSRC)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def _import_built(stamp: dict, digest: str):
    """The module a previous build recorded in its stamp, when the sources it was built from are the current ones;
    else None. Skips importing torch.utils.cpp_extension (setuptools) and running ninja (~0.3 s of CPU)."""
    if stamp.get("digest") != digest or not os.path.isfile(stamp.get("file", "")):
        return None
    spec = importlib.util.spec_from_file_location(stamp["module"], stamp["file"])
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpp_extension():
    # torch.utils.cpp_extension logs "No CUDA runtime is found" at import on GPU-less machines with a CUDA
    # build of torch; that is expected here (the CPU kernels are built), so keep it out of the user's output.
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _want_cuda() -> bool:
    gpu_visible = torch.cuda.is_available()
    if not _build.env_flag("FORCE_ONLY_CPU") and not _build.env_flag("FORCE_CUDA") and torch.version.cuda \
            and gpu_visible:
        cuda_home = _cpp_extension().CUDA_HOME  # only here does the toolkit's presence decide
    else:
        cuda_home = None
    return _build.want_cuda(torch.version.cuda, cuda_home, gpu_visible=gpu_visible)


def _load_jit():
    """The extension built from ``csrc/`` by torch's JIT (``torch.utils.cpp_extension.load``) in
    :func:`build_directory`, or, when a stamp there says the sources have not changed since the last build, the
    module that build produced, imported directly."""
    with_cuda = _want_cuda()
    kwargs = _build.extension_kwargs(with_cuda)
    name = "gradfd_C_cuda" if with_cuda else "gradfd_C"
    directory = build_directory(name, with_cuda, kwargs)
    digest = _sources_digest(directory)
    stamp_path = directory / _STAMP
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        stamp = {}
    if not isinstance(stamp, dict):  # a stamp written by something else: ignore it, rebuild below
        stamp = {}
    try:
        module = _import_built(stamp, digest)
    except (ImportError, OSError):  # a stale or broken file: rebuild below
        module = None
    if module is not None:
        return module
    directory.mkdir(parents=True, exist_ok=True)
    module = _cpp_extension().load(
        name=name,
        sources=kwargs["sources"],
        extra_cflags=kwargs["extra_compile_args"]["cxx"],
        extra_cuda_cflags=kwargs["extra_compile_args"].get("nvcc", []),
        extra_ldflags=kwargs["extra_link_args"],
        extra_include_paths=kwargs["include_dirs"],
        build_directory=str(directory),
        with_cuda=with_cuda,
        verbose=_build.env_flag("GRADFD_VERBOSE_BUILD"),
    )
    if _sources_digest(directory) == digest:  # the sources did not change during the build
        tmp = stamp_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"digest": digest, "module": module.__name__, "file": module.__file__}))
        os.replace(tmp, stamp_path)
    return module


def _ensure_loaded() -> None:
    if _state["loaded"]:
        return
    with _lock:
        if _state["loaded"]:
            return
        reasons = []
        module = None
        if _build.env_flag("GRADFD_DISABLE_KERNELS"):
            reasons.append("GRADFD_DISABLE_KERNELS is set")
        else:
            try:
                module = _load_compiled()
            except ImportError as exc:  # not built in place, or built against another torch
                reasons.append(f"no compiled gradfd._C ({exc})")
            if module is None and not _build.env_flag("GRADFD_NO_JIT"):
                try:
                    module = _load_jit()
                except _NOT_BUILD_FAILURES:
                    raise
                except _BUILD_FAILURES as exc:  # compiler missing, build error, ...
                    first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                    reasons.append(f"JIT build of csrc/ failed: {type(exc).__name__}: {first}")
            elif module is None:
                reasons.append("GRADFD_NO_JIT is set")
        if module is not None:
            _register_fakes()
        _state.update(loaded=True, module=module, reason=None if module else "; ".join(reasons))


_fakes_registered = False


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return

    @torch.library.register_fake("gradfd::perturb_rows_")
    def _perturb_rows_fake(rows, columns, base, index, step, offsets):
        return base.new_empty((len(offsets), index.shape[0]), dtype=torch.float64)

    @torch.library.register_fake("gradfd::central_differences")
    def _central_differences_fake(losses, displacement):
        return losses.new_empty((losses.shape[0] // 2, losses.shape[1]), dtype=torch.float64)

    _fakes_registered = True


def kernels_available() -> bool:
    """True when the native ops are registered (compiled or JIT-built). Triggers the JIT build on first call."""
    _ensure_loaded()
    return _state["module"] is not None


def unavailable_reason() -> str | None:
    """Why the native kernels are unavailable, or None when they are available."""
    _ensure_loaded()
    return _state["reason"]


def require_kernels() -> None:
    """Raise :class:`KernelsUnavailableError` (with the reason) unless the native kernels are available."""
    if not kernels_available():
        raise KernelsUnavailableError(
            f"gradfd's native kernels are unavailable: {_state['reason']}. Install a C++ compiler and ninja "
            "(or build with `pip install --no-build-isolation -e .`), or use engine='loop'."
        )


def cuda_kernels_available() -> bool:
    """True when the loaded extension was compiled with its CUDA kernels."""
    return kernels_available() and bool(getattr(_state["module"], "with_cuda", False))


def perturb_rows_(
    rows: torch.Tensor,
    columns: torch.Tensor,
    base: torch.Tensor,
    index: torch.Tensor,
    step: torch.Tensor,
    offsets: Sequence[float],
) -> torch.Tensor:
    """Re-target a buffer of perturbed copies of ``base`` to new coordinates, in ``O(rows)`` work (one launch).

    Args:
        rows: ``(R, N)`` or ``(N / inner, R, inner)`` buffer (see :func:`new_rows`), dtype of ``base``;
            precondition: row ``r`` equals ``base`` except possibly at element ``columns[r]``. Modified in place.
        columns: ``(R,)`` int64, the column each row has perturbed; modified in place.
        base: ``(N,)`` contiguous floating tensor (float64/32/16, bfloat16): the flattened parameter.
        index: ``(C,)`` int64 coordinates in ``[0, N)``.
        step: ``(C,)`` float64 step per coordinate.
        offsets: ``S`` multipliers of the step, e.g. ``(1, -1)``; ``S*C <= R``.

    Returns:
        ``(S, C)`` float64 displacement: the step actually taken (exact), after rounding
        ``base[index[c]] + offsets[s]*step[c]`` to the dtype. Row ``s*C + c`` of ``rows`` now equals ``base`` with
        that entry moved.

    Raises:
        RuntimeError: from the op, naming ``gradfd::perturb_rows_``, on wrong shapes, dtypes, devices or indices.
        KernelsUnavailableError: when the extension could not be loaded.
    """
    require_kernels()
    return torch.ops.gradfd.perturb_rows_(rows, columns, base, index, step, [float(o) for o in offsets])


def _element_offsets(rows: torch.Tensor, r: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    if rows.dim() == 2:
        return r * rows.shape[1] + i
    inner, stride = rows.shape[2], rows.shape[1] * rows.shape[2]
    return torch.div(i, inner, rounding_mode="floor") * stride + r * inner + i % inner


def perturb_rows_reference(rows, columns, base, index, step, offsets) -> torch.Tensor:
    """Pure-PyTorch twin of :func:`perturb_rows_` (same contract, both layouts)."""
    s, c = len(offsets), index.numel()
    r = torch.arange(s * c, device=base.device)
    storage = rows.view(-1)
    storage[_element_offsets(rows, r, columns[: s * c])] = base[columns[: s * c]]
    off = torch.tensor([float(o) for o in offsets], dtype=torch.float64, device=base.device)
    x = base[index].to(torch.float64)
    moved = (x.unsqueeze(0) + off.unsqueeze(1) * step.unsqueeze(0)).to(base.dtype)  # (S, C)
    storage[_element_offsets(rows, r, index.repeat(s))] = moved.reshape(-1)
    columns[: s * c] = index.repeat(s)
    return moved.to(torch.float64) - x.unsqueeze(0)


def new_rows(base: torch.Tensor, count: int, inner: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A buffer of ``count`` copies of ``base`` and its ``columns`` record, ready for :func:`perturb_rows_`.

    With ``inner`` None (or ``N``) the buffer is ``(count, N)``; otherwise ``(N // inner, count, inner)``: row ``r``
    is ``buffer[:, r, :]``, which puts the batch between a matrix parameter's rows and columns.
    """
    n = base.numel()
    columns = torch.zeros(count, dtype=torch.int64, device=base.device)
    if inner is None or inner == n:
        return base.unsqueeze(0).repeat(count, 1), columns
    if inner <= 0 or n % inner:
        raise ValueError(f"inner must divide the parameter's {n} elements, got {inner}")
    return base.view(n // inner, 1, inner).repeat(1, count, 1), columns


def row_view(rows: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` rows of a buffer as a ``(count, N)``-indexable view (``(N/inner, count, inner)`` for the
    split layout is permuted to ``(count, N/inner, inner)``)."""
    if rows.dim() == 2:
        return rows[:count]
    return rows[:, :count].permute(1, 0, 2)


def perturb(
    base: torch.Tensor, index: torch.Tensor, step: torch.Tensor, offsets: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh perturbed rows: ``rows`` ``(S*C, N)`` where row ``s*C + c`` is ``base`` with entry ``index[c]`` moved
    by ``offsets[s]*step[c]``, and the ``(S, C)`` float64 displacement. See :func:`perturb_rows_`."""
    rows, columns = new_rows(base, len(offsets) * index.numel())
    return rows, perturb_rows_(rows, columns, base, index, step, offsets)


def central_differences(losses: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Central differences of paired perturbed losses, in float64.

    Args:
        losses: ``(2K, C)`` floating; rows ``2k`` and ``2k+1`` hold ``f`` at the ``+`` and ``-`` nodes of level ``k``.
        displacement: ``(2K, C)`` float64, the realised steps from :func:`perturb`.

    Returns:
        ``(K, C)`` float64: ``(f+ - f-) / (d+ - d-)``. Non-finite losses give non-finite entries.
    """
    require_kernels()
    return torch.ops.gradfd.central_differences(losses.contiguous(), displacement.contiguous())


def central_differences_reference(losses: torch.Tensor, displacement: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch twin of :func:`central_differences`."""
    f = losses.to(torch.float64)
    return (f[0::2] - f[1::2]) / (displacement[0::2] - displacement[1::2])


if os.environ.get("GRADFD_EAGER_LOAD"):
    _ensure_loaded()
