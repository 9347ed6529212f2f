"""``gradfd.gradcheck``: a drop-in for ``torch.autograd.gradcheck`` backed by :func:`gradfd.check`.

Replacing ``from torch.autograd import gradcheck`` by ``from gradfd import gradcheck`` keeps the call sites and
the return value (True, or False / an exception on failure). Unlike torch's, it checks float32 (and half)
functions in their own dtype with tolerances derived from the finite difference's error estimate, and in
``fast_mode`` its directional check's tolerance is not inflated by sqrt(N) (what one wrong entry among many it
resolves, per dtype and size: docs/benchmarks.md, "What directional mode can see").

What torch's defaults check, it checks too: the backward is run twice and must agree exactly (``nondet_tol=0.0``);
a tensor where nothing could be compared fails; and with ``check_undefined_grad=True`` (the default) the backward must
treat undefined output gradients as zeros (:func:`gradfd.rules.undefined_grad_problems`), reported per input. Its
options -- forward-mode AD, batched gradients, gradient dtypes -- are performed, each by :func:`gradfd.check`'s
option of the same name.

``gradfd.gradgradcheck`` is ``torch.autograd.gradgradcheck``'s drop-in: the first-order gradient (with its output
gradients as further inputs, as torch does) checked by :func:`gradcheck`, so that the double backward gets the same
per-entry verdicts (:mod:`gradfd.second_order`).
"""

from __future__ import annotations

import numbers
from typing import Callable, Sequence

import numpy as np
import torch
from torch.autograd.gradcheck import GradcheckError as _TorchGradcheckError

from .check import check
from .second_order import differentiable_outputs, gradient_function, rename, unbatchable
from .validation import check_step, describe
from .verdict.policy import SEEDS
from .report import CheckReport, GradientCheckError

__all__ = ["gradcheck", "gradgradcheck", "GradcheckError"]


class GradcheckError(_TorchGradcheckError, GradientCheckError):
    """Raised by :func:`gradcheck` on failure: both torch's ``GradcheckError`` (so existing ``except`` clauses
    work) and gradfd's :class:`GradientCheckError` (``.report`` holds the :class:`CheckReport`). The message is the
    report's table, after ``headline`` when one is given (what failed, when the table alone does not say)."""

    def __init__(self, report: CheckReport, headline: str | None = None):
        GradientCheckError.__init__(self, report)
        if headline:
            self.args = (f"{headline}\n{report}",)


# torch.autograd.gradcheck's other options: the values gradfd performs, keyed by option. Any other value raises
# NotImplementedError naming the option.
_SUPPORTED: dict[str, tuple] = {
    "check_undefined_grad": (True, False),  # True: torch's default
    "check_grad_dtypes": (True, False),
    "check_batched_grad": (True, False),
    "check_batched_forward_grad": (True, False),
    "check_forward_ad": (True, False),
    "check_backward_ad": (True, False),  # both False is torch's AssertionError, raised first
    "masked": (None, False),  # gradfd takes dense tensors only, for which torch treats None as False
}
_BOOL_OPTIONS = ("check_undefined_grad", "check_grad_dtypes", "check_batched_grad", "check_batched_forward_grad",
                 "check_forward_ad", "check_backward_ad")


