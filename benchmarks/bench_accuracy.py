"""Issue 3's measurements: accuracy of the numerical gradient and of its error estimate, the verdicts of
gradfd.check on correct and planted-wrong gradients, and gradfd.check against torch.autograd.gradcheck.

    uv run python benchmarks/bench_accuracy.py             # prints and records in RESULTS.md (and README.md)
    uv run python benchmarks/bench_accuracy.py --no-record
    uv run python benchmarks/bench_accuracy.py --floor     # only the float32 floor: errors over a scan of steps
"""

import argparse
from pathlib import Path

from gradfd import bench

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20, help="random draws of each verdict test function")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--floor", action="store_true", help="only the float32 accuracy floor over a scan of steps")
    args = ap.parse_args()
    info = bench.machine_info()
    if args.floor:
        floor(info, args.no_record)
        return
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
             "error on the largest-gradient entry of each tensor, and of two ReLU MLPs: 64 samples, 30-20-4 (700 "
             "entries; the planted error on W1), and 256 samples, 64-32-10 (2400 entries). At the float32 steps "
             "most first-layer stencils of these networks straddle a ReLU switch. \"First 6 entries\": the 1e-3 "
             "error planted on the largest-gradient entry among the first 6 of W1 of the 64-sample MLP with tanh for "
             "ReLU (the entries the engine's timing probe evaluates in chunks of 2 and 4).", "",
             "| dtype | false failures (correct gradients) | planted 1e-3 errors flagged at the right entry | "
             "planted on one of the first 6 entries flagged | ReLU MLP false failures | planted 1e-3 in ReLU MLP W1 "
             "flagged | ReLU MLP (256 samples) false failures |", "|---|---|---|---|---|---|---|"]
    for r in ver:
        lines.append(f"| {r['dtype']} | {r['false_failures']} / {r['checks']} | {r['planted_caught']} / "
                     f"{r['planted']} | {r['first_caught']} / {r['relu_checks']} | {r['relu_false_failures']} / "
                     f"{r['relu_checks']} | {r['relu_planted_caught']} / {r['relu_checks']} | "
                     f"{r['relu_big_false_failures']} / {r['relu_checks']} |")
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


def floor(info: dict, no_record: bool) -> None:
    """The float32 accuracy floor of the smooth suite: median relative errors at automatic steps x 1/4 ... 16."""
    head = (f"Machine: {bench.describe_machine(info)}. Command: `uv run python benchmarks/bench_accuracy.py "
            "--floor`.\n")
    rows = bench.accuracy_floor()
    lines = [head, "float32, smooth suite (3 draws), median relative error per entry against the float64 derivative. "
             "\"best step\": the best of the automatic step x 1/4, 1/2, 1, 2, 4, 8, 16 for that function, chosen in "
             "hindsight; \"per-entry oracle\": every entry at its own best of those steps (a lower bound for any "
             "step rule with that stencil).", "",
             "| stencil | function | automatic step | best step (factor) | per-entry oracle |", "|---|---|---|---|---|"]
    for r in rows:
        name = f"**{r['function']}**" if r["function"] == "all" else r["function"]
        lines.append(f"| {r['stencil']} | {name} | {r['automatic']:.1e} | {r['best']:.1e} (x{r['best_scale']:g}) | "
                     f"{r['oracle_entry']:.1e} |")
    text = "\n".join(lines)
    print(text)
    if not no_record:
        bench.record_section(HERE / "RESULTS.md", "accuracy-floor", text)


if __name__ == "__main__":
    main()
