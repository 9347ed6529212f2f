"""One check over many processes with ``torch.distributed``: ``distributed=`` of :func:`gradfd.check`,
:func:`gradfd.check_module` and :func:`gradfd.numerical_gradient`.

Every rank holds the whole problem and runs the whole pipeline; only the perturbed evaluations are shared out. The
rules:

- **The split.** An engine driver first runs, on every rank alike, the chunks that settle its choices (the batched
  strategy and rows layout, the structured engine's chunk size); the chunks after those are dealt out round-robin,
  one per rank per round (:meth:`Session.share`). After each round every rank receives every chunk's values and
  stores them in column order, so each rank's evaluation, and everything computed from it, is what one process
  would have computed: the noise calibrations that pool over chunks see the same chunks in the same order.
- **Choices without clocks.** Nothing depends on a rank's clock: ``engine="auto"`` does not time a probe (batched
  above the loop's threshold, the structured engine when it applies), chunks are not resized by timing, and the
  default memory budget is the least of the ranks'. A distributed report is therefore bitwise equal to a
  one-process check with the same choices: ``engine="batched"`` where ``"auto"`` chose batched, and
  ``memory_budget`` set to the budget the report's notes give (``tests/test_distributed.py``). Every rank
  fingerprints its report at the end: a rank whose settling chunks took another way (out of memory there) makes
  every rank raise rather than return another report.
- **The same problem everywhere.** Ranks compare fingerprints (SHA-256) of the parameters' values, shapes and
  dtypes and of the options before anything else, and of the unperturbed outputs and the analytical gradient after
  autograd; a difference raises :class:`DistributedError` on every rank, naming the item and the ranks.
- **Ranks in step.** Every collective carries a tag saying where the rank is; ranks whose tags differ raise
  :class:`DistributedError` ("out of step") rather than read each other's payloads. Shared chunks are not halved on
  out of memory (every rank must run the same chunks): the error is raised on every rank.
- **Errors reach every rank.** A chunk that raises on one rank raises on every rank after the chunks before it are
  stored: the original exception there, a copy elsewhere (its type kept, so that every rank takes the same
  fallback), each with a note naming the rank; where no copy can be made, the same :class:`DistributedError`
  everywhere. A rank that raises outside the split sends its error into the next collective the others join, where
  they raise a :class:`DistributedError` naming it (:meth:`Session.running`).
- **No hang.** Every collective waits at most ``timeout`` seconds (:data:`DEFAULT_TIMEOUT`, set through
  :class:`Distributed`); a rank that dies leaves the others a :class:`DistributedError` when its connection drops
  (gloo) or when the timeout expires. Payloads are pickled on the host and gathered through gloo (an NCCL default
  group gets a gloo side group); an NCCL subgroup's are gathered on its GPUs and wait for its own timeout.

Cost (docs/distributed.md): every rank pays the analytical side, the verdict pipeline and the settling chunks in
full; the finite differences, the bulk of a full check, are divided by the number of ranks. Each round moves every
chunk's values (8 bytes per stencil node, times the outputs of a tensor-valued ``func``) to every rank.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import hashlib
import io
import math
import pickle
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from .budget import default_memory_budget
from .errors import note

__all__ = ["Distributed", "DistributedError", "Session", "DEFAULT_TIMEOUT", "resolve", "active", "sharing",
           "memory_budget", "fingerprint", "verify", "share_columns", "share_rows", "blocks_of"]

DEFAULT_TIMEOUT = 300.0  # seconds a collective waits for the other ranks (a round includes their share of the work)


class DistributedError(Exception):
    """The ranks of a distributed check disagree (their problems differ, or they are out of step), a rank raised
    outside the split or stopped answering, or a collective failed. Raised on every rank that can still raise. Not a
    RuntimeError: no engine fallback takes it for a function that cannot run some way. The group should be destroyed
    and made again after one (a collective may be left pending)."""


def _marked(exc: BaseException) -> BaseException:
    """``exc``, marked as known to every rank (no rank forwards it again)."""
    exc._gradfd_exchanged = True
    return exc


@dataclass(frozen=True)
class Distributed:
    """How a check is distributed: ``distributed=Distributed(group, timeout=60)``.

    Args:
        group: the ``torch.distributed`` process group to share the work over; None: the default group (which must
            be initialized: ``torch.distributed.init_process_group``, or ``torchrun``).
        timeout: seconds each collective waits for the other ranks before raising :class:`DistributedError` (default
            :data:`DEFAULT_TIMEOUT`); the collectives run over gloo (an NCCL default group gets a gloo side group),
            except an NCCL subgroup's, which wait for their process group's own timeout.
    """

    group: Any = None
    timeout: float = DEFAULT_TIMEOUT


_active: contextvars.ContextVar["Session | None"] = contextvars.ContextVar("gradfd_distributed", default=None)


def active() -> "Session | None":
    """The session of the distributed check running in this context, or None."""
    return _active.get()


def sharing() -> "Session | None":
    """The active session when this rank may start a collective: not while it computes a block of its share (a
    driver called from there runs locally)."""
    session = _active.get()
    return None if session is None or session.local else session


def resolve(distributed, name: str = "distributed") -> "Session | None":
    """The :class:`Session` for a ``distributed=`` argument: None for False/None; the active session when one is
    running (a check inside a distributed check); else one over the group given.

    Raises:
        TypeError: ``distributed`` is not a bool, ProcessGroup, :class:`Distributed` or None.
        ValueError: a timeout that is not a positive number.
        RuntimeError: ``distributed=True`` (or a default group) while no process group is initialized; the message
            says how to start one.
    """
    if distributed is None or distributed is False:
        return None
    if isinstance(distributed, Session):
        return distributed
    current = active()
    if current is not None:
        return current
    import torch.distributed as dist

    if distributed is True:
        distributed = Distributed()
    elif dist.is_available() and isinstance(distributed, dist.ProcessGroup):
        distributed = Distributed(distributed)
    if not isinstance(distributed, Distributed):
        raise TypeError(f"{name} must be False, True, a torch.distributed ProcessGroup or gradfd.distributed."
                        f"Distributed, got {type(distributed).__name__}")
    timeout = distributed.timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"{name}'s timeout must be a positive, finite number of seconds, got {timeout!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{name}=True needs an initialized torch.distributed process group: start the processes with torchrun "
            "(`torchrun --nproc-per-node 2 script.py`, or `torchrun --nproc-per-node 2 -m gradfd check file.py:fn "
            "--distributed`) and call torch.distributed.init_process_group('gloo') (CPU) or ('nccl') (GPUs) in "
            "each before checking")
    return Session(distributed.group, float(timeout))


def memory_budget(device: torch.device) -> int:
    """The default memory budget: the least of the ranks' in a distributed check (every rank then chunks alike), else
    this process's (:func:`gradfd.budget.default_memory_budget`)."""
    session = active()
    return default_memory_budget(device) if session is None else session.memory_budget(device)


