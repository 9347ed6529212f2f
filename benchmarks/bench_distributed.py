"""Issue 25: one check over 1 and 2 gloo processes on this CPU -- time, bitwise equality of the reports, and the
measurements of the cost model in docs/distributed.md.

Each case runs twice on a group of 1 process and twice on 2 (``gradfd.demo.distributed.launch``, one thread per rank,
the same seed), alternating; the table shows the fastest run of each, and every report of every run (each rank's) is
compared bitwise with the others. A group of one makes a plain check's choices where they are pinned, and otherwise
differs from it only in skipping the timing probe (tests/test_distributed.py compares both). A ping-pong of 8-byte
and 4 MiB exchanges measures the collectives' latency and bandwidth. Every rank also reports where its time went: its
blocks of the split (``share``), the collectives (waiting for the others included), and the rest, which every rank
pays in full (autograd, the verdict pipeline, the settling chunks).

    uv run python benchmarks/bench_distributed.py            # records results/distributed.json, renders it
    uv run python benchmarks/bench_distributed.py --quick --no-record
"""

from __future__ import annotations

import io
import time

import torch
from sections import arguments, caption, record

import gradfd
from gradfd import distributed as D
from gradfd.demo import bench
from gradfd.demo.distributed import bitwise, launch, summary

SEED = bench.HELD_OUT_SEEDS[0]
REPEATS = 2  # runs of each case on 1 and on 2 processes; the table shows the fastest of each


