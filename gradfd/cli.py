"""The ``gradfd`` command line: ``gradfd demo``, ``gradfd bench``, ``gradfd check path/to/file.py:function``.

Exit codes: 0 success (or a passing check that compared something in every tensor), 1 a failing check or a tensor
of which nothing could be compared, 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

__all__ = ["main", "demo"]


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _side_by_side(title: str, names: list[str], columns: dict[str, torch.Tensor], times: dict[str, float]) -> str:
    ana = columns["autograd"]
    lines = [title, f"  {'entry':<10}" + "".join(f"{k:>22}" for k in columns)]
    flat = {k: v.detach().double().reshape(-1) for k, v in columns.items()}
    for i, name in enumerate(names):
        lines.append(f"  {name:<10}" + "".join(f"{flat[k][i].item():>22.12g}" for k in columns))
    lines.append(f"  {'|diff|':<10}" + "".join(
        f"{(flat[k] - ana.double().reshape(-1)).abs().max().item():>22.3g}" for k in columns))
    lines.append(f"  {'time':<10}" + "".join(f"{times[k] * 1e3:>19.3f} ms" for k in columns))
    return "\n".join(lines)


def demo(out=None, sweep_path: str | None = None) -> None:
    """The lesson's example: linear regression on the lesson's data, analytical vs numerical gradients; the check
    reports of the lesson's linear and quadratic models; the h sweep, plotted to ``sweep_path``
    (default ``gradfd-demo-sweep.png`` in the current directory)."""
    import gradfd
    from gradfd import problems, reference

    from gradfd import ops

    out = out or sys.stdout
    print("gradfd demo: the lesson's linear regression y = w*x + b, MSE on 20 points (lesson 1.5)\n", file=out)
    ops.kernels_available()  # load (or JIT-build) the kernels before anything is timed
    errors: dict[torch.dtype, dict[str, float]] = {}  # the largest error relative to autograd's, per method
    for dtype in (torch.float32, torch.float64):
        loss, (w, b) = problems.linear_regression(d=1, dtype=dtype)
        torch.autograd.grad(loss(w, b), (w, b))  # warm-up
        (gw, gb), t_auto = _timed(lambda: torch.autograd.grad(loss(w, b), (w, b)))
        params = (w.detach(), b.detach())
        cols, times = {"autograd": torch.cat([gw.reshape(-1), gb.reshape(-1)])}, {"autograd": t_auto}
        for label, fn in [
            ("reference h=1e-5", lambda: [reference.numerical_gradient(loss, params, i) for i in (0, 1)]),
            ("gradfd h=1e-5", lambda: [gradfd.numerical_gradient(loss, params, i) for i in (0, 1)]),
            ("gradfd auto h, 4-pt", lambda: [gradfd.numerical_gradient(loss, params, i, h=None, stencil="four_point")
                                             for i in (0, 1)]),
        ]:
            fn()  # warm-up
            (g0, g1), t = _timed(fn)
            cols[label] = torch.cat([g0.reshape(-1), g1.reshape(-1)])
            times[label] = t
        ana = cols["autograd"].double()
        errors[dtype] = {k: float(((v.double() - ana).abs() / ana.abs()).max()) for k, v in cols.items()}
        title = f"{dtype} (loss = {loss(*params).item():.6g}):"
        print(_side_by_side(title, ["w", "b"], cols, times), file=out)
        print(file=out)
    e32, e64 = errors[torch.float32], errors[torch.float64]
    print(f"Largest relative error against autograd, measured above: at the lesson's h = 1e-5 the reference is off by\n"
          f"{e32['reference h=1e-5']:.1e} and gradfd by {e32['gradfd h=1e-5']:.1e} in float32 ({e64['reference h=1e-5']:.1e} "
          f"and {e64['gradfd h=1e-5']:.1e} in float64):\nthe float32 loss is rounded to eps*|loss| ~ 1e-6, and that "
          "error divided by 2h swamps the difference. With h=None\ngradfd picks the step per dtype and per element "
          "(~eps**(1/4) * max(1, |x|) for the 4-point stencil):\n"
          f"{e32['gradfd auto h, 4-pt']:.1e} in float32 and {e64['gradfd auto h, 4-pt']:.1e} in float64.", file=out)
    print("\ngradfd.check on the lesson's models (float32, no tolerance given):", file=out)
    for label, (loss, params) in [("linear regression y = w*x + b", problems.linear_regression(d=1, dtype=torch.float32)),
                                  ("quadratic regression y = w2*x^2 + w1*x + b",
                                   problems.quadratic_regression(dtype=torch.float32))]:
        print(f"\n{label}", file=out)
        print(gradfd.check(loss, params), file=out)
    loss, params = problems.mlp(d=4, k=4, c=2, n=16)
    sweep = gradfd.step_sweep(loss, params, 0)
    path = sweep_path or "gradfd-demo-sweep.png"
    h_best, err_best = sweep.best("central")
    print(f"\nThe lesson's exercise 3 (try several h): the error of central differences against autograd is smallest\n"
          f"at h = {h_best:.2g} ({err_best:.1e}) for an MLP loss in float64 -- truncation (~h^2) on the right, rounding\n"
          "(~eps/h) on the left. (The lesson's regression losses are quadratic in their parameters: central\n"
          "differences have no truncation error there, so only the rounding side would show.)", file=out)
    try:
        sweep.plot(path)
        print(f"The V-shaped curve was written to {path}", file=out)
    except ImportError as exc:
        print(f"(no plot: {exc})", file=out)
    _demo_custom_op(out)
    if not ops.kernels_available():
        print(f"\nnote: native kernels unavailable ({ops.unavailable_reason()}); the loop engine was used", file=out)


def _demo_custom_op(out) -> None:
    """The custom-op part of the demo: gradfd.check vs torch.autograd.gradcheck on a float32-only kernel."""
    import warnings

    import gradfd
    from gradfd import custom_op, ops

    print("\nChecking a custom op: gradfd.custom_op.bias_gelu, gelu(x + bias) by a fused C++/CUDA kernel, float32 "
          "only,\nits backward registered with torch.library.register_autograd; and bias_gelu_buggy, whose backward "
          f"flips\nthe sign where x + bias < {custom_op.BUGGY_BRANCH}.", file=out)
    if not ops.kernels_available():
        print(f"  (skipped: native kernels unavailable: {ops.unavailable_reason()})", file=out)
        return
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g).requires_grad_()
    b = torch.randn(8, generator=g).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradfd.FallbackWarning)
        good = gradfd.check(custom_op.bias_gelu, (x, b), raise_on_failure=False)
        bad = gradfd.check(custom_op.bias_gelu_buggy, (x, b), raise_on_failure=False)
    print(f"\ngradfd.check(bias_gelu, (x, b)) in float32, no tolerance given: "
          f"{'PASSED' if good.passed else 'FAILED'}", file=out)
    print("\n".join("  " + line for line in str(good).splitlines()[1:]), file=out)
    print(f"\ngradfd.check(bias_gelu_buggy, (x, b)): {'PASSED' if bad.passed else 'FAILED'}", file=out)
    print("\n".join("  " + line for line in str(bad).splitlines()[1:]), file=out)
    below = (x + b).detach() < custom_op.BUGGY_BRANCH
    flagged = bad.tensors[0].disagreeing(limit=bad.tensors[0].disagree)
    inside = sum(bool(below[tuple(i)]) for _, i in flagged)
    print(f"  ({int(below.sum())} entries of x + bias lie below {custom_op.BUGGY_BRANCH}, where the sign is flipped; "
          f"{inside} of the {len(flagged)} flagged\n  (output, input) pairs of x lie there)", file=out)
    try:
        torch.autograd.gradcheck(custom_op.bias_gelu, (x.detach().double().requires_grad_(),
                                                       b.detach().double().requires_grad_()))
        verdict64 = "passed"
    except Exception as exc:  # the kernel refuses float64
        verdict64 = f"cannot run: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verdict32 = torch.autograd.gradcheck(custom_op.bias_gelu, (x, b), raise_exception=False)
    print(f"\ntorch.autograd.gradcheck(bias_gelu) in float64: {verdict64}", file=out)
    print(f"torch.autograd.gradcheck(bias_gelu) in float32: {'passed' if verdict32 else 'FAILED'} on the correct op"
          + ("" if verdict32 or not good.passed else "\n  (gradfd.check passes the same op above: gradcheck's fixed "
             "step and tolerance are built for float64)"), file=out)


def bench(devices: list[str], quick: bool, out_dir: str, stream=None) -> int:
    """Run the standard benchmark suite; print the table; write JSON and a PNG plot into ``out_dir``."""
    from pathlib import Path

    from tqdm import tqdm

    from . import bench as B

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
    result = _load_target(args.target)
    options = dict(mode=args.mode, samples=args.samples, directions=args.directions, engine=args.engine,
                   raise_on_failure=False, progress=not args.no_progress)

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
    elif isinstance(result, tuple) and len(result) == 2 and callable(result[0]):
        func, params = result
        params = tuple(params) if isinstance(params, (tuple, list)) else (params,)
        report = gradfd.check(func, tuple(map(convert, params)), **options)
    else:
        raise UsageError(f"{args.target} must return (func, params), (module, inputs), (module, inputs, loss) or a "
                         f"CheckReport, got {type(result).__name__}")
    if args.format == "json":
        print(json.dumps(report.to_dict(), indent=2), file=stream)
    else:
        print(report, file=stream)
    # exit 0 only for a check that compared something in every tensor (report.verified): a CI script must not pass
    # a tensor of which nothing could be compared (tests/test_cli.py::test_nothing_compared_exits_1)
    return 0 if report.verified else 1


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
                                           "(func, params), (module, inputs), (module, inputs, loss) or a "
                                           "CheckReport")
    p_check.add_argument("target", help="path/to/file.py:function")
    p_check.add_argument("--mode", default="full", choices=["full", "sample", "directional"])
    p_check.add_argument("--samples", type=int, default=None, help="entries per tensor in sample mode")
    p_check.add_argument("--directions", type=int, default=None, help="directions in directional mode")
    p_check.add_argument("--dtype", default=None, choices=["float64", "float32", "float16", "bfloat16"],
                         help="convert the floating params to this dtype first")
    p_check.add_argument("--device", default=None, help="move the params to this device first (e.g. cuda)")
    p_check.add_argument("--engine", default="auto", choices=["auto", "batched", "loop", "structured"])
    p_check.add_argument("--format", default="table", choices=["table", "json"])
    p_check.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
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
