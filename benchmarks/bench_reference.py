"""Reference mode (``gradfd.check(op, params, reference=ref)``, issue 22): false alarms on correct half-precision
kernels, and the detection of errors planted on one row of their backward, per dtype.

Kernels, each against a plain-PyTorch reference:
- ``softmax``: ``gradfd.custom_op.softmax``, a ``torch.autograd.Function`` with a hand-written backward computed in
  float32 and rounded once (as fused kernels do), against ``torch.softmax``;
- ``softmax (half arithmetic)``: the same backward computed in the tensor's own dtype, op by op: correct, but
  less accurate than the reference in that dtype (a stress case; no bar);
- ``rms_norm``: gradfd's C++ kernel (``gradfd.custom_op.rms_norm``), against ``rms_norm_reference``;
- ``gelu``, ``attention``, ``layer_norm``: PyTorch's own fused kernels (``F.gelu``,
  ``F.scaled_dot_product_attention``, ``F.layer_norm``), against their textbook compositions.

The correct kernels of ``BARRED`` must pass; the other two are less accurate than the reference in their dtype
(see ``BARRED``), and their rows say how often that is flagged.

A planted error multiplies the gradient of the first input on one row (the last dimension) by ``1 + rel``
(``rel`` in 0.5%, 1%, 2%, 5%; ``-2``: a sign error), through a wrapper around the correct kernel's backward.

The factor was chosen on the tuned draws (seeds 0-19: the "factor needed" column is the largest ``|op - truth| -
floor`` over ``S + R`` among correct kernels there); the table's rates are on held-out draws (1000-1049).

    uv run python benchmarks/bench_reference.py              # records results/reference.json, renders it
    uv run python benchmarks/bench_reference.py --draws 5 --no-record
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from sections import arguments, caption, record

import gradfd
from gradfd import custom_op
from gradfd.demo import bench
from gradfd.report import UNRESOLVED
from gradfd.verdict.policy import DEFAULT_POLICY

RELS = (0.005, 0.01, 0.02, 0.05)
SIGN = -2.0  # 1 + SIGN = -1: the sign error
TUNED = range(0, 20)
HELD_OUT = range(1000, 1050)
DTYPES = (torch.float16, torch.bfloat16)


class SoftmaxHalf(torch.autograd.Function):
    """The same, its backward computed in the tensor's dtype, op by op."""

    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, -1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return y * (g - (g * y).sum(-1, keepdim=True))


def planted(op, rel: float, row: int):
    """``op`` whose backward multiplies the first input's gradient on row ``row`` (of its ``(-1, last)`` view)
    by ``1 + rel``."""

    class Planted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            inner = [a.detach().requires_grad_(a.is_floating_point()) for a in args]
            with torch.enable_grad():
                out = op(*inner)
            ctx.inner, ctx.out = inner, out
            return out.detach()

        @staticmethod
        def backward(ctx, g):
            grads = list(torch.autograd.grad(ctx.out, ctx.inner, g, allow_unused=True, retain_graph=True))
            first = grads[0].contiguous().clone()
            view = first.view(-1, first.shape[-1])
            view[row] = (view[row].float() * (1 + rel)).to(first.dtype)
            grads[0] = first
            return tuple(grads)

    return Planted.apply


