"""The rules an op author writes beyond the gradient's values, each checked as ``torch.autograd.gradcheck`` checks
it, and reported per input: undefined output gradients and input tangents treated as zeros
(:func:`undefined_grad_problems`, :func:`undefined_tangent_problems`), batched gradients equal to a loop of them
(:func:`batched_grad_problems`, :func:`batched_forward_problems`) and gradients in their input's dtype, device and
shape (:func:`grad_dtype_problems`).

Rule: every function here runs ``func`` afresh on private copies, from the caller's RNG state and with TF32 off,
leaves the caller's tensors and RNG state unchanged, and returns ``{k: what went wrong}`` for the inputs
``params[k]`` that break the rule (empty when all is well); the seeded draws (cotangents, tangents) come from
``seed`` (``check``'s); an exception of ``func``'s own rule (a backward or jvp
that raises) is a finding, named, not raised. Where two computations of the same value are compared (batched
against looped, a zero tangent against an undefined one) they may round differently: they must agree within
``Policy.floor_eps`` eps of their dtype, relative to the entry and to the tensor's largest entry (the verdicts'
own floor).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, Iterator, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch._vmap_internals import _vmap

from . import engine as _engine
from . import stencils
from .errors import first_line
from .report import entry_name
from .verdict.policy import DEFAULT_POLICY, SEEDS

__all__ = ["undefined_grad_problems", "undefined_tangent_problems", "batched_grad_problems",
           "batched_forward_problems", "grad_dtype_problems"]

BATCH = 2  # the batched checks' batch: two seeded Gaussian cotangents (tangents), as torch's


def _outputs(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _clones(params: Sequence[torch.Tensor], wrt: Sequence[int]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_(k in wrt) for k, p in enumerate(params)]


def _differentiable(func: Callable, params: Sequence[torch.Tensor], wrt: Sequence[int], rng, what: str):
    """``(clones, differentiable outputs)`` of one fresh forward with autograd, from the caller's RNG state."""
    clones = _clones(params, wrt)
    rng.close()
    with torch.enable_grad(), _engine.noting(f"gradfd: raised while evaluating func for {what}"):
        out = func(*clones)
    return clones, [o for o in _outputs(out) if isinstance(o, torch.Tensor) and o.requires_grad]


def _gaussian(like: torch.Tensor, gen: torch.Generator, batch: int | None = None) -> torch.Tensor:
    shape = like.shape if batch is None else (batch, *like.shape)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(like.dtype).to(like.device)


