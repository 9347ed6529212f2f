"""``gradfd.check_module``: check the gradients of a ``torch.nn.Module``'s parameters (and optionally its inputs).

The module runs through ``torch.func.functional_call`` on private copies of its parameters and buffers, so that
its parameters, their ``.grad``, its buffers and every submodule's ``training`` flag are bitwise unchanged after
every call, failed ones included. Rules:

- **Which tensors.** ``wrt=None`` checks every parameter with ``requires_grad``; frozen ones are listed in the
  report's notes, never silently dropped. Names and ``fnmatch`` patterns select others. A parameter shared by
  several names (tied weights) is checked once and its row carries every name.
- **Which loss.** ``loss(output)`` when given. Otherwise a one-element floating output is the loss, and any other
  output (a tensor, or a tuple such as an RNN's ``(out, h)``) is reduced with a fixed seeded random projection
  ``sum_i <v_i, out_i>`` in float64, with ``v_i`` standard normal over sqrt(numel); the report's notes say so.
- **Batch statistics.** A BatchNorm layer in training mode normalises with the batch's statistics and only
  updates its running statistics as a side effect; gradfd runs it without running statistics (the output is the
  same), so that the side effect neither leaks into the module nor stops batched evaluation.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten

from .check import check
from .engine import RngGuard
from .report import CheckReport, GradientCheckError, InvalidReferenceError
from .validation import describe

__all__ = ["check_module"]

PROJECTION_SEED = 0x5EED  # seeds the random projection of a non-scalar output (loss=None); fixed, so reruns agree


@dataclass(frozen=True)
class _Target:
    """One checked tensor: its names (several for a tied parameter) and the tensor itself."""

    names: tuple[str, ...]
    tensor: torch.Tensor
    kind: str  # "parameter", "input" or "kwarg"
    slot: int | str | None = None  # the input's position, or the kwarg's key

    @property
    def label(self) -> str:
        return " = ".join(self.names)


def _as_inputs(inputs) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, tuple):
        return inputs
    if isinstance(inputs, list):
        return tuple(inputs)
    raise TypeError(f"inputs must be a tensor or a tuple of the module's positional inputs, got {describe(inputs)}")


def _parameters(module: torch.nn.Module) -> list[_Target]:
    """Every distinct parameter once, with all the names it goes by (tied weights)."""
    by_id: dict[int, list] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        entry = by_id.setdefault(id(p), [[], p])
        entry[0].append(name)
    return [_Target(tuple(names), p, "parameter") for names, p in by_id.values()]


def _select(params: list[_Target], wrt) -> tuple[list[_Target], list[str]]:
    """The parameters ``wrt`` selects, and the frozen ones skipped by default."""
    if wrt is None:
        chosen = [t for t in params if t.tensor.requires_grad]
        frozen = [t.label for t in params if not t.tensor.requires_grad]
        return chosen, frozen
    patterns = (wrt,) if isinstance(wrt, str) else wrt
    if not isinstance(patterns, (tuple, list)) or not all(isinstance(w, str) for w in patterns) or not patterns:
        raise TypeError(f"wrt must be a parameter name, a glob pattern, or a non-empty sequence of them, got "
                        f"{describe(wrt)}")
    chosen = [t for t in params if any(fnmatch.fnmatchcase(n, w) for n in t.names for w in patterns)]
    unmatched = [w for w in patterns if not any(fnmatch.fnmatchcase(n, w) for t in params for n in t.names)]
    if unmatched:
        names = [n for t in params for n in t.names]
        raise ValueError(f"wrt: {unmatched} match no parameter of the module; its parameters are {names}")
    return chosen, []


def _inexact(t) -> bool:
    """A floating or complex tensor: one that has gradients (complex ones checked as real pairs)."""
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t.resolve_conj()) if t.is_complex() else t


def _floating_inputs(args: tuple, kwargs: dict) -> list[_Target]:
    found = [_Target((f"inputs[{i}]",), a, "input", i) for i, a in enumerate(args) if _inexact(a)]
    found += [_Target((f"kwargs[{k!r}]",), v, "kwarg", k) for k, v in kwargs.items() if _inexact(v)]
    return found


def _projection(output) -> tuple[Callable[[Any], torch.Tensor], str]:
    """A seeded random projection of every floating (and complex: its real pairs) tensor in ``output`` to one
    float64 number."""
    leaves = [_real(t) for t in tree_flatten(output)[0] if _inexact(t)]
    if not leaves:
        raise ValueError(f"the module's output has no floating tensor to check (got {describe(output)}); pass loss=")
    gen = torch.Generator().manual_seed(PROJECTION_SEED)
    weights = [(torch.randn(t.shape, generator=gen, dtype=torch.float64) / max(t.numel(), 1) ** 0.5).to(t.device)
               for t in leaves]

    def project(out) -> torch.Tensor:
        outs = [_real(t) for t in tree_flatten(out)[0] if _inexact(t)]
        return sum((o.to(torch.float64) * v).sum() for o, v in zip(outs, weights))

    shapes = ", ".join("x".join(map(str, t.shape)) or "scalar" for t in leaves)
    return project, (f"loss=None: the module's floating outputs ({shapes}) were reduced to one number by a fixed "
                     f"random projection sum_i <v_i, out_i> (float64, v_i ~ N(0, 1/numel), seed {PROJECTION_SEED})")


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """Private copies of the buffers; a training BatchNorm's running statistics are left out (None)."""
    skip = set()
    for prefix, sub in module.named_modules():
        if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm) and sub.training and sub.track_running_stats:
            stats = ("running_mean", "running_var", "num_batches_tracked")
            skip.update(f"{prefix}.{b}" if prefix else b for b in stats)
    return {name: None if name in skip else b.detach().clone()
            for name, b in module.named_buffers(remove_duplicate=False)}


