"""Issue 2's benchmark: the reference loop, the batched engine and torch.autograd.gradcheck (slow mode), timed in
one run on the lesson's linear regression and a one-hidden-layer MLP, N = 10 .. 10^4 parameters, float64.

    uv run python benchmarks/bench_engine.py            # prints the table, records it in RESULTS.md and README.md
    uv run python benchmarks/bench_engine.py --no-record
"""

import argparse
import sys
from pathlib import Path

from gradfd import bench

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,1000,10000")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    info = bench.machine_info()
    rows = bench.engine_suite(sizes=[int(s) for s in args.sizes.split(",")], device=args.device,
                              progress=lambda msg: print("  ..", msg, file=sys.stderr, flush=True))
    table = bench.markdown_table(rows)
    text = (f"Machine: {bench.describe_machine(info)}. Command: `uv run python benchmarks/bench_engine.py`.\n"
            f"Median wall time per full gradient (h = 1e-5, float64); speed-up = reference time / method time.\n\n"
            + table)
    print(text)
    if not args.no_record:
        bench.record_section(HERE / "RESULTS.md", f"engine-{args.device}", text)
        bench.record_section(HERE.parent / "README.md", f"engine-{args.device}", text)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / f"engine-{args.device}.json").write_text(bench.rows_to_json(rows, info))


if __name__ == "__main__":
    main()
