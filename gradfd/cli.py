"""The ``gradfd`` command line: ``gradfd demo``, ``gradfd bench``, ``gradfd check path/to/file.py:function``.

Exit codes: 0 success (or a passing check that compared something in every tensor), 1 a failing check or a tensor
of which nothing could be compared, 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys

import torch

__all__ = ["main"]


def bench(devices: list[str], quick: bool, out_dir: str, stream=None) -> int:
    """Run the standard benchmark suite; print the table; write JSON and a PNG plot into ``out_dir``."""
    from pathlib import Path

    from tqdm import tqdm

    from .demo import bench as B

    stream = stream or sys.stdout
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = B.machine_info()
    problems = sum(len(B._suite_problems(d, quick)) for d in devices if d == "cpu" or torch.cuda.is_available())
    bar = tqdm(total=problems * 5, desc="gradfd bench", unit="run", leave=False)

    def progress(message: str) -> None:
        bar.set_postfix_str(message[:60])
        bar.update(1)

    rows, notes = B.standard_suite(devices, quick=quick, progress=progress)
    bar.close()
    table = B.suite_table(rows)
    print(f"gradfd bench ({'quick' if quick else 'full'}): {B.describe_machine(info)}\n", file=stream)
    print(table, file=stream)
    for note in notes:
        print(f"note: {note}", file=stream)
    (out / "bench.json").write_text(B.rows_to_json(rows, {**info, "notes": notes, "quick": quick}))
    (out / "bench.md").write_text(f"{B.describe_machine(info)}\n\n{table}\n")
    try:
        B.suite_plot(rows, out / "bench.png")
        print(f"\nwrote {out / 'bench.json'}, {out / 'bench.md'} and {out / 'bench.png'}", file=stream)
    except ImportError as exc:
        print(f"\nwrote {out / 'bench.json'} and {out / 'bench.md'} (no plot: {exc})", file=stream)
    return 0


class UsageError(Exception):
    """A bad command line: exit status 2."""


def _load_target(target: str):
    """Import ``path/to/file.py:function`` and call the function."""
    import importlib.util
    from pathlib import Path

    path, sep, name = target.rpartition(":")
    if not sep or not path or not name:
        raise UsageError(f"expected path/to/file.py:function, got {target!r}")
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(f"gradfd_user_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UsageError(f"{path} has no function {name!r}")
    return fn()


def run_check(args, stream=None) -> int:
    """``gradfd check``: load the target, run gradfd.check, print the report; 0 pass, 1 fail."""
    import json

    import gradfd

    from .report import CheckReport

    stream = stream or sys.stdout
    if args.distributed:  # every rank runs the same file: the same draws make it the same problem (verified in check)
        torch.manual_seed(0)
        if (args.device or "").startswith("cuda"):  # each rank on its own GPU, before the target allocates
            import os

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    result = _load_target(args.target)
    distributed = _start_distributed(args) if args.distributed else False
    options = dict(mode=args.mode, samples=args.samples, directions=args.directions, engine=args.engine,
                   raise_on_failure=False, progress=not args.no_progress, order=args.order,
                   check_forward_ad=args.forward_ad, distributed=distributed)

    def convert(x):
        if not isinstance(x, torch.Tensor):
            return x
        q = x.detach()
        if args.device:
            q = q.to(args.device)
        if args.dtype and q.is_floating_point():
            q = q.to(getattr(torch, args.dtype))
        return q.requires_grad_(x.requires_grad) if q.is_floating_point() else q

    if isinstance(result, CheckReport):
        report = result
    elif isinstance(result, tuple) and len(result) in (2, 3) and isinstance(result[0], torch.nn.Module):
        module, inputs, loss = (*result, None)[:3]
        if args.device:
            module.to(args.device)
        if args.dtype:
            module.to(getattr(torch, args.dtype))
        inputs = tuple(map(convert, inputs)) if isinstance(inputs, (tuple, list)) else convert(inputs)
        report = gradfd.check_module(module, inputs, loss=loss, **options)
    elif isinstance(result, tuple) and len(result) in (2, 3) and callable(result[0]):
        func, params, reference = (*result, None)[:3]  # (func, params, reference): reference mode
        params = tuple(params) if isinstance(params, (tuple, list)) else (params,)
        report = gradfd.check(func, tuple(map(convert, params)), reference=reference, **options)
    else:
        raise UsageError(f"{args.target} must return (func, params), (func, params, reference), (module, inputs), "
                         f"(module, inputs, loss) or a CheckReport, got {type(result).__name__}")
    if distributed and distributed.rank != 0:  # every rank has the report: rank 0 prints it
        return 0 if report.verified else 1
    if args.format == "json":
        print(json.dumps(report.to_dict(), indent=2), file=stream)
    else:
        print(report, file=stream)
    if args.plot:
        write_plots(report, args.plot, stream if args.format == "table" else sys.stderr)
    # exit 0 only for a check that compared something in every tensor (report.verified): a CI script must not pass
    # a tensor of which nothing could be compared (tests/test_cli.py::test_nothing_compared_exits_1)
    return 0 if report.verified else 1


def _start_distributed(args):
    """``--distributed``, after the target was called: the process group torchrun's environment describes (gloo;
    NCCL with ``--device cuda``, each rank on its ``LOCAL_RANK``'s GPU, set before the target ran), joined here unless
    the target joined one (and left at exit); the check's session."""
    import atexit
    import os

    import torch.distributed as dist

    from .distributed import DEFAULT_TIMEOUT, Distributed, resolve

    timeout = DEFAULT_TIMEOUT if args.distributed_timeout is None else args.distributed_timeout
    if not 0 < timeout < float("inf"):
        raise UsageError(f"--distributed-timeout must be a positive, finite number of seconds, got {timeout}")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise UsageError("--distributed runs under torchrun: torchrun --nproc-per-node N -m gradfd check "
                             f"{args.target} --distributed")
        dist.init_process_group("nccl" if (args.device or "").startswith("cuda") else "gloo")
        # (a gloo group left to the interpreter's exit can abort it while its threads are torn down)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return resolve(Distributed(timeout=timeout))


