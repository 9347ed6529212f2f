"""Real models checked in one call (`gradfd.check_module`): an MLP, a CNN, a Transformer encoder layer, a ResNet
basic block with BatchNorm and a GRU, in float32 and float64, in directional, sample and full modes, beside the
naive loop (two timed evaluations of the loss per entry) and `torch.autograd.gradcheck` (slow mode, float64, where it
fits the time cap and the memory).

Each model is built from a held-out seed (``gradfd.demo.bench.HELD_OUT_SEEDS``), never one used to tune a rule. A
check still running after ``--cap`` seconds is stopped (a signal raises into it), and the table says so.

    uv run python benchmarks/bench_models.py              # records results/models.json, renders it into docs/
    uv run python benchmarks/bench_models.py --models mlp --no-record
"""

from __future__ import annotations

import time
import warnings

import torch
from sections import arguments, caption, record

import gradfd
from gradfd.demo import bench

SEED = bench.HELD_OUT_SEEDS[0]
MODES = ("directional", "sample", "full")


def _mlp(dtype):
    m = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 10))
    x, y = torch.randn(32, 512), torch.randint(0, 10, (32,))
    return m, (x,), lambda out: torch.nn.functional.cross_entropy(out, y)


def _cnn(dtype):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3), torch.nn.ReLU(),
                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    return m, (x,), lambda out: torch.nn.functional.cross_entropy(out, y)


def _transformer(dtype):
    m = torch.nn.TransformerEncoderLayer(128, 4, dim_feedforward=256, dropout=0.0, batch_first=True)
    x = torch.randn(4, 16, 128)
    return m, (x,), lambda out: out.pow(2).mean()


class BasicBlock(torch.nn.Module):
    """conv-BN-ReLU-conv-BN + residual, then ReLU (ResNet's basic block); the builder sets the BatchNorm mode."""

    def __init__(self, c: int):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)
        self.c2, self.b2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


def _resnet_block(dtype):
    m = BasicBlock(12)
    for b in (m.b1, m.b2):  # running statistics of a trained network, not the identity
        b.running_mean.uniform_(-0.2, 0.2)
        b.running_var.uniform_(0.5, 1.5)
    m.eval()
    x = torch.randn(4, 12, 10, 10)
    return m, (x,), lambda out: out.pow(2).mean()


def _gru(dtype):
    m = torch.nn.GRU(16, 32, batch_first=True)
    return m, (torch.randn(4, 10, 16),), None  # the default loss: a seeded projection of (out, h)


MODELS = {
    "mlp": ("MLP 512-1024-10, GELU, cross-entropy, batch 32", _mlp),
    "cnn": ("CNN conv3x3(3-32)-ReLU-conv3x3(32-64)-ReLU-avgpool-linear, 8x3x32x32, cross-entropy", _cnn),
    "transformer": ("TransformerEncoderLayer d=128, 4 heads, ff 256, 4x16, mean square", _transformer),
    "resnet-block": ("ResNet basic block, 12 channels, BatchNorm (eval), 4x12x10x10, mean square", _resnet_block),
    "gru": ("GRU 16-32, 4x10x16, default loss (seeded projection of (out, h))", _gru),
}


def build(name: str, dtype: torch.dtype):
    torch.manual_seed(SEED)
    module, inputs, loss = MODELS[name][1](dtype)
    return module.to(dtype), tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs), loss


def as_function(module, inputs, loss):
    """``(func, params)`` with ``func(*params)`` the loss check_module checks (its default projection included)."""
    from gradfd.module import _projection

    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in module.named_parameters())
    if loss is None:
        with torch.no_grad():
            loss, _ = _projection(module(*inputs))

    def func(*ps):
        return loss(torch.func.functional_call(module, dict(zip(names, ps)), inputs))

    return func, params


def _naive_per_coordinate(module, inputs, loss) -> float:
    """Seconds per coordinate of the lesson's loop: two evaluations of the loss (the median of 5 timed calls)."""
    func, params = as_function(module, inputs, loss)
    times = []
    with torch.no_grad():
        for _ in range(6):
            t0 = time.perf_counter()
            func(*params)
            times.append(time.perf_counter() - t0)
    return 2 * sorted(times[1:])[2]