def _mlp(hidden: int, inputs: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(32, inputs, generator=gen, dtype=torch.float64).to(dtype)
    w1 = (torch.randn(inputs, hidden, generator=gen, dtype=torch.float64) / inputs ** 0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(hidden, 10, generator=gen, dtype=torch.float64) / hidden ** 0.5).to(dtype).requires_grad_()

    def func(w1, w2):
        return torch.tanh(torch.tanh(x @ w1) @ w2).square().mean()

    return func, (w1, w2)


def _cnn():
    import bench_models

    module, inputs, loss = bench_models.build("cnn", torch.float32)
    return bench_models.as_function(module, inputs, loss)


CASES = {  # name -> (what, builder, check options)
    "mlp-generic": ("tanh MLP 128-96-10, float64, full, generic engine (vmap)", lambda: _mlp(96, 128, torch.float64),
                    {}),
    "mlp-loop": ("tanh MLP 128-64-10, float64, full, engine='loop' (as for a func vmap cannot batch)",
                 lambda: _mlp(64, 128, torch.float64), {"engine": "loop"}),
    "cnn": ("small CNN of bench_models (20,042 params), float32, full, defaults", _cnn, {}),
    "directional": ("tanh MLP 512-1024-10, float32, directional, 64 directions",
                    lambda: _mlp(1024, 512, torch.float32), {"mode": "directional", "directions": 64}),
}
QUICK = ("mlp-loop", "directional")


def case(rank: int, world: int, name: str):
    """One case checked over the group: the report's summary, seconds, notes and the rank's time split."""
    func, params = CASES[name][1]()
    session = D.resolve(True)
    t0 = time.perf_counter()
    report = gradfd.check(func, params, raise_on_failure=False, progress=False, seed=SEED, distributed=session,
                          **CASES[name][2])
    return {"summary": summary(report), "seconds": time.perf_counter() - t0, "notes": report.notes,
            "split": dict(session.seconds), "collectives": session.totals[0] // world, "bytes": session.totals[1],
            "rounds": session.rounds}


def ping(rank: int, world: int, rounds: int = 50):
    """Seconds per exchange of an 8-byte and of a 4 MiB payload (every rank sends one, receives all)."""
    session = D.resolve(True)
    out = {}
    for label, payload in (("8 B", 0), ("4 MiB", torch.zeros(2**19, dtype=torch.float64))):
        session.exchange("ping", payload)  # warm-up
        count = rounds if label == "8 B" else max(1, rounds // 5)
        t0 = time.perf_counter()
        for _ in range(count):
            session.exchange("ping", payload)
        out[label] = (time.perf_counter() - t0) / count
    buffer = io.BytesIO()
    torch.save(torch.zeros(2**19, dtype=torch.float64), buffer)
    out["4 MiB bytes"] = len(buffer.getbuffer())
    return out


def measure(names) -> dict:
    rows = []
    for name in names:
        ones, twos = [], []
        for _ in range(REPEATS):  # alternating, the best of each (a shared machine)
            ones.append(launch(1, "bench_distributed:case", name=name)[0])
            twos.append(launch(2, "bench_distributed:case", name=name))
        for r in (*ones, *(r for two in twos for r in two)):
            if not isinstance(r, dict):
                raise RuntimeError(f"{name}: a rank returned {r}")
        reports = {repr(bitwise(r["summary"])) for r in (*ones, *(r for t in twos for r in t))}
        same = len(reports) == 1
        one = min(ones, key=lambda r: r["seconds"])
        two = min(twos, key=lambda t: max(r["seconds"] for r in t))
        entries = sum(t["entries"]["index"].numel() for t in one["summary"])
        rows.append({"case": name, "what": CASES[name][0], "entries": entries,
                     "verdicts": [t["verdict"] for t in two[0]["summary"]], "bitwise_equal": same,
                     "seconds_1": one["seconds"], "seconds_2": max(r["seconds"] for r in two),
                     "split_1": one["split"], "split_2": [r["split"] for r in two],
                     "rounds_1": one["rounds"], "collectives_2": two[0]["collectives"],
                     "bytes_2": two[0]["bytes"]})
        print(rows[-1]["case"], f"{rows[-1]['seconds_1']:.2f} s -> {rows[-1]['seconds_2']:.2f} s", same, flush=True)
    pings = launch(2, "bench_distributed:ping")
    return {"rows": rows, "ping": pings[0]}


def model(r: dict, ping: dict, ranks: int) -> float:
    """The cost model's time on ``ranks`` ranks (docs/distributed.md): what every rank pays, the shared work divided,
    and per round one exchange whose latency and volume grow like a ring's (``ranks - 1`` steps)."""
    s1 = r["split_1"]
    shared = s1["share"]
    everyone = r["seconds_1"] - shared - s1["collectives"]
    blocks = r["rounds_1"]  # one process: one block per round
    latency = ping["8 B"] * (ranks - 1)
    bandwidth = ping["4 MiB bytes"] / max(ping["4 MiB"] - ping["8 B"], 1e-9)
    volume = r["bytes_2"] * (ranks - 1) / ranks  # what one rank receives: the others' share of every block
    return everyone + shared / ranks + -(-blocks // ranks) * latency + volume / bandwidth


def render(data: dict) -> str:
    lines = [caption(data), "",
             "A group of one process against two (gloo, one thread each; the same seed). *Equal*: the two ranks' "
             "reports and the one-process report are bitwise equal, every entry tensor and detail of every record. "
             "*Shared*: seconds each rank "
             "spent in its own blocks of the split (rank 0 / rank 1); *collectives*: rank 0's seconds in them, waiting "
             "for rank 1 included; *everyone*: what each rank pays in full (autograd, the verdicts, the chunks that "
             "settle the engine's choices), the rest of rank 0's time.", "",
             "| case | entries | verdicts | 1 process s | 2 processes s | speed-up | equal | shared s | "
             "collectives s | everyone s | collectives | MB sent |", "|" + "---|" * 12]
    for r in data["rows"]:
        s2 = r["split_2"]
        everyone = r["seconds_2"] - s2[0]["share"] - s2[0]["collectives"]
        lines.append(
            f"| {r['what']} | {r['entries']:,} | {', '.join(sorted(set(r['verdicts'])))} | {r['seconds_1']:.2f} | "
            f"{r['seconds_2']:.2f} | {r['seconds_1'] / r['seconds_2']:.2f}x | {'yes' if r['bitwise_equal'] else 'NO'}"
            f" | {s2[0]['share']:.2f} / {s2[1]['share']:.2f} | {s2[0]['collectives']:.2f} | {everyone:.2f} | "
            f"{r['collectives_2']} | {r['bytes_2'] / 1e6:.2f} |")
    p = data["ping"]
    bandwidth = p["4 MiB bytes"] / max(p["4 MiB"] - p["8 B"], 1e-9)
    equal = all(r["bitwise_equal"] for r in data["rows"])
    lines += ["", f"Collectives here (gloo over loopback, 2 ranks): {p['8 B'] * 1e3:.2f} ms per exchange of 8 bytes "
              f"(latency), {p['4 MiB'] * 1e3:.1f} ms per exchange of 4 MiB from each rank: about "
              f"{bandwidth / 1e9:.2f} GB/s.", "",
              "The cost model (below) from the one-process run's split and the exchange figures: seconds predicted for "
              "2 ranks (against the measured), and for 8 ranks of this kind; *blocks* are the one-process run's "
              "blocks of the split, *ms per block* its shared seconds per block.", "",
              "| case | everyone s | shared s | blocks | ms per block | model, 2 ranks | measured, 2 ranks | "
              "model, 8 ranks | speed-up at 8 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        s1 = r["split_1"]
        everyone = r["seconds_1"] - s1["share"] - s1["collectives"]
        lines.append(f"| {r['case']} | {everyone:.2f} | {s1['share']:.2f} | {r['rounds_1']} | "
                     f"{1e3 * s1['share'] / max(r['rounds_1'], 1):.1f} | {model(r, p, 2):.2f} | "
                     f"{r['seconds_2']:.2f} | {model(r, p, 8):.2f} | {r['seconds_1'] / model(r, p, 8):.1f}x |")
    lines += ["", "- Every rank's report equals the one-process report, numerical values bitwise: "
              + ("yes, in every case (bar met)." if equal else "NO (bar NOT met).")]
    return "\n".join(lines)


RENDER = {"distributed": render}


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--quick", action="store_true", help="two small cases only")
    args = ap.parse_args()
    names = QUICK if args.quick else tuple(CASES)
    data = {"machine": bench.machine_info(), "command": "uv run python benchmarks/bench_distributed.py",
            "seed": SEED, **measure(names)}
    print(record("distributed", data, write=not args.no_record))


if __name__ == "__main__":
    main()
