"""Issue 3's measurements: accuracy of the numerical gradient and of its error estimate, the verdicts of
gradfd.check on correct and planted-wrong gradients, and gradfd.check against torch.autograd.gradcheck.

    uv run python benchmarks/bench_accuracy.py             # prints and records in RESULTS.md (and README.md)
    uv run python benchmarks/bench_accuracy.py --no-record
"""

import argparse
from pathlib import Path

from gradfd import bench

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20, help="random draws of each verdict test function")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    info = bench.machine_info()
    head = f"Machine: {bench.describe_machine(info)}. Command: `uv run python benchmarks/bench_accuracy.py`.\n"

    acc = bench.accuracy_table()
    lines = [head, "Smooth suite: exp, sin, tanh, a cubic (16 entries each), the lesson's linear and quadratic "
             "regressions, a tanh MLP; 3 draws; error against the float64 derivative at the same point; automatic "
             "steps.", "",
             "| dtype | stencil | median relative error | median error / max abs gradient | estimate bounds the "
             "true error | entries |", "|---|---|---|---|---|---|"]
    for r in acc:
        lines.append(f"| {r['dtype']} | {r['stencil']} | {r['median_rel_error']:.1e} | "
                     f"{r['median_error_over_max']:.1e} | {100 * r['estimate_bounds_error']:.1f}% | {r['entries']} |")
    accuracy_text = "\n".join(lines)

    ver = bench.verdict_table(args.seeds)
    lines = [head, f"{args.seeds} draws of each smooth-suite function (checks of all tensors), a planted 1e-3 relative "
             "error on the largest-gradient entry of each tensor, and a ReLU MLP (64 samples, 30-20-4, 700 "
             "entries).", "",
             "| dtype | false failures (correct gradients) | planted 1e-3 errors flagged at the right entry | "
             "ReLU MLP false failures |", "|---|---|---|---|"]
    for r in ver:
        lines.append(f"| {r['dtype']} | {r['false_failures']} / {r['checks']} | {r['planted_caught']} / "
                     f"{r['planted']} | {r['relu_false_failures']} / {r['relu_checks']} |")
    verdict_text = "\n".join(lines)

    cmp_rows = bench.check_vs_gradcheck()
    lines = [head, "Default settings of each tool. \"passes correct\": the correct gradient is accepted; "
             "\"flags 1e-3\": a 1e-3 relative error planted on the largest-gradient entry is reported.", "",
             "| case | dtype | method | time | passes correct | flags 1e-3 |", "|---|---|---|---|---|---|"]
    for r in cmp_rows:
        lines.append(f"| {r['case']} | {r['dtype']} | {r['method']} | {r['seconds'] * 1e3:.1f} ms | "
                     f"{'yes' if r['passes_correct'] else 'NO'} | {'yes' if r['flags_planted_1e-3'] else 'no'} |")
    compare_text = "\n".join(lines)

    print(accuracy_text, verdict_text, compare_text, sep="\n\n")
    if not args.no_record:
        for path in (HERE / "RESULTS.md", HERE.parent / "README.md"):
            bench.record_section(path, "accuracy", accuracy_text)
            bench.record_section(path, "verdicts", verdict_text)
        bench.record_section(HERE / "RESULTS.md", "check-vs-gradcheck", compare_text)


if __name__ == "__main__":
    main()