def _validate_options(options: dict, raise_exception, fast_mode) -> dict:
    """torch's options with their defaults filled in; raise as torch does for inconsistent ones and
    NotImplementedError for those gradfd does not perform."""
    for name in options:
        if name not in _SUPPORTED:
            raise TypeError(f"gradcheck() got an unexpected keyword argument {name!r}")
    flags = {"raise_exception": raise_exception, "fast_mode": fast_mode,
             **{n: options[n] for n in _BOOL_OPTIONS if n in options}}
    for name, value in flags.items():
        # torch takes any truthy value: bools, 0/1 and numpy bools keep their call sites working; other types are
        # a mistake (a string "no" is truthy)
        if not isinstance(value, (bool, numbers.Integral, np.bool_)):
            raise TypeError(f"gradcheck(): {name} must be a bool, got {describe(value)}")
    options = {**options, **{n: bool(flags[n]) for n in _BOOL_OPTIONS if n in options}}
    masked = options.get("masked")
    if masked is not None and not isinstance(masked, bool):
        raise TypeError(f"gradcheck(): masked must be a bool or None, got {describe(masked)}")
    opts = {"check_undefined_grad": True, "check_grad_dtypes": False, "check_batched_grad": False,
            "check_batched_forward_grad": False, "check_forward_ad": False, "check_backward_ad": True,
            "masked": None, **options}
    # torch.autograd.gradcheck's own consistency checks, with its exception type (AssertionError) and message: with
    # check_backward_ad=False and check_forward_ad=False, torch does not return True; it refuses the call
    if not (opts["check_forward_ad"] or opts["check_backward_ad"]):
        raise AssertionError("Expected at least one of check_forward_ad or check_backward_ad to be True "
                             "(gradcheck() got check_backward_ad=False and check_forward_ad=False: nothing to check)")
    if opts["check_batched_grad"] and not opts["check_backward_ad"]:
        raise AssertionError("Setting check_batched_grad=True requires check_backward_ad to be True")
    if opts["check_batched_forward_grad"] and not opts["check_forward_ad"]:
        raise AssertionError("Setting check_batched_forward_grad=True requires check_forward_ad to be True")
    for name, value in opts.items():
        if value not in _SUPPORTED[name]:
            raise NotImplementedError(
                f"gradfd.gradcheck does not support {name}={value!r}: masked=True is for sparse inputs, and gradfd "
                "checks dense tensors (sparse inputs are refused); use torch.autograd.gradcheck for that check"
            )
    return opts


def gradcheck(
    func: Callable[..., torch.Tensor | Sequence[torch.Tensor]],
    inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    eps: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    raise_exception: bool = True,
    fast_mode: bool = False,
    nondet_tol: float | None = 0.0,
    **options,
) -> bool:
    """Check the gradients of ``func`` at ``inputs`` with gradfd; same signature and return value as
    ``torch.autograd.gradcheck``.

    Args:
        func: returns a tensor or a tuple of tensors.
        inputs: a tensor or a tuple of tensors; those that are floating with ``requires_grad=True`` are checked.
            Never modified (nor their ``.grad``).
        eps: finite-difference step; None (default) picks it per dtype and entry (torch's fixed 1e-6 is built for
            float64 only).
        atol, rtol: replace gradfd's dtype floors; the finite difference's own error estimate is always allowed.
        raise_exception: raise :class:`GradcheckError` on failure (default), else return False.
        fast_mode: compare random directional derivatives (``uᵀJv``) instead of the full Jacobian.
        nondet_tol: as in torch: the backward is run twice on the same graph with the same output gradients, and the
            two results must agree within this absolute tolerance in every entry; the default 0.0 asks for
            identical results. None skips this reentrancy check (a gradfd extension; torch has no such value).
        **options: torch's other options, each performed by :func:`gradfd.check`'s option of the same name (its
            docstring, and docs/custom-ops.md, say how). ``check_undefined_grad`` (default True, as in torch): with
            every output gradient undefined (and, for several outputs, each alone), the backward must give every
            input a zero or undefined gradient (and, with ``check_forward_ad``, a jvp must treat an undefined tangent
            as zeros); a failure names the input, the largest entry and what the backward did (the record's
            ``undefined_grad``). ``check_forward_ad`` (default False): forward-mode AD judged against the same
            finite differences, per entry (fast mode: directionally). ``check_backward_ad`` (default True).
            ``check_batched_grad``, ``check_batched_forward_grad``, ``check_grad_dtypes`` (default False): vmap
            over the backward (forward AD) against a loop; gradients in their input's dtype, device and shape.
            Both AD checks False, or a batched check without its side, raises AssertionError, as torch does.
            ``masked`` may be None or False (dense tensors); True raises NotImplementedError.

    Returns:
        True when no entry disagrees, the backward is reentrant (within ``nondet_tol``), (with
        ``check_undefined_grad``) treats undefined output gradients as zeros, the other options' rule checks found
        nothing (the records' ``findings``), and every checked tensor
        had at least one entry compared (``report.verified``): partly unresolved tensors (kinks) pass; a tensor
        whose every entry is unresolved (``sqrt`` at 0: every stencil leaves the domain) fails, naming the tensor.

    Raises:
        GradcheckError: on failure, with ``raise_exception``.
        NotImplementedError: an option gradfd does not support.
        AssertionError: options torch refuses together (``check_backward_ad=False`` with ``check_forward_ad=False``).
        TypeError: an option torch's gradcheck does not have, or an option of the wrong type.
        ValueError, TypeError, IndexError: bad ``eps``, ``atol``, ``rtol``, ``nondet_tol`` or ``inputs``, named (from
            :func:`gradfd.check`).
    """
    return _verdict(_report(func, inputs, eps, atol, rtol, raise_exception, fast_mode, nondet_tol, options),
                    raise_exception)


