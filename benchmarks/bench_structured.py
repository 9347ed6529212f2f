"""Issue 5's measurements: the structured engine against the generic engine and the reference loop.

    uv run python benchmarks/bench_structured.py                # CPU: scaling, the 1024x1024 bar, float32 accuracy;
                                                                # records results/structured-cpu.json, plot in results/
    uv run python benchmarks/bench_structured.py --no-record
    python benchmarks/bench_structured.py --device cuda         # GPU bar: a 4096x4096 Linear weight, batch 64, MSE,
                                                                # with the kernel's achieved bandwidth and FLOP rate

Every timed gradient is first compared with autograd. Times are medians of repeated runs (one run for runs over 3 s).
Where a method would take too long at a size (the reference from N = 10^3 on, the generic engine from 10^5 on), it
is timed on a subsample of coordinates and its per-coordinate cost is multiplied by N: such times are marked
"(extrap.)" -- they are extrapolations, not measurements of a full gradient.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sections import arguments, caption, record

from gradfd import engine, structured
from gradfd.demo import bench
from gradfd.engine import numerical_gradient

HERE = Path(__file__).resolve().parent
BATCH = 64

# nominal ceilings of the cards we test on (SXM parts): HBM bandwidth in bytes/s, FP64 (non-tensor) FLOP/s
CEILINGS = {"H100": (3.35e12, 34e12), "H200": (4.8e12, 34e12)}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str, repeat: int = 3) -> tuple[float, object]:
    """Median wall time of ``fn()`` over up to ``repeat`` runs (one when a run takes over 3 s), and its last result."""
    times, out = [], None
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if times[-1] > 3:
            break
    return statistics.median(times), out


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


def _peak_memory(fn, device: str) -> tuple[int, object]:
    """Peak memory of ``fn()`` above what was in use before it: ``torch.cuda.max_memory_allocated`` on a GPU; on the
    CPU the process's resident set, sampled every millisecond by a thread."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before, out
    try:  # hand freed memory back to the OS first, so that the resident set measures this call
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss()) - before, out


def linear_layer(k: int, d: int, device: str, dtype=torch.float64, seed: int = 0):
    """``mse_loss(F.linear(X, W, b), Y)`` with ``W`` of shape (k, d), batch 64: the issue's CPU/GPU bar problem."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(BATCH, d, generator=g, dtype=torch.float64).to(device, dtype)
    Y = torch.randn(BATCH, k, generator=g, dtype=torch.float64).to(device, dtype)
    W = (torch.randn(k, d, generator=g, dtype=torch.float64) / math.sqrt(d)).to(device, dtype)
    b = (0.1 * torch.randn(k, generator=g, dtype=torch.float64)).to(device, dtype)
    return (lambda W, b: F.mse_loss(F.linear(X, W, b), Y)), (W, b)


def mlp_ce(d: int, device: str, dtype=torch.float64, hidden: int = 32, classes: int = 10, seed: int = 0):
    """``cross_entropy(Linear(d, 32) -> tanh -> Linear(32, 10))``, batch 64, checked in W1 (d, 32): the second matmul
    moves the whole output by an outer product (the changed hidden column times a row of W2), which the fused
    cross-entropy kernel ``gradfd::outer_update_nll`` evaluates without writing the logits out."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(BATCH, d, generator=g, dtype=torch.float64).to(device, dtype)
    labels = torch.randint(0, classes, (BATCH,), generator=g).to(device)
    W1 = (torch.randn(d, hidden, generator=g, dtype=torch.float64) / math.sqrt(d)).to(device, dtype)
    b1 = (0.1 * torch.randn(hidden, generator=g, dtype=torch.float64)).to(device, dtype)
    W2 = (torch.randn(hidden, classes, generator=g, dtype=torch.float64) / math.sqrt(hidden)).to(device, dtype)
    return (lambda W1: F.cross_entropy(torch.tanh(X @ W1 + b1) @ W2, labels)), (W1,)


