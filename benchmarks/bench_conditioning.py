"""False failures of correct float32 gradients where the function is ill-conditioned: ``layer_norm`` of short rows
after elementwise maps. ``sigmoid(sigmoid(x))`` squeezes a row into (0.6, 0.73), the norm divides by the row's small
spread, and the float32 finite differences of some entries settle on a value 1e-3 off the derivative at every step
small enough to shed truncation -- a rounding error correlated over the nodes, which the fourth differences gradfd
measures the rounding with do not see (docs/verdicts.md, "A known false failure"). This benchmark counts how often a correct
gradient fails, by exact columns (``batching="vmap"``) and through the default (colored) pass.

    uv run python benchmarks/bench_conditioning.py              # records benchmarks/results/conditioning.json
    uv run python benchmarks/bench_conditioning.py --no-record
"""


import torch
from sections import arguments, caption, record

import gradfd
from gradfd.demo import bench

MAPS = {
    "sigmoid(sigmoid(x))": lambda t: torch.sigmoid(torch.sigmoid(t)),
    "sigmoid(x)": torch.sigmoid,
    "tanh(x)": torch.tanh,
    "sin(x)": torch.sin,
}
SHAPES = [(7, 4), (4, 7), (3, 8, 5)]


def failures(inner, dtype: torch.dtype, seeds: list[int], **options) -> list[str]:
    """The checks of ``layer_norm(inner(x))`` over the last dimension that fail, as ``shape/seed`` strings."""
    failed = []
    for shape in SHAPES:
        for seed in seeds:
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
            func = lambda t: torch.nn.functional.layer_norm(inner(t), t.shape[-1:])  # noqa: E731
            report = gradfd.check(func, (x.requires_grad_(),), raise_on_failure=False, **options)
            if not report.passed:
                failed.append(f"{'x'.join(map(str, shape))}/{seed}")
    return failed


def render(data: dict) -> str:
    lines = [caption(data), "", "Correct gradients of `layer_norm(map(x))` over the last dimension, shapes "
             f"{', '.join(data['shapes'])}, seeds " + "; ".join(
                 f"{name} {bench.span(seeds)}" for name, seeds in data["ranges"].items())
             + " for each shape: checks that fail (shape/seed of the failures).", "",
             "| map | dtype | seeds | exact columns fail | colored pass (default) fails |", "|---|---|---|---|---|"]
    cell = lambda f, n: f"{len(f)} / {n}" + (f" ({', '.join(f)})" if f else "")  # noqa: E731
    for r in data["rows"]:
        lines.append(f"| {r['map']} | {r['dtype']} | {r['seeds']} | {cell(r['exact'], r['checks'])} | "
                     f"{cell(r['colored'], r['checks'])} |")
    return "\n".join(lines)


RENDER = {"conditioning": render}


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--seeds", type=int, default=15, help="seeds per shape from each seed range")
    args = ap.parse_args()
    ranges = bench.seed_ranges(args.seeds)
    rows = []
    for name, inner in MAPS.items():
        for dtype in (torch.float32, torch.float64):
            for label, seeds in ranges.items():
                rows.append({"map": name, "dtype": str(dtype).replace("torch.", ""), "seeds": label,
                             "checks": len(SHAPES) * len(seeds),
                             "exact": failures(inner, dtype, seeds, batching="vmap"),
                             "colored": failures(inner, dtype, seeds)})
                print(rows[-1], flush=True)
    data = {"machine": bench.machine_info(), "command": "uv run python benchmarks/bench_conditioning.py",
            "shapes": ["x".join(map(str, s)) for s in SHAPES], "ranges": ranges, "rows": rows}
    print(record("conditioning", data, write=not args.no_record))


if __name__ == "__main__":
    main()
