"""The structured engine: every perturbed loss of a parameter at a cost proportional to what the perturbation changes.

A generic engine evaluates the whole function once per perturbed coordinate. Yet perturbing ``W[i, j]`` of
``X @ W`` changes only column ``j`` of the product, by exactly ``delta * X[:, i]`` (``mm`` is linear in each
operand); elementwise ops keep the change inside column ``j``; a sum turns it into a scalar correction. This package
exploits that structure:

1. **Analysis.** ``func`` is traced once per call to an aten-level graph by ``tracer._GraphRecorder`` (a light
   dispatch mode that builds the graph ``make_fx`` would, without importing torch's compiler stack) over
   ``torch.func.functionalize``. Nothing is cached across calls: a function closing over tensors that change between
   calls is re-traced, so it is never evaluated stale. Functions that draw random numbers, have data-dependent control
   flow (``.item()``, ``if tensor:``) or use an op the engine does not understand on a value that depends on the
   checked parameter are refused with :class:`StructuredUnsupported`, which names the op.
2. **Delta propagation.** The graph is interpreted on :class:`Perturbed` values: for a batch of ``B`` perturbations
   (``S`` stencil nodes times a chunk of coordinates) a value is its unperturbed ``base`` plus, for each perturbation,
   the new values of the *region* that changed -- the entries whose indices along ``axes`` equal ``pos[b]``. Every
   op other than the identities below computes the region's new values by running the op's own forward on them
   (restricted to the region), never a derivative. Elementwise ops, broadcasting, views, ``sum``/``mean``, ``mse_loss``,
   ``binary_cross_entropy_with_logits``, ``log_softmax``/``nll_loss`` (cross-entropy), products with a constant,
   convolutions, batch/layer/group norm, pooling and embedding (:mod:`.handlers.layers`), and attention
   (:mod:`.handlers.attention`) are understood. Where an
   op mixes the changed entries into a whole fibre (a softmax across the changed column, a second matmul over it) the
   region widens to that fibre -- it densifies, but only as far as the op reaches.
3. **Reductions in float64.** A full ``sum``/``mean`` of a value whose region changed is
   ``sum(base) - sum(base over the region) + sum(new values over the region)``, each sum a genuine float64 sum: only
   the changed terms are summed per perturbation. Losses are therefore reported in float64 relative to the base sum
   computed the same way (``Evaluation.loss_offset`` is that base).
4. **Fused kernels.** When a column moved by a product linear in the parameter (``mm``/``addmm``/``mv`` with the
   parameter on either side, ``parameter * feature``, ``feature + parameter``) is followed only by constant shifts, an
   optional tanh/ReLU/sigmoid, a target and a squared-error reduction (the lesson's linear and polynomial regressions,
   a Linear layer under MSE), the perturbed values are never materialised: ``gradfd::linear_update_mse`` computes every
   perturbed squared-error sum of a chunk in one pass. Elsewhere ``gradfd::linear_update`` produces the moved columns.
   When a product's whole output moves by an outer product (a moved input column of a second Linear -- a hidden unit
   of an MLP, a channel of a CNN after pooling -- or a replaced weight row), then a row bias, ``log_softmax`` over the
   classes and ``nll_loss`` (cross-entropy with a mean or sum), ``gradfd::outer_update_nll`` computes every perturbed
   loss without writing the moved logits out; anything else that reads them gets them written out.

Honesty: every loss is the function at the perturbed point, evaluated with three exact identities instead of a fresh
forward pass, and no derivative formula: (a) ``mm``/``addmm``/``mv`` are linear in each operand (a moved column is
``round(z + delta * feature)`` from the forward's own product ``z``; a replaced row moves every output by an outer
product, in float64; a convolution likewise, in its weight, bias and input: :mod:`.handlers.layers`); (b) the
unchanged terms of a full sum cancel (item 3); (c) changes propagate through ``add``, products with a constant and
views as the changed region alone. The identities change only the rounding: every node shares the forward's
rounding of ``z`` (a fresh forward would re-round the whole dot product at each node) and the rounding of the full
sum drops out of the differences; the fused kernel's own float32 ``tanh`` rounds a little more coarsely than
PyTorch's (docs/structured.md).

The rule: the structured engine may use only exact identities of the ops it understands and their own forwards on
the changed region; it never uses a derivative formula, never caches a trace across calls, and refuses (with
:class:`StructuredUnsupported`, naming the op) whatever it does not understand -- it never guesses. It imports, of
gradfd, only :mod:`gradfd.errors`, :mod:`gradfd.budget`, :mod:`gradfd.dispatch` and :mod:`gradfd.ops`; never
:mod:`gradfd.engine` (which calls it through :func:`worthwhile` and :func:`evaluate_into`).

Layout (each module imports only those above it):

- ``unsupported``: :class:`StructuredUnsupported` and how ops are named in it.
- ``kernels``: the native ops ``gradfd::linear_update(_mse)`` and ``gradfd::outer_update_nll``, their fake kernels
  and pure-PyTorch references.
- ``values``: :class:`Perturbed`, :class:`Lineage`, :class:`Outer` and the algebra on regions (gather, widen,
  broadcast, views).
- ``tracer``: ``func`` to an aten graph (``_GraphRecorder``, :func:`trace`), in-place nodes rewritten out of place.
- ``handlers``: how each aten op propagates a perturbation (one table, ``handlers.HANDLERS``), by kind: ``linalg``,
  ``shape``, ``pointwise``, ``reductions``, ``losses``, ``layers``, ``attention``.
- ``analysis``: :class:`Analysis`, the interpreter: base values, then a chunk of perturbations node by node.
- ``evaluate``: :func:`evaluate_into`, the engine's entry point: chunks sized from the memory budget.
- this ``__init__``: the public names, and :func:`worthwhile`, whether ``engine="auto"`` tries this engine.
"""