def _autograd(func, params, idx=0) -> torch.Tensor:
    ps = [p.detach().clone().requires_grad_(k == idx) for k, p in enumerate(params)]
    return torch.autograd.grad(func(*ps), ps[idx])[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _reference_per_coordinate(func, params, count: int, h: float = 1e-5) -> float:
    """Seconds per coordinate of the reference loop (gradfd.reference, the lesson's algorithm), timed on its first
    ``count`` coordinates: the same per-coordinate work (clone every parameter, perturb, call func twice)."""
    target = params[0]
    flat_count = min(count, target.numel())
    t0 = time.perf_counter()
    for i in range(flat_count):
        idx = engine.unravel(i, target.shape)
        with torch.no_grad():
            plus = [p.detach().clone() for p in params]
            minus = [p.detach().clone() for p in params]
            plus[0][idx] += h
            minus[0][idx] -= h
            (func(*plus).item() - func(*minus).item()) / (2 * h)
    return (time.perf_counter() - t0) / flat_count


def _generic_per_coordinate(func, params, count: int, device: str) -> float:
    coords = torch.randperm(params[0].numel(), device=device)[:count]
    engine.evaluate(func, params, 0, steps=1e-5, coords=coords[: min(count, 64)], engine="batched")  # warm-up
    seconds, _ = _timed(lambda: engine.evaluate(func, params, 0, steps=1e-5, coords=coords, engine="batched"),
                        device, repeat=1)
    return seconds / coords.numel()


# ---------------------------------------------------------------------------------------------------------------
# scaling


SCALING = {  # problem -> [(N, builder)]
    "linear layer, MSE (fused kernel)": [(k * d, (lambda k=k, d=d: linear_layer(k, d, "cpu"))) for k, d in
                                         ((25, 40), (100, 100), (250, 400), (1000, 1000))],
    "MLP W1, tanh, cross-entropy (fused cross-entropy kernel)": [(32 * d, (lambda d=d: mlp_ce(d, "cpu"))) for d in
                                                                 (32, 313, 3125, 31250)],
}


def scaling(progress) -> list[dict]:
    rows = []
    for problem, cases in SCALING.items():
        for n_params, build in cases:
            func, params = build()
            ana = _autograd(func, params)
            progress(f"{problem} N={n_params}: structured")
            numerical_gradient(func, params, 0, engine="structured")  # warm-up (first trace imports torch.fx)
            t_struct, g = _timed(lambda: numerical_gradient(func, params, 0, engine="structured"), "cpu")
            rows.append(dict(problem=problem, n=n_params, method="structured", seconds=t_struct,
                             extrapolated=False, error=_rel(g, ana)))
            progress(f"{problem} N={n_params}: generic")
            if n_params <= 2 * 10**4:
                t_gen, g = _timed(lambda: numerical_gradient(func, params, 0, engine="batched"), "cpu", repeat=1)
                rows.append(dict(problem=problem, n=n_params, method="generic (batched)", seconds=t_gen,
                                 extrapolated=False, error=_rel(g, ana)))
            else:
                per = _generic_per_coordinate(func, params, 256, "cpu")
                rows.append(dict(problem=problem, n=n_params, method="generic (batched)", seconds=per * n_params,
                                 extrapolated=True, error=float("nan")))
            progress(f"{problem} N={n_params}: reference")
            per = _reference_per_coordinate(func, params, 100)
            rows.append(dict(problem=problem, n=n_params, method="reference", seconds=per * n_params,
                             extrapolated=True, error=float("nan")))
    return rows


def scaling_table(rows: list[dict]) -> str:
    out = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        pr = [r for r in rows if r["problem"] == problem]
        out += [f"**{problem}**", "", "| N | structured | per coordinate | generic (batched) | reference | "
                "structured speed-up vs generic | vs reference | max rel. error vs autograd |",
                "|---|---|---|---|---|---|---|---|"]
        for n in sorted({r["n"] for r in pr}):
            cell = {r["method"]: r for r in pr if r["n"] == n}
            s, g, ref = cell["structured"], cell["generic (batched)"], cell["reference"]

            def fmt(r):
                return _fmt(r["seconds"]) + (" (extrap.)" if r["extrapolated"] else "")

            errs = f"structured {s['error']:.1e}" + (f", generic {g['error']:.1e}" if g["error"] is not None else "")
            out.append(f"| {n:,} | {fmt(s)} | {s['seconds'] / n * 1e9:.0f} ns | {fmt(g)} | {fmt(ref)} | "
                       f"{g['seconds'] / s['seconds']:,.0f}x | {ref['seconds'] / s['seconds']:,.0f}x | {errs} |")
        out.append("")
    return "\n".join(out)


def _fmt(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 3600:
        return f"{seconds:.2f} s"
    return f"{seconds / 3600:.1f} h"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(1, len(problems), figsize=(6 * len(problems), 4.5), squeeze=False)
    styles = {"structured": "C0", "generic (batched)": "C1", "reference": "C3"}
    for ax, problem in zip(axes[0], problems):
        for method, color in styles.items():
            pts = sorted((r["n"], r["seconds"], r["extrapolated"]) for r in rows
                         if r["problem"] == problem and r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=color, label=method)
            for n, t, ext in pts:
                ax.plot(n, t, "o", color=color, markerfacecolor="none" if ext else color)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (parameters checked)")
        ax.set_ylabel("time per full numerical gradient (s)")
        ax.set_title(problem, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(title="open markers: extrapolated", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------------------------
# the bars


def bar(device: str, size: int, dtype=torch.float64) -> dict:
    """Full numerical gradient of a size x size Linear weight, batch 64, MSE (2 size^2 perturbed losses)."""
    func, params = linear_layer(size, size, device, dtype)
    ana = _autograd(func, params)
    h = 1e-5 if dtype == torch.float64 else None
    _sync(device)
    t0 = time.perf_counter()
    ev = engine.evaluate(func, params, 0, steps=h, engine="structured")
    _sync(device)
    first = time.perf_counter() - t0
    seconds, g = _timed(lambda: numerical_gradient(func, params, 0, engine="structured", h=h), device)
    peak, _ = _peak_memory(lambda: numerical_gradient(func, params, 0, engine="structured", h=h), device)
    per_ref = _reference_per_coordinate(func, params, 20)
    return dict(size=size, n=size * size, losses=2 * size * size, seconds=seconds, first_call=first,
                error=_rel(g, ana), reference_extrapolated=per_ref * size * size, peak_bytes=peak,
                chunk=ev.chunk_size, notes=ev.notes, dtype=str(dtype))


def kernel_roofline(device: str, size: int) -> dict:
    """The fused kernel alone on the bar's problem: achieved bandwidth and FP64 FLOP rate against the card's ceiling."""
    n, k, d = BATCH, size, size
    dtype = torch.float32
    base = torch.randn(n, k, device=device, dtype=dtype)
    features = torch.randn(n, d, device=device, dtype=dtype)
    target = torch.randn(n, k, device=device, dtype=dtype)
    c = k * d
    flat = torch.arange(c, device=device)
    column, feature = flat // d, flat % d
    delta = torch.full((2, c), 1e-3, device=device, dtype=torch.float64)
    delta[1] = -1e-3
    structured.linear_update_mse(base, features, target, column, feature, delta)  # warm-up
    seconds, _ = _timed(lambda: structured.linear_update_mse(base, features, target, column, feature, delta),
                        device, repeat=10)
    # DRAM traffic: delta in, out, the two index vectors; features/base/target are re-read from cache
    dram = delta.numel() * 8 * 2 + 2 * c * 8 + (base.numel() + features.numel() + target.numel()) * 4
    # per (coordinate, row): the base term (3 flops) and per node fma, subtract, square, subtract, add (6)
    flops = c * n * (3 + 2 * 6)
    out = dict(size=size, seconds=seconds, bytes=dram, flops=flops, bandwidth=dram / seconds, flop_rate=flops / seconds)
    name = torch.cuda.get_device_name(0) if device == "cuda" else ""
    for card, (bw, fp64) in CEILINGS.items():
        if card in name:
            out.update(card=card, bandwidth_ceiling=bw, fp64_ceiling=fp64)
    return out


def float32_accuracy(seeds: int = 5) -> list[dict]:
    """Structured (changed terms summed in float64) vs generic (the float32 function, its loss reduced in float64) on
    float32 models, against the float64 derivative at the same float32 point; automatic steps."""
    rows = []
    for stencil in ("central", "four_point"):
        for name in ("linear regression (d=200)", "linear layer MSE (64x64)", "MLP tanh MSE, W1",
                     "softmax regression CE"):
            errs = {"structured": [], "generic (batched)": []}
            for seed in range(seeds):
                func32, params32, func64 = _accuracy_problem(name, seed)
                params64 = tuple(p.double() for p in params32)
                exact = _autograd(func64, params64)
                scale = exact.abs().max()
                for method, eng in (("structured", "structured"), ("generic (batched)", "batched")):
                    g = numerical_gradient(func32, params32, 0, h=None, stencil=stencil, engine=eng)
                    errs[method].append(((g.double() - exact).abs() / scale).flatten())
            for method, e in errs.items():
                e = torch.cat(e)
                rows.append(dict(stencil=stencil, problem=name, method=method, median=float(e.median()),
                                 max=float(e.max()), entries=e.numel()))
    return rows


def _accuracy_problem(name: str, seed: int):
    """``(func in float32, float32 params, the same func on float64 data)``: the data are float32 values, so the
    float64 function at the float32 point is the exact reference."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).float()

    if name.startswith("linear regression"):
        X, y, w, b = rn(64, 200, scale=200**-0.5), rn(64, 1) + 3, rn(200, 1), rn(1)

        def make(dt):
            Xd, yd = X.to(dt), y.to(dt)
            return lambda w, b: ((Xd @ w + b - yd) ** 2).mean()

        params = (w, b)
    elif name.startswith("linear layer"):
        X, Y, W, b = rn(64, 64), rn(64, 64), rn(64, 64, scale=1 / 8), rn(64, scale=0.1)

        def make(dt):
            Xd, Yd = X.to(dt), Y.to(dt)
            return lambda W, b: F.mse_loss(F.linear(Xd, W, b), Yd)

        params = (W, b)
    elif name.startswith("MLP"):
        X, Y = rn(64, 16), rn(64, 4)
        W1, b1, W2, b2 = rn(16, 32, scale=0.25), rn(32, scale=0.1), rn(32, 4, scale=32**-0.5), rn(4, scale=0.1)

        def make(dt):
            Xd, Yd, b1d, W2d, b2d = (t.to(dt) for t in (X, Y, b1, W2, b2))
            return lambda W1: ((torch.tanh(Xd @ W1 + b1d) @ W2d + b2d - Yd) ** 2).mean()

        params = (W1,)
    else:
        X, W, b = rn(64, 20), rn(20, 10, scale=20**-0.5), rn(10, scale=0.1)
        labels = torch.randint(0, 10, (64,), generator=g)

        def make(dt):
            Xd, bd = X.to(dt), b.to(dt)
            return lambda W: F.cross_entropy(Xd @ W + bd, labels)

        params = (W,)
    return make(torch.float32), params, make(torch.float64)


def accuracy_table(rows: list[dict]) -> str:
    out = ["| stencil | problem | method | median error / max abs gradient | max error / max abs gradient | entries |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['stencil']} | {r['problem']} | {r['method']} | {r['median']:.1e} | {r['max']:.1e} | "
                   f"{r['entries']} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------


def render(data: dict) -> str:
    """The bar, the kernel's roofline on a GPU, the scaling tables and the float32 accuracy, from the record."""
    r, device, limit = data["bar"], data["device"], data["bar_limit"]
    size = r["size"]
    out = [caption(data), "", f"**Bar ({device}):** full numerical gradient of a {size}x{size} Linear weight "
           f"(`mse_loss(F.linear(X, W, b), Y)`, batch {BATCH}, float64, h = 1e-5): {r['losses']:,} perturbed "
           "losses, no subsampling.", "",
           "| time (warm) | first call in the process (incl. trace) | target | max rel. error vs autograd | "
           "reference (extrap.) | speed-up vs reference | peak memory | chunk |", "|---|---|---|---|---|---|---|---|",
           f"| {_fmt(r['seconds'])} | {_fmt(r['first_call'])} | < {limit:g} s "
           f"({'met' if r['seconds'] < limit else 'NOT met'}) | {r['error']:.1e} | "
           f"{_fmt(r['reference_extrapolated'])} | {r['reference_extrapolated'] / r['seconds']:,.0f}x | "
           f"{r['peak_bytes'] / 2**20:.0f} MiB | {r['chunk']:,} coordinates |", "",
           "The reference time is its per-coordinate cost on 20 coordinates times N (extrapolated). Peak memory: "
           + ("torch.cuda.max_memory_allocated above what was allocated before the call." if device == "cuda"
              else "the process's resident set during a warm call above what it was before (sampled every ms); "
              "it includes the engine's O(N) arrays (node values, displacements and losses: 8 bytes per "
              "perturbed loss each).")]
    k = data.get("kernel")
    if k:
        line = (f"Kernel alone (`gradfd::linear_update_mse`, float32, {k['size'] ** 2:,} coordinates x 2 nodes x "
                f"{BATCH} rows): {k['seconds'] * 1e3:.2f} ms, {k['bandwidth'] / 1e9:.0f} GB/s of DRAM traffic, "
                f"{k['flop_rate'] / 1e12:.2f} TFLOP/s FP64")
        if "card" in k:
            bw, fl = k["bandwidth"] / k["bandwidth_ceiling"], k["flop_rate"] / k["fp64_ceiling"]
            line += (f" = {100 * bw:.0f}% of the {k['card']}'s {k['bandwidth_ceiling'] / 1e12:.2f} TB/s and "
                     f"{100 * fl:.0f}% of its {k['fp64_ceiling'] / 1e12:.0f} TFLOP/s FP64 (non-tensor) nominal "
                     f"ceilings: nearer its {'FP64' if fl > bw else 'bandwidth'} ceiling")
        out += ["", line + "."]
    if data.get("scaling"):
        out += ["", "**Scaling** (time per full numerical gradient against N, float64, h = 1e-5; batch 64; plot: "
                "`benchmarks/results/structured-cpu.png`). The reference is always timed on 100 coordinates and "
                "extrapolated (x N); the generic engine is timed in full up to N = 2 x 10^4 and on 256 "
                "coordinates (extrapolated) above. Per coordinate: structured time / N.", "",
                scaling_table(data["scaling"])]
    if data.get("float32"):
        out += ["", "**float32 accuracy** (5 draws each; error of the numerical gradient of a float32 function "
                "against the float64 derivative at the same float32 point; automatic steps). The structured "
                "engine evaluates every perturbed value in float32 like the function, but sums only the changed "
                "terms, in float64; the generic engine evaluates the whole float32 function and takes its loss's "
                "reduction in float64 (gradfd/reductions.py).", "", accuracy_table(data["float32"])]
    return "\n".join(out)


RENDER = {"structured": render, "structured-cuda": render}


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--size", type=int, default=None, help="bar size (default 1024 on cpu, 4096 on cuda)")
    ap.add_argument("--skip-scaling", action="store_true")
    args = ap.parse_args()
    progress = lambda msg: print("  ..", msg, file=sys.stderr, flush=True)  # noqa: E731
    command = "uv run python benchmarks/bench_structured.py" + (" --device cuda" if args.device == "cuda" else "")
    size = args.size or (4096 if args.device == "cuda" else 1024)
    data = {"machine": bench.machine_info(), "command": command, "device": args.device,
            "bar_limit": 1.0 if args.device == "cuda" else 10.0}
    progress(f"bar: {size}x{size} Linear weight on {args.device}")
    data["bar"] = bar(args.device, size)
    if args.device == "cuda":
        data["kernel"] = kernel_roofline("cuda", size)
    if args.device == "cpu" and not args.skip_scaling:
        data["scaling"] = scaling(progress)
        plot(data["scaling"], HERE / "results" / "structured-cpu.png")
        progress("float32 accuracy")
        data["float32"] = float32_accuracy()
    print(record("structured" if args.device == "cpu" else "structured-cuda", data, write=not args.no_record))


if __name__ == "__main__":
    main()
