"""Issue 2's benchmark: the reference loop, the batched engine and torch.autograd.gradcheck (slow mode), timed in
one run on the lesson's linear regression and a one-hidden-layer MLP, N = 10 .. 10^4 parameters, float64.

    uv run python benchmarks/bench_engine.py            # records results/engine-cpu.json, renders it
    uv run python benchmarks/bench_engine.py --no-record
"""

import sys
from dataclasses import asdict

from sections import arguments, caption, record

from gradfd.demo import bench


def render(data: dict) -> str:
    rows = [bench.Row(**r) for r in data["rows"]]
    time = {(r.problem, r.n, r.method): r.seconds for r in rows}
    speed = {(p, n): time[p, n, "reference"] / time[p, n, "gradfd"] for p, n, m in time if m == "gradfd"}
    fast = [v for (p, n), v in speed.items() if n in (10**3, 10**4)]
    met_fast = bool(fast) and min(fast) >= 5
    met_slow = min(speed.values()) >= 1 / 1.2
    return (f"{caption(data)}\nMedian wall time per full gradient (h = 1e-5, float64); speed-up = reference time / "
            f"method time.\n\n" + bench.markdown_table(rows)
            + f"\nBars: the engine at least 5x faster than the reference at N = 10^3 and 10^4 on both problems: "
            f"{'met' if met_fast else 'NOT met'} (smallest {min(fast, default=float('nan')):.1f}x); never more than "
            f"1.2x slower at any size: {'met' if met_slow else 'NOT met'} (smallest speed-up "
            f"{min(speed.values()):.1f}x).")


RENDER = {"engine-cpu": render, "engine-cuda": render}


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--sizes", default="10,100,1000,10000")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    rows = bench.engine_suite(sizes=[int(s) for s in args.sizes.split(",")], device=args.device,
                              progress=lambda msg: print("  ..", msg, file=sys.stderr, flush=True))
    data = {"machine": bench.machine_info(), "command": "uv run python benchmarks/bench_engine.py"
            + (f" --device {args.device}" if args.device != "cpu" else ""), "rows": [asdict(r) for r in rows]}
    print(record(f"engine-{args.device}", data, write=not args.no_record))


if __name__ == "__main__":
    main()
