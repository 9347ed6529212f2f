"""The batched finite-difference engine behind :func:`gradfd.numerical_gradient`.

For a chunk of coordinates ``i`` the engine

1. builds every perturbed copy ``x + o*h_i*e_i`` of the flattened parameter in one kernel launch
   (``gradfd::perturb``), recording the step actually taken after rounding to the dtype;
2. evaluates ``func`` on the whole chunk in one batched call -- ``torch.func.vmap`` (with the shared-operand
   matmul rewrite of :mod:`.modes`), or ``func``'s own leading batch dimension (``batching="stack"``);
3. turns the losses into central differences in float64 (``gradfd::central_differences``) and Richardson-
   extrapolates them (:mod:`gradfd.stencils`).

Chunks are sized from a memory budget; nothing of size ``numel**2`` is allocated at once. Functions that
cannot be batched fall back, with one warning naming the reason, to a loop that perturbs a private copy in
place and restores it. ``func`` never sees the caller's tensors: it gets private copies, so the caller's
tensors (and their version counters) are bitwise unchanged after every call, even when ``func`` raises.
Functions that draw random numbers see the same draws at every perturbed point, and the caller's RNG state is
restored on exit.

Where things live:

- this module: the entry points -- :func:`numerical_gradient`, :func:`evaluate` and the strategy it picks
  (structured, batched or loop; the "auto" thresholds and probe) -- and the names other modules import;
- :mod:`.problem`: ``func`` on private copies (:class:`Problem`, :class:`OutputSpec`, :class:`RngGuard`,
  :func:`prepare`);
- :mod:`.evaluation`: :class:`Evaluation` (what an evaluation produces), the nodes and the steps;
- :mod:`.batched`: the one batched call of ``func`` on a batch of points (vmap or stacked);
- :mod:`.loop`: the one loop, one call of ``func`` per node;
- :mod:`.coordinates`: the batched driver along coordinates (chunk sizes, out-of-memory halving, the probe's
  timing, the rows' layout);
- :mod:`.points`: :func:`evaluate_points`, the driver for arbitrary points (Jacobian and directional checks);
- :mod:`.modes`: the dispatch modes (allocation meter, shared-operand matmul).

Argument checks live in :mod:`gradfd.validation`, memory budgets in :mod:`gradfd.budget`, warnings and exceptions in
:mod:`gradfd.errors`, the structured engine in :mod:`gradfd.structured`.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch

from .. import distributed as _distributed
from .. import ops, stencils, wirtinger
from ..budget import default_memory_budget, parse_memory_budget
from ..errors import (CANNOT_RUN_THAT_WAY, FallbackWarning, GradfdWarning, NodeErrors, NonFiniteLossError, noting,
                      warn_fallback, warnings_once)
from ..report import entry_name, unravel
from ..stencils import Stencil
from ..validation import check_choice, check_params, check_positive_int, check_step, validate_scalar_output
from .coordinates import CoordinateBatches, sync
from .evaluation import Evaluation, node_values, resolve_steps
from .loop import delivery_groups, loop_coordinates
from .points import evaluate_points
from .problem import OutputSpec, Problem, RngGuard, no_tf32, prepare

__all__ = [
    # the engine
    "ENGINES", "BATCHINGS", "numerical_gradient", "evaluate", "evaluate_points", "prepare", "Evaluation", "Problem",
    "OutputSpec", "RngGuard", "no_tf32", "node_values",
    # re-exported from the modules that own them, for code that reaches them through gradfd.engine
    "GradfdWarning", "FallbackWarning", "NonFiniteLossError", "NodeErrors", "CANNOT_RUN_THAT_WAY", "noting",
    "warnings_once", "validate_scalar_output", "check_params", "check_step", "parse_memory_budget",
    "default_memory_budget", "unravel",
]

ENGINES = ("auto", "batched", "loop", "structured")
BATCHINGS = ("auto", "vmap", "stack", "loop")
# The "auto" strategy's thresholds. They and the probe's clock (``time``) are read from this module at each call,
# where tests patch them (tests/test_engine.py::test_auto_engine_keeps_whichever_its_probe_timed_faster,
# tests/test_structured.py::test_unsupported_functions_raise_naming_the_op_and_fall_back_under_auto).
_TINY = 32  # evaluations below which "auto" uses the loop without probing
_STRUCTURED_MIN_EVALUATIONS = 256  # evaluations at or below which "auto" does not consider the structured engine
_PROBE_LOOP = 2  # coordinates the "auto" probe times with the loop


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


def _evaluate(problem: Problem, steps, stencil: Stencil, coords, engine, batching, chunk_size, budget,
              sink=None, progress=None) -> Evaluation:
    """:func:`evaluate` on a prepared problem with checked arguments: the nodes, then the strategy -- the structured
    engine when it applies (and, under "auto", pays), the loop for tiny problems, else the batched driver (under
    "auto" after the loop and a batched probe were timed), the loop for whatever it leaves."""
    device = problem.device
    if coords is None:
        coords = torch.arange(problem.numel, device=device)
        x = problem.flat.clone()
    else:
        coords = coords.to(device=device, dtype=torch.int64).reshape(-1)
        x = problem.flat[coords]
    h = resolve_steps(problem, steps, stencil, coords, x)
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
    done = 0
    if (engine == "structured" or engine == "auto") and not problem.vector:  # the structured engine when it applies
        from .. import structured

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
                done = exc.delivered  # (columns a sink already took: never delivered twice)

    if engine == "auto" and m * s <= _TINY:
        result.notes.append(f"{m * s} evaluations: loop (below the batching threshold of {_TINY})")
        engine = "loop"
    session = _distributed.active()
    if engine == "auto" and session is not None:  # ranks choose alike: by rule, never by their clocks
        result.notes.append("distributed: batched, without the timing probe")
        engine = "batched"
    loop_rate = None
    if engine == "auto" and done < m:
        probe = min(_PROBE_LOOP, m - done)
        t0 = time.perf_counter()
        loop_coordinates(problem, result, done, done + probe, moved, x)
        sync(device)
        loop_rate = (time.perf_counter() - t0) / probe
        done += probe
    if engine in ("auto", "batched") and done < m:
        def loop(a: int, b: int) -> None:
            loop_coordinates(problem, result, a, b, moved, x)

        done = CoordinateBatches(problem, result, batching, chunk_size, budget, loop_rate, loop,
                                 time.perf_counter).run(done)
    sharing = _distributed.sharing()
    if done < m and sharing is not None:  # a node's value does not depend on the others': the split is exact
        # (the ranks' blocks keep the one loop's deliveries: a loss's in one, a tensor-valued func's in its blocks)
        per = delivery_groups(problem, s) if problem.vector else 1
        blocks = _distributed.blocks_of(done, m, per * -(-(m - done) // (per * sharing.world)))
        _distributed.share_columns(result, problem.node_errors, blocks,
                                   lambda a, b: loop_coordinates(problem, result, a, b, moved, x),
                                   None if problem.vector else [(done, m)])
    elif done < m:
        loop_coordinates(problem, result, done, m, moved, x)
    return result


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
    distributed=False,
) -> torch.Tensor:
    """Numerical gradient of ``func(*params)`` with respect to ``params[param_idx]``, batched.

    Same arguments and result as :func:`gradfd.reference.numerical_gradient`, computed by evaluating many
    perturbed losses per call.

    Args:
        func: called as ``func(*params)``; returns a one-element floating tensor (the loss). It must not modify
            its inputs in place.
        params: tuple or list of tensors, all on one device. Never modified; ``func`` gets private copies.
        param_idx: which of ``params`` to differentiate; a floating tensor (float64/32/16, bfloat16) of any
            shape, or a complex one (complex128/64: its real and imaginary parts are differentiated as real pairs,
            :mod:`gradfd.wirtinger`, and the gradient is PyTorch's ``dL/da + i dL/db``). Its dtype is the evaluation dtype; differences are taken in float64, and so are a
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
        batching: ``"auto"`` (vmap; then vmap with the ops it cannot batch -- RNNs, fused attention -- in
            batchable forms, :mod:`gradfd.engine.forms`; then stacking), ``"vmap"`` (the first two), ``"stack"``
            (``func`` accepts the parameter with a leading batch dimension and returns one loss per row; verified on
            the first chunk) or ``"loop"``.
        distributed: False (default), True, a ``torch.distributed`` ProcessGroup or
            :class:`gradfd.distributed.Distributed`: the evaluations are shared out over the group's ranks, as in
            :func:`gradfd.check` (every rank returns the whole gradient).

    Returns:
        A tensor of the parameter's shape, dtype and device.

    Raises:
        TypeError / ValueError / IndexError: bad arguments, each message naming the argument.
        gradfd.distributed.DistributedError: (``distributed``) the ranks' problems differ, or a rank stopped
            answering; an exception on one rank is raised on every rank.
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
    if wirtinger.has_complex(params) and isinstance(params, (tuple, list)):  # the real pairs, in PyTorch's convention
        pairs_func, pairs = wirtinger.as_pairs(func, params)
        grad = numerical_gradient(pairs_func, pairs, param_idx, h, engine=engine, chunk_size=chunk_size,
                                  memory_budget=memory_budget, stencil=stencil, batching=batching,
                                  distributed=distributed)
        return wirtinger.to_complex(grad) if params[param_idx].is_complex() else grad
    params, param_idx = check_params(params, param_idx)
    if h is not None:
        h = check_step(h)
    session = _distributed.resolve(distributed)
    if session is not None and _distributed.active() is None:
        options = dict(func=getattr(func, "__qualname__", None), param_idx=param_idx, h=h, engine=engine,
                       chunk_size=chunk_size, memory_budget=memory_budget, stencil=stencil, batching=batching)
        with session.running({"params": params, "options": options}):
            grad = numerical_gradient(func, params, param_idx, h, engine=engine, chunk_size=chunk_size,
                                      memory_budget=memory_budget, stencil=stencil, batching=batching,
                                      distributed=session)
            session.verify({"gradient": grad})  # every rank returns the same gradient, or raises
            return grad
    problem = prepare(func, params, param_idx)
    _distributed.verify({"unperturbed loss": problem.base_loss})
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
