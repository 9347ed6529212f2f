"""Calibration of the detection limit every report states (``TensorReport.detection_limit``, issue 20): an error of
``m`` times the stated limit (of the tensor's RMS gradient), planted on one entry, should be flagged in about 95% of
draws at ``m = 1``, and more at ``m = 2``.

Per draw: a correct check states the limit ``L``; then a backward that adds ``m * L * rms`` (random sign) to one
entry's gradient, the entry drawn uniformly among those the correct check looked at, is checked with the same seed;
"caught" is its failing. Seeds: the model of the limit (gradfd/verdict/detection.py) was developed on seeds
1000-1039; 2000-2039 then showed the float32 full rows short (33/40 at 1x: the noise calibration a flagged entry
meets was not modelled, now it is); it is judged here on the fresh range 5000-5039 (``JUDGED_ON``;
gradfd.demo.bench's rule on seed ranges).

    uv run python benchmarks/bench_detection.py            # records results/detection.json, renders it
    uv run python benchmarks/bench_detection.py --draws 4 --no-record
"""

from __future__ import annotations

import math

import torch
from sections import arguments, caption, record

import gradfd
from gradfd.demo import bench
from gradfd.verdict.detection import DETECTION_PROBABILITY

MULTIPLES = (0.5, 1.0, 2.0)
JUDGED_ON = range(5000, 5040)


def _sin2(n: int, dtype: torch.dtype, seed: int):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    return (lambda x: (torch.sin(x) ** 2).sum()), x


def _mlp(dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 30, generator=gen, dtype=torch.float64).to(dtype)
    W2 = (torch.randn(20, 4, generator=gen, dtype=torch.float64) / 20 ** 0.5).to(dtype)
    W1 = (torch.randn(30, 20, generator=gen, dtype=torch.float64) / 30 ** 0.5).to(dtype)
    return (lambda W1: torch.tanh(X @ W1).matmul(W2).pow(2).mean()), W1


CASES = {  # name -> (builder(dtype, seed) -> (loss, x), modes)
    "sum(sin(x)^2), 2,000 entries": (lambda dtype, seed: _sin2(2000, dtype, seed), ("full", "directional")),
    "tanh MLP W1 (64 samples, 30-20-4)": (_mlp, ("full", "sample", "directional")),
}


def trial(case: str, dtype: torch.dtype, mode: str, seed: int) -> dict:
    """The stated limit of one correct check, and whether errors of MULTIPLES times it are caught (an additive
    error on the gradient: ``gradfd.demo.bench.plant`` with a shift)."""
    loss, x = CASES[case][0](dtype, seed)
    correct = gradfd.check(loss, (x.clone().requires_grad_(),), mode=mode, raise_on_failure=False, seed=seed)
    t = correct.tensors[0]
    limit = t.detection_limit
    out = {"limit": limit, "passes_correct": correct.passed, "caught": {}}
    if not (math.isfinite(limit) and limit > 0):
        return out
    g = torch.func.grad(lambda v: loss(v).to(torch.float64))(x.detach().clone())
    rms = float(g.double().pow(2).mean().sqrt())
    looked = (t.entries["index"] if mode == "sample" else torch.arange(x.numel()))
    gen = torch.Generator().manual_seed(seed + 1)
    i = int(looked[torch.randint(looked.numel(), (1,), generator=gen)])
    sign = 1.0 if torch.rand(1, generator=gen).item() < 0.5 else -1.0
    for m in MULTIPLES:
        shift = torch.zeros(x.numel(), dtype=torch.float64)
        shift[i] = sign * m * limit * rms
        planted = gradfd.check(bench.plant(loss, 0, torch.ones_like(x), shift.view_as(x).to(x.dtype)),
                               (x.clone().requires_grad_(),), mode=mode, raise_on_failure=False, seed=seed)
        out["caught"][str(m)] = not planted.passed
    return out


def measure(seeds: list[int]) -> list[dict]:
    rows = []
    for case, (_, modes) in CASES.items():
        for dtype in (torch.float64, torch.float32):
            for mode in modes:
                trials = [trial(case, dtype, mode, s) for s in seeds]
                limits = sorted(t["limit"] for t in trials)
                row = {"case": case, "dtype": str(dtype).replace("torch.", ""), "mode": mode, "draws": len(trials),
                       "median_limit": limits[len(limits) // 2],
                       "passes_correct": sum(t["passes_correct"] for t in trials),
                       "caught": {str(m): sum(t["caught"].get(str(m), False) for t in trials) for m in MULTIPLES},
                       "planted": sum(bool(t["caught"]) for t in trials)}
                rows.append(row)
                print(row, flush=True)
    return rows


def _calibrated(data: dict) -> str:
    """The computed claim: at 1x the stated limit, the share caught reaches the stated probability within the
    binomial noise of the draws (two standard errors), in every row."""
    short = []
    for r in data["rows"]:
        n = r["planted"]
        if n == 0:
            continue
        rate = r["caught"]["1.0"] / n
        slack = 2 * math.sqrt(DETECTION_PROBABILITY * (1 - DETECTION_PROBABILITY) / n)
        if rate < DETECTION_PROBABILITY - slack:
            short.append(f"{r['case']} {r['dtype']} {r['mode']} ({r['caught']['1.0']}/{n})")
    return ("At 1x the stated limit every row catches at least the stated 95%, within two binomial standard errors."
            if not short else "Rows catching less than the stated 95% at 1x the limit: " + "; ".join(short) + ".")


def render(data: dict) -> str:
    lines = [caption(data), "", f"An additive error of m times the stated limit (of the RMS gradient) planted on one "
             f"entry drawn among those looked at, random sign; {data['draws']} draws per row (seeds "
             f"{bench.span(data['seeds'])}, not those the model was developed on). \"caught\": the planted check "
             "fails.", "",
             "| case | dtype | mode | median stated limit | caught at 0.5x | at 1x | at 2x | correct passes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        n = r["planted"]
        cells = " | ".join(f"{r['caught'][str(m)]} / {n}" for m in MULTIPLES)
        lines.append(f"| {r['case']} | {r['dtype']} | {r['mode']} | {r['median_limit']:.1e} | {cells} | "
                     f"{r['passes_correct']} / {r['draws']} |")
    lines += ["", _calibrated(data)]
    return "\n".join(lines)


RENDER = {"detection": render}


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--draws", type=int, default=len(JUDGED_ON))
    args = ap.parse_args()
    seeds = list(JUDGED_ON)[:args.draws]
    data = {"machine": bench.machine_info(), "command": "uv run python benchmarks/bench_detection.py",
            "draws": args.draws, "seeds": seeds, "rows": measure(seeds)}
    print(record("detection", data, write=not args.no_record))


if __name__ == "__main__":
    main()
