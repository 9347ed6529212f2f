"""PyTorch's OpInfo database as a peer test suite for gradfd (issue 4).

For every differentiable entry of ``torch.testing._internal.common_methods_invocations.op_db`` that supports
float64 (and float32) on the CPU, take the entry's first sample input and check its backward with
``torch.autograd.gradcheck`` (slow mode, default tolerances) and with ``gradfd.check`` (default settings), in
float64 and in float32. The gradcheck inputs are built exactly as PyTorch's own ``test/test_ops_gradients.py``
builds them (``TestGradients._check_helper`` in ``torch/testing/_internal/common_utils.py``): the tensors that
require grad (TensorList inputs flattened) are the inputs, and a wrapper puts them back into the sample and calls
``op.gradcheck_wrapper(op.get_op(), *args, **kwargs)`` (then ``sample.output_process_fn_grad``). Both tools get the
same wrapper and the same tensors.

    uv run python benchmarks/bench_opinfo.py                 # all entries; writes benchmarks/results/opinfo.json and
                                                             # the sections "opinfo" (docs/benchmarks.md) and "opinfo-full"
    uv run python benchmarks/bench_opinfo.py --limit 40      # the first 40 entries
    uv run python benchmarks/bench_opinfo.py --only sin,nn.functional.softplus --no-record -v   # a few, verbose

    uv run python benchmarks/bench_opinfo.py --analyse bmm   # gradfd's flagged entries beside a float64 reference

A per-check timeout guard keeps the run to ~5-12 minutes on a 2-core CPU: a gradfd full check that runs past
``--timeout`` seconds (20) is interrupted and redone with ``mode="sample"`` (the row says so); a gradcheck that runs
past ``--gradcheck-timeout`` (60 s) is recorded as a timeout. Complex outputs reach gradfd as ``torch.view_as_real``
pairs. Where gradfd does not pass, an untimed diagnostic rerun with two benchmark-side workarounds (outputs cloned;
only differentiable outputs compared) records what is left once the gradfd issues this benchmark found are fixed.
Importing ``op_db`` freezes ``torch.backends`` flags, which gradfd.check cannot run under: the script lifts the freeze.

Where gradfd fails a float64 sample that gradcheck passes, the run also records evidence (untimed): at gradfd's worst
flagged entry, autograd's value and gradfd's estimate beside the exact derivative of the function the entry computes,
by mpmath (``EXACT``: entry -> formula; entries without one get "no exact reference"), and the float64 forward's own
error there. The evidence is shown next to the count; it never changes the count or the bar.

Both generated sections are pure functions of the record (``RENDER``; ``benchmarks/sections.py``): "opinfo", the
summary in docs/benchmarks.md, and "opinfo-full", the tables of ``benchmarks/results/opinfo.md``. ``--limit``/``--only`` runs record
too (use ``--no-record`` while developing).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
import warnings
import zlib
from itertools import chain
from pathlib import Path
from typing import Callable

import mpmath
import torch

import gradfd
from gradfd.demo import bench
from sections import arguments, caption, record

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

PASS, FAIL, ERROR, TIMEOUT = "pass", "fail", "error", "timeout"


CheckTimeout, time_limit = bench.CheckTimeout, bench.time_limit


def entry_name(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def entry_seed(name: str, dtype: torch.dtype) -> int:
    """A seed per (entry, dtype), independent of --limit/--only (stable across runs)."""
    return zlib.crc32(f"{name}|{dtype}".encode())


def is_iterable_of_tensors(x) -> bool:
    from torch.testing._internal.common_utils import is_iterable_of_tensors as f
    return f(x)


def gradcheck_inputs(op, sample):
    """``(fn, inputs)`` exactly as ``TestGradients._check_helper`` builds them for gradcheck."""
    variant = op.get_op()
    if is_iterable_of_tensors(sample.input):
        all_args = chain(sample.input, sample.args, sample.kwargs.values())
    else:
        all_args = tuple(chain((sample.input,), sample.args, sample.kwargs.values()))
    inputs = tuple(x for x in all_args if isinstance(x, torch.Tensor) and x.requires_grad)

    def recompose(values, inp, idx):
        if is_iterable_of_tensors(inp):
            out = []
            for x in inp:
                if isinstance(x, torch.Tensor) and x.requires_grad:
                    out.append(values[idx])
                    idx += 1
                else:
                    out.append(x)
            return out, idx
        if isinstance(inp, torch.Tensor) and inp.requires_grad:
            return values[idx], idx + 1
        return inp, idx

    def fn(*values):
        positional, idx = [], 0
        inp, idx = recompose(values, sample.input, idx)
        positional.append(inp)
        for x in sample.args:
            inp, idx = recompose(values, x, idx)
            positional.append(inp)
        kwargs = {}
        for key, v in sample.kwargs.items():
            inp, idx = recompose(values, v, idx)
            kwargs[key] = inp
        output = op.gradcheck_wrapper(variant, *positional, **kwargs)
        if sample.output_process_fn_grad is not None:
            return sample.output_process_fn_grad(output)
        return output

    return fn, inputs


def torch_expectation(op, dtype: torch.dtype) -> list[str]:
    """The decorators PyTorch's own suite applies to ``TestBwdGradients.test_fn_grad`` for this entry on the CPU
    (skips, expected failures, tolerance overrides): the context for a gradcheck failure."""
    found = []
    for d in getattr(op, "decorators", ()):
        is_active = getattr(d, "is_active", None)
        if is_active is None:
            continue
        try:
            active = is_active("TestBwdGradients", "test_fn_grad", "cpu", dtype, {})
        except Exception:  # noqa: BLE001
            continue
        if active:
            for dec in d.decorators:
                q = getattr(dec, "__qualname__", type(dec).__name__)
                found.append("skip" if q.startswith("skip") else q.split(".")[0])
    return found


def gradfd_wrapper(fn, *, clone_outputs: bool = False, differentiable_only: list[bool] | None = None):
    """The function handed to gradfd in the real-sample tables: ``fn`` with complex outputs as ``torch.view_as_real``
    pairs (what gradfd.check does itself since issue 24; kept so that those tables stay comparable with their records;
    gradcheck too checks the real and imaginary parts separately).

    The diagnostic variants (never timed, never counted in the headline numbers) work around two gradfd issues
    found by this benchmark: ``clone_outputs`` clones every output (gradfd's loop engine reads outputs that are views
    of the perturbed input after restoring it), ``differentiable_only`` keeps only the outputs autograd marks
    differentiable, as gradcheck does."""

    def wrapped(*values):
        out = fn(*values)
        single = isinstance(out, torch.Tensor)
        outs = [out] if single else list(out)
        if differentiable_only is not None:
            outs = [o for o, keep in zip(outs, differentiable_only) if keep]
        res = []
        for o in outs:
            if isinstance(o, torch.Tensor):
                if o.is_complex():
                    o = torch.view_as_real(o.resolve_conj())
                if clone_outputs:
                    o = o.clone()
            res.append(o)
        return res[0] if single and len(res) == 1 else tuple(res)

    return wrapped


def differentiable_outputs(fn, inputs) -> list[bool]:
    """Which outputs autograd marks differentiable (requires_grad), as gradcheck's _differentiable_outputs does."""
    with torch.enable_grad():
        out = fn(*[t.detach().clone().requires_grad_() for t in inputs])
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return [isinstance(o, torch.Tensor) and o.requires_grad for o in outs]


def first_sample(op, dtype: torch.dtype, seed: int):
    torch.manual_seed(seed)
    return next(iter(op.sample_inputs("cpu", dtype, requires_grad=True)))