def _renamed(report: CheckReport, targets: list[_Target]) -> CheckReport:
    """Rows and notes named by parameter names instead of ``params[k]``."""
    labels = {f"params[{k}]": t.label for k, t in enumerate(targets)}
    pattern = re.compile(r"params\[\d+\]")

    def sub(text: str) -> str:
        return pattern.sub(lambda m: labels.get(m.group(0), m.group(0)), text)

    for t in report.tensors:
        t.name = sub(t.name)
        if t.plot_context is not None:
            t.plot_context = dataclasses.replace(t.plot_context, label=sub(t.plot_context.label))
        t.details = {k: sub(v) if isinstance(v, str) else v for k, v in t.details.items()}
        t.nondeterminism = sub(t.nondeterminism) if t.nondeterminism else t.nondeterminism
        t.undefined_grad = sub(t.undefined_grad) if t.undefined_grad else t.undefined_grad
        t.findings = {rule: sub(text) for rule, text in t.findings.items()}
    report.notes = [sub(n) for n in report.notes]
    return report


def check_module(
    module: torch.nn.Module,
    inputs: torch.Tensor | Sequence[Any],
    *,
    kwargs: dict[str, Any] | None = None,
    loss: Callable[[Any], torch.Tensor] | None = None,
    wrt: str | Sequence[str] | None = None,
    check_inputs: bool = False,
    **check_options: Any,
) -> CheckReport:
    """Check autograd's gradients of a module's parameters (and optionally inputs) against finite differences.

    Args:
        module: the ``torch.nn.Module``; its mode (train/eval) is used as it is.
        inputs: a tensor, or a tuple of the module's positional inputs, on the parameters' device.
        kwargs: keyword inputs of ``module.forward`` (masks, for instance); default none.
        loss: ``loss(output) -> one-element floating tensor``, where ``output`` is what the module returns. Default:
            a one-element floating output is the loss; any other output is reduced by a fixed seeded random
            projection (see the module docstring), and the report's notes say so.
        wrt: parameter names or ``fnmatch`` glob patterns (``"0.*"``, ``"*.weight"``); default every parameter
            with ``requires_grad`` (frozen ones are skipped and listed in the notes).
        check_inputs: also check the floating tensors among ``inputs`` and ``kwargs``.
        **check_options: passed to :func:`gradfd.check` (``mode``, ``samples``, ``directions``, ``atol``,
            ``rtol``, ``engine``, ``batching``, ``progress``, ``policy``, ``raise_on_failure``, ``distributed``
            (every rank calls ``check_module`` on its own copy of the module: its parameters and inputs are verified
            equal across ranks, its buffers through the unperturbed outputs), ...).
            ``reference=`` takes a module here: a plain-PyTorch version of ``module`` with the same parameter names
            (a fused layer's unfused twin), run with ``module``'s parameter values (and its own buffers) through
            the same ``loss``; reference mode then judges ``module``'s gradients against it
            (docs/half-precision.md).

    Returns:
        The :class:`CheckReport`, its rows named by parameter name (``"0.weight"``), ``"inputs[i]"`` or
        ``"kwargs['name']"``; a tied parameter's row carries every name (``"embed.weight = head.weight"``).

    Raises:
        TypeError: ``module`` is not a Module, ``inputs``/``kwargs``/``wrt``/``loss`` of the wrong kind, or a
            ``check_options`` key that :func:`gradfd.check` does not take (``func``, ``params`` and ``wrt``
            belong to check_module).
        ValueError: ``wrt`` matches no parameter, nothing to check, inputs on another device than the parameters,
            a loss that is not one floating value, or a ``reference`` module without one of ``module``'s parameter
            names.
        GradientCheckError: an entry disagrees (unless ``raise_on_failure=False``).
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {describe(module)}")
    args = _as_inputs(inputs)
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(f"kwargs must be a dict of the module's keyword inputs, got {describe(kwargs)}")
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be a callable taking the module's output, got {describe(loss)}")
    for bad in ("func", "params"):
        if bad in check_options:
            raise TypeError(f"check_module got {bad}=: the module and its inputs are the function and the params")
    raise_on_failure = check_options.pop("raise_on_failure", True)
    reference = check_options.pop("reference", None)
    if reference is not None and not isinstance(reference, torch.nn.Module):
        raise TypeError(f"reference must be a torch.nn.Module with the module's parameter names (check_module runs it "
                        f"with the module's parameter values), got {describe(reference)}")

    params = _parameters(module)
    chosen, frozen = _select(params, wrt)
    if check_inputs:
        chosen = chosen + _floating_inputs(args, kwargs)
    if not chosen:
        raise ValueError("nothing to check: the module has no parameter with requires_grad (and check_inputs is "
                         "False); pass wrt= names, set requires_grad, or check_inputs=True")
    devices = ({t.tensor.device for t in params} | {b.device for b in module.buffers()}
               | {a.device for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)})
    if len(devices) > 1:
        raise ValueError(f"inputs must be on the module's device (its parameters' and buffers'): got tensors on "
                         f"{sorted(map(str, devices))}; move them with .to(device)")

    fixed = {n: t.tensor.detach() for t in params for n in t.names}  # parameters not checked stay as they are
    buffers = _buffers(module)
    notes = []
    if frozen:
        notes.append(f"not checked (requires_grad=False): {', '.join(frozen)}")

    if reference is not None:
        have = {n for n, _ in reference.named_parameters(remove_duplicate=False)}
        missing = [n for n in fixed if n not in have]
        if missing:
            raise ValueError(f"reference: a module with the module's parameter names is needed; it lacks "
                             f"{missing[:5]}{' ...' if len(missing) > 5 else ''} (it has {sorted(have)[:5]} ...)")
    ref_buffers = _buffers(reference) if reference is not None else {}

    def call(*tensors, target: torch.nn.Module = module, own: dict = buffers, widen: bool = False):
        state = dict(fixed)
        call_args, call_kwargs = list(args), dict(kwargs)
        for t, x in zip(chosen, tensors):
            if t.kind == "parameter":
                state.update((n, x) for n in t.names)
            elif t.kind == "input":
                call_args[t.slot] = x  # by position: one tensor passed twice is two inputs
            else:
                call_kwargs[t.slot] = x
        state.update(own)
        if widen:  # reference mode's float64 run: every floating tensor the module reads, not only the checked
            state = {n: _widened(v) for n, v in state.items()}
            call_args, call_kwargs = [_widened(a) for a in call_args], {n: _widened(v) for n, v in call_kwargs.items()}
        return torch.func.functional_call(target, state, tuple(call_args), call_kwargs, tie_weights=False,
                                          strict=False)

    before = {n: b.clone() for n, b in buffers.items() if b is not None}
    with torch.no_grad():
        out = _guarded(module, lambda: call(*(t.tensor.detach() for t in chosen)))
    # a forward that updates a buffer in place makes every evaluation see the state the previous one left: the
    # finite differences would not be of one function (tests/test_module.py::test_a_forward_that_updates_a_buffer)
    updated = [n for n, b in before.items() if not torch.equal(b, buffers[n])]
    if updated:
        raise ValueError(f"module: its forward updates the buffer(s) {updated} in place, so each evaluation would see "
                         "the state the previous one left and no single function could be checked; put the module "
                         "(or those layers) in eval mode, or check a forward that does not update them")
    reduce = loss
    if reduce is None:
        if isinstance(out, torch.Tensor) and out.numel() == 1 and out.is_floating_point():
            reduce = _identity
        else:
            reduce, note = _projection(out)
            notes.append(note)
    else:
        with torch.no_grad():
            value = reduce(out)
        if not (isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point()):
            raise ValueError(f"loss must return a one-element floating tensor (the loss) from the module's output, "
                             f"got {describe(value)}")

    def func(*tensors):
        return reduce(call(*tensors))

    if reference is not None:
        def reference_func(*tensors):
            # reference mode runs the reference in float64 by passing float64 copies of the checked tensors: the
            # rest of its state follows
            widen = any(t.dtype == torch.float64 != c.tensor.dtype for t, c in zip(tensors, chosen))
            return reduce(call(*tensors, target=reference, own=ref_buffers, widen=widen))

        check_options["reference"] = reference_func
    tensors = tuple(t.tensor.detach().requires_grad_() for t in chosen)

    def run():
        try:
            return check(func, tensors, raise_on_failure=False, **check_options)
        except InvalidReferenceError as exc:  # its records named by parameter, as the report's are
            raise InvalidReferenceError(_renamed(exc.report, chosen)) from None

    report = _guarded(module, run if reference is None else lambda: _guarded(reference, run))
    report = _renamed(report, chosen)
    report.notes = notes + report.notes
    if raise_on_failure and not report.passed:
        raise GradientCheckError(report)
    return report


def _widened(v):
    """``v`` in float64 where it is a floating tensor of another dtype; anything else as it is."""
    return v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _identity(out: torch.Tensor) -> torch.Tensor:
    return out


def _guarded(module: torch.nn.Module, run: Callable[[], Any]) -> Any:
    """Run ``run()`` and put every submodule's ``training`` flag and the RNG states back afterwards, whatever
    happens (dropout draws in the calls gradfd makes leave no trace)."""
    flags = [(m, m.training) for m in module.modules()]
    rng = RngGuard()
    try:
        return run()
    finally:
        rng.close()
        for m, flag in flags:
            m.training = flag