def _layer_norm_reference(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _attention_reference(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


def _draw(family: str, dtype: torch.dtype, seed: int):
    """``(op, reference, params, rows)``: the family's kernel, its reference, float64-drawn params rounded to
    ``dtype`` (requiring grad), and the number of rows of the first input."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    if family.startswith("softmax"):
        x = randn(r(4, 64), r(8, 256)) * (0.5 + 4 * float(torch.rand(1, generator=gen)))
        op = SoftmaxHalf.apply if "half" in family else custom_op.softmax
        params, ref = (x,), custom_op.softmax_reference
    elif family == "rms_norm":
        d = r(16, 512)
        params, op, ref = (randn(r(2, 32), d), 1 + 0.1 * randn(d)), custom_op.rms_norm, custom_op.rms_norm_reference
    elif family == "layer_norm":
        d = r(16, 512)
        params = (randn(r(2, 32), d) * 2 + 0.5, 1 + 0.1 * randn(d), 0.1 * randn(d))
        op, ref = (lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)), _layer_norm_reference
    elif family == "gelu":
        params = (randn(r(2, 32), r(16, 512)) * 2,)
        op, ref = F.gelu, (lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0))))
    elif family == "attention":
        b, h, n, d = r(1, 2), r(1, 4), r(4, 16), r(8, 32)
        params = (randn(b, h, n, d), randn(b, h, n, d), randn(b, h, n, d))
        op, ref = F.scaled_dot_product_attention, _attention_reference
    else:
        raise ValueError(family)
    params = tuple(p.to(dtype).requires_grad_() for p in params)
    rows = params[0].numel() // params[0].shape[-1]
    return op, ref, params, rows


FAMILIES = ("softmax", "rms_norm", "gelu", "attention", "layer_norm", "softmax (half arithmetic)")
# kernels as accurate as the reference in their dtype, which must pass. Not among them, as the tuned draws showed:
# PyTorch's CPU layer_norm, whose bias gradient in float16/bfloat16 has 2-5x the reference's error (FlashAttention's
# tensor-wide 2x criterion fails it as well), and the softmax whose backward rounds every op in its dtype
BARRED = ("softmax", "rms_norm", "gelu", "attention")


def _needed_factor(report) -> float:
    """The smallest ``reference_factor`` under which every compared entry of a correct kernel agrees: the largest
    ``(|op - truth| - floor) / (S + R)`` (gradfd/verdict/against_reference.py, ``judge``)."""
    need = 0.0
    for t in report.tensors:
        e = t.entries
        judged = e["verdict"] != UNRESOLVED
        est = e["error_estimate"][judged]  # S + R
        floor = e["tolerance"][judged] - DEFAULT_POLICY.reference_factor * est
        over = ((e["analytical"] - e["numerical"]).abs()[judged] - floor).clamp(min=0)
        ratio = torch.where(est > 0, over / est.clamp(min=1e-300), torch.where(over > 0, math.inf, 0.0))
        need = max(need, float(ratio.max()) if ratio.numel() else 0.0)
    return need


def trial(family: str, dtype: torch.dtype, seed: int) -> dict:
    op, ref, params, rows = _draw(family, dtype, seed)
    row = seed % rows
    t0 = time.perf_counter()
    correct = gradfd.check(op, params, reference=ref, raise_on_failure=False, seed=seed)
    seconds = time.perf_counter() - t0
    out = {"passed": correct.passed, "needed": _needed_factor(correct), "seconds": seconds,
           "limit": correct.tensors[0].detection_limit, "ratio": correct.tensors[0].details["reference"]["ratio"],
           # FlashAttention's criterion on the same draws: every tensor's largest error within 2x the reference's
           "fa": all(t.details["reference"]["ratio"] <= 2 for t in correct.tensors),
           "caught": {}, "missed_resolvable": {}}
    e = correct.tensors[0].entries
    on = (e["index"] // params[0].shape[-1]) == row
    for rel in (*RELS, SIGN):
        bad = gradfd.check(planted(op, rel, row), params, reference=ref, raise_on_failure=False, seed=seed)
        flagged = set(bad.tensors[0].disagreeing(10 ** 9))
        on_row = all(_row_of(i, params[0].shape) == row for i in flagged)
        out["caught"][str(rel)] = caught = bool(flagged) and on_row
        # a miss the tolerance could have seen: somewhere on the row the planted shift exceeds the tolerance (the
        # correct check's, which depends on the reference only); other misses lie below the reference's rounding
        resolvable = bool((abs(rel) * e["numerical"][on].abs() > e["tolerance"][on]).any())
        out["missed_resolvable"][str(rel)] = not caught and resolvable
    return out


def _row_of(index: tuple, shape) -> int:
    flat = 0
    for i, n in zip(index[:-1], shape[:-1]):
        flat = flat * n + i
    return flat


def measure(seeds: list[int]) -> list[dict]:
    rows = []
    for family in FAMILIES:
        for dtype in DTYPES:
            trials = [trial(family, dtype, s) for s in seeds]
            limits = sorted(t["limit"] for t in trials)
            row = {"family": family, "dtype": str(dtype).replace("torch.", ""), "draws": len(trials),
                   "passes_correct": sum(t["passed"] for t in trials),
                   "passes_fa": sum(t["fa"] for t in trials),
                   "needed_factor": max(t["needed"] for t in trials),
                   "median_ratio": sorted(t["ratio"] for t in trials)[len(trials) // 2],
                   "median_limit": limits[len(limits) // 2],
                   "median_seconds": sorted(t["seconds"] for t in trials)[len(trials) // 2],
                   "caught": {str(rel): sum(t["caught"][str(rel)] for t in trials) for rel in (*RELS, SIGN)},
                   "missed_resolvable": {str(rel): sum(t["missed_resolvable"][str(rel)] for t in trials)
                                         for rel in (*RELS, SIGN)}}
            rows.append(row)
            print(row, flush=True)
    return rows


def _bars(data: dict) -> list[str]:
    """Issue 22's bars, computed on the held-out rows: the float16 and bfloat16 softmax kernels pass, a sign
    error is flagged, and a planted error on one row is flagged at 1% (float16) and 5% (bfloat16); every
    correct kernel passes."""
    held = {(r["family"], r["dtype"]): r for r in data["held_out"]}
    lines = []
    for dtype, rel in (("float16", "0.01"), ("bfloat16", "0.05")):
        r = held[("softmax", dtype)]
        n = r["draws"]
        met = r["passes_correct"] == n and r["caught"][str(SIGN)] == n and r["caught"][rel] == n
        hidden = n - r["caught"][rel] - r["missed_resolvable"][rel]
        lines.append(f"- softmax, {dtype}: correct passes {r['passes_correct']}/{n}, sign error flagged "
                     f"{r['caught'][str(SIGN)]}/{n}, {float(rel):.0%} on one row flagged {r['caught'][rel]}/{n}: "
                     f"{'met' if met else 'NOT met'}" + (
                         f" ({hidden} of the misses lie below the reference's own rounding on their row: nowhere "
                         f"on it, in each entry's worst cotangent draw, does the planted error exceed the tolerance; "
                         f"{r['missed_resolvable'][rel]} do not)"
                         if not met and r["caught"][rel] < n else "") + ".")
    alarms = [f"{f} {d} ({r['draws'] - r['passes_correct']}/{r['draws']})" for (f, d), r in held.items()
              if f in BARRED and r["passes_correct"] < r["draws"]]
    lines.append("- False alarms on the correct kernels: " + ("none." if not alarms else "; ".join(alarms) + "."))
    return lines


def _num(value, spec: str) -> str:
    """``value`` formatted, or "inf/NaN" where the record holds null (JSON has neither)."""
    return "inf/NaN" if value is None else format(value, spec)


def render(data: dict) -> str:
    tuned = {(r["family"], r["dtype"]): r for r in data["tuned"]}
    lines = [caption(data), "",
             f"Held-out draws (seeds {bench.span(data['held_out_seeds'])}); the factor "
             f"{data['factor']:g} was set on the tuned draws (seeds {bench.span(data['tuned_seeds'])}), whose "
             "largest needed factor the table shows. \"flagged\": the check fails, and every flagged entry of the "
             "first input (where the error is planted) is on the planted row. \"FlashAttention's 2x\": every tensor's largest error within twice the reference's "
             "(one maximum per tensor), on the same draws. \"median op/ref error\": that ratio for the first input.",
             "",
             "| kernel | dtype | correct passes | FlashAttention's 2x passes | factor needed (tuned) | median op/ref "
             "error | median detection limit | 0.5% | 1% | 2% | 5% | sign | median time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["held_out"]:
        n = r["draws"]
        t = tuned[(r["family"], r["dtype"])]
        cells = " | ".join(f"{r['caught'][str(rel)]}/{n}" for rel in (*RELS, SIGN))
        lines.append(f"| {r['family']} | {r['dtype']} | {r['passes_correct']}/{n} | {r['passes_fa']}/{n} | "
                     f"{_num(t['needed_factor'], '.2f')} | {_num(r['median_ratio'], '.2f')} | "
                     f"{_num(r['median_limit'], '.1e')} rms | {cells} | {1000 * r['median_seconds']:.0f} ms |")
    lines += ["", *_bars(data)]
    return "\n".join(lines)


RENDER = {"reference": render}


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--draws", type=int, default=len(HELD_OUT))
    args = ap.parse_args()
    tuned = list(TUNED)[:args.draws]
    held = list(HELD_OUT)[:args.draws]
    data = {"machine": bench.machine_info(), "command": "uv run python benchmarks/bench_reference.py",
            "factor": DEFAULT_POLICY.reference_factor, "tuned_seeds": tuned, "held_out_seeds": held,
            "tuned": measure(tuned), "held_out": measure(held)}
    print(record("reference", data, write=not args.no_record))


if __name__ == "__main__":
    main()
