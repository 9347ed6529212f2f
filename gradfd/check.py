"""``gradfd.check``: numerical against analytical gradients, with a verdict per entry that can be trusted.

This module holds the public entry point -- argument handling, autograd's side, the reentrancy check -- and
hands each input to the verdict pipeline (:mod:`gradfd.verdict`): :func:`gradfd.verdict.coordinates.check_coordinates`
in full and sample mode, :func:`gradfd.verdict.directional.directional_report` in directional mode. The rules of
the verdicts, and every threshold, live there (:class:`gradfd.verdict.policy.Policy`; docs/verdicts.md).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import torch

from . import distributed as _distributed
from . import engine as _engine
from . import stencils
from . import jacobian as _jacobian
from . import second_order as _second_order
from . import wirtinger as _wirtinger
from .plot import EntryContext
from .progress import Progress
from .report import AGREE, DISAGREE, UNRESOLVED, CheckReport, GradientCheckError, InvalidReferenceError
from .validation import check_checkable, check_choice, check_params, check_positive_int, check_step, describe
from .verdict import against_reference as _against
from .verdict import judge as _judge
from .verdict import refine as _refine
from .verdict.coordinates import check_coordinates
from .verdict.directional import Directions, directional_report
from .verdict.estimates import Entries
from .verdict.plan import Request, sample_coordinates
from .engine import no_tf32
from .errors import ComplexOutputs
from .rules import (batched_forward_problems, batched_grad_problems, grad_dtype_problems,
                    undefined_grad_problems, undefined_tangent_problems)
from .verdict.policy import DEFAULT_DIRECTIONS, DEFAULT_POLICY, DEFAULT_SAMPLES, SEEDS, Policy, resolve_policy

__all__ = ["check", "MODES", "FLOOR_EPS", "TOLERANCE_SAFETY", "no_tf32", "analytical_gradients",
           "undefined_grad_problems", "undefined_tangent_problems", "sample_coordinates", "AGREE", "DISAGREE",
           "UNRESOLVED"]

MODES = ("full", "sample", "directional")
FLOOR_EPS = DEFAULT_POLICY.floor_eps  # (the policy's; kept importable from here)
TOLERANCE_SAFETY = DEFAULT_POLICY.tolerance_safety


def _resolve_wrt(params: list[torch.Tensor], wrt) -> list[int]:
    if wrt is None:
        chosen = [k for k, p in enumerate(params) if p.is_floating_point() and p.requires_grad]
        if not chosen:
            raise ValueError(
                "no tensor to check: none of params is a floating tensor with requires_grad=True; set "
                "requires_grad on the tensors to check, or pass wrt=(index, ...)"
            )
        return chosen
    if isinstance(wrt, int) and not isinstance(wrt, bool):
        wrt = (wrt,)
    if not isinstance(wrt, (tuple, list)) or not all(isinstance(k, int) and not isinstance(k, bool) for k in wrt):
        raise TypeError(f"wrt must be an int or a tuple of ints indexing params, got {describe(wrt)}")
    if not wrt:
        raise ValueError("no tensor to check: wrt is empty")
    out = []
    for k in wrt:
        if not -len(params) <= k < len(params):
            raise IndexError(f"wrt entries must be in [0, {len(params)}) for {len(params)} params, got {k}")
        k %= len(params)
        check_checkable(params[k], f"wrt={k}: params[{k}]")
        if k not in out:
            out.append(k)
    return out


def analytical_gradients(func: Callable, params: Sequence[torch.Tensor], wrt: Sequence[int]) -> list[torch.Tensor]:
    """Autograd's gradients of the scalar ``func(*params)`` for ``params[k]``, ``k`` in ``wrt``, computed on clones
    (the caller's ``.grad`` is untouched); zeros where ``func`` does not depend on a tensor.

    Raises:
        TypeError / ValueError naming ``func`` when it does not return a single floating-point value.
    """
    clones = [p.detach().clone().requires_grad_(k in wrt) for k, p in enumerate(params)]
    with torch.enable_grad():
        with _engine.noting("gradfd: raised while computing autograd's gradient (func and its backward at the "
                            "unperturbed params, on clones)"):
            out = _engine.validate_scalar_output(func(*clones), detach=False)
        inputs = [clones[k] for k in wrt]
        if out.requires_grad:
            with _engine.noting("gradfd: raised in autograd's backward of func at the unperturbed params"):
                grads = torch.autograd.grad(out, inputs, allow_unused=True)
        else:
            grads = [None] * len(inputs)
    return [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(inputs, grads)]


def _cotangents(analytical: _jacobian.Analytical, seed: int) -> list[torch.Tensor | None]:
    """The output gradients of the reentrancy check, one per compared output (None where it has no gradient): 1 for a
    one-element output, else torch's fast-mode vector -- uniform in [0, 1), scaled to unit norm -- in the output's
    dtype, so that ``nondet_tol`` bounds the same absolute differences as in ``torch.autograd.gradcheck``."""
    gen = torch.Generator().manual_seed(SEEDS.reentrancy(seed))
    cots: list[torch.Tensor | None] = []
    for o in analytical.outputs:
        if not o.requires_grad:
            cots.append(None)
        elif o.numel() == 1:
            cots.append(torch.ones_like(o))
        else:
            v = torch.rand(o.numel(), generator=gen, dtype=torch.float64)
            cots.append((v / v.norm()).to(dtype=o.dtype, device=o.device).view(o.shape))
    return cots


def _difference(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """Largest ``|a - b|`` over entries, in float64: identical values (equal infinities, NaN at the same place) differ
    by 0, a NaN against a number by inf (torch's ``(a - b).abs().max() > tol`` would let that NaN through)."""
    if a is None and b is None:
        return 0.0
    a = torch.zeros_like(b) if a is None else a
    b = torch.zeros_like(a) if b is None else b
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    if a.numel() == 0:
        return 0.0
    same = (a == b) | (a.isnan() & b.isnan())
    d = torch.where(same, torch.zeros_like(a), (a - b).abs())
    return float(torch.nan_to_num(d, nan=math.inf).max())


def _backward_spreads(analytical: _jacobian.Analytical, wrt: Sequence[int], seed: int) -> dict[int, float]:
    """Reentrancy, as ``torch.autograd.gradcheck`` checks it: the backward of the same graph run twice with the same
    output gradients (:func:`_cotangents`), and for each checked input the largest absolute difference between the
    two results (0.0: identical). A backward that accumulates with atomics can differ run to run. torch compares
    every row of the Jacobian in its slow mode and this one combination of rows in its fast mode; both backwards
    here cover every checked input at once (two backward passes in all)."""
    outs, cots = [], []
    for o, c in zip(analytical.outputs, _cotangents(analytical, seed)):
        if c is not None:
            outs.append(o)
            cots.append(c)
    if not outs:
        return {k: 0.0 for k in wrt}
    inputs = [analytical.clones[k] for k in wrt]

    def backward():
        with _engine.noting("gradfd: raised in autograd's backward of func at the unperturbed params (the "
                            "reentrancy check, nondet_tol)"):
            grads = _jacobian.grad(outs, inputs, cots)
        return [g if g is None or g.layout == torch.strided else g.to_dense() for g in grads]

    first, second = backward(), backward()
    return {k: _difference(a, b) for k, a, b in zip(wrt, first, second)}


def _nondeterminism(spread: float, nondet_tol: float) -> str:
    """The report's sentence for a backward whose two runs differ by ``spread > nondet_tol``."""
    if nondet_tol == 0:
        bound = ("nondet_tol=0.0 (the default of gradfd.gradcheck and torch.autograd.gradcheck) asks for identical "
                 "results; pass nondet_tol=<tol> where the backward is non-deterministic by design (atomics)")
    else:
        bound = f"> nondet_tol={nondet_tol:g}"
    return (f"two backward passes of the same graph, with the same output gradients, differ by {spread:.3g} "
            f"(largest absolute difference); {bound}")


def _resolve_rules(check_forward_ad, check_backward_ad, check_undefined_grad, check_batched_grad,
                   check_batched_forward_grad, check_grad_dtypes, order, reference) -> dict[str, bool]:
    """:func:`check`'s AD and rule options validated (and ``order``, which they combine with): the rule checks of
    :func:`_finish`, by name."""
    rules = {"undefined_grad": check_undefined_grad, "batched_grad": check_batched_grad,
             "batched_forward_grad": check_batched_forward_grad, "grad_dtypes": check_grad_dtypes}
    for name, value in (("check_forward_ad", check_forward_ad), ("check_backward_ad", check_backward_ad),
                        *((f"check_{r}", v) for r, v in rules.items())):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {describe(value)}")
    if not (check_forward_ad or check_backward_ad):
        raise ValueError("nothing to check: check_backward_ad=False and check_forward_ad=False (set one of them)")
    if check_batched_grad and not check_backward_ad:
        raise ValueError("check_batched_grad=True needs check_backward_ad=True (it checks the backward)")
    if check_batched_forward_grad and not check_forward_ad:
        raise ValueError("check_batched_forward_grad=True needs check_forward_ad=True (it checks forward-mode AD)")
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")
    if reference is not None and order == 2:
        raise ValueError("order=2 with reference is not supported: reference mode compares first-order gradients "
                         "(check the reference's double backward with gradfd.check(reference, ..., order=2))")
    if reference is not None and (check_forward_ad or not check_backward_ad):
        raise ValueError("reference mode compares reverse-mode gradients: check_forward_ad=True (or "
                         "check_backward_ad=False) with reference is not supported")
    return rules


def check(
    func: Callable[..., torch.Tensor],
    params: Sequence[torch.Tensor],
    *,
    wrt: int | Sequence[int] | None = None,
    mode: str = "full",
    samples: int | None = None,
    directions: int | None = None,
    h: float | None = None,
    stencil: str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    engine: str = "auto",
    seed: int = 0,
    raise_on_failure: bool = True,
    batching: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | str | None = None,
    nondet_tol: float | None = None,
    progress: bool | None | Callable[[int, int], None] = None,
    policy: Policy | dict | None = None,
    reference: Callable | None = None,
    check_undefined_grad: bool = False,
    order: int = 1,
    check_forward_ad: bool = False,
    check_backward_ad: bool = True,
    check_batched_grad: bool = False,
    check_batched_forward_grad: bool = False,
    check_grad_dtypes: bool = False,
    distributed=False,
) -> CheckReport:
    """Check autograd's gradient of ``func(*params)`` against finite differences, entry by entry (or, with
    ``reference=``, against a validated plain-PyTorch reference: for float16/bfloat16 kernels).

    Args:
        func: called as ``func(*params)``; returns a one-element floating tensor (the loss).
        params: tuple or list of tensors on one device. Never modified (nor their ``.grad``): autograd and the
            finite differences run on private copies. Complex tensors (and complex outputs) are checked as their
            real pairs, in PyTorch's convention (:mod:`gradfd.wirtinger`); their records name the part.
        wrt: indices into ``params`` to check; default every floating tensor with ``requires_grad=True``.
        mode: ``"full"`` (every entry; for tensor-valued functions with an elementwise, broadcasting or row-wise
            Jacobian, checked by colors -- many inputs perturbed together, a few backward passes -- when both sides
            confirm the pattern, else by exact columns), ``"sample"`` (``samples`` entries per tensor: the largest
            |gradient| entries and a seeded uniform sample of the rest) or ``"directional"`` (``directions``
            random Gaussian directions, comparing d/dt f(x + t u) with <grad, u> on a ladder of steps, 24
            evaluations a direction; cost independent of the size; an error on one of N entries moves each
            directional derivative by that entry's share only: docs/verdicts.md, "Directional mode").
        samples: entries per tensor in sample mode (default 256). directions: directions in directional mode
            (default 8).
        h: absolute step, or None (default) for the automatic per-entry step ``~eps**(1/(order+1)) * max(1, |x|)``
            (directional mode evaluates a ladder from 2^ladder_low to 2^ladder_high times it: 2^-12 to 8 by default).
        stencil: ``"four_point"`` (default: the most accurate within 2x the cost of central differences),
            ``"central"`` or ``"richardson"``.
        atol, rtol: replace the dtype floors (64 eps, relative to the entry and to the tensor's largest entry; in
            directional mode to the direction's derivative and to ``||(uᵀJ) * v||_2``); the finite difference's own
            error estimate is always added to the tolerance.
        engine, batching, chunk_size, memory_budget: as in :func:`gradfd.numerical_gradient`.
        seed: seeds the sample and the directions.
        raise_on_failure: raise :class:`GradientCheckError` (carrying the report) when an entry disagrees.
        nondet_tol: None (default) skips the reentrancy check. A float runs the backward twice on the same graph,
            with the same output gradients (1 for a loss; a fixed random unit vector per output otherwise), and fails
            the tensors whose two results differ by more than this, absolutely, in any entry (atomics in CUDA
            backward kernels); ``0.0`` asks for identical results, as ``torch.autograd.gradcheck``'s default
            does. Each record's ``details["backward_spread"]`` holds the measured difference. Costs two backward
            passes in all.
        progress: None (default): once the check's measured rate says it will take more than 10 s, a progress bar
            with the time left appears (tqdm, on stderr, when it is a terminal), and above 10 min a
            :class:`gradfd.CostWarning` gives the estimate and those of mode="sample" and "directional"
            (:mod:`gradfd.progress`). True: a bar from the start; False: neither; or a ``callable(done, total)``
            counting checked coordinates (directions in directional mode).
        policy: the verdict thresholds: None (default: :data:`gradfd.verdict.policy.DEFAULT_POLICY`), a
            :class:`gradfd.verdict.policy.Policy`, or a mapping of field overrides (``{"tolerance_safety": 3.0}``).
            An explicit ``atol``/``rtol`` still replaces the floors that ``floor_eps`` sets.
        reference: None (default), or the same mathematical function as ``func`` in plain PyTorch, called with the
            same arguments (``reference(*params)``), returning what ``func`` returns (same shapes, dtype families
            and device). Reference mode (docs/half-precision.md): the reference's float64 autograd is first checked
            against float64 finite differences (by ``mode``, ``samples``, ``directions``, ``h``, ``stencil`` and
            the engine options, on the scalar ``<reference(*params), v>`` for the first cotangent ``v``, to
            ``reference_truth_share`` of the judged dtype's eps relative to each entry); then
            ``func``'s vjps with ``Policy.reference_cotangents`` seeded Gaussian cotangents (1 for a loss) are
            compared, every entry, with the reference's in float64, within ``reference_factor`` times what the
            reference itself achieves in ``func``'s dtype at that entry (plus its RMS over the tensor), plus
            ``reference_floor_eps`` eps (``atol``/``rtol`` replace that floor). Records have ``mode ==
            "reference"``: ``numerical`` is the reference's float64 value, ``analytical`` func's, and
            ``details["reference"]`` holds func's largest error, the reference's in func's dtype and their
            ratio. ``nondet_tol`` compares two runs of func's backward with the first cotangent.
        check_undefined_grad: False (default) or True: also run ``torch.autograd.gradcheck``'s undefined-gradient
            check (:func:`undefined_grad_problems`): with its output gradients undefined, func's backward must give
            every checked input a zero (or no) gradient. A tensor where it does not fails, with the record's
            ``undefined_grad`` saying what the backward did; ``details["undefined_grad"]`` is ``"passed"``
            otherwise. Costs one forward and one to ``1 + outputs`` backward passes.
        order: 1 (default) or 2. ``order=2`` checks the double backward (:mod:`gradfd.second_order`): autograd's
            derivative of the first-order gradient ``g(*params, *v) = grad(func(*params), params[wrt], v)``, with
            output gradients ``v`` (1 for a one-element output, else seeded Gaussian), against finite differences of
            that analytical ``g``, by ``mode``, with respect to the checked params and to ``v`` (a backward that
            detaches its output gradient fails there): full mode one Hessian column per entry, sample mode sampled
            columns, directional mode ``uᵀ H v``. Records are named ``"grad(params[j]) wrt params[k]"`` and
            ``"grad(params[j]) wrt grad_outputs[i]"`` (``"grads wrt params[k] (u^T H v)"`` in directional mode)
            and carry ``details["order"] = 2``. Each finite-difference point costs a forward and a backward pass of
            func; the analytical side one double backward per Hessian row (batched where the backward allows).
            ``nondet_tol``, ``check_undefined_grad`` and ``check_forward_ad`` (forward over reverse) then apply to
            the first-order gradient's derivatives. Not with ``reference``.
        check_forward_ad: False (default) or True: also judge forward-mode AD (``torch.autograd.forward_ad``: a
            custom Function's ``jvp`` rule) against the same finite differences, by the same rules and ``mode``
            (:class:`gradfd.jacobian.ForwardAnalytical`): full and sample mode compare Jacobian columns, one jvp per
            entry (a colored pass one jvp per input color; sample mode alone picks a seeded uniform sample, as the
            largest entries need every column); directional mode compares ``uᵀ J v`` from jvps of each node's
            realised displacement. Records are named ``"... (forward AD)"`` with ``details["ad"] == "forward"``.
            With ``check_undefined_grad``, the jvp must also treat an undefined input tangent as zeros
            (:func:`undefined_tangent_problems`). The finite differences are evaluated again for this side (twice
            the cost of one side).
        check_backward_ad: True (default): judge reverse-mode AD (the backward). False with
            ``check_forward_ad=True`` judges forward mode alone.
        check_batched_grad, check_batched_forward_grad: False (default) or True: the backward (forward-mode AD) run
            under vmap over two seeded Gaussian output gradients (tangents) must give what a loop gives, within the
            verdicts' floor (:func:`gradfd.rules.batched_grad_problems`,
            :func:`~gradfd.rules.batched_forward_problems`);
            need ``check_backward_ad`` (``check_forward_ad``).
        check_grad_dtypes: False (default) or True: every gradient (output tangent) has its input's (output's)
            dtype, device and shape (:func:`gradfd.rules.grad_dtype_problems`). A finding of these three fails the
            record, in ``findings``.
        distributed: False (default); True (the default ``torch.distributed`` process group), a ``ProcessGroup``,
            or :class:`gradfd.distributed.Distributed` (a group and the collectives' timeout, default 300 s): the
            finite differences are shared out over the group's ranks, which must all call ``check`` with the same
            problem (verified: parameters, options, unperturbed outputs and analytical gradient); every rank
            returns the same report, bitwise equal to one process's with the same choices (:mod:`gradfd.distributed`;
            docs/distributed.md).

    Returns:
        A :class:`CheckReport`: ``str(report)`` is a table, ``report.passed`` the verdict: no entry disagrees, no
        backward was non-deterministic beyond ``nondet_tol``, and (with ``check_undefined_grad``) none mishandles
        undefined output gradients. Unresolved entries do not fail, so a tensor whose
        every entry is unresolved passes (the headline says "PASSED (but nothing could be compared for ...)");
        ``report.uncompared`` lists such tensors and ``report.verified`` is ``passed`` without any, the verdict of
        :func:`gradfd.gradcheck` and :func:`gradfd.testing.assert_gradients_match`.

    float32, float16 and bfloat16 functions are evaluated in their own dtype; differences and reductions are in
    float64 (a scalar loss's full ``sum``/``mean`` and loss reductions are widened while the finite differences
    evaluate it, when that reproduces ``func``'s own loss: :mod:`gradfd.reductions`); TF32 is off during the check.
    The caller's RNG state is restored.

    An entry whose stencil reaches outside ``func``'s domain (a NaN/inf value, or a node where ``func`` raises) is
    checked at smaller steps, where its stencil is finite (see the module docstring); the report's notes say so.

    Raises:
        GradientCheckError: a gradient entry disagrees, the backward is non-deterministic beyond ``nondet_tol``, or
            it mishandles undefined output gradients (``check_undefined_grad``), with ``raise_on_failure``; not when
            nothing could be compared (see Returns).
        Exception: what ``func`` raised, when it raised at the unperturbed point, or at every perturbed node of a
            tensor at every step tried (with a note saying so).
        TypeError / ValueError / IndexError: bad arguments, naming the argument and what was passed (``policy``:
            an unknown field, listing the valid ones, or a value of the wrong type or out of range; ``reference``:
            not callable, outputs that differ from func's in number, shape, dtype family or device, or a float64
            func).
        ValueError: ``order`` other than 1 or 2, ``order=2`` or ``check_forward_ad`` with ``reference``, both
            ``check_forward_ad`` and ``check_backward_ad`` False, or a batched check without its side.
        Exception: what forward-mode AD raised (``check_forward_ad``; a Function without a ``jvp`` rule raises
            there), with a note saying so.
        InvalidReferenceError: ``reference``'s float64 gradient disagrees with its float64 finite differences (or
            none of its entries could be compared); ``.report`` holds that check, the message names the entries.
        gradfd.distributed.DistributedError: (``distributed``) the ranks' problems differ, naming what differs, or a
            rank died or did not answer within the timeout. An exception on one rank is raised on every rank, with a
            note naming the rank. RuntimeError: ``distributed=True`` without an initialized process group.
    """
    arguments = dict(locals())  # (order 2, and complex tensors, check a derived function with these arguments)
    params, _ = check_params(params)
    session = _distributed.resolve(distributed) or _distributed.active()  # (a check inside one: reference mode)
    if session is not None and _distributed.active() is None:  # the outermost check of a distributed run
        return _check_distributed(session, arguments, params)
    if _wirtinger.has_complex(params):
        return _check_pairs(arguments, params)
    wrt_idx = _resolve_wrt(params, wrt)
    check_choice(mode, "mode", MODES)
    samples = check_positive_int(samples, "samples") or DEFAULT_SAMPLES
    directions = check_positive_int(directions, "directions") or DEFAULT_DIRECTIONS
    sten = stencils.get_stencil(stencil if stencil is not None else stencils.DEFAULT_STENCIL)
    if h is not None:
        h = check_step(h)
    for name, value in (("atol", atol), ("rtol", rtol), ("nondet_tol", nondet_tol)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise ValueError(f"{name} must be a finite float >= 0 or None, got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {describe(seed)}")
    rules = _resolve_rules(check_forward_ad, check_backward_ad, check_undefined_grad, check_batched_grad,
                           check_batched_forward_grad, check_grad_dtypes, order, reference)
    if not callable(func):
        raise TypeError(f"func must be callable, got {describe(func)}")
    policy = resolve_policy(policy)
    if order == 2:
        n = len(params)
        cots = _second_order.output_gradients(func, params, SEEDS.second_order(seed))
        g = _second_order.gradient_function(func, wrt_idx, len(cots))
        with _second_order.unbatchable():
            report = check(**{**arguments, "func": g, "params": (*params, *cots), "policy": policy, "order": 1,
                              "wrt": [*wrt_idx, *range(n, n + len(cots))], "raise_on_failure": False})
        _second_order.rename(report, wrt_idx, n, g.lost)
        if raise_on_failure and not report.passed:
            raise GradientCheckError(report)
        return report
    if reference is not None:
        report = _check_against_reference(func, reference, params, wrt_idx, dict(
            mode=mode, samples=samples, directions=directions, h=h, stencil=stencil, engine=engine, seed=seed,
            batching=batching, chunk_size=chunk_size, memory_budget=memory_budget, progress=progress,
            policy=policy), atol, rtol, nondet_tol)
        return _finish(report, func, params, wrt_idx, rules, raise_on_failure, seed)

    budget = _engine.parse_memory_budget(memory_budget) or _distributed.memory_budget(params[wrt_idx[0]].device)
    rng = _engine.RngGuard()
    records = []
    total = (check_backward_ad + check_forward_ad) * sum(
        directions if mode == "directional" else min(samples, params[k].numel()) if mode == "sample"
        else params[k].numel() for k in wrt_idx)
    cheaper = {"sample": sum(min(samples, params[k].numel()) for k in wrt_idx),
               "directional": directions * len(wrt_idx)}
    cheaper = {m: u for m, u in cheaper.items() if MODES.index(m) > MODES.index(mode)}
    bar = Progress(progress, total, mode, cheaper)
    tick, close_bar = bar.tick, bar.close
    try:
        with no_tf32(), _engine.warnings_once():
            sides = []  # the analytical Jacobians judged: reverse mode's, forward mode's
            if check_backward_ad:
                sides.append(_jacobian.Analytical(func, params, wrt_idx, budget // 2))
                rng.close()  # (every side, and the finite differences, see the random draws of the caller's state)
            if check_forward_ad:
                sides.append(_jacobian.ForwardAnalytical(func, params, wrt_idx, budget // 2))
            analytical = sides[0]
            if analytical.scalar:
                _engine.validate_scalar_output(analytical.outputs[0], detach=False)
            elif not analytical.spec.kept:
                raise ValueError(f"func returned no floating-point output to compare (outputs "
                                 f"{[d for _, d in analytical.spec.skipped]} have no gradient)")
            if session is not None:  # the ranks check one problem: the same outputs, the same gradient
                _verify_analytical(analytical, wrt_idx)
            nondet = _backward_spreads(analytical, wrt_idx, seed) if nondet_tol is not None and check_backward_ad \
                else {}
            rng.close()  # the finite differences see the random draws autograd saw
            for analytical, k in ((a, k) for a in sides for k in wrt_idx):
                p = params[k]
                if mode == "directional":
                    evaluator = Directions(func, params, k, analytical, directions, h, sten, batching, seed,
                                           budget // 2, policy)
                    reports = [directional_report(evaluator, k, p, directions, atol, rtol, sten, h, analytical,
                                                  policy)]
                    tick(directions)
                else:
                    if mode == "full":
                        coords = torch.arange(p.numel(), device=p.device)
                    else:
                        scorer = sides[0]  # reverse mode's gradient picks the largest entries; forward mode alone
                        # would need every column for it: its sample is then uniform (seeded)
                        score = (torch.rand(p.numel(), generator=torch.Generator().manual_seed(seed + k),
                                            dtype=torch.float64).to(p.device) if scorer.forward else
                                 scorer.columns(k, torch.arange(p.numel(), device=p.device))[:, 0]
                                 if scorer.scalar else scorer.vjp(k, torch.randn(
                                     scorer.spec.size, generator=torch.Generator().manual_seed(seed + k),
                                     dtype=torch.float64).to(p.device)))
                        coords = sample_coordinates(score, samples, seed + k)
                    reports = check_coordinates(Request(
                        func, params, k, analytical, coords, h, sten, engine, batching, chunk_size, memory_budget,
                        atol, rtol, mode, policy, tick))
                    _attach_plot_context(reports, func, params, k, analytical, sten, h, policy, rng)
                if analytical.forward:
                    for r in reports:
                        r.name += " (forward AD)"
                        r.details["ad"] = "forward"
                if k in nondet and not analytical.forward:
                    for r in reports:
                        r.details["backward_spread"] = nondet[k]
                        if nondet[k] > nondet_tol:
                            r.nondeterminism = _nondeterminism(nondet[k], nondet_tol)
                records.extend(reports)
    except ComplexOutputs:  # real params, a complex output: checked as its real pairs (below, out of this handler)
        records = None
    finally:
        rng.close()
        close_bar()
    if records is None:
        return _check_pairs(arguments, params)
    notes = []
    if not analytical.scalar and analytical.spec.skipped:
        notes.append("skipped outputs without gradient: " + ", ".join(
            f"output[{i}] ({d})" for i, d in analytical.spec.skipped))
    return _finish(CheckReport(records, notes), func, params, wrt_idx, rules, raise_on_failure, seed)


def _check_distributed(session: _distributed.Session, arguments: dict, params: tuple) -> CheckReport:
    """:func:`check` over the ranks of ``session`` (:mod:`gradfd.distributed`): the parameters and options verified
    alike first, the report returned by every rank, with a note on the split."""
    options = {name: v if not callable(v) or isinstance(v, Policy) else getattr(v, "__qualname__", type(v).__qualname__)
               for name, v in arguments.items() if name not in ("params", "progress", "distributed")}
    progress = arguments["progress"] if session.rank == 0 or callable(arguments["progress"]) else False  # one bar
    with session.running({"params": params, "options": options}):
        report = check(**{**arguments, "distributed": session, "raise_on_failure": False, "progress": progress})
        session.verify({"report": [(t.name, t.verdict, t.entries, t.details, t.findings, t.detection_limit)
                                   for t in report.tensors]})  # every rank returns the same report, or raises
    report.notes.append(session.notes())
    if arguments["raise_on_failure"] and not report.passed:
        raise GradientCheckError(report)
    return report


def _verify_analytical(analytical: _jacobian.Analytical, wrt: Sequence[int]) -> None:
    """In a distributed check, every rank must see the same unperturbed outputs and (reverse mode) the same
    gradient, as a vjp of ones per checked tensor (:func:`gradfd.distributed.verify`)."""
    ones = torch.ones(analytical.spec.size, dtype=torch.float64, device=analytical.device)
    _distributed.verify({"unperturbed outputs": analytical.outputs,
                         "analytical gradient": None if analytical.forward else [analytical.vjp(k, ones) for k in wrt]})


def _check_pairs(arguments: dict, params: tuple) -> CheckReport:
    """:func:`check` of a function with complex inputs or outputs, as the real function of their real pairs
    (:mod:`gradfd.wirtinger`: PyTorch's convention, the conjugate Wirtinger derivative), its records marked so that
    they show the complex dtypes and name the parts."""
    if arguments["reference"] is not None:
        raise TypeError("reference mode compares real tensors: complex params or outputs are not supported with "
                        "reference (check the complex op without reference, in complex64 or complex128)")
    pairs_func, pairs_params = _wirtinger.as_pairs(arguments["func"], params)
    report = check(**{**arguments, "func": pairs_func, "params": pairs_params, "raise_on_failure": False})
    _wirtinger.mark(report, params, pairs_func.complex_outputs)
    if arguments["raise_on_failure"] and not report.passed:
        raise GradientCheckError(report)
    return report


def _finish(report: CheckReport, func: Callable, params: Sequence[torch.Tensor], wrt: Sequence[int],
            rules: dict[str, bool], raise_on_failure: bool, seed: int) -> CheckReport:
    """The last step of every check: the rule checks asked for (:mod:`gradfd.rules`; ``rules`` maps each to whether
    it was), their findings on every record of the input and side (reverse or forward mode) they concern, then the
    verdict (raising :class:`GradientCheckError` on failure, with ``raise_on_failure``)."""
    sides = {"forward" if t.details.get("ad") == "forward" else "backward" for t in report.tensors}
    checks = {("backward", "undefined_grad"): undefined_grad_problems,
              ("forward", "undefined_grad"): lambda *a: undefined_tangent_problems(*a, seed=seed),
              ("backward", "batched_grad"): lambda *a: batched_grad_problems(*a, seed=seed),
              ("forward", "batched_forward_grad"): lambda *a: batched_forward_problems(*a, seed=seed),
              ("backward", "grad_dtypes"): lambda *a: grad_dtype_problems(*a, forward=False, seed=seed),
              ("forward", "grad_dtypes"): lambda *a: grad_dtype_problems(*a, forward=True, seed=seed)}
    found = {(side, rule): run(func, params, wrt) for (side, rule), run in checks.items()
             if rules.get(rule) and side in sides}
    for t in report.tensors:
        side = "forward" if t.details.get("ad") == "forward" else "backward"
        # every record names its input once, as params[k] ("params[k]", "output[j] wrt params[k]", ...)
        k = int(re.findall(r"params\[(\d+)\]", t.name)[-1])  # (order 2: "grad(params[j]) wrt params[k]")
        for (s, rule), problems in found.items():
            if s != side:
                continue
            t.details[rule] = problems.get(k, "passed")
            if rule == "undefined_grad":
                t.undefined_grad = problems.get(k)
            elif k in problems:
                t.findings[rule] = problems[k]
    if raise_on_failure and not report.passed:
        raise GradientCheckError(report)
    return report


def _check_against_reference(func: Callable, reference: Callable, params: list[torch.Tensor], wrt: list[int],
                             options: dict, atol: float | None, rtol: float | None,
                             nondet_tol: float | None) -> CheckReport:
    """:func:`check` with ``reference=`` (gradfd/verdict/against_reference.py has the rules): run both sides,
    validate the reference in float64 by finite differences, judge every entry, report."""
    if not callable(reference):
        raise TypeError(f"reference must be callable (the same function as func in plain PyTorch), got "
                        f"{describe(reference)}")
    policy = options["policy"]
    rng = _engine.RngGuard()
    try:
        with no_tf32(), _engine.warnings_once():
            run = _against.run(func, reference, params, wrt, policy, options["seed"], rng.close,
                               twice=nondet_tol is not None)
            rng.close()
            params64 = [p.detach().to(torch.float64) if p.is_floating_point() else p for p in params]
            draw = [None if c is None else c.to(torch.float64) for c in run.cots[0]]

            def projected(*args):  # <reference(*args), v>: its gradient is the truth the op is held to
                outs = _against.outputs_of(reference(*args), "reference")
                return sum((o * c).sum() for o, c in zip(outs, draw) if c is not None)

            # the truth needs confirming only to a share of the judged dtype's eps (the finest judged): a finer error
            # in it cannot move a verdict whose floor is reference_floor_eps eps
            judged = min((s.dtype for s in run.sides.values()), key=stencils.eps)
            validation = check(projected, params64, wrt=wrt, raise_on_failure=False,
                               rtol=policy.reference_truth_share * torch.finfo(judged).eps, **options)
    finally:
        rng.close()
    if not validation.verified:
        raise InvalidReferenceError(validation)
    spreads = {} if run.again is None else {k: _difference(run.again[k], run.sides[k].op[0]) for k in wrt}
    records = []
    for k in wrt:
        v = validation[f"params[{k}]"]
        e = v.entries
        unconfirmed = e["index"][e["verdict"] == UNRESOLVED] if v.mode != "directional" and e else None
        how = (f"its float64 gradient agrees with float64 finite differences ({v.mode} mode, {v.agree} of "
               f"{v.checked} {'directions' if v.mode == 'directional' else 'entries'} compared"
               + (f", {v.unresolved} unresolved" if v.unresolved else "") + ")")
        record = _against.judge(run.sides[k], k, tuple(params[k].shape), policy, atol, rtol, unconfirmed, how)
        if k in spreads:
            record.details["backward_spread"] = spreads[k]
            if spreads[k] > nondet_tol:
                record.nondeterminism = _nondeterminism(spreads[k], nondet_tol)
        records.append(record)
    return CheckReport(records, [_against.forward_note(run.op_outs, run.ref64_outs, run.low_outs)])


def _attach_plot_context(reports, func: Callable, params: Sequence[torch.Tensor], k: int, analytical: _jacobian.Analytical,
                         sten: stencils.Stencil, h: float | None, policy: Policy, rng: _engine.RngGuard) -> None:
    """Give each record of input ``k`` what :meth:`CheckReport.plot_entry` needs to evaluate ``func`` again
    (:class:`gradfd.plot.EntryContext`): one record per compared output, in ``analytical.spec.kept``'s order. It
    holds references to ``params`` and their version counters, never a copy (a model's parameters are not doubled
    for as long as the report lives)."""
    step_dtype = stencils.coarsest([params[k].dtype, *analytical.spec.dtypes])
    outputs = [None] if analytical.scalar else analytical.spec.kept
    for record, output in zip(reports, outputs):
        record.plot_context = EntryContext(
            func, tuple(params), k, output, sten, h, step_dtype, policy.refine,
            policy.refine_rounds + policy.curvature_rounds, policy.min_step_ulps, no_tf32, rng.cpu,
            tuple(None if q.is_inference() else q._version for q in params), rng.cuda, f"params[{k}]")


# judge and refine as tests/test_check.py's synthetic evaluators call them: the default policy, tuples returned.
_Entries = Entries


def _verdicts(e: Entries, floor: torch.Tensor, settled: torch.Tensor | None = None):
    """:func:`gradfd.verdict.judge.judge` as ``(verdict, tolerance, nonsmooth)``."""
    j = _judge.judge(e, floor, DEFAULT_POLICY, settled)
    return j.verdict, j.tol, j.nonsmooth


def refine(e: Entries, verdict: torch.Tensor, tol: torch.Tensor, nonsmooth: torch.Tensor, evaluator, floor_of,
           limit: torch.Tensor | None = None, margin: int = 2):
    """:func:`gradfd.verdict.refine.refine` as ``(entries, verdict, tolerance, evaluations)``."""
    r = _refine.refine(e, _judge.Judgement(verdict, tol, nonsmooth), evaluator, floor_of, DEFAULT_POLICY, limit,
                       margin=margin)
    return r.entries, r.judgement.verdict, r.judgement.tol, r.evaluations
