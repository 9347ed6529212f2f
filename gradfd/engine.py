"""The batched finite-difference engine behind :func:`gradfd.numerical_gradient`.

For a chunk of coordinates ``i`` the engine

1. builds every perturbed copy ``x + o*h_i*e_i`` of the flattened parameter in one kernel launch
   (``gradfd::perturb``), recording the step actually taken after rounding to the dtype;
2. evaluates ``func`` on the whole chunk in one batched call -- ``torch.func.vmap`` (with the shared-operand
   matmul rewrite below), or ``func``'s own leading batch dimension (``batching="stack"``);
3. turns the losses into central differences in float64 (``gradfd::central_differences``) and Richardson-
   extrapolates them (:mod:`gradfd.stencils`).

Chunks are sized from a memory budget; nothing of size ``numel**2`` is allocated at once. Functions that
cannot be batched fall back, with one warning naming the reason, to a loop that perturbs a private copy in
place and restores it. ``func`` never sees the caller's tensors: it gets private copies, so the caller's
tensors (and their version counters) are bitwise unchanged after every call, even when ``func`` raises.
Functions that draw random numbers see the same draws at every perturbed point, and the caller's RNG state is
restored on exit.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten

from . import ops, reductions, stencils
from .budget import GENERIC_CPU_MIN_CHUNK, GENERIC_CPU_WORKING_SET, default_memory_budget, parse_memory_budget
from .dispatch import LightDispatchMode
from .errors import (CANNOT_RUN_THAT_WAY, OOM_ERRORS, FallbackWarning, GradfdWarning, NodeErrors, NonFiniteLossError,
                     first_line, note, noting, warn_fallback, warnings_once)
from .report import entry_name, unravel
from .stencils import Stencil
from .validation import (check_checkable, check_choice, check_params, check_positive_int, check_step, describe,
                         validate_scalar_output)

__all__ = [
    "ENGINES",
    "BATCHINGS",
    "GradfdWarning",
    "FallbackWarning",
    "NonFiniteLossError",
    "Evaluation",
    "numerical_gradient",
    "evaluate",
    "evaluate_points",
    "prepare",
    "default_memory_budget",
    "parse_memory_budget",
]

ENGINES = ("auto", "batched", "loop", "structured")
BATCHINGS = ("auto", "vmap", "stack", "loop")
_TINY = 32  # evaluations below which "auto" uses the loop without probing
_STRUCTURED_MIN_EVALUATIONS = 256  # evaluations at or below which "auto" does not consider the structured engine
_PROBE_LOOP = 2  # coordinates the "auto" probe times with the loop
_PROBE_BATCH = 64  # coordinates the "auto" probe times batched ...
_PROBE_WARMUP = 4  # ... after an untimed batched call on this many


# --------------------------------------------------------------------------------------------------------------
# argument checks


# --------------------------------------------------------------------------------------------------------------
# the function under test, on private copies


class RngGuard:
    """Saves the CPU (and initialised CUDA) RNG states; ``reset()`` puts them back before an evaluation when
    ``func`` was seen to draw random numbers, and ``close()`` restores the caller's state."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.consumed = False

    def observe(self) -> None:
        """Record whether the evaluation since construction consumed random numbers."""
        if not torch.equal(torch.get_rng_state(), self.cpu):
            self.consumed = True
        elif self.cuda is not None and any(
            not torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), self.cuda)
        ):
            self.consumed = True

    def reset(self) -> None:
        if self.consumed:
            self.close()

    def close(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class OutputSpec:
    """The outputs of a tensor-valued ``func`` that are compared: its floating tensors, flattened and concatenated
    (``size`` entries in all). Integer and boolean outputs have no gradient; they are skipped and listed.

    Args:
        out: ``func``'s output at the unperturbed point: a tensor or a tuple/list of tensors.
        skip: numbers of further outputs to leave out (autograd marks them non-differentiable).

    Raises:
        TypeError: naming ``func`` when an output is not a tensor, is sparse or nested, or is complex.
    """

    def __init__(self, out, skip: Sequence[int] = ()):
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        self.count = len(outs)
        self.kept: list[int] = []
        self.shapes: list[tuple] = []
        self.dtypes: list[torch.dtype] = []
        self.skipped: list[tuple[int, str]] = []  # (output number, why)
        for k, o in enumerate(outs):
            if not isinstance(o, torch.Tensor):
                raise TypeError(f"func must return a tensor or a tuple of tensors; output[{k}] is {describe(o)}")
            if o.layout != torch.strided or o.is_nested:
                raise TypeError(f"func's output[{k}] is a {o.layout}{' nested' if o.is_nested else ''} tensor; gradfd "
                                "compares dense (strided) outputs only: return output.to_dense()")
            if o.is_complex():
                raise TypeError(f"func's output[{k}] is complex ({o.dtype}); gradfd compares real outputs only: return "
                                "torch.view_as_real(...) instead")
            if o.is_floating_point() and k not in skip:
                self.kept.append(k)
                self.shapes.append(tuple(o.shape))
                self.dtypes.append(o.dtype)
            else:
                dtype = str(o.dtype).replace("torch.", "")
                self.skipped.append((k, f"{dtype}, non-differentiable" if o.is_floating_point() else dtype))
        self.numels = [math.prod(sh) for sh in self.shapes]
        self.offsets = [sum(self.numels[:j]) for j in range(len(self.numels))]
        self.size = sum(self.numels)

    def _outs(self, out) -> list:
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if len(outs) != self.count:
            raise ValueError(f"func returned {len(outs)} outputs at a perturbed point but {self.count} at the "
                             "unperturbed point")
        return outs

    def flatten(self, out) -> torch.Tensor:
        """``(size,)`` float64: the kept outputs of one evaluation, flattened and concatenated."""
        parts = []
        for j, k in enumerate(self.kept):
            o = self._outs(out)[k]
            if tuple(o.shape) != self.shapes[j]:
                raise ValueError(f"func's output[{k}] changed shape under perturbation: {self.shapes[j]} at the "
                                 f"unperturbed point, {tuple(o.shape)} at a perturbed one; gradfd needs fixed shapes")
            parts.append(o.detach().reshape(-1).to(torch.float64))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def flatten_batched(self, out, batch: int) -> torch.Tensor:
        """``(batch, size)`` float64 from a batched evaluation (each output with a leading batch dimension)."""
        parts = []
        outs = self._outs(out)
        for j, k in enumerate(self.kept):
            o = outs[k]
            if not isinstance(o, torch.Tensor) or tuple(o.shape) != (batch, *self.shapes[j]):
                raise ValueError(f"batched output[{k}] has shape {tuple(getattr(o, 'shape', ()))}, expected "
                                 f"{(batch, *self.shapes[j])}")
            parts.append(o.detach().reshape(batch, -1).to(torch.float64))
        return torch.cat(parts, dim=1) if parts else torch.zeros(batch, 0, dtype=torch.float64)

    def locate(self, flat: int) -> tuple[int, tuple[int, ...]]:
        """``(output number, index tuple)`` of entry ``flat`` of the concatenation."""
        for j in range(len(self.kept) - 1, -1, -1):
            if flat >= self.offsets[j]:
                return self.kept[j], unravel(flat - self.offsets[j], self.shapes[j])
        raise IndexError(flat)


class Problem:
    """``func`` and private copies of its arguments, with the checked parameter replaceable.

    Args:
        func: the loss (or, with ``vector=True``, a tensor-valued function).
        params: the caller's tensors (never handed to ``func``).
        param_idx: the parameter being differentiated.
        vector: ``func`` returns a tensor or a tuple of tensors, compared entry by entry (see :class:`OutputSpec`).
        skip_outputs: outputs left out of the comparison (see :class:`OutputSpec`).
        node_errors: a :class:`NodeErrors` that records (as NaN values) what ``func`` raises at perturbed nodes;
            None (default): such an exception propagates.
    """

    def __init__(self, func: Callable, params: Sequence[torch.Tensor], param_idx: int, vector: bool = False,
                 skip_outputs: Sequence[int] = (), node_errors: NodeErrors | None = None):
        if not callable(func):
            raise TypeError(f"func must be callable, got {describe(func)}")
        self.plain_func = func
        self.reduce64 = False  # evaluate under reductions.Float64Reductions (decided by evaluate_base)
        self.reductions = 0  # how many reductions one evaluation takes in float64
        self.plain_base: torch.Tensor | None = None  # func's own loss at the unperturbed point
        self.param_idx = param_idx
        target = params[param_idx]
        self.shape = tuple(target.shape)
        self.dtype = target.dtype
        self.device = target.device
        self.numel = target.numel()
        self.flat = target.detach().reshape(-1).clone()  # contiguous private copy, perturbed in place
        self.args = [self.flat.view(self.shape) if k == param_idx else p.detach().clone() for k, p in enumerate(params)]
        self.rng = RngGuard()
        self.base_loss: torch.Tensor | None = None
        self.vector = vector
        self.skip_outputs = tuple(skip_outputs)
        self.spec: OutputSpec | None = None
        self.node_errors = node_errors  # record (NaN values) rather than raise what func raises at perturbed nodes

    @property
    def func(self) -> Callable:
        """``func`` as evaluated: under float64 reductions when :meth:`evaluate_base` chose them."""
        return self._wide if self.reduce64 else self.plain_func

    def with_param(self, value: torch.Tensor) -> list:
        args = list(self.args)
        args[self.param_idx] = value
        return args

    def evaluate_base(self) -> torch.Tensor:
        """Call ``func`` once at the unperturbed point; validate its output and that it leaves its inputs alone.

        Returns:
            The loss as a 0-d tensor of ``func``'s dtype.

        Raises:
            TypeError / ValueError naming ``func`` when the output is not a single floating-point value, or when
            ``func`` modifies its inputs in place; NonFiniteLossError when the loss is NaN or inf.
        """
        versions = [a._version for a in self.args]
        with torch.no_grad(), noting(f"gradfd: raised while evaluating func at the unperturbed params "
                                     f"(the base point for params[{self.param_idx}])"):
            out = self.func(*self.args)
        self.rng.observe()
        self.rng.reset()
        changed = [k for k, (a, v) in enumerate(zip(self.args, versions)) if a._version != v]
        if changed:
            raise ValueError(
                f"func modified its input params[{changed[0]}] in place; gradfd evaluates func many times and "
                "needs it to leave its inputs unchanged (clone inside func before modifying)"
            )
        if self.vector:
            self.spec = OutputSpec(out, self.skip_outputs)
            self.base_loss = self.spec.flatten(out)
            bad = (~torch.isfinite(self.base_loss)).nonzero().flatten()
            if bad.numel():
                k, idx = self.spec.locate(int(bad[0]))
                raise NonFiniteLossError(f"func's output[{k}]{list(idx)} is {float(self.base_loss[bad[0]])} at the "
                                         "unperturbed point; finite differences need finite outputs there")
            return self.base_loss
        self.base_loss = validate_scalar_output(out).clone()  # not a view of the buffer perturbed in place
        value = float(self.base_loss)
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"func returned {value} at the unperturbed point; finite differences need a finite loss there"
            )
        self.plain_base = self.base_loss
        if self.base_loss.dtype in reductions.LOW_PRECISION:
            self._try_float64_reductions()
        return self.base_loss

    def _try_float64_reductions(self) -> None:
        """Evaluate ``func`` once more with its full reductions in float64 (:mod:`gradfd.reductions`); keep that
        for every evaluation when it took any and reproduces ``func``'s own loss."""
        mode = reductions.Float64Reductions()
        try:
            with torch.no_grad(), mode:
                wide = self.plain_func(*self.args)
        except CANNOT_RUN_THAT_WAY:  # func cannot run that way: it is evaluated as written
            return
        finally:
            self.rng.reset()
        if mode.count and reductions.consistent(self.plain_base, wide):
            self._wide = reductions.wrap(self.plain_func)
            self.reduce64, self.reductions = True, mode.count
            self.base_loss = wide.detach().reshape(()).clone()

    def output_values(self, out) -> torch.Tensor:
        """One evaluation's compared values: a 0-d tensor (scalar ``func``) or the ``(size,)`` float64 vector."""
        return self.spec.flatten(out) if self.vector else validate_scalar_output(out)

    def batched_values(self, out, batch: int, what: str) -> torch.Tensor:
        """A batched evaluation's values: ``(batch,)`` (scalar ``func``) or ``(batch, size)`` float64."""
        if self.vector:
            return self.spec.flatten_batched(out, batch)
        if not isinstance(out, torch.Tensor) or out.numel() != batch:
            raise ValueError(f"{what} returned {describe(out)} for a batch; expected one loss per row")
        return out.reshape(batch)

    def nan_values(self, on_cpu: bool):
        """What the loop records for a node where ``func`` raised: a NaN loss (a float on the CPU, else a 0-d tensor
        of the loss's dtype) or ``(size,)`` float64 NaN outputs."""
        if self.vector:
            return torch.full((self.spec.size,), math.nan, dtype=torch.float64, device=self.device)
        return math.nan if on_cpu else torch.full((), math.nan, dtype=self.base_loss.dtype, device=self.device)

    def activation_bytes(self) -> int:
        """Bytes of the tensors one unbatched evaluation creates (an upper bound on its working memory)."""
        meter = _AllocationMeter()
        with torch.no_grad(), meter, noting("gradfd: raised while measuring func's memory at the unperturbed params"):
            self.func(*self.args)
        self.rng.reset()
        return meter.total


