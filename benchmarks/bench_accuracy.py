"""Accuracy of the numerical gradient and of its error estimate, the verdicts of gradfd.check on correct and
planted-wrong gradients (on the seeds the verdict rules were tuned on and on held-out seeds), and gradfd.check
against torch.autograd.gradcheck.

    uv run python benchmarks/bench_accuracy.py             # records accuracy, verdicts, check-vs-gradcheck
    uv run python benchmarks/bench_accuracy.py --only verdicts --held-out 100
    uv run python benchmarks/bench_accuracy.py --floor     # only the float32 floor: errors over a scan of steps
    uv run python benchmarks/bench_accuracy.py --no-record # print only

Each table is rendered by RENDER[name] from its record in benchmarks/results/ (benchmarks/sections.py).
"""


from sections import arguments, caption, record

from gradfd.demo import bench

COMMAND = "uv run python benchmarks/bench_accuracy.py"


def render_accuracy(data: dict) -> str:
    lines = [caption(data), "", f"Smooth suite: exp, sin, tanh, a cubic (16 entries each), the lesson's linear and "
             f"quadratic regressions, a tanh MLP; {data['draws']} draws; error against the float64 derivative at the "
             "same point; automatic steps.", "",
             "| dtype | stencil | median relative error | median error / max abs gradient | estimate bounds the "
             "true error | entries |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['dtype']} | {r['stencil']} | {r['median_rel_error']:.1e} | "
                     f"{r['median_error_over_max']:.1e} | {100 * r['estimate_bounds_error']:.1f}% | {r['entries']} |")
    f32 = {r["stencil"]: r["median_rel_error"] for r in data["rows"] if r["dtype"] == "float32"}
    verdict = lambda value, target: f"{value:.1e}, {'met' if value <= target else 'NOT met'}"  # noqa: E731
    lines += ["", f"Issue 3's float32 targets, median relative error at the automatic steps: at most 1e-5 for the "
              f"default 4-point stencil ({verdict(f32['four_point'], 1e-5)}) and 1e-6 for Richardson "
              f"({verdict(f32['richardson'], 1e-6)})."]
    return "\n".join(lines)


def render_verdicts(data: dict) -> str:
    ranges = data["ranges"]
    lines = [caption(data), "", "Draws of each smooth-suite function (checks of all tensors), a planted 1e-3 "
             "relative error on the largest-gradient entry of each tensor, and of two ReLU MLPs: 64 samples, 30-20-4 "
             "(700 entries; the planted error on W1), and 256 samples, 64-32-10 (2400 entries). At the float32 steps "
             "most first-layer stencils of these networks straddle a ReLU switch. \"First 6 entries\": the 1e-3 "
             "error planted on the largest-gradient entry among the first 6 of W1 of the 64-sample MLP with tanh for "
             "ReLU (the entries the engine's timing probe evaluates in chunks of 2 and 4). Seeds: "
             + "; ".join(f"{name} {bench.span(seeds)} ({len(seeds)} draws)" for name, seeds in ranges.items())
             + ". The verdict rules were tuned on the first range; the held-out range was never used to tune them"
             + ("; the fresh range judged the last change of a rule (gradfd/demo/bench.py names it)." if "fresh" in
                ranges else "."),
             "", "| seeds | dtype | false failures (correct gradients) | planted 1e-3 errors flagged at the right "
             "entry | planted on one of the first 6 entries flagged | ReLU MLP false failures | planted 1e-3 in ReLU "
             "MLP W1 flagged | ReLU MLP (256 samples) false failures |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in data["rows"].items():
        for r in rows:
            lines.append(f"| {name} | {r['dtype']} | {r['false_failures']} / {r['checks']} | {r['planted_caught']} / "
                         f"{r['planted']} | {r['first_caught']} / {r['relu_checks']} | {r['relu_false_failures']} / "
                         f"{r['relu_checks']} | {r['relu_planted_caught']} / {r['relu_checks']} | "
                         f"{r['relu_big_false_failures']} / {r['relu_checks']} |")
    return "\n".join(lines)


def render_compare(data: dict) -> str:
    lines = [caption(data), "", "Default settings of each tool. \"passes correct\": the correct gradient is accepted; "
             "\"flags 1e-3\": a 1e-3 relative error planted on the largest-gradient entry is reported.", "",
             "| case | dtype | method | time | passes correct | flags 1e-3 |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['case']} | {r['dtype']} | {r['method']} | {r['seconds'] * 1e3:.1f} ms | "
                     f"{'yes' if r['passes_correct'] else 'NO'} | {'yes' if r['flags_planted_1e-3'] else 'no'} |")
    return "\n".join(lines)


def render_floor(data: dict) -> str:
    lines = [caption(data), "", "float32, smooth suite (3 draws), median relative error per entry against the float64 "
             "derivative. \"best step\": the best of the automatic step x 1/4, 1/2, 1, 2, 4, 8, 16 for that function, "
             "chosen in hindsight; \"per-entry oracle\": every entry at its own best of those steps (a lower bound for "
             "any step rule with that stencil).", "",
             "| stencil | function | automatic step | best step (factor) | per-entry oracle |", "|---|---|---|---|---|"]
    for r in data["rows"]:
        name = f"**{r['function']}**" if r["function"] == "all" else r["function"]
        lines.append(f"| {r['stencil']} | {name} | {r['automatic']:.1e} | {r['best']:.1e} (x{r['best_scale']:g}) | "
                     f"{r['oracle_entry']:.1e} |")
    return "\n".join(lines)


RENDER = {"accuracy": render_accuracy, "verdicts": render_verdicts, "check-vs-gradcheck": render_compare,
          "accuracy-floor": render_floor}


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--tuned", type=int, default=len(bench.TUNED_SEEDS), help="draws from the tuned seed range")
    ap.add_argument("--held-out", type=int, default=len(bench.HELD_OUT_SEEDS), help="draws from the held-out range")
    ap.add_argument("--fresh", type=int, default=len(bench.FRESH_SEEDS),
                    help="draws from the range that judged the last rule change")
    ap.add_argument("--only", default="accuracy,verdicts,check-vs-gradcheck", help="comma-separated tables")
    ap.add_argument("--floor", action="store_true", help="only the float32 accuracy floor over a scan of steps")
    args = ap.parse_args()
    write = not args.no_record
    info = bench.machine_info()
    if args.floor:
        print(record("accuracy-floor", {"machine": info, "command": f"{COMMAND} --floor",
                                        "rows": bench.accuracy_floor()}, write=write))
        return
    only = args.only.split(",")
    if "accuracy" in only:
        print(record("accuracy", {"machine": info, "command": COMMAND, "draws": 3,
                                  "rows": bench.accuracy_table(seeds=3)}, write=write), "\n", flush=True)
    if "verdicts" in only:
        ranges = bench.seed_ranges(args.tuned, args.held_out, args.fresh)
        rows = {}
        for name, seeds in ranges.items():
            rows[name] = bench.verdict_table(seeds)
            print(name, rows[name], flush=True)
        print(record("verdicts", {"machine": info, "command": COMMAND, "ranges": ranges, "rows": rows}, write=write),
              "\n", flush=True)
    if "check-vs-gradcheck" in only:
        print(record("check-vs-gradcheck", {"machine": info, "command": COMMAND, "rows": bench.check_vs_gradcheck()},
                     write=write))


if __name__ == "__main__":
    main()
