"""gradfd's warnings and exceptions, and the rules for which exceptions mean what.

Every module may import this one; it imports nothing of gradfd's.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Callable, Iterator

import torch

__all__ = ["GradfdWarning", "FallbackWarning", "CostWarning", "NonFiniteLossError", "ComplexOutputs", "NodeErrors",
           "DOMAIN_ERRORS",
           "CANNOT_RUN_THAT_WAY", "OOM_ERRORS", "warnings_once", "warn_fallback", "note", "noting", "first_line"]

OOM_ERRORS = tuple(
    t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t
)


class GradfdWarning(UserWarning):
    """Base class of gradfd's warnings."""


class FallbackWarning(GradfdWarning):
    """gradfd fell back to a slower but correct path (and says why)."""


class CostWarning(GradfdWarning):
    """A check is estimated, from its measured rate, to take long (``gradfd.progress.COST_WARNING_SECONDS``); the
    message gives the estimate and that of the cheaper modes. Under ``pytest -W error`` it is raised like any
    warning and stops the check."""


_warned: contextvars.ContextVar[set | None] = contextvars.ContextVar("gradfd_warned", default=None)


@contextlib.contextmanager
def warnings_once() -> Iterator[None]:
    """Within this context (one :func:`gradfd.check` call), each distinct fallback warning is issued once."""
    token = _warned.set(set())
    try:
        yield
    finally:
        _warned.reset(token)


def warn_fallback(message: str, stacklevel: int) -> None:
    seen = _warned.get()
    if seen is not None:
        if message in seen:
            return
        seen.add(message)
    warnings.warn(message, FallbackWarning, stacklevel=stacklevel + 1)


class ComplexOutputs(TypeError):
    """``func`` returned a complex tensor where the engine compares real outputs: :func:`gradfd.check` then checks
    its real pairs (:mod:`gradfd.wirtinger`); the engine's own entry points say how to."""


class NonFiniteLossError(FloatingPointError):
    """``func`` returned NaN or inf at a point gradfd evaluated.

    Attributes:
        gradient: the estimate with NaN at the affected entries (shape of the parameter), or None when the
            unperturbed loss itself is not finite.
        indices: the affected entries' indices into the parameter.
    """

    def __init__(self, message: str, gradient: torch.Tensor | None = None, indices: list | None = None):
        super().__init__(message)
        self.gradient = gradient
        self.indices = indices or []


DOMAIN_ERRORS = (ValueError, RuntimeError, ArithmeticError, AssertionError)  # what a domain check raises (NodeErrors)
# What a function that cannot run some way raises (vmap without a batching rule, a leading batch dimension it does not
# take, .item() under vmap, an op the tracer cannot follow): the engine then tries the next way. Anything else -- a
# timeout a signal handler raised, an exception of func's own -- propagates at once instead of sending the check to a
# slower path (tests/test_engine.py::test_an_exception_of_another_kind_is_not_taken_for_a_batching_failure).
CANNOT_RUN_THAT_WAY = (RuntimeError, TypeError, ValueError, NotImplementedError, LookupError, AttributeError,
                       AssertionError, ArithmeticError)


class NodeErrors:
    """Exceptions that ``func`` raised at perturbed nodes, recorded instead of raised (:func:`gradfd.check` passes one
    to the engine): the node's values are NaN, and the check retries the coordinate at smaller steps -- a node
    outside ``func``'s domain (``Normal(0, s)`` validating ``s > 0`` at ``s - 2h``) is no error of the gradient.

    An exception is taken for a domain edge only when it is of a kind a domain check raises (``DOMAIN_ERRORS``:
    ``ValueError``, ``RuntimeError``, ``ArithmeticError``, ``AssertionError``; never out of memory or
    ``NotImplementedError``) and ``func`` still runs at the unperturbed point right after (a sticky CUDA error, or a
    ``func`` that fails from some call on, raises there too and propagates). Anything else propagates: a timeout
    raised into ``func`` by a signal handler is no domain edge
    (tests/test_engine.py::test_a_node_error_is_a_domain_edge_only_while_func_runs_at_the_unperturbed_point).

    Attributes:
        count: nodes that raised. first: the first exception recorded.
    """

    def __init__(self) -> None:
        self.count = 0
        self.first: Exception | None = None
        self.where: str | None = None

    def take(self, exc: Exception, where: str, base: Callable[[], object]) -> bool:
        """Record ``exc``, raised by ``func`` at the node ``where``, and return True -- or return False (the caller
        re-raises it) when it is out of memory or when ``base()``, ``func`` at the unperturbed point, raises too."""
        if not isinstance(exc, DOMAIN_ERRORS) or isinstance(exc, OOM_ERRORS + (MemoryError, NotImplementedError)):
            return False
        try:
            base()
        except Exception:
            return False
        if self.first is None:
            self.first, self.where = exc, where
        self.count += 1
        return True

    def describe(self) -> str:
        """One line for a report: how many nodes raised, and the first exception's type and first line."""
        exc = self.first
        return (f"func raised at {self.count} perturbed node(s), taken as outside its domain (first, at "
                f"{self.where}: {type(exc).__name__}: {first_line(exc)})")


def note(exc: BaseException, text: str) -> None:
    if hasattr(exc, "add_note"):
        exc.add_note(text)


@contextlib.contextmanager
def noting(text: str):
    """Re-raise whatever the block raises (KeyboardInterrupt included) unchanged, with ``text`` added as a note
    (PEP 678), so that a traceback out of ``func`` says what gradfd was doing when it came."""
    try:
        yield
    except BaseException as exc:
        note(exc, text)
        raise


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "(no message)"