def fingerprint(value) -> str:
    """A SHA-256 digest of a tensor's bytes, shape and dtype (or of a nested list/tuple/dict of them, or of the
    ``repr`` of anything else)."""
    digest = hashlib.sha256()

    def feed(v) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            digest.update(f"tensor{tuple(t.shape)}{t.dtype}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, (list, tuple)):
            digest.update(f"{type(v).__name__}{len(v)}".encode())
            for item in v:
                feed(item)
        elif isinstance(v, dict):
            for key in sorted(v, key=str):
                digest.update(str(key).encode())
                feed(v[key])
        else:
            digest.update(repr(v).encode())

    feed(value)
    return digest.hexdigest()


def verify(items: dict[str, Any]) -> None:
    """In a distributed check, raise :class:`DistributedError` on every rank unless every rank has the same
    fingerprint for each of ``items`` (name -> value). Nothing outside one."""
    session = active()
    if session is not None:
        session.verify(items)


_FORWARDED = "an error raised outside the split"  # the tag of what Session.running sends for a rank that raised


class _Failure:
    """What a rank sends in place of a payload when it raised: the exception (a pickled copy when it can be made),
    its type's name and its text."""

    def __init__(self, exc: BaseException):
        self.kind, self.text = type(exc).__name__, str(exc)
        try:
            self.exc = pickle.loads(pickle.dumps(exc))
        except Exception:
            self.exc = None

    def describe(self, rank: int, world: int) -> str:
        return f"gradfd: rank {rank} of {world} of a distributed check raised {self.kind}: {self.text}"

    def raise_block(self, rank: int, world: int, local: BaseException | None, start: int):
        """Raise, on every rank alike, what a block's computation raised on ``rank``: its type kept (a copy here, the
        original there, each with a note naming the rank, ``_gradfd_block_start`` the block's first column), so that
        every rank takes the same fallback; a DistributedError everywhere when no copy can be made."""
        if self.exc is None:
            raise _marked(DistributedError(self.describe(rank, world))) from local
        exc = local if local is not None else self.exc
        exc._gradfd_block_start = start
        note(exc, f"gradfd: raised on rank {rank} of {world} of a distributed check")
        raise _marked(exc)


class Session:
    """A distributed check's group, and the collectives it runs (every one through :meth:`exchange`: each rank's
    payload under a tag saying where the rank is; ranks whose tags differ are out of step and raise).

    Attributes:
        rank, world: this process's rank in the group, and the group's size.
        timeout: seconds a collective waits (gloo; an NCCL default group's collectives run on a gloo side group).
        exchanges, bytes_sent, rounds, computed: collectives run, the bytes this rank contributed to them, the rounds
            of the split and the blocks this rank computed, in the current check (the cost model's measurements);
            seconds: this rank's time computing its
            blocks (``"share"``) and in collectives (``"collectives"``: waiting for the others included). None of it
            is in the report, which is the same on every rank.
    """

    def __init__(self, group, timeout: float = DEFAULT_TIMEOUT):
        import torch.distributed as dist

        self.dist, self.group, self.timeout = dist, group, timeout
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.backend = str(dist.get_backend(group)).lower()
        self.comm, self.device = group, torch.device("cpu")
        if "gloo" not in self.backend:  # payloads are pickled on the host: gloo carries them, with its timeout
            if group is None or group is dist.group.WORLD:
                self.comm = _gloo_side_group(dist, timeout)
            else:  # (a side group needs every rank of the world: a subgroup's collectives wait its own timeout)
                self.device = torch.device("cuda", torch.cuda.current_device())
        self.local = False  # computing a block of its share: no collective may start (see sharing())
        self._budgets: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        """Zero the counters (at the start of each check)."""
        self.exchanges = self.bytes_sent = self.rounds = self.computed = 0
        self.totals = (0, 0)  # collectives per rank, and bytes sent by all ranks: from the closing exchange
        self.seconds = {"share": 0.0, "collectives": 0.0}

    # -- the one collective ---------------------------------------------------------------------------------------
    def exchange(self, tag: str, obj) -> list:
        """Every rank's ``(tag, obj)``, in rank order; ``obj`` picklable (tensors moved to the CPU first).

        Raises:
            DistributedError, on every rank: a rank sent an error raised outside the split (:meth:`running`; that
            rank re-raises its own), the ranks' tags differ (they are out of step), or a rank did not answer within
            ``timeout`` or its connection dropped.
        """
        if self.local:  # (no engine fallback takes a DistributedError for a function that cannot run some way)
            raise _marked(DistributedError("gradfd: a collective was started while a rank computed its share alone"))
        buffer = io.BytesIO()
        torch.save((tag, obj), buffer)
        data = buffer.getbuffer()
        self.exchanges += 1
        self.bytes_sent += len(data)
        t0 = time.perf_counter()
        try:
            sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
            self._wait(self.dist.all_gather(sizes, torch.tensor([len(data)], device=self.device), group=self.comm,
                                            async_op=True))
            top = int(max(int(s) for s in sizes))
            mine = torch.zeros(top, dtype=torch.uint8)
            mine[:len(data)] = torch.frombuffer(data, dtype=torch.uint8) if len(data) else mine[:0]
            parts = [torch.empty(top, dtype=torch.uint8, device=self.device) for _ in range(self.world)]
            self._wait(self.dist.all_gather(parts, mine.to(self.device), group=self.comm, async_op=True))
            out = [torch.load(io.BytesIO(p[:int(n)].cpu().numpy().tobytes()), weights_only=False)
                   for p, n in zip(parts, sizes)]
        except Exception as exc:
            raise _marked(DistributedError(
                f"gradfd: a collective of the distributed check failed on rank {self.rank} of {self.world} (a rank "
                f"died, was interrupted, or did not answer within {self.timeout:g} s, or sent what this rank cannot "
                f"load; destroy the process group and make it again before the next check): {type(exc).__name__}: "
                f"{exc}")) from exc
        except BaseException as exc:  # KeyboardInterrupt: out at once, forwarded to no one
            raise _marked(exc)
        finally:
            self.seconds["collectives"] += time.perf_counter() - t0
        for r, (t, item) in enumerate(out):
            if t == _FORWARDED and r != self.rank:
                raise _marked(DistributedError(item.describe(r, self.world)))
        tags = [t for t, _ in out]
        if len(set(tags)) > 1:
            raise _marked(DistributedError(
                "gradfd: the ranks of a distributed check are out of step (did one run out of memory, or plan other "
                "chunks?): " + "; ".join(f"rank {r} at {t}" for r, t in enumerate(tags))))
        return [item for _, item in out]

    def _wait(self, work) -> None:
        if self.device.type == "cpu":
            work.wait(datetime.timedelta(seconds=self.timeout))
        else:
            work.wait()

    # -- what is built on it --------------------------------------------------------------------------------------
    def memory_budget(self, device: torch.device) -> int:
        """The smallest of the ranks' default memory budgets for ``device``'s type (one exchange, then cached): every
        rank chunks alike, within what each can hold."""
        key = device.type
        if key not in self._budgets:
            self._budgets[key] = min(self.exchange(f"memory budget {key}", default_memory_budget(device)))
        return self._budgets[key]

    def verify(self, items: dict[str, Any]) -> None:
        """Raise :class:`DistributedError` on every rank unless every rank's fingerprint of each item equals rank
        0's; the message names the items and the ranks that differ."""
        prints = {name: fingerprint(value) for name, value in items.items()}
        everyone = self.exchange("verify " + ", ".join(prints), prints)
        differ = [f"{name} (ranks {', '.join(str(r) for r, p in enumerate(everyone) if p[name] != ref)} differ "
                  "from rank 0)" for name, ref in everyone[0].items() if any(p[name] != ref for p in everyone)]
        if differ:
            hint = ("; a backward that is not deterministic (atomics) differs from run to run: "
                    "torch.use_deterministic_algorithms(True)" if "analytical gradient" in prints else "")
            raise _marked(DistributedError("gradfd: the ranks of a distributed check must check the same problem, "
                                           "but they differ in " + "; ".join(differ) + hint))

    def share(self, blocks: Sequence[tuple[int, int]], compute: Callable[[int, int], Any],
              apply: Callable[[int, int, Any], None]) -> None:
        """Deal ``blocks`` out round-robin: block ``i`` is computed (``compute(a, b)``, a picklable payload) by rank
        ``i % world``; after each round every rank applies every block of the round, in order
        (``apply(a, b, payload)``). A block that raised is raised on every rank after the blocks before it are
        applied (:meth:`_Failure.raise_block`)."""
        tag = f"the split of blocks {fingerprint(list(blocks))[:12]}"
        for first in range(0, len(blocks), self.world):
            mine, local = first + self.rank, None
            payload: Any = None
            if mine < len(blocks):
                self.local, self.computed = True, self.computed + 1
                t0 = time.perf_counter()
                try:
                    payload = compute(*blocks[mine])
                except Exception as exc:
                    payload, local = _Failure(exc), exc
                finally:
                    self.local = False
                    self.seconds["share"] += time.perf_counter() - t0
            self.rounds += 1
            everyone = self.exchange(f"{tag}, round {first // self.world}", payload)
            for r, item in enumerate(everyone[:len(blocks) - first]):
                if isinstance(item, _Failure):
                    item.raise_block(r, self.world, local if r == self.rank else None, blocks[first + r][0])
                apply(*blocks[first + r], item)

    @contextlib.contextmanager
    def running(self, items: dict[str, Any]) -> Iterator["Session"]:
        """Make this the active session for a check: first verify ``items`` (the parameters and options), last
        exchange a closing message. A rank that raises outside a collective sends its error into the next collective
        of the others (once: the closing one at the latest), where they raise a DistributedError naming it; a
        KeyboardInterrupt is sent to no one (the others see the rank go)."""
        token = _active.set(self)
        self.reset()
        try:
            self.verify(items)
            for device in sorted({t.device.type for t in items.get("params", ()) if isinstance(t, torch.Tensor)}):
                self.memory_budget(torch.device(device))  # (now: no collective may start inside a share)
            yield self
            closing = self.exchange("the end of the check", (self.exchanges + 1, self.bytes_sent))
            self.totals = (sum(c[0] for c in closing), sum(c[1] for c in closing))
        except BaseException as exc:
            if isinstance(exc, Exception) and not getattr(exc, "_gradfd_exchanged", False):
                _marked(exc)
                with contextlib.suppress(BaseException):
                    self.exchange(_FORWARDED, _Failure(exc))
            raise
        finally:
            _active.reset(token)

    def notes(self) -> str:
        """The report's line on the split (the same on every rank)."""
        budgets = ", ".join(f"{k}: {v} bytes" for k, v in sorted(self._budgets.items()))
        return (f"distributed over {self.world} ranks ({self.backend}): choices made without timing, default memory "
                f"budget the ranks' least ({budgets or 'not used'}); {self.totals[0] // max(self.world, 1)} "
                f"collectives ({self.rounds} rounds of the split), {self.totals[1]} bytes sent in all")


_SIDE_GROUP: list = []  # (the default group it was made for, the gloo group)


def _gloo_side_group(dist, timeout: float):
    """A gloo group over the whole world, made once per default group (every rank makes it in the same call: its
    first check) and again after the default group was made anew."""
    if not _SIDE_GROUP or _SIDE_GROUP[0] is not dist.group.WORLD:
        _SIDE_GROUP[:] = [dist.group.WORLD, dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))]
    return _SIDE_GROUP[1]


