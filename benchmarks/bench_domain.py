"""Checks near the edge of a function's domain: log, sqrt and x log x of small positive entries, and a Normal
distribution's scale (torch.distributions validates scale > 0 and raises at scale - 2h). At the automatic steps
(2^-5 in float32) the stencils of such entries reach outside the domain; gradfd retries them at smaller steps
(gradfd.verdict.refine). For each case and dtype: how many entries get a verdict, their error against the exact
derivative (float64 autograd at the same point), the tolerance they were judged with, and whether a 1e-3 relative
error planted on a small entry is flagged there.

    uv run python benchmarks/bench_domain.py              # records benchmarks/results/domain.json, renders it
    uv run python benchmarks/bench_domain.py --no-record
"""

import math
import time
import warnings

import torch
from sections import arguments, caption, record

import gradfd
from gradfd.demo import bench

DATA = torch.randn(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _normal(s: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Normal(0.0, s).log_prob(DATA.to(s.dtype).view(1, -1)).sum()


# name, loss, lower and upper end of the entries' uniform draw
CASES = [
    ("log(x), x in (1e-7, 1e-4)", lambda x: torch.log(x).sum(), 1e-7, 1e-4),
    ("log(x), x in (1e-4, 0.1)", lambda x: torch.log(x).sum(), 1e-4, 0.1),
    ("sqrt(x), x in (1e-6, 0.05)", lambda x: torch.sqrt(x).sum(), 1e-6, 0.05),
    ("x log x, x in (1e-6, 0.05)", lambda x: (x * torch.log(x)).sum(), 1e-6, 0.05),
    ("Normal(0, s).log_prob, s in (1e-3, 0.05)", _normal, 1e-3, 0.05),
]


def run_case(func, lo: float, hi: float, dtype: torch.dtype, seed: int, n: int = 64) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x = (lo + (hi - lo) * torch.rand(n, 1, generator=gen, dtype=torch.float64)).to(dtype)
    exact = torch.func.grad(func)(x.double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradfd.FallbackWarning)
        t0 = time.perf_counter()
        report = gradfd.check(func, (x.clone().requires_grad_(),), raise_on_failure=False)
        seconds = time.perf_counter() - t0
        t = report.tensors[0]
        e = t.entries
        ok = e["verdict"] != 2
        ex = exact.reshape(-1)[e["index"]]
        rel = ((e["numerical"] - ex).abs() / ex.abs())[ok]
        tol = (e["tolerance"] / ex.abs())[ok]
        small = int(x.reshape(-1).argmin())
        scale = torch.ones_like(x)
        scale.view(-1)[small] = 1 + 1e-3
        bad = gradfd.check(bench.plant(func, 0, scale), (x.clone().requires_grad_(),), raise_on_failure=False)
    return dict(entries=n, verdicts=int(ok.sum()), false_failures=int(not report.passed),
                error=float(rel.max()) if rel.numel() else math.nan,
                tolerance=float(tol.median()) if tol.numel() else math.nan,
                caught=int(bad.tensors[0].disagreeing() == [(small, 0)]), seconds=seconds)


def near_edge(case: str, seed: int) -> tuple[bool, bool]:
    """Float64, 8 entries a few automatic steps from the edge among 24 farther away (the setting of
    tests/test_check.py::test_entries_a_few_steps_from_a_domain_edge_are_judged_in_float64): whether every entry
    agrees, and whether a 1e-3 relative error planted on the smallest entry is flagged there."""
    gen = torch.Generator().manual_seed(seed)
    edge, func = (3e-4, CASES[1][1]) if case == "log" else (1e-3, _normal)
    x = torch.cat([torch.rand(8, generator=gen, dtype=torch.float64) * 2e-3 + edge,
                   torch.rand(24, generator=gen, dtype=torch.float64) * 0.1 + 0.02])
    x = x[torch.randperm(32, generator=gen)].view(32, 1)
    small = int(x.argmin())
    scale = torch.ones_like(x)
    scale[small] = 1 + 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradfd.FallbackWarning)
        report = gradfd.check(func, (x.clone().requires_grad_(),), raise_on_failure=False)
        bad = gradfd.check(bench.plant(func, 0, scale), (x.clone().requires_grad_(),), raise_on_failure=False)
    return report.passed and report.tensors[0].agree == 32, bad.tensors[0].disagreeing() == [(small, 0)]


def render(data: dict) -> str:
    ranges = data["ranges"]
    lines = [caption(data), "", "Draws of 64 entries per case (seeds: "
             + "; ".join(f"{name} {bench.span(seeds)}" for name, seeds in ranges.items())
             + "; the verdict rules were tuned on the first range only); automatic steps. \"with a verdict\": entries "
             "that agree or disagree (the rest are unresolved); error and tolerance relative to the exact derivative, "
             "over the entries with a verdict (max error, median tolerance); \"planted\": a 1e-3 relative error on "
             "the smallest entry flagged there; time: one check (median).", "",
             "| case | dtype | seeds | with a verdict | false failures | max rel. error | median tolerance | planted "
             "1e-3 flagged | time |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["cases"]:
        err = "-" if r["error"] is None else f"{r['error']:.1e}"
        tol = "-" if r["tolerance"] is None else f"{r['tolerance']:.1e}"
        lines.append(f"| {r['case']} | {r['dtype']} | {r['seeds']} | {r['verdicts']} / {r['entries']} | "
                     f"{r['false_failures']} / {r['draws']} | {err} | {tol} | {r['caught']} / {r['draws']} | "
                     f"{1e3 * r['seconds']:.0f} ms |")
    edge = data["edge_ranges"]
    lines += ["", "Float64, draws of 8 entries a few steps from the edge (log: x in (3e-4, 2.3e-3); Normal: s in "
              "(1e-3, 3e-3)) among 24 in (0.02, 0.12), seeds " + "; ".join(
                  f"{name} {bench.span(seeds)}" for name, seeds in edge.items())
              + ": checks where all 32 agree, and a 1e-3 error planted on the smallest entry flagged there.", "",
              "| case | seeds | all agree | planted 1e-3 flagged |", "|---|---|---|---|"]
    for r in data["edge"]:
        lines.append(f"| {r['case']} | {r['seeds']} | {r['agree']} / {r['draws']} | {r['caught']} / {r['draws']} |")
    return "\n".join(lines)


RENDER = {"domain": render}


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--seeds", type=int, default=5, help="draws per case from each seed range")
    ap.add_argument("--edge-draws", type=int, default=100, help="draws of the float64 near-edge rows per range")
    args = ap.parse_args()
    ranges = bench.seed_ranges(args.seeds)
    edge_ranges = bench.seed_ranges(args.edge_draws)
    cases = []
    for name, func, lo, hi in CASES:
        for dtype in (torch.float32, torch.float64):
            for label, seeds in ranges.items():
                rows = [run_case(func, lo, hi, dtype, seed) for seed in seeds]
                errs = [r["error"] for r in rows if not math.isnan(r["error"])]
                tols = sorted(r["tolerance"] for r in rows if not math.isnan(r["tolerance"]))
                cases.append({"case": name, "dtype": str(dtype).replace("torch.", ""), "seeds": label,
                              "draws": len(rows), "entries": sum(r["entries"] for r in rows),
                              "verdicts": sum(r["verdicts"] for r in rows),
                              "false_failures": sum(r["false_failures"] for r in rows),
                              "error": max(errs) if errs else None,
                              "tolerance": tols[len(tols) // 2] if tols else None,
                              "caught": sum(r["caught"] for r in rows),
                              "seconds": sorted(r["seconds"] for r in rows)[len(rows) // 2]})
                print(cases[-1], flush=True)
    edge = []
    for case in ("log", "normal"):
        for label, seeds in edge_ranges.items():
            rows = [near_edge(case, seed) for seed in seeds]
            edge.append({"case": case, "seeds": label, "draws": len(rows), "agree": sum(a for a, _ in rows),
                         "caught": sum(b for _, b in rows)})
            print(edge[-1], flush=True)
    data = {"machine": bench.machine_info(), "command": "uv run python benchmarks/bench_domain.py", "ranges": ranges,
            "edge_ranges": edge_ranges, "cases": cases, "edge": edge}
    print(record("domain", data, write=not args.no_record))


if __name__ == "__main__":
    main()
