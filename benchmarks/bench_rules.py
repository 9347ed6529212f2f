"""Issue 23's bars: every planted mistake of an op author's rules is caught, in float64 and float32, and the correct
twin raises no false alarm.

The op is ``gradfd.demo.planted.sin_mul(x, w) = sin(x * w)`` with hand-written backward, jvp and double backward;
each kind of mistake (``gradfd.demo.planted.BUGS``) is checked by the drop-ins with the options of its rule
(``OPTIONS``: forward AD, gradgradcheck, the undefined-gradient, batched-gradient and batched-forward checks), by
``torch.autograd`` in float64 and float32 and by gradfd in float64 and float32, in full mode and fast mode. The
correct twin is checked with every option on (gradcheck with forward AD, batched, batched forward, dtypes and
undefined gradients; gradgradcheck with batched gradients and forward-over-reverse). Each draw picks the shape
(2-6 by 2-6) and the values of ``x`` and ``w``. Seeds: the op and its checks were developed on seeds 0-2; the
table is judged on the fresh block 10000-10049 (gradfd.demo.bench's rule on seed ranges).

    uv run python benchmarks/bench_rules.py            # records results/rules.json, renders it
    uv run python benchmarks/bench_rules.py --draws 4 --no-record
"""

from __future__ import annotations

import statistics
import time

import torch
from sections import arguments, caption, record

import gradfd
from gradfd.demo import bench
from gradfd.demo.planted import BUGS, OPTIONS, sin_mul

JUDGED_ON = range(10000, 10050)
CORRECT = "correct twin"
EVERY_RULE = {"check_forward_ad": True, "check_batched_grad": True, "check_batched_forward_grad": True,
              "check_grad_dtypes": True, "check_undefined_grad": True}
SIDES = (  # column -> (library, dtype, fast_mode)
    ("torch float64", torch.autograd, torch.float64, False),
    ("torch float32", torch.autograd, torch.float32, False),
    ("gradfd float64", gradfd, torch.float64, False),
    ("gradfd float32", gradfd, torch.float32, False),
    ("gradfd fast float64", gradfd, torch.float64, True),
    ("gradfd fast float32", gradfd, torch.float32, True),
)


def _inputs(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(int(n) for n in torch.randint(2, 7, (2,), generator=gen))
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(2))


def passes(lib, bug: str | None, x: torch.Tensor, w: torch.Tensor, fast_mode: bool) -> bool | str:
    """Whether ``lib``'s drop-ins pass ``sin_mul`` with ``bug`` under the options of its rule (every rule for the
    correct twin), or what they raised (``"TypeName: message"``, counted as failing and listed under the table)."""
    f = lambda x, w: sin_mul(x, w, bug)  # noqa: E731
    try:
        if bug is None:
            return bool(lib.gradcheck(f, (x, w), raise_exception=False, fast_mode=fast_mode, **EVERY_RULE)
                        and lib.gradgradcheck(f, (x, w), raise_exception=False, fast_mode=fast_mode,
                                              check_batched_grad=True, check_fwd_over_rev=True))
        opts = dict(OPTIONS[bug])
        if opts.pop("gradgrad", False):
            return bool(lib.gradgradcheck(f, (x, w), raise_exception=False, fast_mode=fast_mode, **opts))
        return bool(lib.gradcheck(f, (x, w), raise_exception=False, fast_mode=fast_mode, **opts))
    except Exception as exc:  # torch raises (rather than returns False) for some findings
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def measure(seeds: list[int]) -> list[dict]:
    rows = []
    for bug in (None, *BUGS):
        row = {"kind": CORRECT if bug is None else bug, "draws": len(seeds), "passed": {}, "median_s": {},
               }
        for name, lib, dtype, fast in SIDES:
            results, times = [], []
            for s in seeds:
                x, w = _inputs(s, dtype)
                start = time.perf_counter()
                results.append(passes(lib, bug, x, w, fast))
                times.append(time.perf_counter() - start)
            row["passed"][name] = results
            row["median_s"][name] = statistics.median(times)
        rows.append(row)
        print({k: v if k != "passed" else {n: sum(r is True for r in v) for n, v in v.items()}
               for k, v in row.items()}, flush=True)
    return rows


