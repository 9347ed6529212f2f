"""Entries near a pole, in tensors of a few entries: tan(x) at a distance d below its pole pi/2, and 1/x at x = d.
At the automatic steps (2^-5 of max(1, |x|) in float32, 2^-8 in float64 for the 4-point stencil) the stencils of
entries closer than about two steps straddle the pole, with finite values on both sides. A parameter of one entry,
or an output moved by one input (an elementwise op), measures its rounding from its own fourth difference, so that
alone cannot tell the pole from rounding: gradfd measures such an entry's kinks against the rounding the model
eps * (|f| + terms) gives, and refines it until its stencils settle (gradfd.verdict.refine).

For each case, band of distances and dtype, over draws of d log-uniform in the band: checks of a single-entry loss
``func(x).sum()`` and of the elementwise ``func(x)`` of 8 entries that fail (correct gradients), entries with a
verdict, their largest error against the exact derivative and median error estimate (relative), and how often a 1%
and a 0.1% error planted on one entry (the single entry; the entry nearest the pole) is flagged there.

    uv run python benchmarks/bench_poles.py              # records benchmarks/results/poles.json, renders it
    uv run python benchmarks/bench_poles.py --no-record
"""

import math
import warnings

import torch
from sections import arguments, caption, record

import gradfd
from gradfd.demo import bench


# name, func, the point at distance d from the pole, its exact derivative (float64, at the point as rounded)
CASES = [
    ("tan(x), x = pi/2 - d", torch.tan, lambda d: math.pi / 2 - d, lambda x: 1 / torch.cos(x) ** 2),
    ("1/x, x = d", torch.reciprocal, lambda d: d, lambda x: -1 / x**2),
]
BANDS = [(1e-5, 1e-4), (1e-4, 1e-3), (1e-3, 1e-2), (1e-2, 1e-1)]


def run(func, at, derivative, d: torch.Tensor, dtype: torch.dtype, loss: bool) -> dict:
    """One check of ``func`` at the points ``at(d)`` (a loss of one entry when ``loss``), and two with errors
    planted on the entry nearest the pole."""
    x = torch.tensor([at(float(v)) for v in d], dtype=torch.float64).to(dtype)
    f = (lambda x: func(x).sum()) if loss else func
    exact = derivative(x.double())
    near = int(d.argmin())
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradfd.FallbackWarning)
        report = gradfd.check(f, (x.clone().requires_grad_(),), raise_on_failure=False)
        t = report.tensors[0]
        e = t.entries
        index = e["index"] if loss else e["index"] // x.numel()  # (pairs of the elementwise Jacobian: diagonal)
        if not loss:
            diagonal = e["index"] % x.numel() == index
            e = {k: v[diagonal] for k, v in e.items()}
            index = index[diagonal]
        ok = e["verdict"] != 2
        ex = exact[index].abs()
        error = (e["numerical"] - exact[index]).abs()
        out.update(failed=not report.passed, entries=int(index.numel()), verdicts=int(ok.sum()),
                   error=(error / ex)[ok].tolist(), estimate=(e["error_estimate"] / ex)[ok].tolist(),
                   bounded=int((error <= e["error_estimate"])[ok].sum()))
        for rel in (1e-2, 1e-3):
            scale = torch.ones_like(x)
            scale[near] = 1 + rel
            bad = gradfd.check(bench.plant(f, 0, scale), (x.clone().requires_grad_(),), raise_on_failure=False)
            want = [(near,)] if loss else [((near,), (near,))]
            out[rel] = bad.tensors[0].disagreeing() == want
    return out


def render(data: dict) -> str:
    lines = [caption(data), "", "Draws of d log-uniform in each band (seeds: " + "; ".join(
                 f"{name} {bench.span(seeds)}" for name, seeds in data["ranges"].items())
             + "; the verdict rules were tuned on the first range only), for a loss of one entry and for the "
             "elementwise op on 8 entries (one at d, the others in (d, 10 d)): checks that fail (correct gradients); "
             "entries with a verdict (agree or disagree; the rest are unresolved); their largest error against the "
             "exact derivative and median error estimate, relative, and how many of them the estimate bounds; a 1% "
             "and a 0.1% error planted on the entry nearest the pole, flagged there.", "",
             "| case | d | dtype | kind | seeds | false failures | with a verdict | max rel. error | median estimate | "
             "estimate bounds the error | planted 1% flagged | planted 0.1% flagged |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
    for r in data["rows"]:
        lines.append(f"| {r['case']} | {r['lo']:g} .. {r['hi']:g} | {r['dtype']} | {r['kind']} | {r['seeds']} | "
                     f"{r['failed']} / {r['draws']} | {r['verdicts']} / {r['entries']} | {fmt(r['error'])} | "
                     f"{fmt(r['estimate'])} | {r['bounded']} / {r['verdicts']} | {r['planted_1e-2']} / {r['draws']} | "
                     f"{r['planted_1e-3']} / {r['draws']} |")
    return "\n".join(lines)


RENDER = {"poles": render}


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--draws", type=int, default=10, help="draws per case, band, dtype and kind, per seed range")
    args = ap.parse_args()
    ranges = bench.seed_ranges(args.draws)
    out = []
    for name, func, at, derivative in CASES:
        for lo, hi in BANDS:
            for dtype in (torch.float32, torch.float64):
                for loss in (True, False):
                    for label, seeds in ranges.items():
                        rows = []
                        for draw in seeds:
                            gen = torch.Generator().manual_seed(draw)
                            d = lo * (hi / lo) ** torch.rand(1, generator=gen, dtype=torch.float64)
                            if not loss:  # the others farther away, up to 10 d
                                d = torch.cat([d, d * 10 ** torch.rand(7, generator=gen, dtype=torch.float64)])
                            rows.append(run(func, at, derivative, d, dtype, loss))
                        errors = [v for r in rows for v in r["error"]]
                        estimates = sorted(v for r in rows for v in r["estimate"])
                        out.append({"case": name, "lo": lo, "hi": hi, "dtype": str(dtype).replace("torch.", ""),
                                    "kind": "loss" if loss else "elementwise", "seeds": label, "draws": len(rows),
                                    "failed": sum(r["failed"] for r in rows),
                                    "verdicts": sum(r["verdicts"] for r in rows),
                                    "entries": sum(r["entries"] for r in rows),
                                    "error": max(errors) if errors else None,
                                    "estimate": estimates[len(estimates) // 2] if estimates else None,
                                    "bounded": sum(r["bounded"] for r in rows),
                                    "planted_1e-2": sum(r[1e-2] for r in rows),
                                    "planted_1e-3": sum(r[1e-3] for r in rows)})
                        print(out[-1], flush=True)
    data = {"machine": bench.machine_info(), "command": "uv run python benchmarks/bench_poles.py", "ranges": ranges,
            "rows": out}
    print(record("poles", data, write=not args.no_record))


if __name__ == "__main__":
    main()
