"""Evidence about the CUDA kernels that needs no GPU: what ptxas allocates and where nvcc emitted fused multiply-adds.

Every csrc/cuda/*.cu file is compiled to PTX for sm_90 with the extension's own flags plus ``-lineinfo`` (which only
adds ``.loc`` line records), and the PTX is assembled with ``ptxas -v``. Two facts are read off:

* **Local memory.** ``ptxas -v`` reports each kernel's stack frame and spills; an array indexed by a runtime index
  (or spilled registers) shows up there. The structured engine's kernels must report 0 bytes of each.
* **No FMA on a bitwise line.** Each ``fma`` instruction is attributed to the source line of the ``.loc`` before it.
  Kernels whose results are promised bitwise equal to PyTorch (``BITWISE_KERNELS``) may hold an FMA only inside a
  math-library call (``tanh``, ``exp``: their own polynomials, which no test promises bitwise); an FMA attributed to
  any other line of csrc/ means nvcc fused a multiply and an add that PyTorch rounds separately. Kernels whose own
  lines round as PyTorch's ops around a math call that nothing promises bitwise (``OWN_LINE_KERNELS``: a log-softmax's
  ``log``, within which nvcc contracts the library's own arithmetic) are held to the first rule only.

Run ``bash benchmarks/cuda_evidence.sh`` (which provides nvcc through ../shared/tools/cuda-compile-check) to write
``benchmarks/results/cuda-evidence.txt``; ``tests/test_cuda_sources.py`` asserts the same facts when nvcc and the CUDA
headers are available. Standalone: ``python benchmarks/cuda_evidence.py [--baseline REV] [--out FILE]``; it exits 1
when a fact does not hold.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCH = "sm_90"  # the H100/H200 the GPU checks run on

# kernels whose outputs the tests compare with PyTorch bitwise (rtol=0, atol=0), or with a tolerance far below one
# rounding of the value they round (linear_update_mse's perturbed value): tests/test_kernels.py, tests/test_structured.py
BITWISE_KERNELS = ("perturb_rows_kernel", "central_differences_kernel", "linear_update_kernel",
                   "linear_update_mse_kernel")
# kernels whose own lines round every operation as PyTorch's ops do (outer_update_nll's moved logits, bias add and
# log-probability), around a log whose own arithmetic nothing promises bitwise: no FMA on their own lines
OWN_LINE_KERNELS = ("outer_update_nll_kernel", "outer_update_nll_base_kernel")
# kernels that must keep everything in registers (no stack frame, no spills)
NO_LOCAL_MEMORY_KERNELS = ("linear_update_kernel", "linear_update_mse_kernel")
NO_FMAD = ("-fmad=false",)  # the cross-check: what is left when nvcc may not contract
# a source line that calls into the math library: FMAs inlined from its implementation are the library's own
MATH_CALL = re.compile(r"(?<![\w.])(?:::)?(tanhf?|expf?|erff?|logf?)\s*\(")


def _build_module():
    spec = importlib.util.spec_from_file_location("gradfd_build", ROOT / "gradfd" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_home() -> Path | None:
    """The toolkit torch's extension builder would use (``CUDA_HOME``, else the nvcc on PATH)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return Path(home)
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parent.parent if nvcc else None


def nvcc_command(source: Path, ptx: Path, csrc: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The extension's nvcc flags (gradfd/_build.py and torch's common flags), compiling ``source`` to PTX."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    home = cuda_home()
    flags = _build_module().extension_kwargs(True)["extra_compile_args"]["nvcc"]
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{home / 'include'}", f"-I{csrc}"]
    return [str(home / "bin" / "nvcc"), "-std=c++20", *COMMON_NVCC_FLAGS, *flags, *includes, f"-arch={ARCH}",
            "-lineinfo", *extra, "-ptx", str(source), "-o", str(ptx)]


