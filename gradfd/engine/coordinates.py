"""The batched driver for coordinates: fills an :class:`~.evaluation.Evaluation`'s columns with one batched call
per chunk of coordinates (:func:`~.batched.call_batched` on rows that ``gradfd::perturb_rows_`` re-targets per
chunk). It owns the chunk size (from the memory budget), halving on out-of-memory, the "auto" probe's batched timing,
the rows' layout, and when to give a chunk (or the rest) to the loop.

Which strategy runs at all (structured, batched, loop) is decided in :mod:`gradfd.engine`; the points of the Jacobian
and directional checks have their own driver (:mod:`.points`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .. import distributed, ops
from ..budget import GENERIC_CPU_MIN_CHUNK, GENERIC_CPU_WORKING_SET
from ..errors import CANNOT_RUN_THAT_WAY, OOM_ERRORS, first_line, note, warn_fallback
from ..report import entry_name
from .batched import call_batched, strategies
from .evaluation import Evaluation
from .modes import SharedOperandMatmul
from .problem import Problem

__all__ = ["PerturbedRows", "CoordinateBatches", "sync", "PROBE_BATCH", "PROBE_WARMUP"]

PROBE_BATCH = 64  # coordinates the "auto" probe times batched ...
PROBE_WARMUP = 4  # ... after an untimed batched call on this many
VECTOR_CPU_MIN_CHUNK = 64  # a tensor-valued func's chunks on a CPU: each also pays for comparing its Jacobian columns
# After the engine="auto" probe chose batched, a chunk of at most PROBE_BATCH coordinates capped below the budget by
# the cache heuristic doubles, one timed chunk at a time, and a doubling is kept only when it runs at least SIZE_GAIN
# times faster per coordinate (at most SIZE_DOUBLINGS times): the cache heuristic is a guess, the timing is of func
# (measured: 16 -> 32 coordinates ran a d=128 encoder layer's in_proj_weight 20% faster, 16 -> 64 its linear1.weight
# 25%; benchmarks/bench_models.py).
SIZE_DOUBLINGS = 3
SIZE_GAIN = 0.9


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA), so that a clock read after it times the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


FORMS_NOTE = "vmap ran with batchable forms of the ops it cannot batch"


class PerturbedRows:
    """Perturbed copies of the parameter for one strategy, and the batched call on them.

    Owns the rows buffer (re-targeted per chunk by ``gradfd::perturb_rows_``), its layout, and the strategy:
    ``"vmap"`` (``torch.func.vmap`` under :class:`SharedOperandMatmul`) or ``"stack"`` (``func`` takes the
    parameter with a leading batch dimension; checked against single calls on the first chunk).
    """

    def __init__(self, problem: Problem, offsets: Sequence[float], strategy: str):
        self.problem, self.offsets, self.strategy = problem, offsets, strategy
        self.mode = SharedOperandMatmul()
        self.buffer = self.columns = None
        self.inner: int | None = None
        self.verified = strategy != "stack"
        shape = problem.shape
        # a matrix-shaped parameter may run copy-free with the batch between its rows and columns
        self.split_inner = shape[-1] if len(shape) >= 2 and 1 < shape[-1] < problem.numel else None

    def prepare(self, idx: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Point the first ``len(offsets) * len(idx)`` rows at the new coordinates; return the displacement."""
        need = len(self.offsets) * idx.numel()
        if self.buffer is None or self.buffer.shape[-2] < need:
            self.buffer = self.columns = None
            self.buffer, self.columns = ops.new_rows(self.problem.flat, need, self.inner)
        return ops.perturb_rows_(self.buffer, self.columns, self.problem.flat, idx, steps, self.offsets)

    def set_layout(self, inner: int | None) -> None:
        """Lay the rows out as ``(N / inner, rows, inner)`` (None: ``(rows, N)``) from the next chunk on."""
        if inner != self.inner:
            self.inner, self.buffer, self.columns = inner, None, None

    def __call__(self, count: int) -> torch.Tensor:
        """Values at the first ``count`` rows: ``(count,)`` losses or ``(count, size)`` outputs."""
        in_dim = self.buffer.dim() - 2
        rows = self.buffer[:count] if in_dim == 0 else self.buffer[:, :count]
        out = call_batched(self.problem, rows, self.strategy, in_dim=in_dim, mode=self.mode, verify=not self.verified)
        self.verified = True
        return out


