"""Distributed checks on this machine: ``launch(world, scenario, ...)`` starts ``world`` processes with a gloo group
(``torch.multiprocessing``, as ``torchrun`` would), runs one named scenario in each, and returns what each rank
returned. tests/test_distributed.py and benchmarks/bench_distributed.py use it.

A scenario is a function ``(rank, world, **options) -> picklable``, named in :data:`SCENARIOS` or as
``"module:function"``; an exception in it is returned, not raised, as ``("raised", type name, message, seconds from
the scenario's start)``. Each rank runs on ``GRADFD_THREADS_PER_RANK`` threads (default 1).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Callable

import torch

import gradfd
from gradfd.distributed import Distributed

__all__ = ["launch", "SCENARIOS", "problems", "summary", "bitwise", "target"]


def problems(seed: int) -> dict[str, tuple[Callable, tuple, dict]]:
    """Named problems, each ``(func, params, check options)``, drawn from ``seed``: the engines and modes a
    distributed check splits (generic batched, structured, sample, directional, tensor-valued, loop)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    def param(*shape, scale=1.0, dtype=torch.float32):
        return (rand(*shape, dtype=dtype) * scale).requires_grad_()

    x, y = rand(16, 20), rand(16, 5)
    w1, b1, w2 = param(20, 24, scale=0.3), param(24, scale=0.1), param(24, 5, scale=0.3)

    def mlp(w1, b1, w2):
        return ((torch.tanh(x.to(w1.dtype) @ w1 + b1) @ w2 - y.to(w1.dtype)) ** 2).mean()

    xl, yl, wl = rand(64, 96), rand(64, 48), param(96, 48, scale=0.1)

    def linear(w):
        return ((xl @ w - yl) ** 2).mean()

    v = param(6, 7)

    def rows(v):
        return torch.softmax(v, dim=-1) * torch.sin(v)

    images, kernel = rand(2, 3, 9, 9), param(4, 3, 3, 3, scale=0.3)

    def conv(kernel):
        return torch.relu(torch.nn.functional.conv2d(images, kernel, padding=1)).square().mean()

    # every budget pinned: a default one is a share of the memory free at the time, which the notes state
    small = {"engine": "batched", "chunk_size": 16, "memory_budget": "1MB"}  # many chunks: rounds of the split
    pinned = {"memory_budget": "256MB"}
    return {
        "mlp batched": (mlp, (w1, b1, w2), small),
        "mlp auto": (mlp, (w1, b1, w2), pinned),
        "linear structured": (linear, (wl,), {"engine": "structured", "chunk_size": 512, **pinned}),
        "conv structured": (conv, (kernel,), {"engine": "structured", "mode": "sample", "samples": 100, **pinned}),
        "mlp sample": (mlp, (w1, b1, w2), {"mode": "sample", "samples": 64, **small}),
        "mlp directional": (mlp, (w1, b1, w2), {"mode": "directional", "directions": 6, **pinned}),
        "rows jacobian": (rows, (v,), {**small, "chunk_size": 8}),
        "mlp loop": (mlp, (w1, b1, w2), {"engine": "loop", **pinned}),
        "mlp float64": (mlp, tuple(p.detach().double().requires_grad_() for p in (w1, b1, w2)), small),
    }


def summary(report: gradfd.CheckReport) -> list[dict]:
    """A report's records as plain data: every entry tensor (to compare bitwise), the verdict fields and the details
    (engine, chunking, notes)."""
    return [{"name": t.name, "verdict": t.verdict, "disagreeing": t.disagreeing(),
             "entries": {k: v.detach().cpu().clone() for k, v in t.entries.items()},
             "worst": (t.worst_index, t.worst_analytical, t.worst_numerical, t.worst_error_estimate),
             "details": {k: v for k, v in t.details.items() if k != "analytical"}, "limit": t.detection_limit}
            for t in report.tensors]


def bitwise(value):
    """``value`` with every tensor as its dtype, shape and bytes (NaNs and signed zeros compare as bits), to compare
    reports with ``==``."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return (str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if isinstance(value, dict):
        return {k: bitwise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [bitwise(v) for v in value]
    return "nan" if isinstance(value, float) and value != value else value


def _module(seed: int):
    """A module and its input for ``check_module``: Linear-Tanh-Linear, float64."""
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
    return net, torch.randn(6, 12, generator=gen, dtype=torch.float64)


def _equal(rank: int, world: int, seed: int = 0, names: list[str] | None = None, timeout: float = 60.0):
    """Every problem checked over the group: each one's summary, seconds, notes and the blocks this rank computed."""
    from gradfd.distributed import resolve

    out = {}
    for name, (func, params, options) in problems(seed).items():
        if names is not None and name not in names:
            continue
        t0 = time.perf_counter()
        session = resolve(Distributed(timeout=timeout))
        report = gradfd.check(func, params, raise_on_failure=False, progress=False, distributed=session, **options)
        out[name] = (summary(report), time.perf_counter() - t0, report.notes, session.computed)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 30, generator=gen, dtype=torch.float64)
    xs = torch.randn(8, 40, generator=gen, dtype=torch.float64)
    out["numerical_gradient"] = gradfd.numerical_gradient(lambda w: torch.tanh(xs @ w).sum(), (w,), 0, None,
                                                          engine="batched", memory_budget="1MB", distributed=True)
    out["points"] = _points(seed, True)
    net, x = _module(seed)
    report = gradfd.check_module(net, x, raise_on_failure=False, progress=False, distributed=True, engine="batched",
                                 chunk_size=16)
    out["check_module"] = (summary(report), 0.0, report.notes, None)
    return out