def probe() -> str | None:
    """None when nvcc can compile a file that includes torch's CUDA headers; otherwise why not."""
    home = cuda_home()
    if home is None or not (home / "bin" / "nvcc").exists():
        return "no nvcc (set CUDA_HOME or put nvcc on PATH)"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is not a CUDA build (its CUDA headers are needed)"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cu"
        src.write_text("#include <ATen/cuda/CUDAContext.h>\n__global__ void k(double* x) { x[0] = 1.0; }\n")
        run = subprocess.run(nvcc_command(src, Path(tmp) / "probe.ptx", ROOT / "csrc"), capture_output=True,
                             text=True)
        if run.returncode != 0:
            errors = [line for line in run.stderr.splitlines() if "error" in line] or run.stderr.splitlines()[-1:]
            return f"{home / 'bin' / 'nvcc'} cannot compile torch's CUDA headers: {errors[0].strip()}"
    return None


@dataclass
class Kernel:
    mangled: str
    name: str  # e.g. linear_update_mse_kernel<double, 16>
    base: str  # e.g. linear_update_mse_kernel
    registers: int = -1
    stack: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    smem: int = 0
    fma_math: int = 0  # FMAs inside a math-library call (tanh, exp, erf)
    fma_own: dict[tuple[str, int], int] = field(default_factory=dict)  # (file, line) -> FMAs of csrc's own lines
    calls: list[str] = field(default_factory=list)

    @property
    def fma_own_total(self) -> int:
        return sum(self.fma_own.values())

    @property
    def fma_total(self) -> int:
        return self.fma_math + self.fma_own_total


_ARG = re.compile(r"N3c104HalfE|N3c108BFloat16E|Li(\d+)E|d|f")
_ARG_NAMES = {"N3c104HalfE": "Half", "N3c108BFloat16E": "BFloat16", "d": "double", "f": "float"}


def pretty(mangled: str) -> tuple[str, str]:
    """(``name<args>``, ``name``) of a mangled kernel of gradfd's (no demangler needed)."""
    m = re.search(r"([a-z_]+_kernel)(?:I(.*?)EEv)?", mangled)
    if not m:
        return mangled, mangled
    base, args = m.group(1), m.group(2)
    if not args:
        return base, base
    names = [_ARG_NAMES.get(a.group(0), a.group(1)) for a in _ARG.finditer(args)]
    return f"{base}<{', '.join(names)}>", base


def parse_ptx(ptx: str, csrc: Path) -> dict[str, Kernel]:
    """Kernels of a PTX file with their FMAs attributed to source lines (``.loc`` records from -lineinfo)."""
    files = {int(m.group(1)): m.group(2) for m in re.finditer(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.M)}
    lines_of: dict[str, list[str]] = {}

    def source_line(path: str, line: int) -> str:
        if path not in lines_of:
            try:
                lines_of[path] = Path(path).read_text().splitlines()
            except OSError:
                lines_of[path] = []
        text = lines_of[path]
        return text[line - 1] if 0 < line <= len(text) else ""

    kernels: dict[str, Kernel] = {}
    current: Kernel | None = None
    loc: tuple[int, int] | None = None
    for raw in ptx.splitlines():
        entry = re.match(r"^\s*(?:\.\w+\s+)*\.(?:entry|func)\s+(?:\([^)]*\)\s*)?([\w$]+)\s*\(?", raw)
        if entry and not raw.rstrip().endswith(";"):
            name, base = pretty(entry.group(1))
            current = kernels.setdefault(entry.group(1), Kernel(entry.group(1), name, base))
            loc = None
            continue
        if current is None:
            continue
        if raw.startswith("}"):
            current = None
            continue
        s = raw.strip()
        if m := re.match(r"\.loc\s+(\d+)\s+(\d+)", s):
            loc = (int(m.group(1)), int(m.group(2)))
        elif s.startswith("call"):
            callee = re.search(r"([\w$]+)\s*,?\s*\(", s.split(None, 1)[1] if " " in s else s)
            current.calls.append(callee.group(1) if callee else s)
        elif re.match(r"fma\.", s):
            path = files.get(loc[0], "?") if loc else "?"
            line = loc[1] if loc else 0
            own = Path(path).resolve().is_relative_to(csrc.resolve()) if path != "?" else True
            if own and not MATH_CALL.search(source_line(path, line)):
                key = (os.path.relpath(path, csrc.parent) if path != "?" else "?", line)
                current.fma_own[key] = current.fma_own.get(key, 0) + 1
            else:
                current.fma_math += 1
    return kernels