@dataclass
class _Chunk:
    """What became of one chunk of columns."""

    size: int  # columns attempted, after any out-of-memory halving
    values: torch.Tensor | None = None  # (S * size, ...) values when a strategy ran it
    displacement: torch.Tensor | None = None  # (S, size) float64, with the values
    copies_before: int = 0  # the mode's copy count before the call
    looped: bool = False  # the loop filled it (func raised at a node after batching had worked)


class CoordinateBatches:
    """Fills ``result``'s columns with batched calls (see the module's docstring).

    Args:
        problem, result: the prepared problem and the evaluation being filled.
        batching: ``"auto"`` (vmap, vmap with batchable forms, then stack), ``"vmap"`` or ``"stack"``.
        chunk_size: coordinates per call as given, or None: from ``budget`` (bytes; None: the default budget).
        loop_rate: seconds per coordinate of the loop when "auto" probes (then a warm-up chunk and timed chunks
            decide between batched and loop), else None.
        loop: ``loop(a, b)`` fills columns ``a:b`` one node at a time.
        clock: the probe's clock (``time.perf_counter``).
    """

    def __init__(self, problem: Problem, result: Evaluation, batching: str, chunk_size: int | None,
                 budget: int | None, loop_rate: float | None, loop: Callable[[int, int], None],
                 clock: Callable[[], float]):
        self.problem, self.result, self.batching = problem, result, batching
        self.chunk_size, self.budget, self.loop_rate, self.loop, self.clock = chunk_size, budget, loop_rate, loop, clock
        self.offsets = result.stencil.offsets
        self.strategies = strategies(batching)
        self.batch: PerturbedRows | None = None
        self.reasons: list[str] = []  # why each strategy failed
        # "auto": a small untimed batched call first (first-call costs: buffers, vmap set-up), then a timed probe
        self.phase = "warmup" if loop_rate is not None else None
        self.probe_rates: list[float] = []
        self.trial_inner: int | None = None  # the split rows layout, once tried
        self.trial_open = True  # in a distributed check, the split layout is tried after the first chunk only
        self.halving = True  # out of memory halves the chunk (not in a distributed check's shared chunks)
        self.plain_copies: float | None = None  # copies per column in the plain layout, while the trial is undecided
        self.retried = False  # the strategies were tried again after a chunk where func raised at a node
        self.start = 0  # the first column of this run of batched calls (a failure after it is func's own)
        self.chunk = 0
        self.cap = 0  # the chunk the memory budget allows (the cache heuristic may set a smaller one)
        self.sized: list[tuple[float, int]] = []  # (seconds per coordinate, chunk) of the sizing phase

    def run(self, start: int) -> int:
        """Fill columns from ``start``; return how many columns are done (the caller loops over the rest).

        Raises:
            MemoryError: out of memory on a single perturbed point.
            Whatever ``func`` raises that is no failure to run batched, or any exception once batching has worked
            (unless ``problem.node_errors`` records it), with a note naming the coordinates.
        """
        result = self.result
        m = result.coords.numel()
        self.chunk = self._chunk_size(m)
        self.start = pos = start
        while pos < m:
            if distributed.sharing() is not None and self._settled(pos):
                return self._share(pos, m)
            limit = {"warmup": PROBE_WARMUP, "probe": PROBE_BATCH}.get(self.phase, self.chunk)
            t0 = self.clock()
            done = self._attempt(pos, min(self.chunk, m - pos, limit))
            if done.looped:
                pos += done.size
                continue
            if done.values is None:  # every strategy failed on this chunk
                pos, again = self._loop_failed_chunk(pos, done.size, m)
                if again:
                    continue
                warn_fallback("gradfd: func cannot be evaluated batched (" + "; ".join(self.reasons) + "); falling "
                              "back to the per-coordinate loop", stacklevel=5)
                result.notes.append("batching failed: " + "; ".join(self.reasons))
                return pos
            pos = self._store(pos, done)
            timing = None
            if self.phase == "size":
                self._size(t0, done.size)
            elif self.phase is not None:
                timing = self._probe(t0, done.size, pos < m)
            if timing == "loop":
                return pos
            if timing is None and self.phase != "size":  # one change at a time: sizing times one layout
                self._try_layout(done)
        return pos

    def _settled(self, pos: int) -> bool:
        """Whether every later chunk runs as one process would run it: a strategy has run and checked itself, and
        the rows layout is decided (which is all the state one chunk leaves the next, without a probe)."""
        return (pos > self.start and self.batch is not None and self.batch.verified and not self.trial_open
                and self.plain_copies is None and self.phase is None)

    def _share(self, pos: int, m: int) -> int:
        """Columns ``pos:m`` in chunks dealt out over the ranks of the distributed check
        (:func:`gradfd.distributed.share_columns`)."""
        def fill(a: int, b: int) -> None:
            while a < b:
                done = self._attempt(a, min(self.chunk, b - a))
                a = a + done.size if done.looped else self._store(a, done)

        self.halving = False
        distributed.share_columns(self.result, self.problem.node_errors, distributed.blocks_of(pos, m, self.chunk),
                                  fill)
        return m

    def _chunk_size(self, m: int) -> int:
        """Coordinates per call: as given, else what the budget holds, cache-sized on a CPU."""
        if self.chunk_size is not None:
            return min(self.chunk_size, m)
        problem, device = self.problem, self.problem.device
        budget = self.budget or distributed.memory_budget(device)
        outputs = problem.spec.size * 8 if problem.vector else 0
        per_coord = len(self.offsets) * (problem.numel * problem.flat.element_size() + problem.activation_bytes()
                                         + outputs + 256) * 2
        chunk = self.cap = min(m, max(1, budget // per_coord))
        if device.type == "cpu":  # measured: chunks whose working set stays cache-sized run fastest on a CPU
            least = VECTOR_CPU_MIN_CHUNK if problem.vector else GENERIC_CPU_MIN_CHUNK
            chunk = min(chunk, max(least, GENERIC_CPU_WORKING_SET // per_coord))
        chunk = min(m, chunk)
        self.result.notes.append(f"chunk of {chunk} coordinates ({per_coord * chunk / 2**20:.1f} MiB; budget "
                                 f"{budget / 2**20:.0f} MiB)")
        return chunk

    def _attempt(self, pos: int, size: int) -> _Chunk:
        """Columns ``pos:pos + size`` by the current strategy, the next ones if it cannot run, halved on OOM."""
        problem, result = self.problem, self.result
        while True:
            if self.batch is None:
                if not self.strategies:
                    return _Chunk(size)
                self.batch = PerturbedRows(problem, self.offsets, self.strategies.pop(0))
            idx = result.coords[pos:pos + size]
            disp = self.batch.prepare(idx, result.steps[pos:pos + size])
            copies_before = self.batch.mode.copied
            try:
                return _Chunk(size, self.batch(len(self.offsets) * size), disp, copies_before)
            except OOM_ERRORS as exc:
                if size == 1:
                    raise MemoryError(f"gradfd: out of memory evaluating a single perturbed point: {exc}") from exc
                if not self.halving:  # every rank must run the same chunks
                    note(exc, "gradfd: out of memory in a shared chunk of a distributed check (shared chunks are not "
                              "halved: pass a smaller memory_budget or chunk_size)")
                    raise
                size = self.chunk = max(1, size // 2)
                self.cap = min(self.cap, size)  # sizing never doubles back into it
                self.batch.set_layout(self.batch.inner)  # drop the buffer before retrying smaller
                result.notes.append(f"out of memory: chunk halved to {size}")
            except CANNOT_RUN_THAT_WAY as exc:  # cannot batch this func: try the next strategy
                if pos > self.start and problem.node_errors is not None:
                    self.loop(pos, pos + size)  # the nodes one at a time: those that raise are recorded
                    return _Chunk(size, looped=True)
                if pos > self.start:  # batching worked on earlier chunks: a genuine error of func
                    note(exc, self._where(idx))
                    raise
                self.reasons.append(f"{self.batch.strategy}: {type(exc).__name__}: {first_line(exc)}")
                self.batch = None
            except Exception as exc:
                # not a failure to run batched: func's own, propagated at once
                # (tests/test_engine.py::test_an_exception_of_another_kind_is_not_taken_for_a_batching_failure)
                note(exc, self._where(idx))
                raise

    def _where(self, idx: torch.Tensor) -> str:
        problem = self.problem
        return (f"gradfd: raised while evaluating a batch of coordinates "
                f"{entry_name(problem.param_idx, problem.shape, int(idx[0]))} .. "
                f"{entry_name(problem.param_idx, problem.shape, int(idx[-1]))}")

    def _loop_failed_chunk(self, pos: int, size: int, m: int) -> tuple[int, bool]:
        """With ``problem.node_errors``, once: the chunk where every strategy failed, one node at a time (a node that
        raises is recorded). When one did, that node (outside func's domain) may be what failed the batched calls:
        they are tried again on the next chunk. Returns the columns done and whether to go on batched
        (tests/test_engine.py::test_a_node_that_raises_is_recorded_and_the_rest_stays_batched)."""
        errors = self.problem.node_errors
        if errors is None or self.retried:
            return pos, False
        before = errors.count
        self.loop(pos, pos + size)
        pos += size
        if errors.count > before and pos < m:
            self.retried, self.start = True, pos
            self.strategies = strategies(self.batching)
            self.reasons.clear()
            return pos, True
        return pos, False

    def _store(self, pos: int, done: _Chunk) -> int:
        result, size, values = self.result, done.size, done.values
        result.displacement[:, pos:pos + size] = done.displacement
        result.store(pos, pos + size, values.view(len(self.offsets), size, *values.shape[1:]).to(torch.float64))
        result.engine, result.batching, result.chunk_size = "batched", self.batch.strategy, self.chunk
        if self.batch.strategy == "vmap+forms" and not any(n.startswith(FORMS_NOTE) for n in result.notes):
            seen = "".join(f", {f}" for f in sorted(self.problem.forms_used))
            result.notes.append(f"{FORMS_NOTE} (RNN decompositions, attention's math formulation, no fused attention "
                                f"fast path{seen}); plain vmap: {'; '.join(self.reasons)}")
        return pos + size

    def _probe(self, t0: float, size: int, more: bool) -> str | None:
        """The "auto" probe after a chunk begun at ``t0``: ``"next"`` (time another chunk), ``"loop"`` (the loop was
        faster: stop), or None (batched chosen; go on)."""
        if self.phase == "warmup":
            self.phase = "probe"
            return "next"
        sync(self.problem.device)
        self.probe_rates.append((self.clock() - t0) / size)
        rate = min(self.probe_rates)
        if rate > self.loop_rate and len(self.probe_rates) < 2 and more:
            return "next"  # the loop looks faster: time one more chunk (the best of two resists a busy machine)
        self.phase = None
        chosen = "loop" if rate > self.loop_rate else "batched"
        self.result.notes.append(f"probe: batched {rate * 1e6:.0f} us/coordinate vs loop {self.loop_rate * 1e6:.0f} "
                                 f"us: {chosen} chosen")
        if chosen == "loop":
            self.result.engine, self.result.batching = "loop", None
            return "loop"
        if self.chunk_size is None and self.chunk <= PROBE_BATCH and 2 * self.chunk <= self.cap:
            self.phase, self.sized = "size", [(rate, self.chunk)]
            self.chunk *= 2
        return None

    def _size(self, t0: float, size: int) -> None:
        """The sizing phase after a chunk begun at ``t0`` (see ``SIZE_GAIN``): double the chunk again, or settle."""
        sync(self.problem.device)
        rate = (self.clock() - t0) / size
        best_rate, best = min(self.sized)
        self.sized.append((rate, size))
        if size == self.chunk and rate <= SIZE_GAIN * best_rate:
            if len(self.sized) <= SIZE_DOUBLINGS and 2 * size <= self.cap:
                self.chunk = 2 * size
                return
            best = size
        self.phase, self.chunk, self.result.chunk_size = None, best, best
        self.result.notes.append("chunk sized by timing: " + ", ".join(
            f"{c} coordinates {r * 1e6:.0f} us/coordinate" for r, c in self.sized) + f": {best} kept")

    def _try_layout(self, done: _Chunk) -> None:
        """When the batched matmul had to copy the parameter's rows, try the split layout once; keep it if it
        copies less per column."""
        batch = self.batch
        copied = batch.mode.copied - done.copies_before
        opened = self.trial_open
        self.trial_open = distributed.sharing() is None  # (one process: at any chunk that copied; see _settled)
        if (opened and self.trial_inner is None and copied and batch.split_inner
                and batch.strategy in ("vmap", "vmap+forms")):
            self.trial_inner, self.plain_copies = batch.split_inner, copied / done.size
            batch.set_layout(batch.split_inner)
        elif self.plain_copies is not None and self.trial_inner == batch.inner:
            if copied / done.size >= self.plain_copies:
                batch.set_layout(None)
            else:
                self.result.notes.append(f"rows laid out as ({self.problem.numel // batch.inner}, batch, "
                                         f"{batch.inner}): the batched matmul reads them without copying")
            self.plain_copies = None
