"""The command-line benchmark suite (`gradfd bench`) recorded for the docs: the reference loop, the generic and
structured engines and torch.autograd.gradcheck on the lesson's problems, an MLP, a Linear layer and the custom op.

    uv run python benchmarks/bench_suite.py            # = gradfd bench --out benchmarks/results/cpu, then renders
    uv run python benchmarks/bench_suite.py --quick

`gradfd bench --out DIR` writes DIR/bench.json; this script runs it into benchmarks/results/cpu/ and re-renders the
"bench-cpu" section from that record (benchmarks/sections.py).
"""

import argparse
import math

from sections import RESULTS, update

from gradfd.demo import bench

COMMAND = "uv run gradfd bench --out benchmarks/results/cpu"


def render(data: dict) -> str:
    rows = [bench.Row(**{k: (math.nan if v is None else v) for k, v in r.items()}) for r in data["rows"]]
    notes = "".join(f"\nnote: {n}" for n in data["machine"].get("notes", []))
    return (f"Command: `{COMMAND}`. Machine: {bench.describe_machine(data['machine'])}\n\n"
            f"{bench.suite_table(rows)}{notes}")


RENDER = {"bench-cpu": render}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from gradfd.cli import main as cli

    cli(["bench", "--out", str(RESULTS / "cpu")] + (["--quick"] if args.quick else []))
    update(["bench-cpu"])


if __name__ == "__main__":
    main()