def share_columns(result, errors, blocks: Sequence[tuple[int, int]], fill: Callable[[int, int], None],
                  deliveries: Sequence[tuple[int, int]] | None = None) -> None:
    """Fill an engine ``Evaluation``'s columns block by block over the active session's ranks.

    ``fill(a, b)`` writes columns ``a:b`` the way an engine driver does (``result.displacement`` and
    ``result.store``); on the rank that owns the block those writes are captured, with the perturbed nodes where
    ``func`` raised (``errors``, a :class:`gradfd.errors.NodeErrors`, or None). Every rank then replays every block in
    column order: the stores reach ``result``'s sink and progress as one process's would, and the node errors are
    counted (the first one kept) in that order too.

    ``deliveries``: the column ranges one process stores at once (the one loop's block of a loss), each the union of
    consecutive ``blocks``; the blocks' values are stored joined into them, so that a sink, whose noise calibration
    pools per delivery, sees one process's deliveries. Only where a column's values do not depend on the other columns
    of its call (the loop: one call of ``func`` per node). None: each block's stores as they came.
    """
    pending: list = []
    ends = iter(deliveries or ())
    delivery = next(ends, None)

    def compute(a: int, b: int):
        stores = []

        def capture(start: int, stop: int, values: torch.Tensor) -> None:
            stores.append((start, stop, values.cpu(), result.displacement[:, start:stop].cpu()))

        result.store = capture  # (an instance attribute: the class's store is untouched)
        try:
            _, raised = _recording(errors, lambda: fill(a, b))
        finally:
            del result.store
        return stores, raised

    def apply(a: int, b: int, payload) -> None:
        nonlocal delivery
        stores, raised = payload
        device = result.displacement.device
        for start, stop, values, disp in stores:
            result.displacement[:, start:stop] = disp.to(device)
            if delivery is None:
                result.store(start, stop, values.to(device))
                continue
            pending.append(values)
            if stop == delivery[1]:
                result.store(delivery[0], delivery[1], torch.cat(pending, dim=1).to(device))
                pending.clear()
                delivery = next(ends, None)
        _replay(errors, raised)

    active().share(blocks, compute, apply)