PLOTS_PER_RECORD = 5


def _index_label(index, tensor_valued: bool) -> str:
    """``2_3`` for entry (2, 3); ``out1-in2_3`` for (output (1,), input (2, 3)); ``scalar`` for ()."""
    join = lambda idx: "_".join(map(str, idx)) or "scalar"  # noqa: E731
    return f"out{join(index[0])}-in{join(index[1])}" if tensor_valued else join(index)


def write_plots(report, out_dir: str, stream) -> list[str]:
    """``gradfd check --plot DIR``: ``report.plot_entry`` for the worst entries of each record (disagreeing first,
    worst first, then unresolved; at most ``PLOTS_PER_RECORD``), written to ``DIR/<record>-<index>.png``; prints and
    returns the paths."""
    import re
    from pathlib import Path

    from .report import _pyplot

    try:
        plt = _pyplot()
    except ImportError as exc:
        print(f"no plots: {exc}", file=stream)
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for t in report.tensors:
        if t.mode == "directional" or t.plot_context is None:
            if t.disagree or t.unresolved:
                why = ("directional mode has no per-entry coordinate" if t.mode == "directional" else
                       "the report carries no function to evaluate")
                print(f"no plots for {t.name}: {why}", file=stream)
            continue
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", t.name).strip("_")
        for index in t.flagged(PLOTS_PER_RECORD):
            path = out / f"{stem}-{_index_label(index, t.output_shape is not None)}.png"
            try:
                plt.close(report.plot_entry(t.name, index, str(path)))
            except Exception as exc:  # one plot that cannot be drawn does not stop the others, nor the exit code
                print(f"no plot for {t.name} {index}: {type(exc).__name__}: {exc}", file=stream)
                continue
            written.append(str(path))
            print(f"wrote {path}", file=stream)
    return written


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradfd`` command. Returns the exit status (0 ok, 1 a failing check, 2 usage error)."""
    parser = argparse.ArgumentParser(prog="gradfd", description="Finite-difference gradient checker for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="the lesson's example: analytical vs numerical gradients, side by side")
    p_demo.add_argument("--plot", default="gradfd-demo-sweep.png", help="where to write the h-sweep plot (PNG)")
    p_bench = sub.add_parser("bench", help="the standard benchmark suite: table, JSON and plot")
    p_bench.add_argument("--device", default="cpu", help="comma-separated devices: cpu,cuda (default cpu)")
    p_bench.add_argument("--quick", action="store_true", help="a smaller suite (under 2 minutes on 2 CPU cores)")
    p_bench.add_argument("--out", default="bench-results", help="folder for bench.json, bench.md, bench.png")
    p_check = sub.add_parser("check", help="check a function from a file: path/to/file.py:function returning "
                                           "(func, params), (func, params, reference) (a half-precision op "
                                           "against its plain-PyTorch reference), (module, inputs), (module, "
                                           "inputs, loss) or a CheckReport")
    p_check.add_argument("target", help="path/to/file.py:function")
    p_check.add_argument("--mode", default="full", choices=["full", "sample", "directional"])
    p_check.add_argument("--samples", type=int, default=None, help="entries per tensor in sample mode")
    p_check.add_argument("--directions", type=int, default=None, help="directions in directional mode")
    p_check.add_argument("--dtype", default=None, choices=["float64", "float32", "float16", "bfloat16"],
                         help="convert the floating params to this dtype first")
    p_check.add_argument("--device", default=None, help="move the params to this device first (e.g. cuda)")
    p_check.add_argument("--engine", default="auto", choices=["auto", "batched", "loop", "structured"])
    p_check.add_argument("--order", type=int, default=1, choices=[1, 2],
                         help="2: check the double backward (finite differences of the first-order gradient)")
    p_check.add_argument("--forward-ad", action="store_true",
                         help="also judge forward-mode AD (the jvp rules) against the same finite differences")
    p_check.add_argument("--distributed", action="store_true",
                         help="share the finite differences over the ranks of a torch.distributed group (under "
                              "torchrun: torchrun --nproc-per-node N -m gradfd check file.py:fn --distributed); "
                              "torch's generators are seeded with 0 on every rank before the target is called; rank 0 "
                              "prints the report, every rank exits with the verdict")
    p_check.add_argument("--distributed-timeout", type=float, default=None, metavar="SECONDS",
                         help="seconds a collective waits for the other ranks (default: "
                              "gradfd.distributed.DEFAULT_TIMEOUT, 300)")
    p_check.add_argument("--format", default="table", choices=["table", "json"])
    p_check.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p_check.add_argument("--plot", default=None, metavar="DIR",
                         help="write report.plot_entry PNGs of the worst entries of each tensor (disagreeing, then "
                              f"unresolved; at most {PLOTS_PER_RECORD} per tensor) into DIR")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo.walkthrough import demo

            demo(sweep_path=args.plot)
            return 0
        if args.command == "bench":
            devices = [d.strip() for d in args.device.split(",") if d.strip()]
            bad = [d for d in devices if d not in ("cpu", "cuda")]
            if bad or not devices:
                raise UsageError(f"--device takes cpu and/or cuda, got {args.device!r}")
            return bench(devices, args.quick, args.out)
        if args.samples is not None and args.samples <= 0 or args.directions is not None and args.directions <= 0:
            raise UsageError("--samples and --directions must be positive")
        return run_check(args)
    except UsageError as exc:
        print(f"gradfd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