def run_check(name: str, dtype: torch.dtype, mode: str) -> dict:
    module, inputs, loss = build(name, dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        report = gradfd.check_module(module, inputs, loss=loss, mode=mode, raise_on_failure=False, seed=SEED)
        seconds = time.perf_counter() - t0
    tensors = report.tensors
    return {"seconds": seconds, "passed": report.passed, "verified": report.verified,
            "agree": sum(t.agree for t in tensors), "disagree": sum(t.disagree for t in tensors),
            "unresolved": sum(t.unresolved for t in tensors), "checked": sum(t.checked for t in tensors),
            "engines": sorted({f"{t.details.get('engine', '-')}/{t.details.get('batching') or '-'}"
                               for t in tensors}),
            "failing": [t.name for t in tensors if not t.passed],
            "warnings": sorted({str(w.message).splitlines()[0][:200] for w in caught})}


def run_gradcheck(name: str, dtype: torch.dtype) -> dict:
    func, params = as_function(*build(name, dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        ok = torch.autograd.gradcheck(func, params, raise_exception=False)
    return {"seconds": time.perf_counter() - t0, "passed": bool(ok)}


def measure(name: str, dtypes, cap: float) -> list[dict]:
    rows = []
    for dtype in dtypes:
        module, inputs, loss = build(name, dtype)
        n = sum(p.numel() for p in module.parameters())
        naive = _naive_per_coordinate(module, inputs, loss) * n
        row = {"model": name, "dtype": str(dtype).replace("torch.", ""), "params": n, "naive_seconds": naive}
        for mode in MODES:
            try:
                with bench.time_limit(cap):
                    row[mode] = run_check(name, dtype, mode)
            except bench.CheckTimeout:
                row[mode] = {"skipped": f"stopped at the {cap:.0f} s cap"}
            print(name, row["dtype"], mode, row[mode], flush=True)
        if dtype == torch.float64:
            if n > bench.GRADCHECK_CAP:  # its slow mode took 24 GB on the CNN (20,042 entries) and swapped
                row["gradcheck"] = {"skipped": f"{n:,} entries > {bench.GRADCHECK_CAP:,}: slow mode's memory"}
            elif naive > cap:
                row["gradcheck"] = {"skipped": f"estimated {naive:.0f} s > cap {cap:.0f} s"}
            else:
                row["gradcheck"] = run_gradcheck(name, dtype)
        rows.append(row)
    return rows


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if "skipped" in r:
        return f"not run ({r['skipped']})"
    verdict = "pass" if r["passed"] and r.get("verified", True) else ("pass, some uncompared" if r["passed"]
                                                                       else "FAIL " + ", ".join(r.get("failing", [])))
    counts = f"; {r['agree']}/{r['disagree']}/{r['unresolved']}" if "agree" in r else ""
    return f"{r['seconds']:.2f} s ({verdict}{counts})"


BAR_SECONDS = 60.0  # issue 19's bar: a TransformerEncoderLayer checked in full, every parameter, float32


def _bar(data: dict) -> str:
    """Issue 19's bar, computed from the record."""
    row = next((r for r in data["rows"] if r["model"] == "transformer" and r["dtype"] == "float32"), None)
    head = (f"Issue 19's bar, a TransformerEncoderLayer checked in full (every parameter, float32) in under "
            f"{BAR_SECONDS:.0f} s:")
    if row is None or "full" not in row:
        return f"{head} not measured in this run."
    full = row["full"]
    if "skipped" in full:
        return f"{head} NOT met ({full['skipped']})."
    verdict = "met" if full["seconds"] < BAR_SECONDS and full["passed"] else "NOT met"
    return f"{head} {verdict} ({full['seconds']:.0f} s, {'pass' if full['passed'] else 'FAIL'})."


# issue 21's bars (the structured engine on real layers): model -> (bar, moonshot or None), float32 full checks
LAYER_BARS = {"cnn": (30.0, 5.0), "mlp": (3.0, None), "resnet-block": (10.0, None)}


def _layer_bars(data: dict) -> str:
    """Issue 21's bars, computed from the record (the MLP here has 535,562 parameters; the issue's has 300k)."""
    parts = []
    for name, (limit, moon) in LAYER_BARS.items():
        row = next((r for r in data["rows"] if r["model"] == name and r["dtype"] == "float32"), None)
        full = None if row is None else row.get("full")
        if full is None or "skipped" in full:
            parts.append(f"{name}: not measured" if full is None else f"{name}: NOT met ({full['skipped']})")
            continue
        ok = full["passed"]
        verdict = "met" if ok and full["seconds"] < limit else "NOT met"
        moonshot = ("" if moon is None else
                    f"; moonshot under {moon:g} s {'met' if ok and full['seconds'] < moon else 'not met'}")
        parts.append(f"{name} full in {full['seconds']:.1f} s: under {limit:g} s {verdict}{moonshot}")
    return ("Issue 21's bars (float32, full mode, every parameter; the MLP here has 535,562 parameters, the issue's "
            "300k): " + "; ".join(parts) + ".")


def render(data: dict) -> str:
    lines = [caption(data), "",
             f"`gradfd.check_module` with default settings on models built from held-out seed {data['seed']}; "
             "each cell: time (verdict; agree/disagree/unresolved entries or directions). The naive loop is the "
             "lesson's per-coordinate loop: two evaluations of the loss per parameter entry (each timed, median of 5) "
             f"times the entries. gradcheck is `torch.autograd.gradcheck` (slow mode) in float64 where the naive "
             f"estimate is under the {data['cap']:.0f} s cap and the parameters number at most "
             f"{bench.GRADCHECK_CAP:,} (above, its memory grows past the machine's). A check still running at the "
             f"{data['cap']:.0f} s cap is stopped, and says so.", "",
             "| model | dtype | params | directional | sample | full | engine/batching (full) | naive loop (extrap.) | "
             "gradcheck slow |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        full = r.get("full", {})
        engines = ", ".join(full.get("engines", [])) or "-"
        lines.append(f"| {MODELS[r['model']][0]} | {r['dtype']} | {r['params']:,} | {_cell(r.get('directional'))} | "
                     f"{_cell(r.get('sample'))} | {_cell(full)} | {engines} | {r['naive_seconds']:.0f} s | "
                     f"{_cell(r.get('gradcheck'))} |")
    lines += ["", _bar(data), "", _layer_bars(data)]
    warned = sorted({w for r in data["rows"] for m in MODES for w in r.get(m, {}).get("warnings", [])})
    if warned:
        lines += ["", "Warnings raised during these checks:", ""] + [f"- {w}" for w in warned]
    return "\n".join(lines)


RENDER = {"models": render}


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--cap", type=float, default=180.0, help="seconds: a check running longer is stopped")
    args = ap.parse_args()
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    rows = [row for name in args.models.split(",") for row in measure(name, dtypes, args.cap)]
    data = {"machine": bench.machine_info(), "command": "uv run python benchmarks/bench_models.py", "seed": SEED,
            "cap": args.cap, "rows": rows}
    print(record("models", data, write=not args.no_record))


if __name__ == "__main__":
    main()