from __future__ import annotations

from . import kernels, tracer
from .analysis import Analysis
from .evaluate import evaluate_into
from .kernels import (ACTIVATIONS, linear_update, linear_update_mse, linear_update_mse_reference,
                      linear_update_reference, outer_update_nll, outer_update_nll_reference)
from .tracer import trace
from .unsupported import StructuredUnsupported
from .values import Lineage, Outer, Perturbed

__all__ = [
    "StructuredUnsupported",
    "Perturbed",
    "Lineage",
    "Outer",
    "ACTIVATIONS",
    "linear_update",
    "linear_update_reference",
    "linear_update_mse",
    "linear_update_mse_reference",
    "outer_update_nll",
    "outer_update_nll_reference",
    "Analysis",
    "evaluate_into",
    "trace",
    "worthwhile",
]

# private names the tests reach through the package (tests/test_structured.py, tests/test_first_call.py)
_ensure_fakes = kernels._ensure_fakes
_record = tracer._record
_GraphRecorder = tracer._GraphRecorder

# "auto" tries the structured engine when the generic engine would touch at least _MIN_WORK bytes: below that,
# tracing (about 10 ms) costs more than it saves
# (tests/test_structured.py::test_auto_uses_the_structured_engine_on_large_problems).
_MIN_WORK = 1e8


def worthwhile(problem, evaluations: int, notes: list[str]) -> bool:
    """Whether ``engine="auto"`` should try the structured engine: when the generic engine's work (evaluations times
    the bytes of one evaluation's activations and parameter copy) outweighs the cost of tracing ``func``. Records the
    decision in ``notes`` when it declines.

    Args:
        problem: the engine's prepared :class:`gradfd.engine.Problem`.
        evaluations: how many evaluations of ``func`` the generic engine would make.
        notes: the Evaluation's notes, appended to when the answer is no.
    """
    work = evaluations * (problem.activation_bytes() + problem.numel * problem.flat.element_size())
    if work >= _MIN_WORK:
        return True
    notes.append(f"structured engine not tried: generic work ~{work / 1e6:.1f} MB is below {_MIN_WORK / 1e6:.0f} MB")
    return False
