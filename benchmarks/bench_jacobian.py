"""Issue 4's measurements: Jacobian checks of an elementwise and a row-wise op (gradfd.check full/directional vs
torch.autograd.gradcheck slow/fast, float64, CPU), and the float32-only custom op against both tools.

    uv run python benchmarks/bench_jacobian.py             # records results/jacobian.json, custom-op.json
    uv run python benchmarks/bench_jacobian.py --no-record --sizes 1000,10000
"""

import sys

from sections import arguments, caption, record

from gradfd import ops
from gradfd.demo import bench


BAR_N, BAR_RATIO = 10**4, 20.0  # issue 4: full mode >= 20x faster than gradcheck's slow mode at 1e4 inputs


def render_jacobian(data: dict) -> str:
    rows = data["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [caption(data), "", "float64, one run each at 1e4 and above (median of 3 below); \"-\": not run "
             "(gradcheck's slow mode forms the dense n x n Jacobian: 80 GB at 1e5). gradfd's full mode checks all n^2 "
             "entries, column-compressed (colored) for these patterns and verified on both sides.", "",
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
    ratios = {r["op"]: None for r in rows if r["n"] == BAR_N}
    for op in ratios:
        cells = {r["method"]: r["seconds"] for r in rows if r["op"] == op and r["n"] == BAR_N}
        if cells.get("gradcheck slow") and cells.get("gradfd full"):
            ratios[op] = cells["gradcheck slow"] / cells["gradfd full"]
    if ratios:
        met = all(v is not None and v >= BAR_RATIO for v in ratios.values())
        lines += ["", f"Issue 4's bar, gradfd's full mode at least {BAR_RATIO:g}x faster than gradcheck's slow mode at "
                  f"n = {BAR_N:,}: {'met' if met else 'NOT met'} ("
                  + ", ".join(f"{op}: {'-' if v is None else f'{v:.1f}x'}" for op, v in ratios.items()) + ")."]
    return "\n".join(lines)


def render_custom_op(data: dict) -> str:
    lines = [caption(data), "", "x: 32x16 float32, bias: 16 float32.", "", "| op | method | verdict | time |",
             "|---|---|---|---|"]
    if data.get("unavailable"):
        lines.append(f"| (kernels unavailable: {data['unavailable']}) | | | |")
    for r in data["rows"]:
        lines.append(f"| {r['op']} | {r['method']} | {r['verdict']} | {r['seconds'] * 1e3:.0f} ms |")
    return "\n".join(lines)


RENDER = {"jacobian": render_jacobian, "custom-op": render_custom_op}


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--sizes", default="1000,10000,100000")
    args = ap.parse_args()
    info = bench.machine_info()
    command = "uv run python benchmarks/bench_jacobian.py"
    rows = bench.jacobian_suite([int(s) for s in args.sizes.split(",")],
                                progress=lambda m: print("  ..", m, file=sys.stderr, flush=True))
    print(record("jacobian", {"machine": info, "command": command, "rows": rows}, write=not args.no_record), "\n")
    available = ops.kernels_available()
    op = {"machine": info, "command": command, "rows": bench.custom_op_comparison() if available else [],
          "unavailable": None if available else ops.unavailable_reason()}
    print(record("custom-op", op, write=not args.no_record))


if __name__ == "__main__":
    main()
