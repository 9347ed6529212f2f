"""Issue 4's measurements: Jacobian checks of an elementwise and a row-wise op (gradfd.check full/directional vs
torch.autograd.gradcheck slow/fast, float64, CPU), and the float32-only custom op against both tools.

    uv run python benchmarks/bench_jacobian.py             # prints and records in RESULTS.md (and README.md)
    uv run python benchmarks/bench_jacobian.py --no-record --sizes 1000,10000
"""

import argparse
import sys
from pathlib import Path

from gradfd import bench, ops

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    info = bench.machine_info()
    head = f"Machine: {bench.describe_machine(info)}. Command: `uv run python benchmarks/bench_jacobian.py`.\n"
    rows = bench.jacobian_suite([int(s) for s in args.sizes.split(",")],
                                progress=lambda m: print("  ..", m, file=sys.stderr, flush=True))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [head, "float64, one run each at 1e4 and above (median of 3 below); \"-\": not run (gradcheck's slow "
             "mode forms the dense n x n Jacobian: 80 GB at 1e5). gradfd's full mode checks all n^2 entries, "
             "column-compressed (colored) for these patterns and verified on both sides.", "",
             "| op | n | " + " | ".join(methods) + " | full: gradcheck slow / gradfd full |",
             "|---|---|" + "---|" * len(methods) + "---|"]
    for op in dict.fromkeys(r["op"] for r in rows):
        for n in sorted({r["n"] for r in rows if r["op"] == op}):
            cells = {r["method"]: r for r in rows if r["op"] == op and r["n"] == n}
            fmt = lambda r: "-" if r["seconds"] is None else (  # noqa: E731
                f"{r['seconds'] * 1e3:.0f} ms" if r["seconds"] < 1 else f"{r['seconds']:.2f} s") + (
                "" if r["passed"] in (True, None) else " (FAILED)")
            a, b = cells.get("gradcheck slow"), cells.get("gradfd full")
            ratio = f"{a['seconds'] / b['seconds']:.1f}x" if a and b and a["seconds"] and b["seconds"] else "-"
            lines.append(f"| {op} | {n:,} | " + " | ".join(fmt(cells[m]) for m in methods) + f" | {ratio} |")
    jac_text = "\n".join(lines)
    lines = [head, "x: 32x16 float32, bias: 16 float32.", "", "| op | method | verdict | time |", "|---|---|---|---|"]
    if ops.kernels_available():
        for r in bench.custom_op_comparison():
            lines.append(f"| {r['op']} | {r['method']} | {r['verdict']} | {r['seconds'] * 1e3:.0f} ms |")
    else:
        lines.append(f"| (kernels unavailable: {ops.unavailable_reason()}) | | | |")
    op_text = "\n".join(lines)
    print(jac_text, op_text, sep="\n\n")
    if not args.no_record:
        for path in (HERE / "RESULTS.md", HERE.parent / "README.md"):
            bench.record_section(path, "jacobian", jac_text)
            bench.record_section(path, "custom-op", op_text)


if __name__ == "__main__":
    main()