def _report(func, inputs, eps, atol, rtol, raise_exception, fast_mode, nondet_tol, options: dict,
            name: str = "gradcheck") -> CheckReport:
    """:func:`gradfd.check`'s report of ``func`` at ``inputs`` under torch's gradcheck options (validated)."""
    opts = _validate_options(options, raise_exception, fast_mode)
    params = _as_tuple(inputs, "inputs", name)
    if eps is not None:
        eps = check_step(eps, "eps")
    return check(func, params, mode="directional" if fast_mode else "full", h=eps, atol=atol, rtol=rtol,
                 raise_on_failure=False, nondet_tol=nondet_tol, **{n: opts[n] for n in _BOOL_OPTIONS})


def _verdict(report: CheckReport, raise_exception: bool) -> bool:
    """The drop-ins' verdict: True when ``report.verified``; else :class:`GradcheckError` or False."""
    if report.verified:
        return True
    if raise_exception:
        raise GradcheckError(report, report.uncompared_message())
    return False


def _as_tuple(value, what: str, name: str) -> tuple:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)):
        return tuple(value)
    raise TypeError(f"{name}(): {what} must be a tensor or a tuple of tensors, got {describe(value)}")


def gradgradcheck(
    func: Callable[..., torch.Tensor | Sequence[torch.Tensor]],
    inputs: torch.Tensor | Sequence[torch.Tensor],
    grad_outputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    *,
    eps: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    gen_non_contig_grad_outputs: bool = False,
    raise_exception: bool = True,
    nondet_tol: float | None = 0.0,
    check_undefined_grad: bool = True,
    check_grad_dtypes: bool = False,
    check_batched_grad: bool = False,
    check_fwd_over_rev: bool = False,
    check_rev_over_rev: bool = True,
    fast_mode: bool = False,
    masked: bool = False,
) -> bool:
    """Check the double backward of ``func`` at ``inputs`` with gradfd; same signature and return value as
    ``torch.autograd.gradgradcheck``.

    As torch does, this is :func:`gradcheck` of ``g(*inputs, *grad_outputs) = torch.autograd.grad(func's
    differentiable outputs, the inputs that require grad, grad_outputs, create_graph=True)``: finite differences of
    autograd's first-order gradient against its derivative (the double backward), every entry in the dtype of
    ``inputs`` (float32 is trusted), and, where ``grad_outputs`` require grad, the first-order gradient's
    derivative with respect to them too. Where ``func`` does not depend on an input, its gradient is zeros (torch
    leaves it out).

    Args:
        func, inputs: as :func:`gradcheck`.
        grad_outputs: one per differentiable output of ``func``, or None (default): seeded (not the global RNG's)
            uniform draws in [-1, 1) of each output's shape, dtype and device, requiring grad (so also checked), as
            torch's ``make_tensor(low=-1, high=1)``. Records name them ``grad_outputs[i]`` and the first-order
            gradients ``grad(params[k])``.
        gen_non_contig_grad_outputs: the backward gets its output gradients in a non-contiguous layout, at every
            evaluation (gradfd's private copies are contiguous otherwise).
        eps, atol, rtol, raise_exception, nondet_tol, fast_mode: as in :func:`gradcheck`.
        check_undefined_grad, check_grad_dtypes, check_batched_grad: :func:`gradcheck`'s options, applied to ``g``
            (the double backward).
        check_fwd_over_rev, check_rev_over_rev: :func:`gradcheck`'s ``check_forward_ad`` and ``check_backward_ad``
            for ``g``: forward-over-reverse and reverse-over-reverse (default).
        masked: False (default) or None; True raises NotImplementedError (sparse).

    Returns:
        True when every entry of the second derivative agrees (and the options' rule checks pass).

    Raises:
        GradcheckError: on failure, with ``raise_exception``.
        AssertionError: options torch refuses together (both of ``check_fwd_over_rev`` and ``check_rev_over_rev``
            False; ``check_undefined_grad`` or ``check_batched_grad`` without ``check_rev_over_rev``).
        TypeError, ValueError: bad ``inputs``, ``grad_outputs`` (a count or shape that does not match the outputs)
            or options, named.
    """
    if not (check_fwd_over_rev or check_rev_over_rev):
        raise AssertionError("Expected at least one of check_fwd_over_rev or check_rev_over_rev to be True")
    if check_undefined_grad and not check_rev_over_rev:
        raise AssertionError("Setting check_undefined_grad=True requires check_rev_over_rev to be True")
    if check_batched_grad and not check_rev_over_rev:
        raise AssertionError("Setting check_batched_grad=True requires check_rev_over_rev to be True")
    if not isinstance(gen_non_contig_grad_outputs, (bool, numbers.Integral, np.bool_)):
        raise TypeError(f"gradgradcheck(): gen_non_contig_grad_outputs must be a bool, got "
                        f"{describe(gen_non_contig_grad_outputs)}")
    inputs = _as_tuple(inputs, "inputs", "gradgradcheck")
    outs = differentiable_outputs(func, inputs)
    if grad_outputs is None:
        gen = torch.Generator().manual_seed(SEEDS.second_order(0))
        grad_outputs = tuple(_uniform(o, gen) for o in outs)
    elif not isinstance(grad_outputs, (torch.Tensor, tuple, list)):
        raise TypeError(f"gradgradcheck(): grad_outputs must be a tensor, a tuple of tensors or None, got "
                        f"{describe(grad_outputs)}")
    grad_outputs = _as_tuple(grad_outputs, "grad_outputs", "gradgradcheck")
    if len(grad_outputs) != len(outs) or any(
            not isinstance(c, torch.Tensor) or c.shape != o.shape for c, o in zip(grad_outputs, outs)):
        raise ValueError(f"gradgradcheck(): grad_outputs must match func's differentiable outputs: expected "
                         f"{len(outs)} tensors of shapes {[tuple(o.shape) for o in outs]}, got "
                         f"{[describe(c) for c in grad_outputs]}")
    wrt = [k for k, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
    g = gradient_function(func, wrt, len(grad_outputs), noncontiguous=bool(gen_non_contig_grad_outputs))
    options = dict(check_undefined_grad=check_undefined_grad, check_grad_dtypes=check_grad_dtypes,
                   check_batched_grad=check_batched_grad, check_forward_ad=check_fwd_over_rev,
                   check_backward_ad=check_rev_over_rev, masked=masked)
    with unbatchable():
        report = _report(g, inputs + grad_outputs, eps, atol, rtol, raise_exception, fast_mode, nondet_tol, options,
                         "gradgradcheck")
    rename(report, wrt, len(inputs), g.lost)
    return _verdict(report, raise_exception)


def _uniform(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Uniform [-1, 1) draws shaped like ``like`` (its dtype and device), requiring grad (torch's
    ``make_tensor(low=-1, high=1)``, from a seeded generator)."""
    if like.is_complex():  # both parts uniform, as make_tensor draws a complex tensor
        pairs = torch.rand((*like.shape, 2), generator=gen, dtype=torch.float64) * 2 - 1
        return torch.view_as_complex(pairs).to(like.dtype).to(like.device).requires_grad_()
    return (torch.rand(like.shape, generator=gen, dtype=torch.float64) * 2 - 1).to(like.dtype).to(
        like.device).requires_grad_()
