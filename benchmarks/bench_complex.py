"""Issue 24's bar on custom Functions: a hand-written complex backward with its conjugate missing is caught in
complex128 and complex64, and the correct twin passes.

The ops are ``gradfd.demo.planted.COMPLEX_OPS`` (``z * w``, ``z * conj(w)``, ``exp(z) w``, ``z^2 + w``, ``sin(z) w``,
``|z|^2 w``), each with a hand-written backward in PyTorch's convention and a twin whose backward drops the
conjugate of ``z``'s derivative. Each draw picks the shape (2-6 by 2-6) and the values; the drop-ins check it:
``torch.autograd.gradcheck`` in complex128 (full and fast mode), ``gradfd.gradcheck`` in complex128 and complex64
(full and fast mode). Seeds: the ops were developed on the defaults of one draw; the table is judged on the fresh
block 10100-10149 (gradfd.demo.bench's rule on seed ranges).

    uv run python benchmarks/bench_complex.py            # records results/complex.json, renders it
    uv run python benchmarks/bench_complex.py --draws 4 --no-record
"""

from __future__ import annotations

import statistics
import time

import torch
from sections import arguments, caption, record

import gradfd
from gradfd.demo import bench
from gradfd.demo.planted import COMPLEX_OPS, complex_op

JUDGED_ON = range(10100, 10150)
SIDES = (  # column -> (library, dtype, fast_mode)
    ("torch complex128", torch.autograd, torch.complex128, False),
    ("torch fast complex128", torch.autograd, torch.complex128, True),
    ("gradfd complex128", gradfd, torch.complex128, False),
    ("gradfd complex64", gradfd, torch.complex64, False),
    ("gradfd fast complex128", gradfd, torch.complex128, True),
    ("gradfd fast complex64", gradfd, torch.complex64, True),
)


def _inputs(seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(int(n) for n in torch.randint(2, 7, (2,), generator=gen))
    return tuple(torch.randn(shape, generator=gen, dtype=torch.complex128).to(dtype).requires_grad_()
                 for _ in range(2))


def passes(lib, name: str, missing_conj: bool, seed: int, dtype: torch.dtype, fast_mode: bool) -> bool | str:
    """The drop-in's verdict on one draw, or what it raised (``"TypeName: message"``, counted as failing)."""
    z, w = _inputs(seed, dtype)
    try:
        return bool(lib.gradcheck(lambda z, w: complex_op(name, z, w, missing_conj), (z, w), raise_exception=False,
                                  fast_mode=fast_mode))
    except Exception as exc:  # noqa: BLE001 -- record what went wrong
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def measure(seeds: list[int]) -> list[dict]:
    rows = []
    for name in COMPLEX_OPS:
        for missing in (False, True):
            row = {"op": name, "missing_conj": missing, "draws": len(seeds), "passed": {}, "median_s": {}}
            for col, lib, dtype, fast in SIDES:
                results, times = [], []
                for s in seeds:
                    start = time.perf_counter()
                    results.append(passes(lib, name, missing, s, dtype, fast))
                    times.append(time.perf_counter() - start)
                row["passed"][col], row["median_s"][col] = results, statistics.median(times)
            rows.append(row)
            print(name, missing, {c: sum(r is True for r in v) for c, v in row["passed"].items()}, flush=True)
    return rows


def _bars(data: dict) -> list[str]:
    """The computed claims: every missing conjugate caught (the check fails, not raises) by gradfd in complex128 and
    complex64, full and fast mode; every correct twin passes every gradfd column."""
    missed = {c: 0 for c, *_ in SIDES if c.startswith("gradfd")}
    alarms = dict(missed)
    for r in data["rows"]:
        for c in missed:
            if r["missing_conj"]:
                missed[c] += sum(ok is not False for ok in r["passed"][c])
            else:
                alarms[c] += sum(ok is not True for ok in r["passed"][c])
    n = sum(r["draws"] for r in data["rows"] if r["missing_conj"])
    return [f"Missing conjugates caught by gradfd: every one of {n} per column (bar met)." if not any(missed.values())
            else f"Missing conjugates gradfd does not catch: {missed} of {n} per column (bar NOT met).",
            "Correct twins: no false alarm in any gradfd column (bar met)." if not any(alarms.values())
            else f"Correct twins failed: {alarms} (bar NOT met)."]


def render(data: dict) -> str:
    names = [c for c, *_ in SIDES]
    lines = [caption(data), "",
             f"Each row: {data['draws']} draws (seeds {bench.span(data['seeds'])}, fresh) checked by each drop-in; "
             "a cell counts the draws that **pass**: all of them for a correct backward, none for one whose "
             "conjugate is missing. Median seconds per check below.", "",
             "| op | backward | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in data["rows"]:
        cells = [f"{sum(ok is True for ok in r['passed'][c])}/{r['draws']}" for c in names]
        lines.append(f"| {r['op']} | {'conjugate missing' if r['missing_conj'] else 'right'} | "
                     + " | ".join(cells) + " |")
    lines.append("| median s per check | | " + " | ".join(
        f"{statistics.median(r['median_s'][c] for r in data['rows']):.3f}" for c in names) + " |")
    raised = sorted({f"{c}: {ok}" for r in data["rows"] for c, v in r["passed"].items() for ok in v
                     if isinstance(ok, str)})
    lines += [""] + [f"- {b}" for b in _bars(data)]
    if raised:
        lines += ["", "What the checks raised (counted as failing): " + "; ".join(f"`{t}`" for t in raised)]
    return "\n".join(lines)


RENDER = {"complex-ops": render}


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--draws", type=int, default=len(JUDGED_ON))
    args = ap.parse_args()
    seeds = list(JUDGED_ON)[:args.draws]
    data = {"machine": bench.machine_info(), "command": "uv run python benchmarks/bench_complex.py",
            "draws": args.draws, "seeds": seeds, "rows": measure(seeds)}
    print(record("complex-ops", data, write=not args.no_record))


if __name__ == "__main__":
    main()