class _AllocationMeter(LightDispatchMode):
    """Sums the bytes of every new storage created while active."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self._seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key not in self._seen:
                    self._seen.add(key)
                    self.total += t.untyped_storage().nbytes()
        return out


class SharedOperandMatmul(LightDispatchMode):
    """Rewrites a batched matrix product whose one operand is the same for every batch member into one ``mm``.

    ``vmap(lambda w: X @ w)`` over rows of a ``(d, 1)`` parameter lowers to ``bmm(X.expand(B, n, d), W)``, which
    runs B matrix-vector products (measured: 112 ms for B=2000, n=100, d=1000, against 4 ms for the equivalent
    ``mm``). An operand expanded along the batch has stride 0 there; this mode turns such a ``bmm`` into one
    ``mm`` over the folded batch. Results are identical up to the order of floating-point summation.
    """

    def __init__(self) -> None:
        super().__init__()
        self.copied = 0  # elements the folds had to copy: a hint that another rows layout would be cheaper

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.bmm.default and not kwargs:
            a, b = args
            if a.dim() == 3 and b.dim() == 3 and a.shape[0] > 1 and (a.stride(0) == 0 or b.stride(0) == 0):
                out = _shared_bmm(a, b, self)
                if out is not None:
                    return out
        return func(*args, **(kwargs or {}))


def _shared_bmm(a: torch.Tensor, b: torch.Tensor, mode: SharedOperandMatmul) -> torch.Tensor | None:
    """``bmm(a, b)`` as one ``mm`` when one operand is expanded along the batch; None when the native ``bmm`` is
    faster (measured on a 2-core CPU: folding pays for a shared left operand only when ``k`` is small, since it
    copies the right operand; a shared right operand folds for free)."""
    batch, n, d = a.shape
    k = b.shape[2]
    if a.stride(0) == 0 and b.stride(0) == 0:
        return torch.mm(a[0], b[0]).expand(batch, n, k).contiguous()
    if b.stride(0) == 0:  # (B, n, d) @ (d, k): fold the batch into rows
        return torch.mm(a.reshape(batch * n, d), b[0]).view(batch, n, k)
    # a shared: out[i] = a0 @ b[i] for all i is a0 @ [b[0] | b[1] | ...]
    spread = b.permute(1, 0, 2)
    try:
        wide = spread.view(d, batch * k)
    except RuntimeError:  # the rows' layout does not allow it without a copy
        mode.copied += b.numel()
        if k > _FOLD_MAX_COLUMNS:
            return None
        wide = spread.reshape(d, batch * k)
    return torch.mm(a[0], wide).view(n, batch, k).permute(1, 0, 2).contiguous()


_FOLD_MAX_COLUMNS = 32


# --------------------------------------------------------------------------------------------------------------
# evaluation


@dataclass
class Evaluation:
    """The raw result of evaluating ``func`` at the stencil's nodes around a set of coordinates.

    Attributes:
        param_idx, shape, dtype: the differentiated parameter.
        coords: ``(M,)`` int64 flat indices that were perturbed (on the parameter's device).
        steps: ``(M,)`` float64 nominal steps ``h_i``.
        stencil: the stencil; its ``offsets`` order the rows below.
        losses: ``(S, M)`` float64 losses at the nodes ``x + offsets[s]*h_i*e_i``, less ``loss_offset`` (None when a
            ``sink`` receives the values instead, as for tensor-valued functions).
        displacement: ``(S, M)`` float64 steps actually taken after rounding to ``dtype``.
        base_loss: ``func`` at the unperturbed point (float64 0-d tensor), less ``loss_offset``.
        engine: ``"batched"``, ``"loop"`` or ``"structured"`` (what actually ran; a mix reports ``"batched"`` with a
            note).
        batching: ``"vmap"``, ``"stack"`` or None.
        chunk_size: coordinates per batched call (after any out-of-memory halving), or None.
        notes: human-readable decisions (probe timings, fallbacks).
        sink: optional ``callable(start, stop, values, displacement)`` receiving each chunk's values.
        loss_offset: ``losses`` and ``base_loss`` are relative to this value: the loss is their sum. 0 except for the
            structured engine, which reports changes from the base loss to keep the full loss's rounding out of them.
    """

    param_idx: int
    shape: tuple
    dtype: torch.dtype
    coords: torch.Tensor
    steps: torch.Tensor
    stencil: Stencil
    losses: torch.Tensor
    displacement: torch.Tensor
    base_loss: torch.Tensor
    engine: str
    batching: str | None
    chunk_size: int | None
    notes: list[str] = field(default_factory=list)
    sink: Callable | None = field(default=None, repr=False)
    progress: Callable[[int], None] | None = field(default=None, repr=False)

    def store(self, start: int, stop: int, values: torch.Tensor) -> None:
        """Record the values of columns ``start:stop``: ``(S, c)`` losses, or ``(S, c, size)`` for a tensor-valued
        ``func``, which go to ``sink(start, stop, values, displacement)`` instead of being kept."""
        if self.sink is not None:
            self.sink(start, stop, values, self.displacement[:, start:stop])
        else:
            self.losses[:, start:stop] = values
        if self.progress is not None:
            self.progress(stop - start)
    loss_offset: float = 0.0

    def levels(self) -> torch.Tensor:
        """``(K, M)`` float64 central differences, one row per step level."""
        if ops.kernels_available():
            return ops.central_differences(self.losses, self.displacement)
        return ops.central_differences_reference(self.losses, self.displacement)

    def half_spacing(self) -> torch.Tensor:
        """``(K, M)`` float64 realised half-spacings ``(d+ - d-)/2`` of the levels."""
        return (self.displacement[0::2] - self.displacement[1::2]) / 2

    def finite(self) -> torch.Tensor:
        """``(M,)`` bool: every node loss of the coordinate is finite."""
        return torch.isfinite(self.losses).all(dim=0)

    def estimate(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Extrapolated derivative ``(M,)`` and truncation spread (or None), see :func:`stencils.extrapolate`."""
        return stencils.extrapolate(self.levels(), self.half_spacing())


def prepare(func: Callable, params: Sequence[torch.Tensor], param_idx: int, vector: bool = False,
            skip_outputs: Sequence[int] = (), node_errors: NodeErrors | None = None) -> Problem:
    """A :class:`Problem` with its unperturbed loss (or outputs) evaluated and validated (arguments already
    checked); ``skip_outputs`` as in :class:`OutputSpec`, ``node_errors`` as in :class:`Problem`."""
    problem = Problem(func, params, param_idx, vector, skip_outputs, node_errors)
    try:
        problem.evaluate_base()
    except BaseException:
        problem.rng.close()
        raise
    return problem


def evaluate(
    func: Callable,
    params: Sequence[torch.Tensor],
    param_idx: int,
    *,
    steps: float | torch.Tensor | None = None,
    stencil: str | Stencil = "central",
    coords: torch.Tensor | None = None,
    engine: str = "auto",
    batching: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    problem: Problem | None = None,
    sink: Callable | None = None,
    progress: Callable[[int], None] | None = None,
) -> Evaluation:
    """Evaluate ``func`` at every node of ``stencil`` around each coordinate in ``coords``.

    This is the engine's lower-level entry point (used by :func:`numerical_gradient` and :func:`gradfd.check`).
    Arguments are as in :func:`numerical_gradient`; in addition ``steps`` may be a ``(numel,)`` float64 tensor
    of per-element steps (None: :func:`stencils.automatic_steps`), ``coords`` a ``(M,)`` int64 tensor of flat
    indices to evaluate (default: all), ``problem`` a prepared :class:`Problem` (its base loss evaluated; with
    ``vector=True`` for tensor-valued functions), and ``sink`` a ``callable(start, stop, values, displacement)``
    that receives each chunk's values (required for tensor-valued functions, whose values are not kept), and
    ``progress`` a ``callable(coordinates done)`` called after each chunk.

    Returns:
        An :class:`Evaluation`.
    """
    stencil = stencil if isinstance(stencil, Stencil) else stencils.get_stencil(stencil)
    check_choice(engine, "engine", ENGINES)
    check_choice(batching, "batching", BATCHINGS)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    budget = parse_memory_budget(memory_budget)
    if problem is None:
        params, param_idx = check_params(params, param_idx)
        problem = prepare(func, params, param_idx)
    try:
        return _evaluate(problem, steps, stencil, coords, engine, batching, chunk_size, budget, sink, progress)
    finally:
        problem.rng.close()


def _resolve_steps(problem: Problem, steps, stencil: Stencil, coords: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(M,)`` float64 nominal steps for the coordinates whose values are ``x``."""
    if steps is None:
        return stencils.automatic_steps(x, stencil)
    if isinstance(steps, torch.Tensor):
        h = steps.to(device=problem.device, dtype=torch.float64).reshape(-1)
        if h.numel() == problem.numel and h.numel() != coords.numel():
            h = h[coords]
        elif h.numel() != coords.numel():
            raise ValueError(f"h must be a float or have one entry per element ({problem.numel}), got {h.numel()}")
        if not bool((torch.isfinite(h) & (h > 0)).all()):
            raise ValueError("h must be positive and finite everywhere")
        return h
    return torch.full((coords.numel(),), check_step(steps), dtype=torch.float64, device=problem.device)


def node_values(x: torch.Tensor, h: torch.Tensor, offsets: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The stencil's nodes ``round(x + o*h)`` in ``x``'s dtype, ``(S, M)``, and their exact float64 displacement.

    The same arithmetic as ``gradfd::perturb_rows_`` (which computes them per row on the device).
    """
    x64 = x.to(torch.float64)
    off = torch.tensor(offsets, dtype=torch.float64, device=x.device)
    moved = torch.addcmul(x64.unsqueeze(0), off.unsqueeze(1), h.unsqueeze(0)).to(x.dtype)
    return moved, moved.to(torch.float64) - x64


def _evaluate(problem: Problem, steps, stencil: Stencil, coords, engine, batching, chunk_size, budget,
              sink=None, progress=None) -> Evaluation:
    device = problem.device
    if coords is None:
        coords = torch.arange(problem.numel, device=device)
        x = problem.flat.clone()
    else:
        coords = coords.to(device=device, dtype=torch.int64).reshape(-1)
        x = problem.flat[coords]
    h = _resolve_steps(problem, steps, stencil, coords, x)
    offsets = stencil.offsets
    moved, disp = node_values(x, h, offsets)
    if bool((disp == 0).any()):
        j = int((disp == 0).any(dim=0).nonzero()[0])
        raise ValueError(
            f"h={float(h[j]):.3g} is below the resolution of {problem.dtype} at "
            f"{entry_name(problem.param_idx, problem.shape, int(coords[j]))} = {float(x[j]):.6g} (x + h rounds to "
            "x); use a larger h, or h=None for gradfd's automatic per-element step"
        )
    s, m = len(offsets), coords.numel()
    if problem.vector and sink is None:
        raise ValueError("a tensor-valued func needs a sink for its values")
    losses = None if sink is not None else torch.empty((s, m), dtype=torch.float64, device=device)
    result = Evaluation(problem.param_idx, problem.shape, problem.dtype, coords, h, stencil, losses, disp,
                        problem.base_loss.to(torch.float64), "loop", None, None, sink=sink, progress=progress)
    if problem.reduce64:
        result.notes.append(f"loss reductions in float64 ({problem.reductions} per evaluation)")
    if batching == "loop" and engine != "structured":
        engine = "loop"
    if engine in ("batched", "structured"):
        ops.require_kernels()
    elif engine == "auto" and not ops.kernels_available():
        warn_fallback(f"gradfd: native kernels unavailable ({ops.unavailable_reason()}); using the per-coordinate loop",
              stacklevel=4)
        engine = "loop"
    if m == 0:
        return result
    if engine == "structured" and problem.vector:
        raise ValueError("engine='structured' checks scalar losses; use engine='auto' or 'batched' for a tensor-valued "
                         "func")
    if (engine == "structured" or engine == "auto") and not problem.vector:  # gradfd/structured.py when it applies
        from . import structured

        # (under "auto", a few hundred evaluations never pay for tracing: skip even measuring the work)
        if engine == "structured" or (m * s > _STRUCTURED_MIN_EVALUATIONS
                                      and structured.worthwhile(problem, m * s, result.notes)):
            try:
                structured.evaluate_into(problem, result, moved, chunk_size, budget)
                return result
            except structured.StructuredUnsupported as exc:
                if engine == "structured":
                    raise
                result.notes.append(f"structured engine not applicable ({exc.op}: {exc.reason}); generic engine used")

    done = 0
    if engine == "auto" and m * s <= _TINY:
        result.notes.append(f"{m * s} evaluations: loop (below the batching threshold of {_TINY})")
        engine = "loop"
    loop_rate = None
    if engine == "auto":
        probe = min(_PROBE_LOOP, m)
        t0 = time.perf_counter()
        _run_loop(problem, result, 0, probe, moved, x)
        _sync(device)
        loop_rate = (time.perf_counter() - t0) / probe
        done = probe
    if engine in ("auto", "batched") and done < m:
        done = _run_batched(problem, result, done, offsets, batching, chunk_size, budget, loop_rate,
                            lambda a, b: _run_loop(problem, result, a, b, moved, x))
    if done < m:
        _run_loop(problem, result, done, m, moved, x)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_NUMPY_DTYPES = (torch.float64, torch.float32, torch.float16)


def _run_loop(problem: Problem, result: Evaluation, start: int, stop: int, moved: torch.Tensor,
              x: torch.Tensor) -> None:
    """Fill columns ``start:stop`` of ``result`` by perturbing the private copy in place, one node at a time.

    ``moved`` is the ``(S, M)`` tensor of node values from :func:`node_values`, ``x`` the ``(M,)`` unperturbed values.
    """
    flat, func = problem.flat, problem.func
    offsets = result.stencil.offsets
    args = problem.with_param(flat.view(problem.shape))
    coords = result.coords[start:stop]
    moved_values = moved[:, start:stop].t().tolist()  # (M, S) python floats, exact in the dtype
    original = x[start:stop].tolist()
    index = coords.tolist()
    # On the CPU, write through a numpy view of the private copy: ~20x cheaper per element than tensor setitem.
    on_cpu = flat.device.type == "cpu" and flat.dtype in _NUMPY_DTYPES
    target = flat.numpy() if on_cpu else flat
    reset = problem.rng.reset if problem.rng.consumed else None
    n_off = len(offsets)
    record = problem.spec.flatten if problem.vector else (lambda out: _scalar_now(out, on_cpu))
    errors = problem.node_errors  # when given, a node that raises gets NaN values (see NodeErrors)
    nan = problem.nan_values(on_cpu) if errors is not None else None

    def unperturbed(i: int, value) -> None:  # func at the unperturbed point (the next node re-perturbs entry i)
        target[i] = value
        problem.rng.reset()
        func(*args)
    # tensor-valued funcs: hand the values over in blocks whose (nodes x outputs) stay bounded
    block = len(index) if not problem.vector else max(1, _LOOP_BLOCK_VALUES // max(1, n_off * problem.spec.size))
    j = s = 0
    try:
        for first in range(0, len(index), block):
            outs = []
            with torch.no_grad():
                for j in range(first, min(first + block, len(index))):
                    i = index[j]
                    for s, value in enumerate(moved_values[j]):
                        target[i] = value
                        if reset is not None:
                            reset()
                        # copy the values now: an output may be a view of the buffer perturbed in place
                        if errors is None:
                            outs.append(record(func(*args)))
                            continue
                        try:
                            out = func(*args)
                        except Exception as exc:  # (what func raised; its output is still validated)
                            if not errors.take(exc, f"{entry_name(problem.param_idx, problem.shape, i)} "
                                                    f"{offsets[s]:+g}*h", lambda: unperturbed(i, original[j])):
                                raise
                            outs.append(nan)
                            continue
                        outs.append(record(out))
                    target[i] = original[j]
            count = len(outs) // n_off
            if problem.vector:
                vals = torch.stack(outs).view(count, n_off, -1).permute(1, 0, 2)
            else:
                vals = (torch.tensor(outs, dtype=torch.float64) if on_cpu else torch.stack(outs).to(torch.float64))
                vals = vals.view(count, n_off).t()
            result.store(start + first, start + first + count, vals)
    except BaseException as exc:
        target[index[j]] = original[j]
        note(exc, f"gradfd: raised while evaluating func at "
                   f"{entry_name(problem.param_idx, problem.shape, index[j])} {offsets[s]:+g}*h")
        raise


_LOOP_BLOCK_VALUES = 1 << 22  # values (nodes x outputs) the loop collects before handing them over


def _scalar_now(out, on_cpu: bool):
    """One loss value, copied out of ``out`` now (a Python float on the CPU); TypeError/ValueError naming ``func`` for
    anything but a one-element floating tensor."""
    if isinstance(out, torch.Tensor) and out.numel() == 1 and out.is_floating_point():
        return out.item() if on_cpu else out.detach().reshape(()).clone()
    validate_scalar_output(out)  # raises, saying what it got
    raise AssertionError("unreachable")


class _Batched:
    """Evaluates ``func`` on chunks of perturbed rows with one batched call per chunk.

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
        if inner != self.inner:
            self.inner, self.buffer, self.columns = inner, None, None

    def __call__(self, count: int) -> torch.Tensor:
        """Losses at the first ``count`` rows, as a ``(count,)`` tensor."""
        problem = self.problem
        problem.rng.reset()
        with torch.no_grad():
            if self.strategy == "vmap":
                rows = self.buffer[:count] if self.buffer.dim() == 2 else self.buffer[:, :count]
                in_dim = 0 if self.buffer.dim() == 2 else 1

                def single(row: torch.Tensor) -> torch.Tensor:
                    return problem.func(*problem.with_param(row.view(problem.shape)))

                with self.mode, warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = torch.func.vmap(single, in_dims=in_dim, randomness="same")(rows)
                slow = [w for w in caught if "batching rule" in str(w.message)]
                if slow:  # vmap ran a per-sample loop internally (an op without a batching rule): not batched
                    raise RuntimeError(f"vmap has no batching rule for an op of func ({first_line(slow[0].message)})")
                for w in caught:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
                what = "vmap(func)"
            else:
                stacked = ops.row_view(self.buffer, count).reshape(count, *problem.shape)
                out = problem.func(*problem.with_param(stacked))
                what = f"func given params[{problem.param_idx}] with a leading batch dimension"
            out = problem.batched_values(out, count, what)
            if not self.verified:
                self._verify(count, out)
                self.verified = True
        return out

    def _verify(self, count: int, out: torch.Tensor) -> None:
        """Compare a few stacked rows with single calls; raise ValueError when they differ."""
        verify_stacked(self.problem, ops.row_view(self.buffer, count), out)


def verify_stacked(problem: Problem, rows: torch.Tensor, out: torch.Tensor) -> None:
    """Compare the first, middle and last of a stacked call's ``out`` with single calls of ``func`` at ``rows``
    (``(P, N)``); ValueError when one differs by more than ``sqrt(eps)`` relative."""
    tol = math.sqrt(stencils.eps(problem.dtype))
    for r in sorted({0, rows.shape[0] // 2, rows.shape[0] - 1}):
        problem.rng.reset()
        single = problem.output_values(problem.func(*problem.with_param(rows[r].reshape(problem.shape))))
        a, b = out[r].to(torch.float64), single.to(torch.float64)
        if not bool(((a - b).abs() <= tol * torch.maximum(a.abs(), b.abs()).clamp(min=1e-30)).all()):
            raise ValueError(
                f"row {r} of the stacked call differs from a single call at the same point (by up to "
                f"{float((a - b).abs().max()):.3g}): func does not treat the leading dimension as independent rows"
            )


def _run_batched(problem, result, start, offsets, batching, chunk_size, budget, loop_rate, loop) -> int:
    """Fill columns from ``start`` with batched calls; return how many columns are done. ``loop(a, b)`` fills
    columns ``a:b`` one node at a time: a chunk that raises after batching worked (with ``problem.node_errors``:
    a node outside func's domain, most likely) is redone by it."""
    m, s = result.coords.numel(), len(offsets)
    device = problem.device
    if chunk_size is None:
        budget = budget or default_memory_budget(device)
        outputs = problem.spec.size * 8 if problem.vector else 0
        per_coord = s * (problem.numel * problem.flat.element_size() + problem.activation_bytes() + outputs + 256) * 2
        chunk = max(1, budget // per_coord)
        if device.type == "cpu":  # measured: chunks whose working set stays cache-sized run fastest on a CPU
            # (tensor-valued funcs: at least 64, as each chunk also pays for comparing its Jacobian columns)
            chunk = min(chunk, max(64 if problem.vector else GENERIC_CPU_MIN_CHUNK, GENERIC_CPU_WORKING_SET // per_coord))
        chunk = min(m, chunk)
        result.notes.append(f"chunk of {chunk} coordinates ({per_coord * chunk / 2**20:.1f} MiB; budget "
                            f"{budget / 2**20:.0f} MiB)")
    else:
        chunk = min(chunk_size, m)
    strategies = ["vmap", "stack"] if batching == "auto" else [batching]
    batch: _Batched | None = None
    reasons: list[str] = []
    # "auto": a small untimed batched call first (first-call costs: buffers, vmap set-up), then a timed probe
    phase = "warmup" if loop_rate is not None else None
    probe_rates: list[float] = []
    pos = start
    layout_trial: tuple | None = None  # (inner tried, copies before) while a layout is being tried
    retried = False  # the strategies were tried again after a chunk where func raised at a node
    while pos < m:
        limit = {"warmup": _PROBE_WARMUP, "probe": _PROBE_BATCH}.get(phase, chunk)
        this = min(chunk, m - pos, limit)
        t0 = time.perf_counter()
        looped = False
        while True:
            if batch is None:
                if not strategies:
                    break
                batch = _Batched(problem, offsets, strategies.pop(0))
            idx = result.coords[pos:pos + this]
            disp = batch.prepare(idx, result.steps[pos:pos + this])
            copies_before = batch.mode.copied
            try:
                out = batch(s * this)
                break
            except OOM_ERRORS as exc:
                if this == 1:
                    raise MemoryError(f"gradfd: out of memory evaluating a single perturbed point: {exc}") from exc
                this = chunk = max(1, this // 2)
                batch.set_layout(batch.inner)  # drop the buffer before retrying smaller
                result.notes.append(f"out of memory: chunk halved to {this}")
            except CANNOT_RUN_THAT_WAY as exc:  # cannot batch this func: try the next strategy
                if pos > start and problem.node_errors is not None:
                    loop(pos, pos + this)  # the nodes one at a time: those that raise are recorded
                    looped = True
                    break
                if pos > start:  # batching worked on earlier chunks: a genuine error of func
                    note(exc, f"gradfd: raised while evaluating a batch of coordinates "
                               f"{entry_name(problem.param_idx, problem.shape, int(idx[0]))} .. "
                               f"{entry_name(problem.param_idx, problem.shape, int(idx[-1]))}")
                    raise
                reasons.append(f"{batch.strategy}: {type(exc).__name__}: {first_line(exc)}")
                batch = None
            except Exception as exc:  # not a batching failure (CANNOT_RUN_THAT_WAY): func's own, propagated
                note(exc, f"gradfd: raised while evaluating a batch of coordinates "
                           f"{entry_name(problem.param_idx, problem.shape, int(idx[0]))} .. "
                           f"{entry_name(problem.param_idx, problem.shape, int(idx[-1]))}")
                raise
        if looped:
            pos += this
            continue
        if batch is None and problem.node_errors is not None and not retried:
            # every strategy failed on this chunk: one node at a time, a node that raises is recorded; if one did,
            # that (a node outside func's domain) may be what failed the batched calls: they are tried once more
            before = problem.node_errors.count
            loop(pos, pos + this)
            pos += this
            if problem.node_errors.count > before and pos < m:
                retried, start = True, pos
                strategies = ["vmap", "stack"] if batching == "auto" else [batching]
                reasons.clear()
                continue
        if batch is None:
            warn_fallback("gradfd: func cannot be evaluated batched (" + "; ".join(reasons) + "); falling back to the "
                  "per-coordinate loop", stacklevel=5)
            result.notes.append("batching failed: " + "; ".join(reasons))
            return pos
        result.displacement[:, pos:pos + this] = disp
        result.store(pos, pos + this, out.view(s, this, *out.shape[1:]).to(torch.float64))
        pos += this
        result.engine, result.batching, result.chunk_size = "batched", batch.strategy, chunk
        copied = batch.mode.copied - copies_before
        if phase == "warmup":
            phase = "probe"
            continue
        if phase == "probe":
            _sync(device)
            probe_rates.append((time.perf_counter() - t0) / this)
            rate = min(probe_rates)
            if rate > loop_rate and len(probe_rates) < 2 and pos < m:
                continue  # the loop looks faster: time one more chunk (the best of two resists a busy machine)
            phase = None
            chosen = "loop" if rate > loop_rate else "batched"
            result.notes.append(f"probe: batched {rate * 1e6:.0f} us/coordinate vs loop {loop_rate * 1e6:.0f} us: "
                                f"{chosen} chosen")
            if chosen == "loop":
                result.engine, result.batching = "loop", None
                return pos
        # layout: if the batched matmul had to copy the parameter rows, try the split layout once
        if layout_trial is None and copied and batch.split_inner and batch.strategy == "vmap":
            layout_trial = (batch.split_inner, copied / this)
            batch.set_layout(batch.split_inner)
        elif layout_trial and layout_trial[0] == batch.inner and layout_trial[1] is not None:
            if copied / this >= layout_trial[1]:
                batch.set_layout(None)
            else:
                result.notes.append(f"rows laid out as ({problem.numel // batch.inner}, batch, {batch.inner}): "
                                    "the batched matmul reads them without copying")
            layout_trial = (layout_trial[0], None)
    return pos


def evaluate_points(problem: Problem, points: torch.Tensor, batching: str = "auto", *,
                    warn: bool = True) -> tuple[torch.Tensor, str]:
    """``func`` at arbitrary points of the checked parameter: ``points`` is ``(P, N)`` in the parameter's dtype.

    Batched in chunks of at most 256 points: ``batching="auto"`` tries ``torch.func.vmap``, then stacking the
    points along a leading dimension (checked against single calls at three points of the first chunk), then one
    call per point -- with a :class:`FallbackWarning` naming why, unless ``warn=False``. ``"vmap"`` and
    ``"stack"`` try only that strategy before the loop; ``"loop"`` goes straight to it.

    Returns:
        ``(values, strategy)``: ``(P,)`` float64 losses, or ``(P, size)`` for a tensor-valued ``func``, and the
        strategy used (``"vmap"``, ``"stack"`` or ``"loop"``).
    """
    count = points.shape[0]
    width = (problem.spec.size,) if problem.vector else ()
    out = torch.empty(count, *width, dtype=torch.float64, device=points.device)
    tried = {"auto": ("vmap", "stack"), "vmap": ("vmap",), "stack": ("stack",), "loop": ()}[batching]
    failures = []
    for strategy in tried if count > 1 else ():
        start = 0
        try:
            for start in range(0, count, 256):
                rows = points[start:start + 256]
                out[start:start + rows.shape[0]] = _points_batched(problem, rows, strategy, verify=start == 0)
            return out, strategy
        except CANNOT_RUN_THAT_WAY + OOM_ERRORS + (MemoryError,) as exc:
            if start > 0 and not isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
                if problem.node_errors is not None:  # the rest one point at a time: those that raise are recorded
                    out[start:] = _points_loop(problem, points[start:], start, count)
                    return out, strategy
                # batching worked on earlier chunks: a genuine error of func
                note(exc, f"gradfd: raised while evaluating func at perturbed points {start} .. "
                           f"{min(start + 256, count) - 1} of {count} of params[{problem.param_idx}]")
                raise
            failures.append(f"{strategy}: {type(exc).__name__}: {first_line(exc)}")
        except Exception as exc:  # not a batching failure (CANNOT_RUN_THAT_WAY): func's own, propagated
            note(exc, f"gradfd: raised while evaluating func at perturbed points {start} .. "
                       f"{min(start + 256, count) - 1} of {count} of params[{problem.param_idx}]")
            raise
    if failures and warn:
        warn_fallback(f"gradfd: func cannot be evaluated batched ({'; '.join(failures)}); falling back to one call per "
              "point", stacklevel=3)
    out[:] = _points_loop(problem, points, 0, count)
    return out, "loop"


def _points_loop(problem: Problem, points: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """``func`` at each of the ``(P, N)`` points, one call each (points ``first ..`` of ``count``): ``(P,)`` or
    ``(P, size)`` float64; a point where func raises is NaN when ``problem.node_errors`` records it."""
    errors = problem.node_errors
    out = torch.empty(points.shape[0], *((problem.spec.size,) if problem.vector else ()), dtype=torch.float64,
                      device=points.device)

    def unperturbed() -> None:
        problem.rng.reset()
        problem.func(*problem.args)

    with torch.no_grad():
        for j in range(points.shape[0]):
            problem.rng.reset()
            where = f"perturbed point {first + j} of {count} of params[{problem.param_idx}]"
            try:
                value = problem.func(*problem.with_param(points[j].view(problem.shape)))
            except BaseException as exc:
                if (errors is None or not isinstance(exc, Exception)
                        or not errors.take(exc, where, lambda: unperturbed())):
                    note(exc, f"gradfd: raised while evaluating func at {where}")
                    raise
                out[j] = math.nan
                continue
            with noting(f"gradfd: raised while evaluating func at {where}"):
                out[j] = problem.output_values(value)
    return out


def _points_batched(problem: Problem, rows: torch.Tensor, strategy: str, verify: bool) -> torch.Tensor:
    """One batched call of ``func`` on the ``(P, N)`` points ``rows`` (see :func:`evaluate_points`)."""
    problem.rng.reset()
    with torch.no_grad():
        if strategy == "vmap":
            def single(row: torch.Tensor) -> torch.Tensor:
                return problem.func(*problem.with_param(row.view(problem.shape)))

            with SharedOperandMatmul(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                vals = torch.func.vmap(single, randomness="same")(rows)
            if any("batching rule" in str(w.message) for w in caught):
                raise RuntimeError("vmap has no batching rule for an op of func")
            return problem.batched_values(vals, rows.shape[0], "vmap(func)")
        what = f"func given params[{problem.param_idx}] with a leading batch dimension"
        vals = problem.batched_values(problem.func(*problem.with_param(rows.reshape(-1, *problem.shape))),
                                      rows.shape[0], what)
        if verify:
            verify_stacked(problem, rows, vals)
        return vals


# --------------------------------------------------------------------------------------------------------------
# public API


def numerical_gradient(
    func: Callable[..., torch.Tensor],
    params: Sequence[torch.Tensor],
    param_idx: int,
    h: float | None = 1e-5,
    *,
    engine: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    stencil: str = "central",
    batching: str = "auto",
) -> torch.Tensor:
    """Numerical gradient of ``func(*params)`` with respect to ``params[param_idx]``, batched.

    Same arguments and result as :func:`gradfd.reference.numerical_gradient`, computed by evaluating many
    perturbed losses per call.

    Args:
        func: called as ``func(*params)``; returns a one-element floating tensor (the loss). It must not modify
            its inputs in place.
        params: tuple or list of tensors, all on one device. Never modified; ``func`` gets private copies.
        param_idx: which of ``params`` to differentiate; a floating tensor (float64/32/16, bfloat16) of any
            shape. Its dtype is the evaluation dtype; differences are taken in float64, and so are a
            low-precision loss's full reductions when that reproduces ``func``'s loss (:mod:`gradfd.reductions`).
        h: absolute step (default ``1e-5``, the reference's), or None for the automatic per-element step
            ``~eps**(1/(order+1)) * max(1, |x|)``.
        engine: ``"auto"`` (default: the structured engine when it applies to a large enough problem, else measures
            a small probe and picks the faster), ``"batched"`` (the kernel engine; raises
            :class:`gradfd.ops.KernelsUnavailableError` if the extension cannot be loaded), ``"loop"`` (per coordinate,
            in place, pure PyTorch) or ``"structured"`` (:mod:`gradfd.structured`: evaluates only what each
            perturbation changes; raises :class:`gradfd.structured.StructuredUnsupported`, naming the op, when it does
            not apply).
        chunk_size: coordinates per batched call (honoured as given); default from ``memory_budget``.
        memory_budget: bytes (int) or a size string like ``"512MB"`` for one chunk's working memory; default:
            half the free GPU memory, or a quarter of available RAM capped at 2 GiB.
        stencil: ``"central"`` (default, as the reference), ``"four_point"`` or ``"richardson"``.
        batching: ``"auto"`` (vmap, then stacking), ``"vmap"``, ``"stack"`` (``func`` accepts the parameter with
            a leading batch dimension and returns one loss per row; verified on the first chunk) or ``"loop"``.

    Returns:
        A tensor of the parameter's shape, dtype and device.

    Raises:
        TypeError / ValueError / IndexError: bad arguments, each message naming the argument.
        NonFiniteLossError: ``func`` returned NaN or inf at some evaluated point (the message names the
            entries; ``.gradient`` holds the estimate with NaN there).
        Any exception raised by ``func`` propagates unchanged, with a note naming the entry being evaluated.

    Example:
        >>> import torch, gradfd
        >>> X = torch.randn(20, 3, dtype=torch.float64); y = torch.randn(20, 1, dtype=torch.float64)
        >>> w = torch.randn(3, 1, dtype=torch.float64); b = torch.zeros(1, dtype=torch.float64)
        >>> g = gradfd.numerical_gradient(lambda w, b: ((X @ w + b - y) ** 2).mean(), (w, b), 0)
        >>> g.shape
        torch.Size([3, 1])
    """
    params, param_idx = check_params(params, param_idx)
    if h is not None:
        h = check_step(h)
    problem = prepare(func, params, param_idx)
    result = evaluate(func, params, param_idx, steps=h, stencil=stencil, engine=engine, batching=batching,
                      chunk_size=chunk_size, memory_budget=memory_budget, problem=problem)
    estimate, _ = result.estimate()
    target = params[param_idx]
    grad = estimate.reshape(target.shape)
    finite = result.finite()
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        names = [entry_name(param_idx, target.shape, int(result.coords[j])) for j in bad[:5]]
        grad = torch.where(finite.reshape(target.shape), grad, torch.full_like(grad, math.nan))
        raise NonFiniteLossError(
            f"func returned NaN or inf at perturbed points of {len(bad)} of {finite.numel()} entries, e.g. "
            f"{', '.join(names)}; the numerical gradient is undefined there (try a smaller h, or check func's "
            "domain)",
            gradient=grad.to(target.dtype),
            indices=[unravel(int(result.coords[j]), target.shape) for j in bad],
        )
    return grad.to(target.dtype)