def parse_ptxas(text: str, kernels: dict[str, Kernel]) -> None:
    current = None
    for line in text.splitlines():
        if m := re.search(r"Function properties for ([\w$]+)", line):
            current = kernels.get(m.group(1))
        elif current is not None and (m := re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current.registers = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current.smem = int(smem.group(1)) if smem else 0


def analyse_source(source: Path, csrc: Path, workdir: Path, extra: tuple[str, ...] = ()) -> dict[str, Kernel]:
    """Compile one .cu file to PTX (``extra``: more nvcc flags), assemble it with ptxas -v, return its kernels."""
    ptx = workdir / (source.stem + "".join(extra).replace("=", "_") + ".ptx")
    run = subprocess.run(nvcc_command(source, ptx, csrc, extra), capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{run.stderr[-4000:]}")
    kernels = parse_ptx(ptx.read_text(), csrc)
    ptxas = subprocess.run([str(cuda_home() / "bin" / "ptxas"), "-v", f"-arch={ARCH}", str(ptx), "-o",
                            str(workdir / (source.stem + ".cubin"))], capture_output=True, text=True)
    if ptxas.returncode != 0:
        raise RuntimeError(f"ptxas failed on {ptx}:\n{ptxas.stderr[-4000:]}")
    parse_ptxas(ptxas.stdout + ptxas.stderr, kernels)
    return kernels


def analyse(csrc: Path, extra: tuple[str, ...] = ()) -> dict[str, dict[str, Kernel]]:
    """{source file name: {mangled: Kernel}} for every csrc/cuda/*.cu, compiled in parallel."""
    sources = sorted((csrc / "cuda").glob("*.cu"))
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(len(sources)) as pool:
        jobs = {s.name: pool.submit(analyse_source, s, csrc, Path(tmp), extra) for s in sources}
        return {name: job.result() for name, job in jobs.items()}


def _same_kernel(result: dict[str, dict[str, Kernel]], source: str, kernel: Kernel) -> Kernel:
    """``kernel`` in another compile of ``source`` (the anonymous namespace's mangled name depends on the flags)."""
    return next(k for k in result[source].values() if k.name == kernel.name)


def problems(result: dict[str, dict[str, Kernel]], nofmad: dict[str, dict[str, Kernel]] | None = None) -> list[str]:
    """Every broken promise: an FMA on a bitwise kernel's own line, local memory in a structured kernel, a call; with
    ``nofmad`` (the same sources compiled with -fmad=false), any FMA nvcc contracted in a bitwise kernel."""
    out = []
    for source, kernels in result.items():
        for k in kernels.values():
            if k.base in BITWISE_KERNELS and nofmad is not None:
                explicit = _same_kernel(nofmad, source, k).fma_total
                if k.fma_total != explicit:
                    out.append(f"{source}: {k.name}: {k.fma_total} fma, {explicit} with -fmad=false: "
                               f"nvcc contracted {k.fma_total - explicit}")
            if k.base in BITWISE_KERNELS or k.base in OWN_LINE_KERNELS:
                for (path, line), count in sorted(k.fma_own.items()):
                    out.append(f"{source}: {k.name}: {count} fma on {path}:{line}")
                if k.calls:
                    out.append(f"{source}: {k.name}: calls {sorted(set(k.calls))} (not inlined: unchecked)")
            if k.base in NO_LOCAL_MEMORY_KERNELS and (k.stack, k.spill_stores, k.spill_loads) != (0, 0, 0):
                out.append(f"{source}: {k.name}: {k.stack} bytes stack frame, {k.spill_stores}/{k.spill_loads} "
                           "bytes spill stores/loads")
    return out


def render(result: dict[str, dict[str, Kernel]], nofmad: dict[str, dict[str, Kernel]]) -> list[str]:
    lines = []
    for source, kernels in result.items():
        lines.append(f"{source}:")
        lines.append(f"  {'kernel':38s} {'regs':>4s} {'stack':>5s} {'spill st/ld':>11s} {'smem':>5s}  "
                     f"{'fma in math calls':>17s} {'fma on own lines':>16s} {'fma, -fmad=false':>16s}  bitwise promise")
        for k in sorted(kernels.values(), key=lambda k: k.name):
            if not k.base.endswith("_kernel"):
                continue
            promise = "yes" if k.base in BITWISE_KERNELS else "own lines" if k.base in OWN_LINE_KERNELS else "no"
            explicit = _same_kernel(nofmad, source, k).fma_total
            lines.append(f"  {k.name:38s} {k.registers:4d} {k.stack:5d} {f'{k.spill_stores}/{k.spill_loads}':>11s} "
                         f"{k.smem:5d}  {k.fma_math:17d} {k.fma_own_total:16d} {explicit:16d}  {promise}")
            for (path, line), count in sorted(k.fma_own.items()):
                lines.append(f"      {count:4d} fma on {path}:{line}")
    return lines


def _tree_at(rev: str, dest: Path) -> Path:
    """csrc/ and gradfd/_build.py of git revision ``rev`` extracted under ``dest``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "csrc"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "csrc"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="also analyse csrc/ at this git revision, for a before/after")
    parser.add_argument("--out", type=Path, help="write the report here as well as to stdout")
    args = parser.parse_args(argv)
    reason = probe()
    if reason:
        print(f"cuda_evidence: cannot compile: {reason}", file=sys.stderr)
        return 2
    import torch

    nvcc = subprocess.run([str(cuda_home() / "bin" / "nvcc"), "--version"], capture_output=True, text=True)
    release = re.search(r"release [\d.]+, V[\d.]+", nvcc.stdout)
    header = [
        "CUDA kernel evidence without a GPU (benchmarks/cuda_evidence.py; regenerate: bash benchmarks/cuda_evidence.sh)",
        f"nvcc {release.group(0) if release else '?'}, torch {torch.__version__}, -arch={ARCH} -lineinfo; flags: "
        "gradfd/_build.py (nvcc) + torch's COMMON_NVCC_FLAGS",
        "regs/stack/spill/smem: ptxas -v. 'fma on own lines': fma instructions whose .loc is a csrc/ line that is not "
        "a math-library call; 'fma in math calls': inside tanh/exp/erf/log (the library's own polynomials).",
        "'fma, -fmad=false': all fma instructions of the kernel compiled with -fmad=false, which forbids nvcc to "
        "contract; equal to the sum of the two fma columns exactly when nvcc contracted nothing in the kernel.",
        f"bitwise kernels (no fma on own lines allowed): {', '.join(BITWISE_KERNELS)}",
        f"own-line kernels (no fma on own lines; nvcc may contract inside their math calls): "
        f"{', '.join(OWN_LINE_KERNELS)}",
        f"no local memory allowed (0 stack, 0 spills): {', '.join(NO_LOCAL_MEMORY_KERNELS)}",
        "",
    ]
    body = []
    if args.baseline:
        with tempfile.TemporaryDirectory() as tmp:
            tree = _tree_at(args.baseline, Path(tmp))
            before, before_nofmad = analyse(tree), analyse(tree, NO_FMAD)
            body += [f"== before: csrc/ at {args.baseline}", *render(before, before_nofmad), "",
                     "problems before:", *(f"  {p}" for p in problems(before, before_nofmad) or ["none"]), ""]
    after, after_nofmad = analyse(ROOT / "csrc"), analyse(ROOT / "csrc", NO_FMAD)
    found = problems(after, after_nofmad)
    body += ["== after: csrc/ in the working tree", *render(after, after_nofmad), "",
             "problems:", *(f"  {p}" for p in found or ["none"])]
    text = "\n".join(header + body) + "\n"
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
