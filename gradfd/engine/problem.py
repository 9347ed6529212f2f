"""The function under test on private copies: :class:`Problem` (``func``, copies of its arguments, the checked
parameter as a flat buffer that the loop perturbs in place), :class:`OutputSpec` (which outputs of a tensor-valued
``func`` are compared), :class:`RngGuard` (the same random draws at every node), :func:`no_tf32` and
:func:`prepare`.

How ``func`` is then evaluated at many points (batched, looped) lives in :mod:`.batched`, :mod:`.loop` and the
drivers; argument checks live in :mod:`gradfd.validation`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import torch

from .. import reductions
from ..errors import CANNOT_RUN_THAT_WAY, ComplexOutputs, NodeErrors, NonFiniteLossError, noting
from ..report import unravel
from ..validation import describe, validate_scalar_output
from .modes import AllocationMeter

__all__ = ["RngGuard", "no_tf32", "OutputSpec", "Problem", "prepare"]


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Turn TF32 matmul/cuDNN off (and float32 matmul precision to "highest"); restore the settings on exit.

    cuDNN's flag goes through ``torch.backends.cudnn.flags``, which also works where the global flags are frozen
    (``torch.backends.disable_global_flags()``, as in PyTorch's own test harness)."""
    cudnn = torch.backends.cudnn
    cuda_matmul = torch.backends.cuda.matmul.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = cuda_matmul
        torch.set_float32_matmul_precision(precision)


class RngGuard:
    """Saves the CPU (and initialised CUDA) RNG states; ``reset()`` puts them back before an evaluation when
    ``func`` was seen to draw random numbers, and ``close()`` restores the caller's state."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        cuda_in_use = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda = torch.cuda.get_rng_state_all() if cuda_in_use else None
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
        """Put the saved states back when ``func`` was seen to draw random numbers (else do nothing)."""
        if self.consumed:
            self.close()

    def close(self) -> None:
        """Restore the saved (the caller's) RNG states."""
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
        TypeError: naming ``func`` when an output is not a tensor, is sparse or nested; :class:`ComplexOutputs` (a
            TypeError) when it is complex.
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
                raise ComplexOutputs(f"func's output[{k}] is complex ({o.dtype}); the engine compares real outputs: "
                                     "gradfd.check checks a complex output as its real pairs, or return "
                                     "torch.view_as_real(...)")
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
        self.reduction_quantum = 0.0  # ... and the rounding of one of its terms (Float64Reductions.quantum)
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
        self.forms_used: set[str] = set()  # batchable forms that ran ("vmap+forms": engine/forms.py)

    @property
    def func(self) -> Callable:
        """``func`` as evaluated: under float64 reductions when :meth:`evaluate_base` chose them."""
        return self._wide if self.reduce64 else self.plain_func

    def stacked_func(self, batch: int) -> Callable:
        """``func`` as evaluated on the parameter stacked along a leading batch dimension of size ``batch``: its
        reductions of a tensor with that leading dimension over every other dimension in float64 when
        :meth:`evaluate_base` chose float64 reductions, so that each row's loss is the one a single call gives (a float32 sum of the rows against a float64 base point failed 4% of correct
        checks of ``exp(x / 2).sum(-1)``: tests/test_reductions.py::test_stacked_rows_reduce_as_single_calls_do)."""
        if not self.reduce64:
            return self.plain_func
        return reductions.wrap(self.plain_func, lambda: reductions.Float64Reductions(batch_dims=1, batch=batch))

    def with_param(self, value: torch.Tensor) -> list:
        """The private arguments with the checked parameter replaced by ``value`` (of the parameter's shape, or with
        leading batch dimensions)."""
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
        mode = reductions.Float64Reductions(measure=True)
        try:
            with torch.no_grad(), mode:
                wide = self.plain_func(*self.args)
        except CANNOT_RUN_THAT_WAY:  # func cannot run that way: it is evaluated as written
            return
        finally:
            self.rng.reset()
        if mode.count and reductions.consistent(self.plain_base, wide):
            self._wide = reductions.wrap(self.plain_func)
            self.reduce64, self.reductions, self.reduction_quantum = True, mode.count, mode.quantum
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
        meter = AllocationMeter()
        with torch.no_grad(), meter, noting("gradfd: raised while measuring func's memory at the unperturbed params"):
            self.func(*self.args)
        self.rng.reset()
        return meter.total



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
