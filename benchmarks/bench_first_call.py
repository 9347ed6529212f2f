"""Issue 17, part 4: the cost of the first call in a fresh process.

    uv run python benchmarks/bench_first_call.py              # 5 fresh processes per case; records
                                                              # benchmarks/results/first-call.json, renders it
    uv run python benchmarks/bench_first_call.py --runs 3 --out /tmp/first-call.json

Each case runs in fresh subprocesses (``sys.executable``), after the extension was built here (its loader is called
once before any child starts, so no child pays for a compilation). A child imports ``torch`` and ``gradfd``, builds
its problem, then times the first call and a second (warm) call in the same process, and prints the engine that ran.
Each first call is also recorded in CPU seconds (``time.process_time``; the whole process's user + system time for the
command line), which a busy machine inflates much less than wall time. The command-line case is timed as a whole
process (``python -m gradfd check file.py:fn``) by the parent.

Bars (issue 17): first ``gradfd.check`` of ``tanh(x).sum()`` (4096 entries, float64) <= 1.0 s; first
``numerical_gradient`` of a 1024x1024 Linear + MSE (batch 64, float64, engine "auto") <= 1.5 s; ``gradfd check`` of a
144-entry MLP, whole process, <= 3 s. Every gradient is compared with autograd before its time is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BARS = {"check_tanh_4096": 1.0, "numerical_gradient_linear_1024": 1.5, "cli_check_mlp_144": 3.0, "import_torch": None}
CASES = {
    "check_tanh_4096": "gradfd.check of tanh(x).sum(), 4096 entries, float64 (first call after import)",
    "numerical_gradient_linear_1024": "gradfd.numerical_gradient of mse_loss(F.linear(X, W, b), Y), W 1024x1024, "
                                      "batch 64, float64, engine 'auto' (first call after import)",
    "cli_check_mlp_144": "python -m gradfd check file.py:mlp on a 144-entry MLP (whole process)",
    "import_torch": "python -c 'import torch' (whole process: the floor under the command line's time)",
}

# the command-line case's target: problems.mlp(d=8, k=8, c=8) has 64 + 8 + 64 + 8 = 144 entries
CLI_TARGET = textwrap.dedent('''
    from gradfd.demo import problems

    def mlp():
        return problems.mlp(d=8, k=8, c=8, n=64)
''')


def _child_check_tanh() -> dict:
    import torch

    import gradfd

    x = torch.randn(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def func(x):
        return torch.tanh(x).sum()

    t0, c0 = time.perf_counter(), time.process_time()
    report = gradfd.check(func, (x,), raise_on_failure=False)
    first, cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    again = gradfd.check(func, (x,), raise_on_failure=False)
    warm = time.perf_counter() - t0
    if not (report.passed and again.passed):
        raise SystemExit(f"the check failed on a correct function:\n{report}")
    return {"first": first, "cpu": cpu, "warm": warm, "engine": report.tensors[0].details["engine"]}


def _child_linear() -> dict:
    import math

    import torch
    import torch.nn.functional as F

    import gradfd
    from gradfd import engine

    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 1024, generator=g, dtype=torch.float64)
    Y = torch.randn(64, 1024, generator=g, dtype=torch.float64)
    W = torch.randn(1024, 1024, generator=g, dtype=torch.float64) / math.sqrt(1024)
    b = 0.1 * torch.randn(1024, generator=g, dtype=torch.float64)

    def func(W, b):
        return F.mse_loss(F.linear(X, W, b), Y)

    t0, c0 = time.perf_counter(), time.process_time()
    grad = gradfd.numerical_gradient(func, (W, b), 0)
    first, cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    gradfd.numerical_gradient(func, (W, b), 0)
    warm = time.perf_counter() - t0
    # which engine "auto" picks (one more evaluation, not timed), and correctness against autograd
    chosen = engine.evaluate(func, (W, b), 0, steps=1e-5).engine
    Wg = W.clone().requires_grad_()
    (ana,) = torch.autograd.grad(func(Wg, b), Wg)
    rel = float((grad - ana).abs().max() / ana.abs().max())
    if not rel < 1e-8:
        raise SystemExit(f"numerical gradient off by {rel:.2e} (relative) against autograd")
    return {"first": first, "cpu": cpu, "warm": warm, "engine": chosen, "rel_error": rel}


CHILDREN = {"check_tanh_4096": _child_check_tanh, "numerical_gradient_linear_1024": _child_linear}


def _env() -> dict:
    """The children import gradfd from this checkout (the script's parent folder), whatever is installed."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _run_child(case: str) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", case], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{case}: child failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_cli(target: Path | None) -> dict:
    """The whole process of ``gradfd check`` on ``target`` (or of ``python -c 'import torch'`` when None)."""
    cmd = [sys.executable, "-m", "gradfd", "check", f"{target}:mlp", "--format", "json", "--no-progress"] if target \
        else [sys.executable, "-c", "import torch"]
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, check=False)
    whole, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    if target is None:
        return {"first": whole, "cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), "warm": None,
                "engine": "-"}
    report = json.loads(out.stdout)
    engines = sorted({t["details"]["engine"] for t in report["tensors"]})
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    engine = engines[0] if len(engines) == 1 else "+".join(engines)
    return {"first": whole, "cpu": cpu, "warm": None, "engine": engine}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per case (default 5)")
    parser.add_argument("--out", default=None, help="write the record here instead of benchmarks/results/")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ", ".join(CASES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child]()))
        return 0

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    from gradfd import ops
    from gradfd.demo import bench

    ops.kernels_available()  # build (or load) the extension once, before any child is timed
    if not ops.kernels_available():
        print(f"note: kernels unavailable ({ops.unavailable_reason()})", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "mlp144.py"
        target.write_text(CLI_TARGET)
        for case in args.cases.split(","):
            runs = [_run_cli(target) if case == "cli_check_mlp_144" else _run_cli(None) if case == "import_torch"
                    else _run_child(case) for _ in range(args.runs)]
            firsts = [r["first"] for r in runs]
            warms = [r["warm"] for r in runs if r["warm"] is not None]
            engines = sorted({r["engine"] for r in runs})
            row = {"case": case, "description": CASES[case], "first_call_s": firsts,
                   "median_s": statistics.median(firsts),
                   "first_call_cpu_s": [r["cpu"] for r in runs],
                   "median_cpu_s": statistics.median(r["cpu"] for r in runs),
                   "warm_s": statistics.median(warms) if warms else None,
                   "bar_s": BARS[case],
                   "engine": engines[0] if len(engines) == 1 else "+".join(engines)}
            rows.append(row)
            warm = f"{row['warm_s']:.3f} s" if row["warm_s"] is not None else "-"
            print(f"{case}: median {row['median_s']:.2f} s (CPU {row['median_cpu_s']:.2f} s; bar {row['bar_s']}), "
                  "first calls "
                  f"{', '.join(f'{t:.2f}' for t in firsts)}; warm {warm}; engine {row['engine']}")
    result = {"machine": {**bench.machine_info(), "loadavg": os.getloadavg()},
              "command": "uv run python benchmarks/bench_first_call.py", "runs": args.runs, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(render(json.loads(json.dumps(result))))
    else:
        from sections import record

        print(record("first-call", result))
    return 0


def render(data: dict) -> str:
    """The first-call table from the record: medians, CPU seconds, warm times, the engine, the bar computed."""
    from sections import caption

    load = data["machine"].get("loadavg")
    lines = [caption(data), "", f"Median of {data['runs']} fresh processes per case (wall and CPU seconds of the first "
             "call after `import torch, gradfd`, the extension already built; the command-line case is the whole "
             "process); warm: a second call in the same process."
             + (f" 1-minute load average at the end: {load[0]:.1f} on {data['machine']['cores']} cores." if load else ""),
             "", "| first call | median | CPU | warm | engine | bar |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        warm = "-" if r["warm_s"] is None else f"{r['warm_s']:.2f} s"
        bar = "-" if r["bar_s"] is None else \
            f"<= {r['bar_s']:g} s ({'met' if r['median_s'] <= r['bar_s'] else 'NOT met'})"
        lines.append(f"| {r['description']} | {r['median_s']:.2f} s | {r['median_cpu_s']:.2f} s | {warm} | "
                     f"{r['engine']} | {bar} |")
    return "\n".join(lines)


RENDER = {"first-call": render}


if __name__ == "__main__":
    sys.exit(main())