def _points(seed: int, distributed: bool) -> torch.Tensor:
    """The engine's driver for arbitrary points (Jacobian and directional checks) at 600 points: 3 chunks."""
    from gradfd import engine
    from gradfd.distributed import resolve

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(30, generator=gen, dtype=torch.float64)
    points = w + 1e-3 * torch.randn(600, 30, generator=gen, dtype=torch.float64)
    session = resolve(distributed)
    with session.running({"params": [w]}) if session is not None else contextlib.nullcontext():
        problem = engine.prepare(lambda w: torch.sin(w).cumsum(0).square().sum(), (w,), 0)
        return engine.evaluate_points(problem, points)[0]


class _PlantedSin(torch.autograd.Function):
    """``sin(x)`` whose backward is 1% wrong at one entry (``PLANTED``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.sin(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad = torch.cos(x) * g
        grad[PLANTED] = grad[PLANTED] * 1.01
        return grad


PLANTED = (7, 11)


def _planted(rank: int, world: int, seed: int = 0, timeout: float = 60.0, dtype: str = "float32"):
    """A 1% error planted on one entry of a Function's backward: each record's verdict and disagreeing entries."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(30, 20, generator=gen, dtype=torch.float64)
    w = torch.randn(30, 20, generator=gen, dtype=torch.float64)
    x[PLANTED], w[PLANTED] = 0.3, 1.0  # (the planted entry's gradient is of the tensor's size)
    x, w = x.to(getattr(torch, dtype)).requires_grad_(), w.to(getattr(torch, dtype))
    report = gradfd.check(lambda x: (_PlantedSin.apply(x) * w).sum(), (x,), raise_on_failure=False,
                          progress=False, distributed=Distributed(timeout=timeout) if world else False)
    return [(t.name, t.verdict, t.disagreeing(100)) for t in report.tensors]


def _differ(rank: int, world: int, seed: int = 0, timeout: float = 60.0):
    """Rank 1 checks other parameter values."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(10, 10, generator=gen, dtype=torch.float64) + (rank == 1) * 1e-12).requires_grad_()
    return _intact_after(lambda: gradfd.check(lambda w: (w.sin() ** 2).sum(), (w,), progress=False,
                                              distributed=Distributed(timeout=timeout)), w)


def _raising_on_rank_1(seed: int, error: Callable[[], Exception], rank: int):
    """A loss over a 40 x 40 weight whose func raises ``error()`` on rank 1 at the nodes of the last entry, which lies
    in rank 1's half of the loop's split."""
    w = torch.randn(40, 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).requires_grad_()
    last = float(w[-1, -1])

    def func(w):
        if rank == 1 and float(w[-1, -1]) != last:
            raise error()
        return (w.sin() ** 2).sum()

    return func, w


def _intact_after(call: Callable, w: torch.Tensor):
    """``call()``; what it raises gets a note saying whether ``w`` (values, version, ``.grad``) came out unchanged."""
    before, version = w.detach().clone(), w._version
    try:
        return call()
    except Exception as exc:
        intact = torch.equal(w.detach(), before) and w._version == version and w.grad is None
        exc.add_note(f"tensors intact: {intact}")
        raise


def _raises(rank: int, world: int, seed: int = 0, timeout: float = 60.0):
    """func raises on rank 1 only, at perturbed points (in the split)."""
    func, w = _raising_on_rank_1(seed, lambda: KeyError("planted failure on rank 1"), rank)
    return _intact_after(lambda: gradfd.check(func, (w,), progress=False, engine="loop",
                                              distributed=Distributed(timeout=timeout)), w)


def _forwarded(rank: int, world: int, seed: int = 0, timeout: float = 60.0):
    """func raises on rank 1 only, in autograd's pass (outside the split)."""
    w = torch.randn(40, 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).requires_grad_()

    def func(w):
        if rank == 1 and torch.is_grad_enabled():
            raise ValueError("planted failure on rank 1, under autograd")
        return (w.sin() ** 2).sum()

    return gradfd.check(func, (w,), progress=False, engine="loop", distributed=Distributed(timeout=timeout))


