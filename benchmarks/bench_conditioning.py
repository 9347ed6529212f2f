"""False failures of correct float32 gradients where the function is ill-conditioned: ``layer_norm`` of short rows
after elementwise maps. ``sigmoid(sigmoid(x))`` squeezes a row into (0.6, 0.73), the norm divides by the row's small
spread, and the float32 finite differences of some entries settle on a value 1e-3 off the derivative at every step
small enough to shed truncation -- a rounding error correlated over the nodes, which the fourth differences gradfd
measures the rounding with do not see (README, "A known false failure"). This benchmark counts how often a correct
gradient fails, by exact columns (``batching="vmap"``) and through the default (colored) pass.

    uv run python benchmarks/bench_conditioning.py              # prints and records in RESULTS.md and README.md
    uv run python benchmarks/bench_conditioning.py --no-record
"""

import argparse
from pathlib import Path

import torch

import gradfd
from gradfd import bench

HERE = Path(__file__).resolve().parent
MAPS = {
    "sigmoid(sigmoid(x))": lambda t: torch.sigmoid(torch.sigmoid(t)),
    "sigmoid(x)": torch.sigmoid,
    "tanh(x)": torch.tanh,
    "sin(x)": torch.sin,
}
SHAPES = [(7, 4), (4, 7), (3, 8, 5)]


def failures(inner, dtype: torch.dtype, seeds: int, **options) -> list[str]:
    """The checks of ``layer_norm(inner(x))`` over the last dimension that fail, as ``shape/seed`` strings."""
    failed = []
    for shape in SHAPES:
        for seed in range(seeds):
            x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
            func = lambda t: torch.nn.functional.layer_norm(inner(t), t.shape[-1:])  # noqa: E731
            report = gradfd.check(func, (x.requires_grad_(),), raise_on_failure=False, **options)
            if not report.passed:
                failed.append(f"{'x'.join(map(str, shape))}/{seed}")
    return failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=15)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    n = len(SHAPES) * args.seeds
    lines = [f"Machine: {bench.describe_machine(bench.machine_info())}. Command: "
             "`uv run python benchmarks/bench_conditioning.py`.", "",
             f"Correct gradients of `layer_norm(map(x))` over the last dimension, shapes "
             f"{', '.join('x'.join(map(str, s)) for s in SHAPES)}, {args.seeds} seeds each: checks that fail "
             "(shape/seed of the failures).", "",
             "| map | dtype | exact columns fail | colored pass (default) fails |", "|---|---|---|---|"]
    for name, inner in MAPS.items():
        for dtype in (torch.float32, torch.float64):
            exact = failures(inner, dtype, args.seeds, batching="vmap")
            colored = failures(inner, dtype, args.seeds)
            cell = lambda f: f"{len(f)} / {n}" + (f" ({', '.join(f)})" if f else "")  # noqa: E731
            lines.append(f"| {name} | {str(dtype).replace('torch.', '')} | {cell(exact)} | {cell(colored)} |")
            print(lines[-1], flush=True)
    bench.publish("conditioning", "\n".join(lines), HERE, record=not args.no_record)


if __name__ == "__main__":
    main()
