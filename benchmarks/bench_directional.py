"""What directional mode can see: a 1% or 0.1% error planted on one entry of an N-entry tensor, against correct
twins, in float64 and float32 (``mode="directional"`` with its defaults), beside full mode and beside
``torch.autograd.gradcheck(fast_mode=True)``.

The loss is ``sum(sin(x)**2)``; the planted error multiplies autograd's gradient at one entry (the one with the
largest gradient) by 1 + err (``gradfd.demo.bench.plant``). Seeds: the held-out range (``gradfd.demo.bench.HELD_OUT_SEEDS``).

    uv run python benchmarks/bench_directional.py            # records results/directional.json, renders it
    uv run python benchmarks/bench_directional.py --draws 2 --no-record
"""

import argparse
import time
import warnings

import torch
from sections import caption, record

import gradfd
from gradfd.demo import bench

SIZES = (10**4, 10**5)
ERRORS = (1e-2, 1e-3)
FULL_UP_TO = 10**4  # full mode, for contrast, at the smaller size only (each check of 10^5 entries takes ~15 s here)
# gradcheck's fast mode runs in float64 only: in float32 it fails every check, and on failure it forms the dense
# N x N Jacobian for its message (10^8 entries at N = 10^4)


def loss(x: torch.Tensor) -> torch.Tensor:
    return (torch.sin(x) ** 2).sum()


def trial(n: int, dtype: torch.dtype, err: float, seed: int, mode: str) -> dict:
    """One correct check and one with ``err`` planted on the largest-gradient entry: whether the correct one passes,
    whether the planted one fails (and, in full mode, at that entry), and the seconds of the correct check."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    i = int(torch.sin(2 * x.double()).abs().argmax())
    scale = torch.ones(n, dtype=dtype)
    scale[i] = 1 + err
    if mode == "gradcheck fast":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            ok = torch.autograd.gradcheck(loss, (x.clone().requires_grad_(),), fast_mode=True, raise_exception=False)
            seconds = time.perf_counter() - t0
            bad = torch.autograd.gradcheck(bench.plant(loss, 0, scale), (x.clone().requires_grad_(),), fast_mode=True,
                                           raise_exception=False)
        return {"passes_correct": bool(ok), "caught": not bad, "seconds": seconds}
    t0 = time.perf_counter()
    ok = gradfd.check(loss, (x.clone().requires_grad_(),), mode=mode, raise_on_failure=False, seed=seed).passed
    seconds = time.perf_counter() - t0
    rep = gradfd.check(bench.plant(loss, 0, scale), (x.clone().requires_grad_(),), mode=mode, raise_on_failure=False,
                       seed=seed)
    caught = not rep.passed
    if mode == "full":
        caught = rep.tensors[0].disagreeing() == [(i,)]
    return {"passes_correct": ok, "caught": caught, "seconds": seconds}


def render(data: dict) -> str:
    lines = [caption(data), "", f"`sum(sin(x)**2)`, a relative error planted on the largest-gradient entry of x; "
             f"{data['draws']} draws per cell (seeds {bench.span(data['seeds'])}), default settings of each mode. "
             "\"caught\": the planted check fails (full mode: at that entry alone); \"correct passes\": the correct "
             "twin passes; time: the correct check (median). Full mode runs at the smaller size only; gradcheck's "
             "fast mode in float64 only (in float32 it fails correct gradients too, and its failure message forms the "
             "dense N x N Jacobian).", "",
             "| dtype | N | planted error | method | caught | correct passes | time |", "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['dtype']} | {r['n']:,} | {r['error']:g} | {r['method']} | {r['caught']} / {r['draws']} | "
                     f"{r['passes_correct']} / {r['draws']} | {r['seconds'] * 1e3:.0f} ms |")
    return "\n".join(lines)


RENDER = {"directional": render}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--methods", default="directional,full,gradcheck fast")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    seeds = list(bench.HELD_OUT_SEEDS)[: args.draws]
    rows = []
    for dtype in (torch.float64, torch.float32):
        for n in SIZES:
            for err in ERRORS:
                for method in args.methods.split(","):
                    if method == "full" and n > FULL_UP_TO or method == "gradcheck fast" and dtype != torch.float64:
                        continue
                    trials = [trial(n, dtype, err, seed, method) for seed in seeds]
                    times = sorted(t["seconds"] for t in trials)
                    rows.append({"dtype": str(dtype).replace("torch.", ""), "n": n, "error": err, "method": method,
                                 "draws": len(trials), "caught": sum(t["caught"] for t in trials),
                                 "passes_correct": sum(t["passes_correct"] for t in trials),
                                 "seconds": times[len(times) // 2]})
                    print(rows[-1], flush=True)
    data = {"machine": bench.machine_info(), "command": "uv run python benchmarks/bench_directional.py",
            "draws": args.draws, "seeds": seeds, "rows": rows}
    print(record("directional", data, write=not args.no_record))


if __name__ == "__main__":
    main()
