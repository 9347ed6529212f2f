"""Benchmark harness: timing, machine description, and the tables recorded in benchmarks/RESULTS.md and the README.

Every method's gradient is compared with autograd before it is timed; the tables carry that error.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import problems, reference
from .engine import numerical_gradient

__all__ = ["machine_info", "time_call", "Row", "engine_suite", "markdown_table", "record_section"]


def machine_info() -> dict:
    """CPU model, core count, GPU name, torch/CUDA versions and today's date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": _dt.date.today().isoformat(),
    }


def describe_machine(info: dict) -> str:
    """One line for a table caption."""
    gpu = f", {info['gpu']}" if info.get("gpu") else ""
    return (f"{info['cpu']} ({info['cores']} cores, {info['torch_threads']} torch threads){gpu}; torch {info['torch']}; "
            f"{info['date']}")


def time_call(fn: Callable[[], object], device: str = "cpu", min_runs: int = 3, min_time: float = 0.3,
              max_time: float = 3.0) -> float:
    """Median wall time of ``fn()`` in seconds, after one warm-up call; CUDA work is synchronised.

    Runs at least ``min_runs`` times and ``min_time`` seconds, unless one run takes over ``max_time``.
    """
    def once() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    first = once()
    if first > max_time:
        return first
    times: list[float] = []
    while len(times) < min_runs or sum(times) < min_time:
        times.append(once())
        if len(times) >= 200:
            break
    return statistics.median(times)


@dataclass
class Row:
    """One benchmark measurement."""

    problem: str
    n: int
    method: str
    device: str
    seconds: float
    error: float  # max |numerical - autograd| / max |autograd|
    extrapolated: bool = False
    note: str = ""
    extra: dict = field(default_factory=dict)


def _rel_error(num: torch.Tensor, ana: torch.Tensor) -> float:
    scale = ana.abs().max().item()
    return (num.double() - ana.double()).abs().max().item() / (scale or 1.0)


def _engine_problem(kind: str, n_params: int, device: str, dtype: torch.dtype):
    if kind == "linear":
        func, params = problems.linear_regression(d=n_params, n=20, dtype=dtype, device=device)
    else:
        hidden = min(n_params, 10)
        func, params = problems.mlp(d=max(n_params // hidden, 1), k=hidden, c=1, n=32, dtype=dtype, device=device)
    return func, params


def engine_suite(sizes=(10, 100, 1000, 10000), kinds=("linear", "mlp"), device: str = "cpu",
                 dtype: torch.dtype = torch.float64, gradcheck: bool = True, progress: Callable | None = None) -> list[Row]:
    """Reference loop vs the engine (``engine="auto"``) vs ``torch.autograd.gradcheck`` (slow mode).

    Problems: (a) the lesson's linear regression ``y = Xw + b``, ``w`` of shape ``(N, 1)``, 20 samples; (b) a
    one-hidden-layer MLP ``tanh(X W1 + b1) W2 + b2`` with 10 hidden units, 32 samples, checked in ``W1``
    (``N`` entries). float64, ``h = 1e-5`` for all three methods.
    """
    rows: list[Row] = []
    for kind in kinds:
        for n in sizes:
            func, params = _engine_problem(kind, n, device, dtype)
            target = params[0]
            loss = func(*params)
            (ana,) = torch.autograd.grad(loss, target)
            plain = tuple(p.detach() for p in params)
            # method -> (what is timed, how its gradient is obtained for the error column)
            methods: dict[str, tuple[Callable[[], object], Callable[[], torch.Tensor]]] = {}
            ref = lambda: reference.numerical_gradient(func, plain, 0)  # noqa: E731
            eng = lambda: numerical_gradient(func, plain, 0)  # noqa: E731
            methods["reference"] = (ref, ref)
            methods["gradfd"] = (eng, eng)
            if gradcheck:
                methods["gradcheck (slow)"] = (lambda: _gradcheck(func, plain), lambda: _gradcheck_gradient(func, plain))
            for method, (timed, gradient) in methods.items():
                if progress:
                    progress(f"{kind} N={n} {method}")
                err = _rel_error(gradient(), ana)
                seconds = time_call(timed, device)
                rows.append(Row(kind, n, method, device, seconds, err))
    return rows


def _gradcheck(func, params) -> bool:
    """``torch.autograd.gradcheck`` in slow mode on ``params[0]`` (the others held fixed), float64 defaults."""
    w = params[0].detach().clone().requires_grad_()
    rest = params[1:]
    return torch.autograd.gradcheck(lambda w: func(w, *rest), (w,), eps=1e-5, raise_exception=False)


def _gradcheck_gradient(func, params) -> torch.Tensor:
    """The numerical gradient gradcheck's slow mode builds (it does not return it; this is the private routine it
    calls, ``torch.autograd.gradcheck._get_numerical_jacobian``)."""
    from torch.autograd.gradcheck import _get_numerical_jacobian

    w = params[0].detach().clone().requires_grad_()
    rest = params[1:]
    (jac,) = _get_numerical_jacobian(lambda w: func(w, *rest), (w,), eps=1e-5)
    return jac[0].reshape(w.shape)


def markdown_table(rows: list[Row], baseline: str = "reference") -> str:
    """A table per problem: time of each method, its speed-up over ``baseline`` and its error vs autograd."""
    out = []
    by_problem: dict[str, list[Row]] = {}
    for r in rows:
        by_problem.setdefault(r.problem, []).append(r)
    for problem, prow in by_problem.items():
        methods = list(dict.fromkeys(r.method for r in prow))
        sizes = sorted({r.n for r in prow})
        head = "| N | " + " | ".join(f"{m} time" for m in methods) + " | " + " | ".join(
            f"{m} speed-up" for m in methods if m != baseline) + " | max rel. error vs autograd |"
        out += [f"**{problem}**", "", head, "|" + "---|" * (head.count("|") - 1)]
        for n in sizes:
            cells = {r.method: r for r in prow if r.n == n}
            base = cells.get(baseline)
            times = [(_fmt_time(cells[m].seconds) + (" (extrap.)" if cells[m].extrapolated else "")) if m in cells
                     else "-" for m in methods]
            speed = [f"{base.seconds / cells[m].seconds:.1f}x" if base and m in cells else "-"
                     for m in methods if m != baseline]
            errs = ", ".join(f"{m}: {cells[m].error:.1e}" for m in methods if m in cells)
            out.append(f"| {n:,} | " + " | ".join(times) + " | " + " | ".join(speed) + f" | {errs} |")
        out.append("")
    return "\n".join(out)


def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def record_section(path: str | Path, name: str, text: str) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path`` (appending the markers
    if absent)."""
    path = Path(path)
    body = path.read_text() if path.exists() else ""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in body and end in body:
        body = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, body, flags=re.S)
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    path.write_text(body)


def rows_to_json(rows: list[Row], info: dict) -> str:
    """JSON with the machine description and every row."""
    return json.dumps({"machine": info, "rows": [asdict(r) for r in rows]}, indent=2)