def share_rows(out: torch.Tensor, errors, blocks: Sequence[tuple[int, int]],
               fill: Callable[[int, int], torch.Tensor]) -> None:
    """Fill rows ``a:b`` of ``out`` with ``fill(a, b)`` for each block, over the active session's ranks (as
    :func:`share_columns`: each block computed once, every rank receiving all, node errors replayed in order)."""
    def compute(a: int, b: int):
        values, raised = _recording(errors, lambda: fill(a, b))
        return values.cpu(), raised

    def apply(a: int, b: int, payload) -> None:
        values, raised = payload
        out[a:b] = values.to(out.device)
        _replay(errors, raised)

    active().share(blocks, compute, apply)


def _recording(errors, run: Callable[[], Any]):
    """``run()``, and what it added to ``errors`` (a NodeErrors or None) as a picklable record; ``errors`` itself
    is left as before (also when ``run`` raises), for :func:`_replay` to add it back on every rank in block order."""
    before = None if errors is None else (errors.count, errors.first, errors.where)
    try:
        value = run()
        if errors is None or errors.count == before[0]:
            return value, None
        return value, (errors.count - before[0], _Failure(errors.first) if before[1] is None else None, errors.where)
    finally:
        if errors is not None:
            errors.count, errors.first, errors.where = before


def _replay(errors, raised) -> None:
    if raised is None:
        return
    count, first, where = raised
    errors.count += count
    if errors.first is None and first is not None:  # (a stand-in of the same type name and text where no copy)
        errors.first = first.exc if isinstance(first.exc, Exception) else type(first.kind, (Exception,), {})(first.text)
        errors.where = where


def blocks_of(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """``start:stop`` cut into consecutive blocks of ``size`` (the last one shorter)."""
    return [(a, min(a + size, stop)) for a in range(start, stop, max(1, size))]