def short(msg: str, n: int = 300) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def run_gradcheck(fn, inputs, timeout: float, seed: int) -> dict:
    row: dict = {}
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    try:
        with time_limit(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok = torch.autograd.gradcheck(fn, inputs, raise_exception=False)
        row["verdict"] = PASS if ok else FAIL
    except CheckTimeout as exc:
        row.update(verdict=TIMEOUT, message=str(exc))
    except Exception as exc:  # noqa: BLE001 -- a peer benchmark: record whatever goes wrong
        row.update(verdict=ERROR, message=short(f"{type(exc).__name__}: {exc}"))
    row["seconds"] = time.perf_counter() - t0
    if row["verdict"] == FAIL:  # why (not timed): rerun raising, keep the first lines of gradcheck's message
        try:
            with time_limit(timeout), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.manual_seed(seed)
                torch.autograd.gradcheck(fn, inputs, raise_exception=True)
        except Exception as exc:  # noqa: BLE001
            row["message"] = short(f"{type(exc).__name__}: {exc}", 600)
    return row


def report_summary(report) -> dict:
    tensors = []
    for t in report.tensors:
        tensors.append({
            "name": t.name, "shape": list(t.shape), "checked": t.checked, "total": t.total,
            "agree": t.agree, "disagree": t.disagree, "unresolved": t.unresolved,
            "max_abs_error": t.max_abs_error, "max_rel_error": t.max_rel_error,
            "worst_index": str(t.worst_index), "worst_analytical": t.worst_analytical,
            "worst_numerical": t.worst_numerical, "worst_tolerance": t.worst_tolerance,
            "batching": t.details.get("batching"), "engine": t.details.get("engine"),
        })
    return {
        "disagree": sum(t.disagree for t in report.tensors),
        "unresolved": sum(t.unresolved for t in report.tensors),
        "agree": sum(t.agree for t in report.tensors),
        "tensors": tensors,
        "notes": list(getattr(report, "notes", []) or []),
    }


def run_gradfd(fn, inputs, timeout: float, seed: int, verbose: bool = False, mode: str = "full"):
    """gradfd.check of ``fn`` at ``inputs``: ``(row, report)``; the report is None where the check raised or timed
    out."""
    row: dict = {"mode": mode}
    report = None
    t0 = time.perf_counter()

    def attempt(mode: str, limit: float):
        torch.manual_seed(seed)
        with time_limit(limit), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rep = gradfd.check(fn, inputs, mode=mode, raise_on_failure=False)
        return rep, [short(str(w.message), 200) for w in caught]

    try:
        try:
            report, warns = attempt(mode, timeout if mode == "full" else 2 * timeout)
        except CheckTimeout:
            if mode != "full":
                raise
            row["mode"] = "sample"
            row["fallback"] = f"full check exceeded {timeout:g} s: redone with mode='sample'"
            report, warns = attempt("sample", 2 * timeout)
        row["verdict"] = PASS if report.passed else FAIL
        row.update(report_summary(report))
        if warns:
            row["warnings"] = sorted(set(warns))[:5]
        if not report.passed or verbose:
            row["table"] = str(report)[:6000]
    except CheckTimeout as exc:
        row.update(verdict=TIMEOUT, message=str(exc))
    except Exception as exc:  # noqa: BLE001
        row.update(verdict=ERROR, message=short(f"{type(exc).__name__}: {exc}", 600))
        if verbose:
            traceback.print_exc()
    row["seconds"] = time.perf_counter() - t0
    return row, report


def describe_inputs(inputs) -> str:
    return ", ".join("x".join(map(str, t.shape)) or "scalar" for t in inputs)


# ---------------------------------------------------------------------------------------------------------------
# evidence: where gradfd fails and gradcheck passes, both tools' values beside the exact derivative (mpmath)

MP_DIGITS = 50  # mpmath's working precision: far beyond float64's 16 digits, so the reference adds no error of its own


def _hardsigmoid(x):
    return min(max(x / 6 + mpmath.mpf(1) / 2, mpmath.mpf(0)), mpmath.mpf(1))


def _hardsigmoid_slope(x):
    if x == -3 or x == 3:
        return None  # a kink: no derivative
    return mpmath.mpf(1) / 6 if -3 < x < 3 else mpmath.mpf(0)


# entry -> (the derivative's formula, f, f'): the mathematical function an entry computes and its exact derivative, for
# the entries where gradfd has failed and gradcheck passed. An entry missing here gets "no exact reference".
EXACT: dict[str, tuple[str, Callable, Callable]] = {
    "nn.functional.hardsigmoid": ("1/6 on (-3, 3), 0 outside", _hardsigmoid, _hardsigmoid_slope),
    "special.bessel_j0": ("-J1(x)", lambda x: mpmath.besselj(0, x), lambda x: -mpmath.besselj(1, x)),
    "special.bessel_j1": ("(J0(x) - J2(x)) / 2", lambda x: mpmath.besselj(1, x),
                          lambda x: (mpmath.besselj(0, x) - mpmath.besselj(2, x)) / 2),
    "special.bessel_y0": ("-Y1(x)", lambda x: mpmath.bessely(0, x), lambda x: -mpmath.bessely(1, x)),
    "special.bessel_y1": ("(Y0(x) - Y2(x)) / 2", lambda x: mpmath.bessely(1, x),
                          lambda x: (mpmath.bessely(0, x) - mpmath.bessely(2, x)) / 2),
}


def _flat(index: tuple, shape: tuple) -> int:
    flat = 0
    for i, n in zip(index, shape):
        flat = flat * n + i
    return flat


def exact_evidence(name: str, fn, inputs, report) -> dict:
    """At gradfd's worst flagged entry (the largest |numerical - analytical| / tolerance) of a failed check: the input
    value x, autograd's derivative, gradfd's estimate and its tolerance, beside the exact derivative of the function
    the entry computes (``EXACT``, mpmath at ``MP_DIGITS`` digits) and the error of torch's own forward at x.

    Only a diagonal entry of an elementwise function of one tensor has a derivative that one formula gives; elsewhere,
    and for entries not in ``EXACT``, the dict says why there is no reference."""
    flagged = [t for t in report.tensors if t.disagree]
    if not flagged:
        return {"reference": None, "why": "no disagreeing entry"}
    t = max(flagged, key=lambda t: abs(t.worst_numerical - t.worst_analytical) / max(t.worst_tolerance, 1e-300))
    ev: dict = {"tensor": t.name, "index": str(t.worst_index), "analytical": t.worst_analytical,
                "numerical": t.worst_numerical, "tolerance": t.worst_tolerance, "reference": None}
    if name not in EXACT:
        return {**ev, "why": "no exact reference"}
    idx = t.worst_index
    shape = tuple(inputs[0].shape)
    if not (len(inputs) == 1 and t.output_shape is not None and tuple(t.output_shape) == shape
            and isinstance(idx, tuple) and len(idx) == 2 and tuple(idx[0]) == tuple(idx[1])):
        return {**ev, "why": "not a diagonal entry of an elementwise function of one tensor"}
    formula, f, slope = EXACT[name]
    flat = _flat(tuple(idx[1]), shape)
    x = float(inputs[0].detach().reshape(-1)[flat])
    with torch.no_grad():
        out = fn(*[p.detach() for p in inputs])
    out = out if isinstance(out, torch.Tensor) else out[0]
    forward = float(out.reshape(-1)[flat])
    with mpmath.workdps(MP_DIGITS):
        X = mpmath.mpf(x)
        value, exact = f(X), slope(X)
        if exact is None or isinstance(exact, mpmath.mpc) or isinstance(value, mpmath.mpc):
            return {**ev, "x": x, "why": f"no real derivative at x = {x!r}"}

        def rel(err):
            return float(err / abs(exact)) if exact != 0 else None

        err_a, err_n = abs(t.worst_analytical - exact), abs(t.worst_numerical - exact)
        return {**ev, "reference": formula, "x": x, "exact": float(exact),
                "analytical_abs_error": float(err_a), "numerical_abs_error": float(err_n),
                "analytical_rel_error": rel(err_a), "numerical_rel_error": rel(err_n),
                "forward": forward, "forward_exact": float(value),
                "forward_abs_error": float(abs(forward - value)),
                "forward_rel_error": float(abs(forward - value) / abs(value)) if value != 0 else None}


TRUE_ALARM, FORWARD_ERROR = "true alarm", "the forward's error"
UNDECIDED, NO_REFERENCE = "undecided", "no exact reference"


def finding(ev: dict | None) -> str:
    """What the evidence shows. A true alarm: autograd's value misses the exact derivative by more than gradfd's
    tolerance at that entry and by more than gradfd's estimate does. The forward's error: gradfd's estimate (the slope
    of torch's forward) is further from the exact derivative than autograd's value. Otherwise undecided."""
    if not ev or ev.get("reference") is None:
        return NO_REFERENCE
    err_a, err_n, tol = ev["analytical_abs_error"], ev["numerical_abs_error"], ev["tolerance"]
    if None in (err_a, err_n, tol):  # a non-finite value (stored as null)
        return UNDECIDED
    if err_a > tol and err_a > err_n:
        return TRUE_ALARM
    if err_n > err_a:
        return FORWARD_ERROR
    return UNDECIDED


def check_entry(op, dtype: torch.dtype, timeout: float, gc_timeout: float, verbose: bool = False,
                tools=("gradcheck", "gradfd"), diagnose: bool = True) -> dict:
    """One sample of one entry in one dtype: both tools. Returns the row (with 'skipped' when not checked)."""
    name = entry_name(op)
    seed = entry_seed(name, dtype)
    row: dict = {"entry": name, "dtype": str(dtype).replace("torch.", ""), "seed": seed}
    if dtype not in op.supported_dtypes("cpu"):
        return {**row, "skipped": f"{row['dtype']} not supported on cpu"}
    if dtype not in op.supported_backward_dtypes("cpu"):
        return {**row, "skipped": f"no backward in {row['dtype']} on cpu"}
    try:
        sample = first_sample(op, dtype, seed)
    except StopIteration:
        return {**row, "skipped": "no sample input"}
    except Exception as exc:  # noqa: BLE001
        return {**row, "skipped": short(f"sample_inputs raised {type(exc).__name__}: {exc}")}
    fn, inputs = gradcheck_inputs(op, sample)
    if not inputs:
        return {**row, "skipped": "sample has no tensor requiring grad"}
    row["inputs"] = describe_inputs(inputs)
    row["numel"] = sum(t.numel() for t in inputs)
    row["torch_test_fn_grad"] = torch_expectation(op, dtype)
    if "gradcheck" in tools:
        row["gradcheck"] = run_gradcheck(fn, inputs, gc_timeout, seed)
    if "gradfd" in tools:
        row["gradfd"], report = run_gradfd(gradfd_wrapper(fn), inputs, timeout, seed, verbose)
        if (dtype == torch.float64 and report is not None and not report.passed
                and verdict(row, "gradcheck") in (PASS, None)):
            # not timed: gradfd fails where gradcheck passes; set both tools against the exact derivative
            row["evidence"] = exact_evidence(name, gradfd_wrapper(fn), inputs, report)
        if diagnose and row["gradfd"]["verdict"] != PASS:
            # not timed, not counted: the same check with the benchmark-side workarounds for gradfd's aliasing and
            # non-differentiable-output issues, to see what is left
            try:
                keep = differentiable_outputs(fn, inputs)
            except Exception:  # noqa: BLE001
                keep = None
            diag, _ = run_gradfd(gradfd_wrapper(fn, clone_outputs=True, differentiable_only=keep), inputs, timeout,
                                 seed, verbose, mode=row["gradfd"]["mode"])
            diag["dropped_outputs"] = [k for k, v in enumerate(keep or []) if not v]
            row["gradfd_workaround"] = diag
    return row


# ---------------------------------------------------------------------------------------------------------------
# summary


def verdict(row: dict, tool: str) -> str | None:
    return row.get(tool, {}).get("verdict")


def summarise(rows64: list[dict], rows32: list[dict], entries: int, skipped_entries: list[dict]) -> dict:
    checked64 = [r for r in rows64 if "skipped" not in r]
    checked32 = [r for r in rows32 if "skipped" not in r]
    matrix = {"both pass": [], "both fail": [], "gradcheck passes, gradfd fails": [],
              "gradfd passes, gradcheck fails": [], "gradcheck error/timeout, gradfd passes": [],
              "gradcheck error/timeout, gradfd fails": [], "gradfd error/timeout, gradcheck passes": [],
              "gradfd error/timeout, gradcheck fails": [], "both error/timeout": []}
    for r in checked64:
        gc, gf = verdict(r, "gradcheck"), verdict(r, "gradfd")
        gc_bad, gf_bad = gc in (ERROR, TIMEOUT), gf in (ERROR, TIMEOUT)
        if gc_bad and gf_bad:
            key = "both error/timeout"
        elif gc_bad:
            key = f"gradcheck error/timeout, gradfd {'passes' if gf == PASS else 'fails'}"
        elif gf_bad:
            key = f"gradfd error/timeout, gradcheck {'passes' if gc == PASS else 'fails'}"
        elif gc == PASS and gf == PASS:
            key = "both pass"
        elif gc == FAIL and gf == FAIL:
            key = "both fail"
        elif gc == PASS:
            key = "gradcheck passes, gradfd fails"
        else:
            key = "gradfd passes, gradcheck fails"
        matrix[key].append(r["entry"])
    gc64_pass = {r["entry"] for r in checked64 if verdict(r, "gradcheck") == PASS}
    by32 = {r["entry"]: r for r in checked32}
    on_gc_pass = [by32[e] for e in sorted(gc64_pass) if e in by32]

    def count(rows, tool, v=PASS):
        return sum(verdict(r, tool) == v for r in rows)

    def seconds(rows, tool):
        return sum(r.get(tool, {}).get("seconds", 0.0) for r in rows)

    skip_reasons: dict[str, int] = {}
    for r in skipped_entries + [r for r in rows64 if "skipped" in r]:
        skip_reasons[f"float64: {r['skipped']}"] = skip_reasons.get(f"float64: {r['skipped']}", 0) + 1
    for r in rows32:
        if "skipped" in r:
            skip_reasons[f"float32: {r['skipped']}"] = skip_reasons.get(f"float32: {r['skipped']}", 0) + 1
    fallbacks = [(r["entry"], r["dtype"]) for r in rows64 + rows32 if r.get("gradfd", {}).get("fallback")]
    # every sample gradcheck passes in float64 and gradfd does not (fails, raises or times out)
    gf64_false_alarms = matrix["gradcheck passes, gradfd fails"] + matrix["gradfd error/timeout, gradcheck passes"]
    s = {
        "entries_considered": entries,
        "entries_with_autograd": entries - len(skipped_entries),
        "float64_samples_checked": len(checked64),
        "float32_samples_checked": len(checked32),
        "skip_reasons": skip_reasons,
        "float64_matrix_counts": {k: len(v) for k, v in matrix.items()},
        "float64_matrix": matrix,
        "float64_pass": {"gradcheck": count(checked64, "gradcheck"), "gradfd": count(checked64, "gradfd")},
        "float32_pass": {"gradcheck": count(checked32, "gradcheck"), "gradfd": count(checked32, "gradfd")},
        "float32_on_gradcheck64_pass": {
            "samples": len(on_gc_pass), "gradfd": count(on_gc_pass, "gradfd"),
            "gradcheck": count(on_gc_pass, "gradcheck"),
            "gradfd_not_passing": [(r["entry"], verdict(r, "gradfd")) for r in on_gc_pass
                                   if verdict(r, "gradfd") != PASS]},
        "seconds": {
            "float64": {"gradcheck": seconds(checked64, "gradcheck"), "gradfd": seconds(checked64, "gradfd")},
            "float32": {"gradcheck": seconds(checked32, "gradcheck"), "gradfd": seconds(checked32, "gradfd")},
        },
        "gradfd_sample_mode_fallbacks": fallbacks,
    }
    bars = {
        "no_float64_false_alarm": {"met": not gf64_false_alarms, "false_alarms": gf64_false_alarms,
                                   "of_gradcheck_passes": len(gc64_pass)},
        "float32_pass_rate_ge_95": {
            "met": bool(on_gc_pass) and count(on_gc_pass, "gradfd") >= 0.95 * len(on_gc_pass),
            "rate": count(on_gc_pass, "gradfd") / max(1, len(on_gc_pass))},
        "faster_than_gradcheck_slow": {
            "met": s["seconds"]["float64"]["gradfd"] < s["seconds"]["float64"]["gradcheck"],
            "gradfd_s": s["seconds"]["float64"]["gradfd"], "gradcheck_s": s["seconds"]["float64"]["gradcheck"]},
    }
    s["bars"] = bars

    # the same bars with gradfd's verdict from the (untimed) workaround rerun where the plain check did not pass
    def after(r):
        return r.get("gradfd_workaround", r.get("gradfd", {})).get("verdict")

    false64 = [r["entry"] for r in checked64 if verdict(r, "gradcheck") == PASS and after(r) != PASS]
    pass32 = sum(after(r) == PASS for r in on_gc_pass)
    s["after_workarounds"] = {
        "float64_gradcheck_pass_gradfd_not_pass": false64,
        "float64_gradfd_pass": sum(after(r) == PASS for r in checked64),
        "float32_on_gradcheck64_pass": pass32,
        "float32_rate": pass32 / max(1, len(on_gc_pass)),
        "float32_gradfd_not_passing": [(r["entry"], after(r)) for r in on_gc_pass if after(r) != PASS],
        "fixed_by_workaround": [(r["entry"], r["dtype"]) for r in checked64 + checked32
                                if verdict(r, "gradfd") != PASS and after(r) == PASS],
    }
    return s


def summary_of(data: dict) -> dict:
    """:func:`summarise` of a record's rows: the renderers count from the rows themselves."""
    rows64 = [r for r in data["rows"] if r["dtype"] == "float64"]
    rows32 = [r for r in data["rows"] if r["dtype"] == "float32"]
    return summarise(rows64, rows32, data["entries_considered"], data["skipped_entries"])


def fmt_s(x: float) -> str:
    return f"{x:.1f} s"


def fmt(x, spec: str = ".10g") -> str:
    return "-" if x is None else format(x, spec)


def ticks(entries) -> str:
    return ", ".join(f"`{e}`" for e in entries) or "none"


def yes_no(met: bool) -> str:
    return "yes" if met else "NO"


def head(data: dict) -> str:
    """The first line: the caption, then the run's wall time and load."""
    facts = f" Wall time {data['wall_seconds'] / 60:.1f} min"
    la0, la1 = data["machine"].get("loadavg_start"), data["machine"].get("loadavg_end")
    if la0 and la1:
        facts += f"; 1-min load average {la0[0]:.1f} at the start, {la1[0]:.1f} at the end"
    return caption(data) + facts + "."


def pass_table(s: dict) -> list[str]:
    p64, p32, g, sec = s["float64_pass"], s["float32_pass"], s["float32_on_gradcheck64_pass"], s["seconds"]
    n64, n32 = s["float64_samples_checked"], s["float32_samples_checked"]
    return ["| | gradcheck (slow) | gradfd.check |", "|---|---|---|",
            f"| float64 passes | {p64['gradcheck']} / {n64} | {p64['gradfd']} / {n64} |",
            f"| float32 passes | {p32['gradcheck']} / {n32} | {p32['gradfd']} / {n32} |",
            f"| float32 passes, on the samples gradcheck passes in float64 | {g['gradcheck']} / {g['samples']} | "
            f"{g['gradfd']} / {g['samples']} ({100 * g['gradfd'] / max(1, g['samples']):.1f}%) |",
            f"| total time, float64 | {fmt_s(sec['float64']['gradcheck'])} | {fmt_s(sec['float64']['gradfd'])} |",
            f"| total time, float32 | {fmt_s(sec['float32']['gradcheck'])} | {fmt_s(sec['float32']['gradfd'])} |"]


def bars_table(s: dict) -> list[str]:
    b, g = s["bars"], s["float32_on_gradcheck64_pass"]
    fa, t = b["no_float64_false_alarm"], b["faster_than_gradcheck_slow"]
    return ["| bar | met | measured |", "|---|---|---|",
            f"| no float64 false alarm where gradcheck (slow) passes | {yes_no(fa['met'])} | "
            f"{len(fa['false_alarms'])} gradfd failures among {fa['of_gradcheck_passes']} gradcheck passes"
            + (" (evidence below)" if fa["false_alarms"] else "") + " |",
            f"| ≥ 95% of those samples pass in float32 | {yes_no(b['float32_pass_rate_ge_95']['met'])} | "
            f"{100 * b['float32_pass_rate_ge_95']['rate']:.1f}% ({g['gradfd']} / {g['samples']}) |",
            f"| less total time than gradcheck (slow), float64 | {yes_no(t['met'])} | "
            f"gradfd {fmt_s(t['gradfd_s'])} vs gradcheck {fmt_s(t['gradcheck_s'])} "
            f"({t['gradfd_s'] / t['gradcheck_s']:.2f}x) |"]


def evidence_lines(data: dict, s: dict) -> list[str]:
    """The float64 samples gradfd does not pass and gradcheck does, counted, then each beside the exact derivative."""
    alarms = s["bars"]["no_float64_false_alarm"]["false_alarms"]
    if not alarms:
        return ["**0 gradfd failures where gradcheck passes (float64).**"]
    by_entry = {r["entry"]: r for r in data["rows"] if r["dtype"] == "float64"}
    found = {e: finding(by_entry[e].get("evidence")) for e in alarms}

    def named(kind):
        es = [e for e in alarms if found[e] == kind]
        return f"{len(es)}" + (f" ({ticks(es)})" if es else "")

    L = [f"**{len(alarms)} gradfd failures where gradcheck passes (float64): evidence below.** At gradfd's worst "
         f"flagged entry of each, autograd's value (analytical) and gradfd's estimate (numerical) beside the exact "
         f"derivative of the function the entry computes (mpmath, {MP_DIGITS} digits, from the formula in "
         "`bench_opinfo.EXACT`), and the error of torch's float64 forward at the same x. A *true alarm* is an "
         "analytical value further from the exact derivative than both gradfd's tolerance at that entry and gradfd's "
         "numerical value; *the forward's error* is a numerical value (the slope of torch's forward) further from the "
         "exact derivative than the analytical one: forward and backward disagree, and it is the forward that misses "
         f"the function. The evidence shows {named(TRUE_ALARM)} to be true alarms; {named(FORWARD_ERROR)} to be the "
         f"forward's error; {named(UNDECIDED)} undecided; {named(NO_REFERENCE)} without an exact reference. "
         "The count and the bar above stand as counted.", "",
         "| entry | x | analytical | gradfd numerical | mpmath derivative | \\|analytical − exact\\| / \\|exact\\| | "
         "\\|numerical − exact\\| / \\|exact\\| | forward rel. error | finding |",
         "|---|---|---|---|---|---|---|---|---|"]
    for e in alarms:
        ev = by_entry[e].get("evidence") or {}
        if ev.get("reference") is None:
            why = ev.get("why", "gradfd raised: no report")
            L.append(f"| `{e}` | {fmt(ev.get('x'))} | {fmt(ev.get('analytical'))} | {fmt(ev.get('numerical'))} | "
                     f"- | - | - | - | {NO_REFERENCE} ({why}) |")
            continue
        L.append(f"| `{e}` | {fmt(ev['x'])} | {fmt(ev['analytical'])} | {fmt(ev['numerical'])} | "
                 f"{fmt(ev['exact'])} ({ev['reference']}) | {fmt(ev['analytical_rel_error'], '.1e')} | "
                 f"{fmt(ev['numerical_rel_error'], '.1e')} | {fmt(ev['forward_rel_error'], '.1e')} | "
                 f"{found[e]} |")
    return L


def render_summary(data: dict) -> str:
    """The short section (docs/benchmarks.md): pass counts and times of both tools, issue 4's bars, the disagreements by name
    and the evidence for gradfd's failures where gradcheck passes."""
    s = summary_of(data)
    m, g = s["float64_matrix"], s["float32_on_gradcheck64_pass"]
    neither = (m["both fail"] + m["gradfd error/timeout, gradcheck fails"] + m["gradcheck error/timeout, gradfd fails"]
               + m["both error/timeout"])
    L = [head(data), "",
         f"`gradfd.check` beside `torch.autograd.gradcheck` (slow mode, default tolerances) on one sample of every "
         f"differentiable `op_db` entry ({s['float64_samples_checked']} samples in float64, "
         f"{s['float32_samples_checked']} in float32). Full tables: `benchmarks/results/opinfo.md`.", ""]
    L += pass_table(s)
    L += ["", "Issue 4's bars:", ""] + bars_table(s)
    L += ["", "Where the verdicts differ (float64):", "",
          f"- gradcheck passes, gradfd does not: {ticks(s['bars']['no_float64_false_alarm']['false_alarms'])};",
          f"- gradfd passes, gradcheck does not: "
          f"{ticks(m['gradfd passes, gradcheck fails'] + m['gradcheck error/timeout, gradfd passes'])};",
          f"- neither passes: {ticks(neither)}.",
          "",
          "float32, among the samples gradcheck passes in float64, gradfd does not pass: "
          + (", ".join(f"`{e}` ({v})" for e, v in g["gradfd_not_passing"]) or "none") + ".", ""]
    L += evidence_lines(data, s)
    return "\n".join(L)


def render_full(data: dict) -> str:
    """``results/opinfo.md``'s generated section: counts, the float64 agreement matrix, pass rates and time, the bars
    with the evidence, the workaround rerun and every row to analyse."""
    s = summary_of(data)
    rows = [r for r in data["rows"] if r["dtype"] == "float64"] + [r for r in data["rows"] if r["dtype"] == "float32"]
    L = [head(data) + " The 2 cores are shared with other work: absolute times are noisy; the two tools run "
         "interleaved, entry by entry.", ""]
    L += ["One sample per op_db entry (the first of `op.sample_inputs('cpu', dtype, requires_grad=True)`, seeded "
          "per entry), gradcheck inputs built as in `test/test_ops_gradients.py`. gradcheck: "
          "`torch.autograd.gradcheck(fn, inputs, raise_exception=False)` (slow mode, default eps/atol/rtol, "
          "nondet_tol=0, check_undefined_grad=True). gradfd: `gradfd.check(fn, inputs, raise_on_failure=False)` "
          "(full mode, automatic steps; a check running past the timeout is redone in sample mode). Times are the "
          "sum of the per-sample wall times of each tool.", ""]
    L += ["**Counts**", "", "| | count |", "|---|---|",
          f"| op_db entries | {s['entries_considered']} |",
          f"| entries with `supports_autograd` | {s['entries_with_autograd']} |",
          f"| float64 samples checked | {s['float64_samples_checked']} |",
          f"| float32 samples checked | {s['float32_samples_checked']} |"]
    for reason, n in sorted(s["skip_reasons"].items(), key=lambda t: -t[1]):
        L.append(f"| skipped: {reason} | {n} |")
    L += ["", "**float64 agreement matrix**", "", "| gradcheck (slow) \\ gradfd | count | entries |", "|---|---|---|"]
    for k, v in s["float64_matrix"].items():
        L.append(f"| {k} | {len(v)} | {'' if k == 'both pass' else ', '.join(f'`{e}`' for e in v)} |")
    L += ["", "**Pass rates and time**", ""] + pass_table(s)
    if s["gradfd_sample_mode_fallbacks"]:
        L += ["", "gradfd checks redone in sample mode after the timeout: " +
              ", ".join(f"`{e}` ({d})" for e, d in s["gradfd_sample_mode_fallbacks"])]
    L += ["", "**Issue 4's bars**", ""] + bars_table(s) + [""] + evidence_lines(data, s)
    a, g = s["after_workarounds"], s["float32_on_gradcheck64_pass"]
    L += ["", "**The same, with benchmark-side workarounds for two gradfd issues** (diagnostic only, untimed: outputs "
          "cloned, so that gradfd's loop engine does not read views of the perturbed input after restoring it; only "
          "the outputs autograd marks differentiable compared, as gradcheck does)", "",
          "| | measured |", "|---|---|",
          f"| float64: gradcheck passes, gradfd does not | {len(a['float64_gradcheck_pass_gradfd_not_pass'])}: "
          + ", ".join(f"`{e}`" for e in a["float64_gradcheck_pass_gradfd_not_pass"]) + " |",
          f"| float64 gradfd passes | {a['float64_gradfd_pass']} / {s['float64_samples_checked']} |",
          f"| float32 passes on the entries gradcheck passes in float64 | {a['float32_on_gradcheck64_pass']} / "
          f"{g['samples']} ({100 * a['float32_rate']:.1f}%); not passing: "
          + (", ".join(f"`{e}` ({v})" for e, v in a["float32_gradfd_not_passing"]) or "none") + " |"]
    # every float64 row where the tools differ or either errs, and every float32 gradfd non-pass
    L += ["", "**Rows to analyse** (float64 rows where the verdicts differ or a tool errs; float32 rows where gradfd "
          "does not pass)", "", "| entry | dtype | inputs | gradcheck | gradfd | gradfd detail | gradfd with workarounds "
          "| PyTorch's test_fn_grad |", "|---|---|---|---|---|---|---|---|"]

    def detail(r):
        gf = r.get("gradfd", {})
        if gf.get("verdict") in (ERROR, TIMEOUT):
            return short(gf.get("message", ""), 160).replace("|", "\\|")
        worst = max(gf.get("tensors", []), key=lambda t: t["disagree"], default=None)
        if worst is None:
            return ""
        return (f"{gf['disagree']} disagree, {gf['unresolved']} unresolved; worst {worst['name']} "
                f"{worst['worst_index']}: analytical {fmt(worst['worst_analytical'], '.6g')}, numerical "
                f"{fmt(worst['worst_numerical'], '.6g')}").replace("|", "\\|")

    for r in rows:
        if "skipped" in r:
            continue
        gc, gf = verdict(r, "gradcheck"), verdict(r, "gradfd")
        if (r["dtype"] == "float64" and (gc != gf or gc in (ERROR, TIMEOUT))) or (r["dtype"] == "float32" and gf != PASS):
            w = r.get("gradfd_workaround")
            wtext = "" if w is None else w["verdict"] + (f" (dropped outputs {w['dropped_outputs']})"
                                                         if w.get("dropped_outputs") else "")
            L.append(f"| `{r['entry']}` | {r['dtype']} | {r.get('inputs', '')} | {gc} | {gf} | {detail(r)} | {wtext} | "
                     f"{', '.join(r.get('torch_test_fn_grad', [])) or '-'} |")
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------------------------
# --rules: forward-mode AD and gradgrad (issue 23), beside torch's own checks

RULE_CHECKS = {  # the check -> the OpInfo flag an entry needs for it
    "forward AD": "supports_forward_ad",
    "gradgrad": "supports_gradgrad",
}


def run_rule(lib, check: str, fn, inputs, timeout: float, seed: int) -> dict:
    """``lib``'s drop-in (``torch.autograd`` or ``gradfd``) on one sample: forward AD as PyTorch's own
    ``test_forward_mode_AD`` runs it (``gradcheck(check_forward_ad=True, check_backward_ad=False)``), gradgrad as
    ``test_fn_gradgrad`` (``gradgradcheck`` with its defaults)."""
    row: dict = {}
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    try:
        with time_limit(timeout), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if check == "forward AD":
                ok = lib.gradcheck(fn, inputs, check_forward_ad=True, check_backward_ad=False, raise_exception=False)
            else:
                ok = lib.gradgradcheck(fn, inputs, raise_exception=False)
        row["verdict"] = PASS if ok else FAIL
    except CheckTimeout as exc:
        row.update(verdict=TIMEOUT, message=str(exc))
    except Exception as exc:  # noqa: BLE001 -- a peer benchmark: record whatever goes wrong
        row.update(verdict=ERROR, message=short(f"{type(exc).__name__}: {exc}"))
    row["seconds"] = time.perf_counter() - t0
    if row["verdict"] == FAIL and lib is gradfd:  # which records failed (not timed)
        try:
            with time_limit(timeout), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.manual_seed(seed)
                if check == "forward AD":
                    gradfd.gradcheck(fn, inputs, check_forward_ad=True, check_backward_ad=False)
                else:
                    gradfd.gradgradcheck(fn, inputs)
        except Exception as exc:  # noqa: BLE001
            row["message"] = short(f"{type(exc).__name__}: {exc}", 600)
    return row


def check_rules(op, dtype: torch.dtype, timeout: float) -> list[dict]:
    """Each rule check the entry supports, on its first sample in ``dtype`` (the seed of the first-order rows):
    torch's and gradfd's drop-ins in float64, gradfd's alone in float32 (torch's float64-built tolerances fail
    float32)."""
    name = entry_name(op)
    seed = entry_seed(name, dtype)
    rows = []
    for check, flag in RULE_CHECKS.items():
        row: dict = {"entry": name, "dtype": str(dtype).replace("torch.", ""), "seed": seed, "check": check}
        if not getattr(op, flag, False):
            continue
        if dtype not in op.supported_backward_dtypes("cpu"):
            rows.append({**row, "skipped": f"no backward in {row['dtype']} on cpu"})
            continue
        try:
            sample = first_sample(op, dtype, seed)
        except Exception as exc:  # noqa: BLE001 (StopIteration included)
            rows.append({**row, "skipped": short(f"no sample input ({type(exc).__name__})")})
            continue
        fn, inputs = gradcheck_inputs(op, sample)
        if not inputs:
            rows.append({**row, "skipped": "sample has no tensor requiring grad"})
            continue
        row["inputs"] = describe_inputs(inputs)
        if dtype == torch.float64:
            row["torch"] = run_rule(torch.autograd, check, fn, inputs, timeout, seed)
        row["gradfd"] = run_rule(gradfd, check, gradfd_wrapper(fn), inputs, timeout, seed)
        if check == "forward AD" and verdict(row, "gradfd") == FAIL and verdict(row, "torch") == PASS:
            # not timed: the jvp at gradfd's worst entry beside the exact derivative (as the first-order rows do)
            torch.manual_seed(seed)
            report = gradfd.check(gradfd_wrapper(fn), inputs, check_forward_ad=True, check_backward_ad=False,
                                  raise_on_failure=False)
            row["evidence"] = exact_evidence(name, gradfd_wrapper(fn), inputs, report)
        rows.append(row)
    return rows


def summarise_rules(rows: list[dict]) -> dict:
    """Per check: float64 passes of each tool, the samples torch passes and gradfd does not, and gradfd's float32
    passes among the samples torch's float64 check passes (the bar: at least 95% for gradgrad)."""
    out = {}
    for check in RULE_CHECKS:
        r64 = [r for r in rows if r["check"] == check and r["dtype"] == "float64" and "skipped" not in r]
        r32 = {r["entry"]: r for r in rows if r["check"] == check and r["dtype"] == "float32" and "skipped" not in r}
        torch_pass = [r["entry"] for r in r64 if verdict(r, "torch") == PASS]
        on = [r32[e] for e in torch_pass if e in r32]
        errors: dict[str, int] = {}
        for r in r64 + list(r32.values()):
            if verdict(r, "gradfd") in (ERROR, TIMEOUT):
                key = r["gradfd"].get("message", r["gradfd"]["verdict"])[:90]
                errors[key] = errors.get(key, 0) + 1
        out[check] = {
            "float64_samples": len(r64),
            "float64_pass": {"torch": sum(verdict(r, "torch") == PASS for r in r64),
                             "gradfd": sum(verdict(r, "gradfd") == PASS for r in r64)},
            "torch_passes_gradfd_not": [(r["entry"], verdict(r, "gradfd") + (
                f"; {finding(r['evidence'])}: autograd {fmt(r['evidence'].get('analytical'))}, exact "
                f"{fmt(r['evidence'].get('exact'))}" if r.get("evidence", {}).get("reference") else ""))
                for r in r64 if verdict(r, "torch") == PASS and verdict(r, "gradfd") != PASS],
            "gradfd_passes_torch_not": [(r["entry"], verdict(r, "torch")) for r in r64
                                        if verdict(r, "gradfd") == PASS and verdict(r, "torch") != PASS],
            "float32_on_torch64_pass": {"samples": len(on), "gradfd": sum(verdict(r, "gradfd") == PASS for r in on),
                                        "not_passing": [(r["entry"], verdict(r, "gradfd")) for r in on
                                                        if verdict(r, "gradfd") != PASS]},
            "seconds": {"torch float64": sum(r["torch"]["seconds"] for r in r64),
                        "gradfd float64": sum(r["gradfd"]["seconds"] for r in r64),
                        "gradfd float32": sum(r["gradfd"]["seconds"] for r in r32.values())},
            "gradfd_errors": errors,
        }
    return out


def render_rules(data: dict) -> str:
    s = summarise_rules(data["rows"])
    lines = [head(data), "",
             "Each entry's first sample (the first-order rows' seeds). Forward AD: `gradcheck(check_forward_ad=True, "
             "check_backward_ad=False)`, as PyTorch's `test_forward_mode_AD`; gradgrad: `gradgradcheck` with its "
             "defaults, as `test_fn_gradgrad`. Both tools get the same function and tensors (complex outputs reach "
             "gradfd as real pairs).", "",
             "| check | float64 samples | torch passes (float64) | gradfd passes (float64) | torch passes, gradfd "
             "not | gradfd float32 passes, of torch's float64 passes | seconds: torch f64 / gradfd f64 / f32 |",
             "|---|---|---|---|---|---|---|"]
    for check, c in s.items():
        on = c["float32_on_torch64_pass"]
        sec = c["seconds"]
        lines.append(f"| {check} | {c['float64_samples']} | {c['float64_pass']['torch']} | "
                     f"{c['float64_pass']['gradfd']} | {len(c['torch_passes_gradfd_not'])} | "
                     f"{on['gradfd']} / {on['samples']} | {sec['torch float64']:.1f} / {sec['gradfd float64']:.1f} / "
                     f"{sec['gradfd float32']:.1f} |")
    lines.append("")
    for check, c in s.items():
        on = c["float32_on_torch64_pass"]
        rate = on["gradfd"] / max(1, on["samples"])
        lines.append(f"- **{check}**: gradfd passes {rate:.1%} in float32 of the samples torch's float64 check "
                     f"passes" + (f" (bar: at least 95%: {'met' if rate >= 0.95 else 'NOT met'})"
                                  if check == "gradgrad" else "") + ".")
        listed = lambda pairs: ticks(f"{e} ({v})" for e, v in pairs)  # noqa: E731
        lines.append(f"  - torch passes in float64, gradfd does not: {listed(c['torch_passes_gradfd_not'])}.")
        lines.append(f"  - gradfd passes in float64, torch does not: {listed(c['gradfd_passes_torch_not'])}.")
        lines.append(f"  - float32, not passing (of torch's float64 passes): {listed(on['not_passing'])}.")
        if c["gradfd_errors"]:
            lines.append("  - what gradfd raised: " + "; ".join(f"{n}x `{m}`" for m, n in sorted(
                c["gradfd_errors"].items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)


def rules_main(selected: list, dtypes: list, timeout: float, command: str, info: dict, write: bool,
               t_start: float) -> None:
    rows = []
    for i, op in enumerate(selected, 1):
        for d in dtypes:
            for r in check_rules(op, d, timeout):
                rows.append(r)
                cells = "skipped: " + r["skipped"] if "skipped" in r else " | ".join(
                    f"{t} {r[t]['verdict']:7s} {r[t]['seconds']:6.2f}s" for t in ("torch", "gradfd") if t in r)
                print(f"[{i:3d}/{len(selected)}] {r['entry']:40s} {r['dtype']:7s} {r['check']:10s} {cells}",
                      flush=True)
    info["loadavg_end"] = os.getloadavg()
    data = {"machine": info, "command": command, "wall_seconds": time.perf_counter() - t_start, "rows": rows}
    data = json.loads(json.dumps(data, default=str))
    print(record("opinfo-rules", data, write=write))


# ---------------------------------------------------------------------------------------------------------------
# --complex: complex samples (issue 24), beside torch's gradcheck

COMPLEX_DTYPES = (torch.complex128, torch.complex64)


def _complex_output(fn, inputs) -> bool:
    with torch.no_grad():
        out = fn(*[t.detach() for t in inputs])
    return any(isinstance(o, torch.Tensor) and o.is_complex() for o in (out if isinstance(out, (tuple, list))
                                                                          else (out,)))


def check_complex(op, timeout: float, gc_timeout: float) -> list[dict]:
    """The entry's first sample in complex128 and complex64 (where it supports them on the CPU), and its float64 and
    float32 samples where they return a complex output: torch's gradcheck (complex128 and float64) and gradfd.check,
    given ``fn`` as it is (gradfd checks complex tensors as real pairs itself)."""
    name = entry_name(op)
    rows = []
    for dtype in (*COMPLEX_DTYPES, torch.float64, torch.float32):
        real = not dtype.is_complex
        row: dict = {"entry": name, "dtype": str(dtype).replace("torch.", ""), "seed": entry_seed(name, dtype)}
        if dtype not in op.supported_backward_dtypes("cpu"):
            if not real:
                rows.append({**row, "skipped": f"no backward in {row['dtype']} on cpu"})
            continue
        try:
            sample = first_sample(op, dtype, row["seed"])
            fn, inputs = gradcheck_inputs(op, sample)
            if real and not (inputs and _complex_output(fn, inputs)):
                continue  # a real sample: the first-order table's
        except Exception as exc:  # noqa: BLE001 (StopIteration included)
            if not real:
                rows.append({**row, "skipped": short(f"no sample ({type(exc).__name__}: {exc})")})
            continue
        if not inputs:
            rows.append({**row, "skipped": "sample has no tensor requiring grad"})
            continue
        if real:
            row["dtype"] += ", complex output"
        row["inputs"] = describe_inputs(inputs)
        if dtype in (torch.complex128, torch.float64):
            row["gradcheck"] = run_gradcheck(fn, inputs, gc_timeout, row["seed"])
        row["gradfd"], _ = run_gradfd(fn, inputs, timeout, row["seed"])
        rows.append(row)
    return rows


def summarise_complex(rows: list[dict]) -> dict:
    """Per kind of sample: gradfd's verdicts beside gradcheck's, the samples gradcheck passes and gradfd does not
    (false alarms, the bar: none), those without a verdict (error, timeout, nothing compared; the bar: at most 1% of
    the samples), and complex64's passes among the samples gradcheck passes in complex128."""
    out: dict = {}
    for kind in ("complex128", "float64, complex output", "complex64", "float32, complex output"):
        rs = [r for r in rows if r["dtype"] == kind and "skipped" not in r]
        # no verdict: the check raised or timed out, or a tensor had no entry compared (every one unresolved)
        no_verdict = [(r["entry"], verdict(r, "gradfd")) for r in rs if verdict(r, "gradfd") in (ERROR, TIMEOUT)
                      or any(t["agree"] + t["disagree"] == 0 and t["checked"] for t in r["gradfd"].get("tensors", []))]
        entries = [t for r in rs for t in r["gradfd"].get("tensors", [])]
        out[kind] = {
            "samples": len(rs),
            "unresolved_entries": sum(t["unresolved"] for t in entries),
            "checked_entries": sum(t["checked"] for t in entries),
            "gradcheck_pass": sum(verdict(r, "gradcheck") == PASS for r in rs),
            "gradfd_pass": sum(verdict(r, "gradfd") == PASS for r in rs),
            "false_alarms": [(r["entry"], verdict(r, "gradfd")) for r in rs
                             if verdict(r, "gradcheck") == PASS and verdict(r, "gradfd") != PASS],
            "gradfd_catches": [(r["entry"], verdict(r, "gradcheck")) for r in rs if "gradcheck" in r
                               and verdict(r, "gradfd") == FAIL and verdict(r, "gradcheck") != PASS],
            "gradfd_fails": [(r["entry"], verdict(r, "gradfd")) for r in rs if verdict(r, "gradfd") != PASS],
            "no_verdict": no_verdict,
            "seconds": {"gradcheck": sum(r.get("gradcheck", {}).get("seconds", 0.0) for r in rs),
                        "gradfd": sum(r["gradfd"]["seconds"] for r in rs)},
        }
    c128 = {r["entry"] for r in rows if r["dtype"] == "complex128" and verdict(r, "gradcheck") == PASS}
    c64 = [r for r in rows if r["dtype"] == "complex64" and "skipped" not in r and r["entry"] in c128]
    out["complex64"]["on_gradcheck128_pass"] = {"samples": len(c64), "gradfd": sum(verdict(r, "gradfd") == PASS
                                                                                    for r in c64),
                                                "not_passing": [(r["entry"], verdict(r, "gradfd")) for r in c64
                                                                if verdict(r, "gradfd") != PASS]}
    return out


def render_complex(data: dict) -> str:
    s = summarise_complex(data["rows"])
    lines = [head(data), "",
             "Each entry's first sample in complex128 and complex64, and its float64 and float32 samples where they "
             "return a complex output; `torch.autograd.gradcheck` (slow mode) beside `gradfd.check` (defaults), both "
             "given the function as it is.", "",
             "| samples | count | gradcheck passes | gradfd passes | gradcheck passes, gradfd not | no gradfd "
             "verdict | unresolved entries | seconds: gradcheck / gradfd |", "|---|---|---|---|---|---|---|---|"]
    for kind, c in s.items():
        torch_ran = kind in ("complex128", "float64, complex output")
        gc = str(c["gradcheck_pass"]) if torch_ran else "-"
        fa = str(len(c["false_alarms"])) if torch_ran else "-"
        lines.append(f"| {kind} | {c['samples']} | {gc} | {c['gradfd_pass']} | {fa} | {len(c['no_verdict'])} | "
                     f"{c['unresolved_entries']} of {c['checked_entries']} | "
                     f"{c['seconds']['gradcheck']:.1f} / {c['seconds']['gradfd']:.1f} |" if torch_ran else
                     f"- / {c['seconds']['gradfd']:.1f} |")
    total = sum(c["samples"] for c in s.values())
    none = sum(len(c["no_verdict"]) for c in s.values())
    unresolved = sum(c["unresolved_entries"] for c in s.values()) / max(1, sum(c["checked_entries"]
                                                                              for c in s.values()))
    alarms = [e for kind in ("complex128", "float64, complex output") for e in s[kind]["false_alarms"]]
    on = s["complex64"]["on_gradcheck128_pass"]
    listed = lambda pairs: ticks(f"{e} ({v})" for e, v in pairs)  # noqa: E731
    lines += ["",
              f"- Samples without a gradfd verdict (raised, timed out, or a tensor with nothing compared): {none} of "
              f"{total} ({none / max(1, total):.1%}); unresolved entries {unresolved:.2%} of those checked (bar: at "
              f"most 1% of each: {'met' if none <= 0.01 * total and unresolved <= 0.01 else 'NOT met'}): "
              f"{listed(e for c in s.values() for e in c['no_verdict'])}.",
              f"- gradcheck passes, gradfd does not (complex128 and float64 complex outputs; bar: none: "
              f"{'met' if not alarms else 'NOT met'}): {listed(alarms)}.",
              f"- gradfd fails where gradcheck fails or cannot run (gradcheck's verdict): "
              f"{listed(e for c in s.values() for e in c['gradfd_catches'])}.",
              f"- complex64: gradfd passes {on['gradfd']} of the {on['samples']} samples gradcheck passes in "
              f"complex128; not passing: {listed(on['not_passing'])}; float32 complex outputs not passing: "
              f"{listed(s['float32, complex output']['gradfd_fails'])}."]
    return "\n".join(lines)


def complex_main(selected: list, timeout: float, gc_timeout: float, command: str, info: dict, write: bool,
                 t_start: float) -> None:
    rows = []
    for i, op in enumerate(selected, 1):
        for r in check_complex(op, timeout, gc_timeout):
            rows.append(r)
            cells = "skipped: " + r["skipped"] if "skipped" in r else " | ".join(
                f"{t} {r[t]['verdict']:7s} {r[t]['seconds']:6.2f}s" for t in ("gradcheck", "gradfd") if t in r)
            print(f"[{i:3d}/{len(selected)}] {r['entry']:40s} {r['dtype']:24s} {cells}", flush=True)
    info["loadavg_end"] = os.getloadavg()
    data = {"machine": info, "command": command, "wall_seconds": time.perf_counter() - t_start, "rows": rows}
    data = json.loads(json.dumps(data, default=str))
    print(record("opinfo-complex", data, write=write))


RENDER = {"opinfo": render_summary, "opinfo-full": render_full, "opinfo-rules": render_rules,
          "opinfo-complex": render_complex}


# ---------------------------------------------------------------------------------------------------------------
# --analyse: an independent float64 reference for the entries gradfd flags


def ridders(g, h0: float, ntab: int = 12, con: float = 1.4) -> tuple[float, float]:
    """Ridders' extrapolated central difference of the scalar function ``g(t)`` at 0 (Numerical Recipes' dfridr):
    the estimate and its error estimate. ``g`` is evaluated in float64."""
    a = [[0.0] * ntab for _ in range(ntab)]
    hh = h0
    a[0][0] = (g(hh) - g(-hh)) / (2 * hh)
    best, err = a[0][0], math.inf
    for i in range(1, ntab):
        hh /= con
        a[0][i] = (g(hh) - g(-hh)) / (2 * hh)
        fac = con * con
        for j in range(1, i + 1):
            a[j][i] = (a[j - 1][i] * fac - a[j - 1][i - 1]) / (fac - 1)
            fac *= con * con
            e = max(abs(a[j][i] - a[j - 1][i]), abs(a[j][i] - a[j - 1][i - 1]))
            if e <= err:
                err, best = e, a[j][i]
        if abs(a[i][i] - a[i - 1][i - 1]) >= 2 * err:
            break
    return best, err


def as_float64(sample):
    return sample.transform(lambda t: (t.detach().double().requires_grad_(t.requires_grad)
                                       if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else
                                       (torch.float64 if t is torch.float32 else t)))


def analyse(op, dtype: torch.dtype, max_entries: int = 8, h0: float | None = None) -> None:
    """Print gradfd's flagged entries of one sample beside an independent reference: Ridders' extrapolation of the
    op evaluated in float64 at the same point (for float32 samples, the float32 values upcast), and autograd's
    float64 derivative there."""
    from gradfd.report import DISAGREE, UNRESOLVED
    name = entry_name(op)
    seed = entry_seed(name, dtype)
    sample = first_sample(op, dtype, seed)
    fn, inputs = gradcheck_inputs(op, sample)
    wrapped = gradfd_wrapper(fn)
    report = gradfd.check(wrapped, inputs, raise_on_failure=False)
    print(report)
    s64 = as_float64(sample) if dtype != torch.float64 else sample
    fn64, inputs64 = gradcheck_inputs(op, s64)
    w64 = gradfd_wrapper(fn64)
    with torch.no_grad():
        out64 = w64(*inputs64)
    outs64 = [out64] if isinstance(out64, torch.Tensor) else list(out64)
    for t in report.tensors:
        e = t.entries
        flagged = ((e["verdict"] == DISAGREE) | (e["verdict"] == UNRESOLVED)).nonzero().flatten()
        if flagged.numel() == 0:
            continue
        k_in = int(t.name.split("params[")[1].split("]")[0])
        k_out = int(t.name.split("output[")[1].split("]")[0]) if t.name.startswith("output[") else 0
        n_out = outs64[k_out].numel()
        order = (e["numerical"][flagged] - e["analytical"][flagged]).abs().argsort(descending=True)
        print(f"\n{t.name}: {flagged.numel()} flagged; worst {min(max_entries, flagged.numel())}:")
        print("  (in, out)            verdict  analytical            gradfd numerical      reference (Ridders, f64) "
              "  ref. err   |ana-ref|   |num-ref|   gradfd tol  x_in")
        for j in flagged[order][:max_entries]:
            idx = int(e["index"][j])
            i_in, i_out = (idx // n_out, idx % n_out) if t.name.startswith("output[") else (idx, 0)
            x = inputs64[k_in].detach()
            xi = float(x.reshape(-1)[i_in])

            def g(step, i_in=i_in, i_out=i_out, k_in=k_in, k_out=k_out):
                xs = [p.detach().clone() for p in inputs64]
                xs[k_in].reshape(-1)[i_in] += step
                with torch.no_grad():
                    o = w64(*xs)
                o = o if isinstance(o, torch.Tensor) else o[k_out]
                return float(o.reshape(-1)[i_out])

            ref, err = ridders(g, h0 if h0 is not None else 0.1 * max(1.0, abs(xi)))
            ana, num = float(e["analytical"][j]), float(e["numerical"][j])
            v = {1: "disagree", 2: "unresolved"}[int(e["verdict"][j])]
            print(f"  ({_engine_unravel(i_in, t.shape)}, {i_out:4d}) {v:10s} {ana:+.15e} {num:+.15e} {ref:+.15e} "
                  f"{err:9.2e} {abs(ana - ref):9.2e} {abs(num - ref):9.2e} {float(e['tolerance'][j]):9.2e} {xi:+.6g}")


def _engine_unravel(flat, shape):
    from gradfd.engine import unravel
    return unravel(flat, shape)


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--limit", type=int, default=None, help="only the first N differentiable entries")
    ap.add_argument("--only", default=None, help="comma-separated entry names (name or name.variant)")
    ap.add_argument("--timeout", type=float, default=20.0,
                    help="seconds a gradfd full check may take before it is redone in sample mode")
    ap.add_argument("--gradcheck-timeout", type=float, default=60.0, help="seconds a gradcheck may take")
    ap.add_argument("--no-diagnose", action="store_true", help="skip the (untimed) workaround reruns of failures")
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("-v", "--verbose", action="store_true", help="print gradfd's report for every row")
    ap.add_argument("--analyse", default=None, metavar="ENTRY[:DTYPE]",
                    help="print gradfd's flagged entries of one sample beside a float64 Ridders reference")
    ap.add_argument("--h0", type=float, default=None, help="initial Ridders step for --analyse")
    ap.add_argument("--rules", action="store_true", help="forward AD and gradgrad instead of the first-order check "
                                                         "(the section opinfo-rules, results/opinfo-rules.json)")
    ap.add_argument("--complex", action="store_true", help="complex samples instead (the section opinfo-complex, "
                                                           "results/opinfo-complex.json)")
    args = ap.parse_args()
    command = "uv run python benchmarks/bench_opinfo.py" + "".join(f" {a}" for a in sys.argv[1:])
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]

    t_start = time.perf_counter()
    from torch.testing._internal.common_methods_invocations import op_db

    # Importing torch.testing._internal.common_utils calls torch.backends.disable_global_flags(), after which
    # gradfd.check's no_tf32() (a bare `torch.backends.cudnn.allow_tf32 = False`) raises RuntimeError: gradfd cannot
    # run inside PyTorch's own test harness (reported as a gradfd issue). Lift the freeze for this benchmark.
    torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True

    if args.analyse:
        name, _, dt = args.analyse.partition(":")
        for op in op_db:
            if entry_name(op) == name:
                analyse(op, getattr(torch, dt or "float64"), h0=args.h0)
        return
    # warm up: the C++ kernels JIT-build on first use (not timed against gradfd)
    gradfd.check(lambda x: (x * x).sum(), (torch.randn(4, dtype=torch.float64, requires_grad=True),))
    info = bench.machine_info()
    info["loadavg_start"] = os.getloadavg()
    only = set(args.only.split(",")) if args.only else None
    skipped_entries, selected = [], []
    for op in op_db:
        name = entry_name(op)
        if only is not None and name not in only and op.name not in only:
            continue
        if not op.supports_autograd:
            skipped_entries.append({"entry": name, "skipped": "supports_autograd is False"})
            continue
        selected.append(op)
    if args.limit is not None:
        selected = selected[: args.limit]
    considered = len(selected) + len(skipped_entries) if args.limit is None else len(selected)
    if args.limit is not None:
        skipped_entries = []
    print(f"{len(selected)} differentiable entries to check ({len(op_db)} in op_db); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    if args.rules:
        rules_main(selected, dtypes, args.gradcheck_timeout, command, info, not args.no_record, t_start)
        return
    if args.complex:
        complex_main(selected, args.timeout, args.gradcheck_timeout, command, info, not args.no_record, t_start)
        return
    rows = {d: [] for d in dtypes}
    for i, op in enumerate(selected, 1):
        for d in dtypes:
            r = check_entry(op, d, args.timeout, args.gradcheck_timeout, args.verbose, diagnose=not args.no_diagnose)
            rows[d].append(r)
            dn = r["dtype"]
            if "skipped" in r:
                line = f"skipped: {r['skipped']}"
            else:
                gc, gf = r["gradcheck"], r["gradfd"]
                line = (f"gradcheck {gc['verdict']:7s} {gc['seconds']:6.2f}s | gradfd {gf['verdict']:7s} "
                        f"{gf['seconds']:6.2f}s" + (f" [{gf['mode']}]" if gf.get("mode") == "sample" else "")
                        + f" | {r['inputs']}")
                msgs = [f"{t}: {r[t]['message']}" for t in ("gradcheck", "gradfd")
                        if r[t]["verdict"] in (ERROR, TIMEOUT)]
                if gf["verdict"] == FAIL:
                    msgs.append(f"gradfd: {gf['disagree']} disagree")
                if "gradfd_workaround" in r:
                    msgs.append(f"gradfd with workarounds (untimed): {r['gradfd_workaround']['verdict']}")
                if msgs:
                    line += "\n      " + "\n      ".join(short(m, 200) for m in msgs)
                if args.verbose and "table" in gf:
                    line += "\n" + gf["table"]
            print(f"[{i:3d}/{len(selected)}] {r['entry']:45s} {dn:7s} {line}", flush=True)
    wall = time.perf_counter() - t_start
    info["loadavg_end"] = os.getloadavg()
    rows64 = rows.get(torch.float64, [])
    rows32 = rows.get(torch.float32, [])
    data = {"machine": info, "command": command, "wall_seconds": wall, "entries_considered": considered,
            "summary": summarise(rows64, rows32, considered, skipped_entries),
            "skipped_entries": skipped_entries, "rows": rows64 + rows32}
    data = json.loads(json.dumps(data, default=str))  # what the record will hold (sections.record stores NaN as null)
    # both sections render from the one record, benchmarks/results/opinfo.json
    full = record("opinfo-full", data, write=not args.no_record)
    summary = record("opinfo", data, write=not args.no_record)
    print("\n" + full + "\n\n---- the summary (docs/benchmarks.md) ----\n\n" + summary)
    if not args.no_record:
        print(f"wrote {RESULTS / 'opinfo.json'} and the sections 'opinfo' and 'opinfo-full' where their markers stand")

if __name__ == "__main__":
    main()