def _bars(data: dict) -> list[str]:
    """The computed claims: every mistake that torch's float64 check catches is caught by gradfd -- its check fails,
    not raises -- in float64 and float32, full and fast mode; the correct twin passes every gradfd column."""
    out = []
    for r in data["rows"]:
        p = r["passed"]
        if r["kind"] == CORRECT:
            alarms = {n: sum(ok is not True for ok in v) for n, v in p.items() if n.startswith("gradfd")}
            out.append("Correct twin, every rule on: " + ("no false alarm in any gradfd column (bar met)."
                                                          if not any(alarms.values()) else
                                                          f"false alarms {alarms} (bar NOT met)."))
            continue
        torch_caught = [i for i, ok in enumerate(p["torch float64"]) if ok is not True]
        caught = {n: sum(ok is False for ok in v) for n, v in p.items() if n.startswith("gradfd")}
        missed = {n: sum(1 for i in torch_caught if v[i] is not False) for n, v in p.items() if n.startswith("gradfd")}
        line = (f"{r['kind']}: torch float64 catches {len(torch_caught)}/{r['draws']}; gradfd catches "
                + ", ".join(f"{c}/{r['draws']} ({n[7:]})" for n, c in caught.items()))
        if torch_caught:
            line += ("; of torch's catches, gradfd misses none (bar met)." if not any(missed.values()) else
                     f"; of torch's catches, gradfd misses {missed} (bar NOT met).")
        else:
            line += " (torch's checks let this mistake through: no bar)."
        out.append(line)
    return out


def render(data: dict) -> str:
    names = [n for n, *_ in SIDES]
    lines = [caption(data), "",
             f"Each row: {data['draws']} draws (seeds {bench.span(data['seeds'])}, fresh: not those the op was "
             "developed on) of `sin_mul(x, w)` with the mistake planted, checked by each drop-in with the options of "
             "its rule; a cell counts the draws that **fail** (the mistake caught), and for the correct twin the "
             "draws that pass. torch in float32 fails the correct twin too: its failures there are not detections. "
             "Median seconds per check below.", "",
             "| mistake (option) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in data["rows"]:
        option = "every rule" if r["kind"] == CORRECT else ", ".join(OPTIONS[r["kind"]])
        if r["kind"] == CORRECT:
            cells = [f"passes {sum(ok is True for ok in r['passed'][n])}/{r['draws']}" for n in names]
        else:
            cells = [f"{sum(ok is not True for ok in r['passed'][n])}/{r['draws']}" for n in names]
        lines.append(f"| {r['kind']} ({option}) | " + " | ".join(cells) + " |")
    lines.append("| median s per check | " + " | ".join(
        f"{statistics.median(r['median_s'][n] for r in data['rows']):.3f}" for n in names) + " |")
    raised = sorted({f"{n}: {ok}" for r in data["rows"] for n, v in r["passed"].items() for ok in v
                     if isinstance(ok, str)})
    lines += [""] + [f"- {b}" for b in _bars(data)]
    if raised:
        lines += ["", "What the checks raised (counted as failing): " + "; ".join(f"`{t}`" for t in raised)]
    return "\n".join(lines)


RENDER = {"rules": render}


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--draws", type=int, default=len(JUDGED_ON))
    args = ap.parse_args()
    seeds = list(JUDGED_ON)[:args.draws]
    data = {"machine": bench.machine_info(), "command": "uv run python benchmarks/bench_rules.py",
            "draws": args.draws, "seeds": seeds, "rows": measure(seeds)}
    print(record("rules", data, write=not args.no_record))


if __name__ == "__main__":
    main()
