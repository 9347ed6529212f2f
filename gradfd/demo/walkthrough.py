"""``gradfd demo``: the lesson's example (analytical against numerical gradients, side by side), the check reports of
the lesson's models, the step sweep, and a custom op checked by gradfd and by ``torch.autograd.gradcheck``."""

from __future__ import annotations

import sys
import time

import torch

__all__ = ["demo"]


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
    from gradfd import ops, reference

    from . import problems

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
    _demo_half_precision(out)
    _demo_rules(out)
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


def _demo_half_precision(out) -> None:
    """The half-precision part of the demo: the RMSNorm kernel in float16 against its reference, correct and with
    its planted bug, beside what finite differences alone say in float16."""
    import gradfd
    from gradfd import custom_op, ops

    print("\nChecking a float16 kernel against a reference: gradfd.custom_op.rms_norm (C++/CUDA, float32 "
          "accumulation)\nand rms_norm_buggy, whose backward leaves the weight out of grad_x's projection term; the "
          "reference is\nrms_norm_reference, plain PyTorch, validated in float64 by finite differences first.",
          file=out)
    if not ops.kernels_available():
        print(f"  (skipped: native kernels unavailable: {ops.unavailable_reason()})", file=out)
        return
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g).half().requires_grad_()
    w = (1 + 0.1 * torch.randn(64, generator=g)).half().requires_grad_()
    verdicts = {}
    for name, op in (("rms_norm", custom_op.rms_norm), ("rms_norm_buggy", custom_op.rms_norm_buggy)):
        report = verdicts[name] = gradfd.check(op, (x, w), reference=custom_op.rms_norm_reference,
                                               raise_on_failure=False)
        print(f"\ngradfd.check({name}, (x, w), reference=rms_norm_reference) in float16: "
              f"{'PASSED' if report.passed else 'FAILED'}", file=out)
        print("\n".join("  " + line for line in str(report).splitlines()[1:]), file=out)
    plain = gradfd.check(custom_op.rms_norm_buggy, (x, w), raise_on_failure=False)
    print(f"\nFinite differences alone, gradfd.check(rms_norm_buggy, (x, w)) in float16: "
          f"{'PASSED' if plain.passed else 'FAILED'} (detects (95%): "
          f"{', '.join(t.detection_text() for t in plain.tensors)})" + (
              ":\n  a float16 difference cannot resolve the bug; the reference can."
              if plain.passed and not verdicts["rms_norm_buggy"].passed else "."), file=out)


def _demo_rules(out) -> None:
    """The other rules of a custom op, in float32: a double backward with a planted mistake (gradfd.check's
    ``order=2``), and a complex backward with its conjugate missing (complex64), each pointed at."""
    import gradfd
    from gradfd.demo.planted import complex_op, sin_mul

    g = torch.Generator().manual_seed(0)
    x, w = (torch.randn(3, 4, generator=g).requires_grad_() for _ in range(2))
    print("\nThe other rules of a custom op, in float32: sin(x * w) (gradfd.demo.planted.sin_mul) whose hand-written "
          "double\nbackward drops a cos, checked with gradfd.check(loss, (x, w), order=2):", file=out)
    report = gradfd.check(lambda x, w: sin_mul(x, w, "double_backward").sum(), (x, w), order=2,
                          raise_on_failure=False)
    failed = [t.name for t in report.tensors if not t.passed]
    print(f"  {'PASSED' if report.passed else 'FAILED'}: {', '.join(failed) or 'nothing'} "
          f"(the planted term is d(grad w)/dx); the correct op: "
          f"{'PASSED' if gradfd.check(lambda x, w: sin_mul(x, w).sum(), (x, w), order=2).passed else 'FAILED'}",
          file=out)
    z, v = (torch.randn(6, generator=g, dtype=torch.complex64).requires_grad_() for _ in range(2))
    bad = gradfd.check(lambda z, v: complex_op("mul", z, v, missing_conj=True), (z, v), raise_on_failure=False)
    flagged = [line.strip() for line in str(bad).splitlines() if "disagreeing entries" in line]
    print(f"z * w in complex64 with its backward's conjugate missing: {'PASSED' if bad.passed else 'FAILED'}:\n  "
          + "\n  ".join(flagged) + "\n(torch.autograd.gradcheck cannot judge float32 or complex64.)", file=out)