def _beyond_floor(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bad, gap)``: where ``a`` and ``b`` (one shape) differ beyond the floor of the module docstring, relative to
    ``b``'s entry and its largest finite entry, and by how much. Equal values (equal infinities) and NaN in both
    places differ by 0; a NaN against a number by inf."""
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    same = (a64 == b64) | (a64.isnan() & b64.isnan())
    gap = torch.where(same, torch.zeros_like(a64), (a64 - b64).abs().nan_to_num(nan=math.inf))
    size = torch.where(b64.isfinite(), b64.abs(), torch.zeros_like(b64))
    scale = float(size.max()) if size.numel() else 0.0
    return gap > DEFAULT_POLICY.floor_eps * stencils.eps(b.dtype) * (size + scale), gap


def _mismatch(batched: torch.Tensor, looped: torch.Tensor) -> str | None:
    """Where ``batched`` and ``looped`` differ beyond the floor (:func:`_beyond_floor`): a sentence, else None."""
    if batched.shape != looped.shape:
        return f"shape {tuple(batched.shape)} where the loop gave {tuple(looped.shape)}"
    bad, gap = _beyond_floor(batched, looped)
    if not bool(bad.any()):
        return None
    w = int(torch.where(bad, gap, torch.zeros_like(gap)).flatten().argmax())
    return (f"{int(bad.sum())} of {bad.numel()} entries differ, the largest by {float(gap.flatten()[w]):.3g} "
            f"({float(batched.flatten()[w]):.6g} batched, {float(looped.flatten()[w]):.6g} looped)")


def undefined_grad_problems(func: Callable, params: Sequence[torch.Tensor], wrt: Sequence[int]) -> dict[int, str]:
    """The undefined-gradient check of ``torch.autograd.gradcheck`` (``check_undefined_grad``): ``func``'s backward
    must treat an undefined output gradient as zeros. For each case ``func`` runs afresh on clones of ``params``
    (from the caller's RNG state, with TF32 off), and its differentiable outputs are wrapped so that their gradients
    arrive undefined (``torch._C._functions.UndefinedGrad``, as torch does): all of them at once, then, for several
    outputs, each alone with the others given zeros. Every checked input's gradient must then be undefined (None)
    or exactly zero. The caller's tensors and RNG state are unchanged.

    Args:
        func: as :func:`check` takes it.
        params: its arguments (cloned, never modified).
        wrt: the indices of the inputs to look at.

    Returns:
        ``{k: what went wrong}`` for the inputs ``params[k]`` whose gradient was nonzero (how many entries, the
        largest and where), or, where the backward raised, what it raised (for every input not already named);
        empty when all is well.
    """
    problems: dict[int, str] = {}
    rng = _engine.RngGuard()
    try:
        with _engine.no_tf32():
            for label, undefined in _undefined_cases(func, params, wrt, rng):
                clones = [p.detach().clone().requires_grad_(k in wrt) for k, p in enumerate(params)]
                rng.close()
                with torch.enable_grad(), _engine.noting("gradfd: raised while evaluating func for the "
                                                         "undefined-gradient check"):
                    out = func(*clones)
                outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
                        if isinstance(o, torch.Tensor) and o.requires_grad]
                wrapped = [torch._C._functions.UndefinedGrad()(o) if j in undefined else o for j, o in enumerate(outs)]
                zeros = [torch.zeros_like(o, memory_format=torch.legacy_contiguous_format) for o in outs]
                try:
                    with torch.enable_grad():
                        grads = torch.autograd.grad(wrapped, [clones[k] for k in wrt], zeros, allow_unused=True)
                except Exception as exc:  # a backward that reads the undefined gradient (None) raises anything
                    for k in wrt:
                        problems.setdefault(k, f"with {label}, the backward raised {type(exc).__name__}: "
                                               f"{first_line(exc)}")
                    continue
                for k, g in zip(wrt, grads):
                    if k not in problems and g is not None:
                        problems.update(_nonzero(k, g, label))
    finally:
        rng.close()
    return problems


def undefined_tangent_problems(func: Callable, params: Sequence[torch.Tensor], wrt: Sequence[int],
                               seed: int = 0) -> dict[int, str]:
    """Forward mode's undefined-tangent check (``torch.autograd.gradcheck``'s with ``check_forward_ad`` and
    ``check_undefined_grad``): a jvp rule must treat an undefined input tangent as zeros.

    Every checked input carries a seeded Gaussian tangent; then, for each ``params[k]`` in turn, its tangent is
    made a materialized zero and, in a second run, left undefined (a plain tensor). The output tangents of the two
    runs must agree, to ``Policy.floor_eps`` eps of the output's dtype relative to the largest of them (the two
    runs take different paths through the rule; mathematically they are equal). Each run starts from the caller's
    RNG state; the caller's tensors and RNG state are unchanged.

    Returns:
        ``{k: what went wrong}`` for the inputs whose undefined tangent changed an output tangent (which output, the
        largest difference), or made the jvp raise; empty when all is well.
    """
    problems: dict[int, str] = {}
    rng = _engine.RngGuard()
    gen = torch.Generator().manual_seed(SEEDS.batched(seed) + 3)
    tangents = {k: torch.randn(params[k].shape, generator=gen, dtype=torch.float64).to(params[k].dtype).to(
        params[k].device) for k in wrt}

    def run(k: int, zero: bool) -> list:
        rng.close()
        args = [p.detach().clone() for p in params]
        with fwAD.dual_level():
            for i in wrt:
                if i != k:
                    args[i] = fwAD.make_dual(args[i], tangents[i])
                elif zero:
                    args[i] = fwAD.make_dual(args[i], torch.zeros_like(args[i]))
            out = func(*args)
            outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
                    if isinstance(o, torch.Tensor) and o.is_floating_point()]
            return [fwAD.unpack_dual(o).tangent for o in outs]

    try:
        with _engine.no_tf32(), torch.no_grad():
            for k in wrt:
                try:
                    with _engine.noting("gradfd: raised in forward-mode AD for the undefined-tangent check"):
                        materialized, undefined = run(k, True), run(k, False)
                except Exception as exc:
                    problems[k] = (f"with params[{k}]'s tangent undefined or zero, the jvp raised "
                                   f"{type(exc).__name__}: {first_line(exc)}")
                    continue
                for j, (a, b) in enumerate(zip(materialized, undefined)):
                    if a is None or b is None:
                        continue
                    bad, gap = _beyond_floor(b, a)
                    if bool(bad.any()):
                        problems[k] = (f"with params[{k}]'s tangent undefined, output {j}'s tangent differs from "
                                       f"its value with a zero tangent in {int(bad.sum())} of {bad.numel()} entries, "
                                       f"by up to {float(gap.max()):.3g}; a jvp rule must treat an undefined tangent "
                                       "as zeros")
                        break
    finally:
        rng.close()
    return problems


def _undefined_cases(func: Callable, params: Sequence[torch.Tensor], wrt: Sequence[int], rng) -> list:
    """``[(label, indices of the outputs whose gradient is undefined)]``: all of them, then each alone where there
    are several (one forward, from the caller's RNG state, counts the differentiable outputs)."""
    rng.close()
    with torch.enable_grad(), _engine.noting("gradfd: raised while evaluating func for the undefined-gradient check"):
        out = func(*[p.detach().clone().requires_grad_(k in wrt) for k, p in enumerate(params)])
    n = sum(isinstance(o, torch.Tensor) and o.requires_grad for o in (out if isinstance(out, (tuple, list)) else [out]))
    if n == 0:
        return []
    cases = [("every output gradient undefined", set(range(n)))]
    if n > 1:
        cases += [(f"output {j}'s gradient undefined, the others zero", {j}) for j in range(n)]
    return cases


def _nonzero(k: int, g: torch.Tensor, label: str) -> dict[int, str]:
    """``{k: sentence}`` where the gradient ``g`` of ``params[k]`` has a nonzero (or NaN) entry, else ``{}``."""
    g = g.detach()
    if g.layout != torch.strided:  # sparse: its stored values, never densified
        g = g.coalesce() if g.is_sparse else g
        values = g.values() if g.is_sparse else g.to_dense()
        if not bool((values != 0).any()):
            return {}
        g = g.to_dense()
    nonzero = g != 0  # (NaN included)
    if not bool(nonzero.any()):
        return {}
    flat = int(g.abs().nan_to_num(nan=math.inf).flatten().argmax())
    return {k: f"with {label}, the backward gave params[{k}] a nonzero gradient ({int(nonzero.sum())} of "
               f"{g.numel()} entries, the largest {float(g.flatten()[flat]):.3g} at "
               f"{entry_name(k, tuple(g.shape), flat)}); it must treat an undefined output gradient as zeros"}




def batched_grad_problems(func: Callable, params: Sequence[torch.Tensor], wrt: Sequence[int],
                          seed: int = 0) -> dict[int, str]:
    """``torch.autograd.gradcheck``'s ``check_batched_grad``: the backward run batched -- vmap over ``BATCH``
    seeded Gaussian output gradients (``torch.autograd.grad(..., is_grads_batched=True)``) -- must give what a loop
    of backward passes gives. A backward that cannot run under vmap (``.item()``, an in-place write into a captured
    tensor, a call out of PyTorch) is a finding that names what it raised."""
    problems: dict[int, str] = {}
    rng = _engine.RngGuard()
    try:
        with _engine.no_tf32():
            clones, outs = _differentiable(func, params, wrt, rng, "the batched-gradient check")
            if not outs:
                return problems
            gen = torch.Generator().manual_seed(SEEDS.batched(seed))
            cots = [_gaussian(o, gen, BATCH) for o in outs]
            xs = [clones[k] for k in wrt]
            with torch.enable_grad(), _engine.noting("gradfd: raised in the backward of func (the batched-gradient "
                                                     "check's loop)"):
                looped = [torch.autograd.grad(outs, xs, [c[b] for c in cots], retain_graph=True, allow_unused=True)
                          for b in range(BATCH)]
            try:
                with torch.enable_grad(), _quiet_vmap():
                    batched = torch.autograd.grad(outs, xs, cots, retain_graph=True, allow_unused=True,
                                                  is_grads_batched=True)
            except Exception as exc:
                for k in wrt:
                    problems[k] = (f"the backward cannot run batched (vmap over {BATCH} output gradients, "
                                   f"torch.autograd.grad(..., is_grads_batched=True)): it raised "
                                   f"{type(exc).__name__}: {first_line(exc)}")
                return problems
            for i, (k, x) in enumerate(zip(wrt, xs)):
                loop = torch.stack([torch.zeros_like(x) if g[i] is None else g[i] for g in looped])
                got = torch.zeros_like(loop) if batched[i] is None else batched[i]
                why = _mismatch(got, loop)
                if why:
                    problems[k] = (f"the backward run batched (vmap over {BATCH} output gradients) differs from a "
                                   f"loop of backward passes: {why}")
    finally:
        rng.close()
    return problems


def batched_forward_problems(func: Callable, params: Sequence[torch.Tensor], wrt: Sequence[int],
                             seed: int = 0) -> dict[int, str]:
    """``torch.autograd.gradcheck``'s ``check_batched_forward_grad``: forward-mode AD run batched -- vmap over
    ``BATCH`` seeded Gaussian tangents of ``params[k]`` (``torch._vmap_internals._vmap``, as torch's check does) --
    must give what a loop of jvps gives. A jvp rule that cannot run under vmap is a finding that names what it
    raised."""
    problems: dict[int, str] = {}
    rng = _engine.RngGuard()
    gen = torch.Generator().manual_seed(SEEDS.batched(seed) + 1)
    try:
        with _engine.no_tf32(), torch.no_grad():
            for k in wrt:
                def jvp(tangent, k=k):
                    rng.close()
                    args = [p.detach().clone() for p in params]
                    with fwAD.dual_level():
                        args[k] = fwAD.make_dual(args[k], tangent)
                        outs = [o for o in _outputs(func(*args))
                                if isinstance(o, torch.Tensor) and o.is_floating_point()]
                        return tuple(_tangent(o) for o in outs)

                tangents = _gaussian(params[k], gen, BATCH)
                with _engine.noting("gradfd: raised in forward-mode AD of func (the batched forward check's loop)"):
                    looped = [jvp(tangents[b]) for b in range(BATCH)]
                try:
                    with _quiet_vmap():
                        batched = _vmap(jvp)(tangents)
                except Exception as exc:
                    problems[k] = (f"forward-mode AD cannot run batched (vmap over {BATCH} tangents of params[{k}]): "
                                   f"it raised {type(exc).__name__}: {first_line(exc)}")
                    continue
                for j, got in enumerate(batched):
                    why = _mismatch(got, torch.stack([t[j] for t in looped]))
                    if why:
                        problems[k] = (f"forward-mode AD run batched (vmap over {BATCH} tangents of params[{k}]) "
                                       f"differs from a loop of jvps in output {j}: {why}")
                        break
    finally:
        rng.close()
    return problems


def _tangent(o: torch.Tensor) -> torch.Tensor:
    """A dual output's tangent, zeros (batched like the primal) where it has none."""
    primal, tangent = fwAD.unpack_dual(o)
    return torch.zeros_like(primal) if tangent is None else tangent


def grad_dtype_problems(func: Callable, params: Sequence[torch.Tensor], wrt: Sequence[int],
                        forward: bool, seed: int = 0) -> dict[int, str]:
    """``torch.autograd.gradcheck``'s ``check_grad_dtypes``: each gradient has its input's dtype, device and shape
    (reverse mode: a vjp with seeded Gaussian output gradients), or each output tangent its output's (forward mode:
    a jvp with a seeded Gaussian tangent per input). For real strided tensors the reverse side cannot fail: autograd
    casts a backward's gradient to its input's dtype, sums it to its shape and refuses another device before it is
    returned (it is kept for parity with torch's option); forward AD lets a tangent of another dtype through, which
    the forward side finds (torch's check compares only complex against real)."""
    problems: dict[int, str] = {}
    rng = _engine.RngGuard()
    gen = torch.Generator().manual_seed(SEEDS.batched(seed) + 2)
    try:
        with _engine.no_tf32():
            if not forward:
                clones, outs = _differentiable(func, params, wrt, rng, "the gradient-dtype check")
                if not outs:
                    return problems
                with torch.enable_grad(), _engine.noting("gradfd: raised in the backward of func (the "
                                                         "gradient-dtype check)"):
                    grads = torch.autograd.grad(outs, [clones[k] for k in wrt], [_gaussian(o, gen) for o in outs],
                                                allow_unused=True)
                for k, g in zip(wrt, grads):
                    p = params[k]
                    if g is not None and (g.dtype, g.device, g.shape) != (p.dtype, p.device, p.shape):
                        problems[k] = (f"the backward gave params[{k}] a gradient of dtype {g.dtype}, device "
                                       f"{g.device}, shape {tuple(g.shape)}; expected the input's {p.dtype}, "
                                       f"{p.device}, {tuple(p.shape)}")
                return problems
            for k in wrt:
                rng.close()
                args = [p.detach().clone() for p in params]
                with torch.no_grad(), fwAD.dual_level(), _engine.noting(
                        "gradfd: raised in forward-mode AD of func (the gradient-dtype check)"):
                    args[k] = fwAD.make_dual(args[k], _gaussian(params[k], gen))
                    outs = [o for o in _outputs(func(*args)) if isinstance(o, torch.Tensor) and o.is_floating_point()]
                    for j, o in enumerate(outs):
                        primal, t = fwAD.unpack_dual(o)
                        if t is not None and (t.dtype, t.device, t.shape) != (primal.dtype, primal.device,
                                                                               primal.shape):
                            problems[k] = (f"forward-mode AD gave output {j} a tangent of dtype {t.dtype}, device "
                                           f"{t.device}, shape {tuple(t.shape)} for params[{k}]; expected the "
                                           f"output's {primal.dtype}, {primal.device}, {tuple(primal.shape)}")
                            break
    finally:
        rng.close()
    return problems


@contextlib.contextmanager
def _quiet_vmap() -> Iterator[None]:
    """Silence vmap's "performance drop" warnings (a backward without a batching rule runs correctly, slowly)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        warnings.filterwarnings("ignore", message="Please use `torch.vmap`")
        yield