def _killed(rank: int, world: int, seed: int = 0, timeout: float = 20.0, how: str = "exit"):
    """Rank 1 stops midway through the finite differences: exits without a word (``how="exit"``), or hangs for
    three timeouts (``"hang"``)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 40, generator=gen, dtype=torch.float64).requires_grad_()
    calls = [0]

    def func(w):
        calls[0] += 1
        if rank == 1 and calls[0] == 50:
            if how == "exit":
                os._exit(3)
            time.sleep(3 * timeout)
        return (w.sin() ** 2).sum()

    return gradfd.check(func, (w,), progress=False, engine="loop", distributed=Distributed(timeout=timeout))


class _Unpicklable(Exception):
    def __init__(self, a, b):  # (pickle calls cls(*args) with one argument: no copy can be made)
        super().__init__(f"{a} {b}")


def _unpicklable(rank: int, world: int, seed: int = 0, timeout: float = 60.0):
    """func raises, on rank 1 only, an exception no other rank can rebuild (in the split)."""
    func, w = _raising_on_rank_1(seed, lambda: _Unpicklable("planted", "on rank 1"), rank)
    return gradfd.check(func, (w,), progress=False, engine="loop", distributed=Distributed(timeout=timeout))


def _out_of_step(rank: int, world: int, seed: int = 0, timeout: float = 60.0):
    """The ranks reach different collectives."""
    from gradfd.distributed import resolve

    return resolve(Distributed(timeout=timeout)).exchange(f"step of rank {rank}", rank)


def _suite(rank: int, world: int, seed: int = 0, timeout: float = 60.0):
    """The equality problems, the planted error, differing parameters and a raising func, one after the other in
    the same group: each one's result (or what it raised)."""
    out = {}
    for name, scenario in (("equal", _equal), ("planted", _planted), ("differ", _differ), ("raises", _raises),
                           ("unpicklable", _unpicklable), ("forwarded", _forwarded), ("out of step", _out_of_step)):
        t0 = time.perf_counter()
        try:
            out[name] = scenario(rank, world, seed=seed, timeout=timeout)
        except Exception as exc:
            out[name] = _raised(exc, t0)
    return out


SCENARIOS = {"equal": _equal, "planted": _planted, "differ": _differ, "raises": _raises, "killed": _killed,
             "unpicklable": _unpicklable, "forwarded": _forwarded, "out of step": _out_of_step, "suite": _suite}


def _raised(exc: BaseException, t0: float) -> tuple:
    """What a scenario returns for an exception: ``("raised", type name, message and notes, seconds)``."""
    text = "\n".join([str(exc), *getattr(exc, "__notes__", [])])
    return ("raised", type(exc).__name__, text, time.perf_counter() - t0)


def _worker(rank: int, world: int, scenario: str, options: dict, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(max(1, int(os.environ.get("GRADFD_THREADS_PER_RANK", "1"))))
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    if ":" in scenario:  # module:function (a benchmark's own scenario; the module is on the parent's sys.path)
        import importlib

        module, _, name = scenario.partition(":")
        run = getattr(importlib.import_module(module), name)
    else:
        run = SCENARIOS[scenario]
    t0 = time.perf_counter()
    try:
        result = run(rank, world, **options)
    except Exception as exc:
        result = _raised(exc, t0)
    path = os.path.join(folder, f"rank{rank}.pt")
    torch.save(result, path + ".part")
    os.replace(path + ".part", path)  # (whole, or not there: a rank may die in what follows)
    dist.destroy_process_group()


def launch(world: int, scenario: str, **options) -> list:
    """Run ``scenario`` on ``world`` gloo ranks (spawned processes); return each rank's result (None for a rank that
    died before returning)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(_worker, args=(world, scenario, options, folder), nprocs=world, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + 900
        for process in context.processes:  # (not context.join: it would end the others when one rank dies)
            process.join(max(0.0, deadline - time.monotonic()))
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        out = []
        for rank in range(world):
            path = os.path.join(folder, f"rank{rank}.pt")
            out.append(torch.load(path, weights_only=False) if os.path.exists(path) else None)
        return out


def target():
    """A target for ``torchrun ... -m gradfd check gradfd/demo/distributed.py:target --distributed``: a tanh layer's
    squared output, float64, a 60 x 40 weight (benchmarks/gpu.sh runs it on one NCCL rank)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(60, 40, generator=gen, dtype=torch.float64).requires_grad_()
    x = torch.randn(16, 60, generator=gen, dtype=torch.float64)
    return (lambda w: torch.tanh(x.to(w.device) @ w).square().sum()), (w,)
