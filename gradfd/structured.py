"""The structured engine: every perturbed loss of a parameter at a cost proportional to what the perturbation changes.

A generic engine evaluates the whole function once per perturbed coordinate. Yet perturbing ``W[i, j]`` of
``X @ W`` changes only column ``j`` of the product, by exactly ``delta * X[:, i]`` (``mm`` is linear in each
operand); elementwise ops keep the change inside column ``j``; a sum turns it into a scalar correction. This module
exploits that structure:

1. **Analysis.** ``func`` is traced once per call to an aten-level graph by :class:`_GraphRecorder` (a light
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
   ``binary_cross_entropy_with_logits``, ``log_softmax``/``nll_loss`` (cross-entropy) and products with a constant are
   understood. Where an op mixes the changed entries into a whole fibre (a softmax across the changed column, a second
   matmul over it) the region widens to that fibre -- it densifies, but only as far as the op reaches.
3. **Reductions in float64.** A full ``sum``/``mean`` of a value whose region changed is
   ``sum(base) - sum(base over the region) + sum(new values over the region)``, each sum a genuine float64 sum: only
   the changed terms are summed per perturbation. Losses are therefore reported in float64 relative to the base sum
   computed the same way (``Evaluation.base_loss`` is that base).
4. **Fused kernels.** When a column moved by a product linear in the parameter (``mm``/``addmm``/``mv`` with the
   parameter on either side, ``parameter * feature``, ``feature + parameter``) is followed only by constant shifts, an
   optional tanh/ReLU/sigmoid, a target and a squared-error reduction (the lesson's linear and polynomial regressions,
   a Linear layer under MSE), the perturbed values are never materialised: ``gradfd::linear_update_mse`` computes every
   perturbed squared-error sum of a chunk in one pass. Elsewhere ``gradfd::linear_update`` produces the moved columns.

Honesty: every loss is the function at the perturbed point, evaluated with three exact identities instead of a fresh
forward pass, and no derivative formula: (a) ``mm``/``addmm``/``mv`` are linear in each operand (a moved column is
``round(z + delta * feature)`` from the forward's own product ``z``; a replaced row moves every output by an outer
product, in float64); (b) the unchanged terms of a full sum cancel (item 3); (c) changes propagate through ``add``,
products with a constant and views as the changed region alone. The identities change only the rounding, and never
add to it: every node shares the forward's rounding of ``z`` (a fresh forward would re-round the whole dot product
at each node) and the rounding of the full sum drops out of the differences (docs/engine.md, "The structured engine").
"""

from __future__ import annotations

import functools
import math
import operator
import time
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import autograd_would_have_decomposed
from torch.utils._pytree import tree_flatten, tree_map

from . import ops
from .budget import STRUCTURED_CPU_WORKING_SET, default_memory_budget
from .dispatch import LightDispatchMode
from .errors import CANNOT_RUN_THAT_WAY, note

__all__ = [
    "StructuredUnsupported",
    "Perturbed",
    "Lineage",
    "ACTIVATIONS",
    "linear_update",
    "linear_update_reference",
    "linear_update_mse",
    "linear_update_mse_reference",
    "Analysis",
    "evaluate_into",
    "trace",
]

aten = torch.ops.aten

ACTIVATIONS = {None: 0, "tanh": 1, "relu": 2, "sigmoid": 3}
_ACTIVATION_OPS = {aten.tanh.default: "tanh", aten.relu.default: "relu", aten.sigmoid.default: "sigmoid"}
_ACTIVATION_FUNCS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}
_MAX_NODES = 16  # stencil nodes per coordinate in linear_update_mse (kMaxNodes in csrc/structured.h)
_PROBE_COORDS = 64  # coordinates of the first chunk, which measures the bytes per coordinate


class StructuredUnsupported(RuntimeError):
    """The structured engine cannot evaluate ``func``; ``op`` names the aten op (or step) that stopped the analysis.

    ``engine="structured"`` raises it; ``engine="auto"`` falls back to the generic engine and records the message in
    ``Evaluation.notes``.
    """

    def __init__(self, op: str, reason: str):
        super().__init__(
            f"the structured engine cannot evaluate func: {op}: {reason}. Use engine='auto' (falls back to the "
            "generic engine) or engine='batched'"
        )
        self.op = op
        self.reason = reason


# --------------------------------------------------------------------------------------------------------------
# kernels and their pure-PyTorch twins

_fakes_registered = False


def _ensure_fakes() -> None:
    """Register the fake (meta) kernels of this module's ops (once the extension is loaded)."""
    global _fakes_registered
    if _fakes_registered or not ops.kernels_available():
        return

    @torch.library.register_fake("gradfd::linear_update")
    def _linear_update_fake(base, features, column, feature, delta):
        return base.new_empty((column.shape[0], base.shape[0]))

    @torch.library.register_fake("gradfd::linear_update_mse")
    def _linear_update_mse_fake(base, features, target, column, feature, delta, activation):
        return base.new_empty((delta.shape[0], column.shape[0]), dtype=torch.float64)

    _fakes_registered = True


def linear_update(base: torch.Tensor, features: torch.Tensor, column: torch.Tensor, feature: torch.Tensor,
                  delta: torch.Tensor) -> torch.Tensor:
    """Moved output columns of a product linear in the perturbed parameter, without re-running the product.

    Args:
        base: ``(n, K)`` floating, contiguous: the product's unperturbed output, one column per region.
        features: ``(n, D)``, base's dtype, contiguous: the columns the outputs move along.
        column: ``(C,)`` int64 in ``[0, K)``: the moved output column of each perturbation.
        feature: ``(C,)`` int64 in ``[0, D)``: the feature column it moves along.
        delta: ``(C,)`` float64: how far (the parameter's realised displacement).

    Returns:
        ``(C, n)`` in base's dtype: ``round(base[:, column[c]] + delta[c] * features[:, feature[c]])``, computed in
        float64 and rounded once.

    Raises:
        RuntimeError from the op, naming ``gradfd::linear_update``, on wrong shapes, dtypes, devices or indices;
        :class:`gradfd.ops.KernelsUnavailableError` when the extension could not be loaded.
    """
    ops.require_kernels()
    _ensure_fakes()
    return torch.ops.gradfd.linear_update(base, features, column, feature, delta)


def linear_update_reference(base, features, column, feature, delta) -> torch.Tensor:
    """Pure-PyTorch twin of :func:`linear_update`."""
    moved = base[:, column].t().double() + delta.unsqueeze(1) * features[:, feature].t().double()
    return moved.to(base.dtype)


def linear_update_mse(base: torch.Tensor, features: torch.Tensor, target: torch.Tensor, column: torch.Tensor,
                      feature: torch.Tensor, delta: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    """How each perturbation changes the squared-error sum of a moved column, summing the changed terms only, in one
    pass that reads each input once per coordinate.

    Args:
        base, features, column, feature: as in :func:`linear_update` (``C`` coordinates).
        target: ``(n, K)``, base's dtype, contiguous: subtracted after the activation.
        delta: ``(S, C)`` float64, ``1 <= S <= 16``: the displacement at each stencil node of each coordinate.
        activation: None, ``"tanh"``, ``"relu"`` or ``"sigmoid"``, evaluated in base's dtype.

    Returns:
        ``(S, C)`` float64: ``sum_r [(act(round(base[r, j] + delta[s, c] * features[r, i])) - target[r, j])**2
        - (act(base[r, j]) - target[r, j])**2]`` with ``j = column[c]``, ``i = feature[c]``: every term is an element's
        squared error at the perturbed point minus the same at the base point, both evaluated; differences, squares
        and the sum in float64.

    Raises:
        RuntimeError from the op, naming ``gradfd::linear_update_mse``, on bad arguments; ValueError for an unknown
        activation; :class:`gradfd.ops.KernelsUnavailableError` when the extension could not be loaded.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    ops.require_kernels()
    _ensure_fakes()
    return torch.ops.gradfd.linear_update_mse(base, features, target, column, feature, delta, ACTIVATIONS[activation])


def linear_update_mse_reference(base, features, target, column, feature, delta, activation=None) -> torch.Tensor:
    """Pure-PyTorch twin of :func:`linear_update_mse`."""
    s, c = delta.shape
    moved = (base[:, column].t().double().unsqueeze(0)
             + delta.unsqueeze(2) * features[:, feature].t().double().unsqueeze(0)).to(base.dtype)  # (S, C, n)
    at_base = base[:, column].t()  # (C, n)
    if activation is not None:
        moved, at_base = _ACTIVATION_FUNCS[activation](moved), _ACTIVATION_FUNCS[activation](at_base)
    y = target[:, column].t().double()
    diff, diff0 = moved.double() - y.unsqueeze(0), at_base.double() - y
    return (diff * diff - (diff0 * diff0).unsqueeze(0)).sum(-1)


# --------------------------------------------------------------------------------------------------------------
# the representation of perturbed values


@dataclass
class Lineage:
    """How a region's new values follow from a column moved by a product linear in the parameter.

    For perturbation ``b`` the region's values are, in order:
    ``v = round(z[:, col[b]] + delta[b] * features[:, fi[b]])``; ``v = act(v)`` if ``activation``;
    ``v = v - target[:, col[b]]`` if ``target`` is given; ``v = v**2`` if ``squared``. The ``(n, K)`` layout of
    ``z``/``target`` is :func:`columns` of the value's base: the region's entries (in order) down a column.
    """

    z: torch.Tensor
    features: torch.Tensor
    col: torch.Tensor
    fi: torch.Tensor
    delta: torch.Tensor
    activation: str | None = None
    target: torch.Tensor | None = None
    squared: bool = False

    @property
    def stage(self) -> str:
        if self.squared:
            return "squared"
        if self.target is not None:
            return "residual"
        return "activated" if self.activation else "linear"

    def materialize(self) -> torch.Tensor:
        """``(B, n)`` region values in z's dtype."""
        v = linear_update(self.z, self.features, self.col.contiguous(), self.fi.contiguous(),
                          self.delta.contiguous())
        if self.activation:
            v = _ACTIVATION_FUNCS[self.activation](v)
        if self.target is not None:
            v = v - self.target[:, self.col].t()
        if self.squared:
            v = v.pow(2)
        return v


@dataclass
class Perturbed:
    """A value of the graph under a batch of ``B`` perturbations of the checked parameter.

    Attributes:
        base: the unperturbed value (shape ``T``).
        axes: sorted dims of ``T`` that locate the changed region: for perturbation ``b`` the entries whose index along
            ``axes[a]`` is ``pos[b, a]`` may differ from ``base``; every other entry equals ``base``. ``()`` means the
            whole tensor may differ.
        pos: ``(B, len(axes))`` int64.
        slab_: ``(B, *T[rest])`` new values of the region (``rest``: the dims not in ``axes``, in order), or None while
            ``lineage`` describes them lazily.
        lineage: see :class:`Lineage`.
        scalar: every row of the slab is one value broadcast over the region.
        promoted: ``base`` was re-evaluated (a float64 reduction) and differs from the traced base.
        relative: (float64 reductions) the slab holds the change from ``base``, not the new values; ``axes`` is ``()``.
    """

    base: torch.Tensor
    axes: tuple[int, ...]
    pos: torch.Tensor
    slab_: torch.Tensor | None
    lineage: Lineage | None = None
    scalar: bool = False
    promoted: bool = False
    relative: bool = False

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    @property
    def rest(self) -> list[int]:
        return [d for d in range(self.base.dim()) if d not in self.axes]

    @property
    def rest_shape(self) -> list[int]:
        return [self.base.shape[d] for d in self.rest]

    @property
    def slab(self) -> torch.Tensor:
        if self.slab_ is None:
            self.slab_ = self.lineage.materialize().reshape(self.batch, *self.rest_shape)
        return self.slab_


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def gather(t: torch.Tensor, axes: tuple[int, ...], pos: torch.Tensor) -> torch.Tensor:
    """``t``'s region per perturbation: ``(B, *t.shape[rest])`` (``(1, *t.shape)`` when ``axes`` is empty)."""
    if not axes:
        return t.unsqueeze(0)
    rest = [d for d in range(t.dim()) if d not in axes]
    moved = t.permute(*axes, *rest)
    return moved[tuple(pos[:, a] for a in range(len(axes)))]


def columns(t: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """``t`` as ``(n, K)`` contiguous: one column per region (the region's entries in order down the column)."""
    rest = [d for d in range(t.dim()) if d not in axes]
    n, k = _prod(t.shape[d] for d in rest), _prod(t.shape[a] for a in axes)
    return t.permute(*rest, *axes).reshape(n, k).contiguous()


def ravel(pos: torch.Tensor, sizes) -> torch.Tensor:
    """Flat (row-major) index of ``pos`` ``(B, len(sizes))`` in a tensor of ``sizes``."""
    flat = torch.zeros(pos.shape[0], dtype=torch.int64, device=pos.device)
    for a, size in enumerate(sizes):
        flat = flat * int(size) + pos[:, a]
    return flat


def unravel_batch(flat: torch.Tensor, sizes) -> torch.Tensor:
    """Inverse of :func:`ravel`: ``(B, len(sizes))`` int64."""
    out = []
    for size in reversed(list(sizes)):
        out.append(flat % int(size))
        flat = torch.div(flat, int(size), rounding_mode="floor")
    return torch.stack(list(reversed(out)), 1) if out else flat.new_zeros((flat.shape[0], 0))


def absolute(v):
    """``v`` with a relative slab turned into new values (``base + change``); anything else unchanged."""
    if isinstance(v, Perturbed) and v.relative:
        return Perturbed(v.base, (), v.pos, v.base.unsqueeze(0) + v.slab, promoted=True)
    return v


def full(p: Perturbed) -> torch.Tensor:
    """The whole perturbed value, ``(B, *T)`` (densified)."""
    return widen(p, ()).slab.expand(p.batch, *p.base.shape)


def widen(p: Perturbed, keep: tuple[int, ...]) -> Perturbed:
    """The same value with its region described by the axes ``keep`` only (a subset of ``p.axes``): the dropped axes
    become whole dims of the slab, filled from ``base`` outside the old region."""
    keep = tuple(sorted(keep))
    drop = [a for a in p.axes if a not in keep]
    if not drop:
        return p
    b = p.batch
    keep_i = [p.axes.index(a) for a in keep]
    drop_i = [p.axes.index(a) for a in drop]
    new_pos = p.pos[:, keep_i]
    new_rest = [d for d in range(p.base.dim()) if d not in keep]
    slab = gather(p.base, keep, new_pos).expand(b, *[p.base.shape[d] for d in new_rest]).clone()
    old_rest = p.rest
    view = slab.permute(0, *[new_rest.index(a) + 1 for a in drop], *[new_rest.index(d) + 1 for d in old_rest])
    view[(torch.arange(b, device=slab.device), *[p.pos[:, i] for i in drop_i])] = p.slab.to(slab.dtype)
    unit = all(p.base.shape[a] == 1 for a in drop)
    return Perturbed(p.base, keep, new_pos, slab, scalar=p.scalar and unit, promoted=p.promoted)


def unit_axes(p: Perturbed) -> Perturbed:
    """Add the size-1 dims of the region to ``axes`` (at position 0): the same region, described more narrowly."""
    units = [d for d in p.rest if p.base.shape[d] == 1]
    if not units:
        return p
    axes = tuple(sorted(p.axes + tuple(units)))
    zeros = p.pos.new_zeros((p.batch, 1))
    cols = [p.pos[:, p.axes.index(a):p.axes.index(a) + 1] if a in p.axes else zeros for a in axes]
    pos = torch.cat(cols, 1) if cols else p.pos
    slab = p.slab.reshape(p.batch, *[p.base.shape[d] for d in range(p.base.dim()) if d not in axes])
    return Perturbed(p.base, axes, pos, slab, scalar=p.scalar, promoted=p.promoted)


def broadcast_to(p: Perturbed, shape) -> Perturbed:
    """``p`` broadcast (``expand``) to ``shape``."""
    shape = tuple(shape)
    if tuple(p.base.shape) == shape:
        return p
    lead = len(shape) - p.base.dim()
    grown = [a for a in p.axes if p.base.shape[a] == 1 and shape[a + lead] != 1]
    p = widen(p, tuple(a for a in p.axes if a not in grown))
    rest_new = [d for d in range(len(shape)) if d - lead not in p.axes or d < lead]
    slab = p.slab.reshape(p.batch, *([1] * lead), *p.rest_shape).expand(p.batch, *[shape[d] for d in rest_new])
    return Perturbed(p.base.expand(shape), tuple(a + lead for a in p.axes), p.pos, slab, scalar=p.scalar,
                     promoted=p.promoted)


def _with_unaffected(p: Perturbed, affected: torch.Tensor) -> Perturbed:
    """Set the slab of perturbations that do not reach this value (``~affected``) to the base region."""
    if bool(affected.all()):
        return p
    base_region = gather(p.base, p.axes, p.pos).expand_as(p.slab)
    mask = affected.view(-1, *([1] * (p.slab.dim() - 1)))
    return replace(p, slab_=torch.where(mask, p.slab, base_region.to(p.slab.dtype)), lineage=None)


# --------------------------------------------------------------------------------------------------------------
# tracing


class _GraphRecorder(LightDispatchMode):
    """Records the aten ops that run while it is active into a ``torch.fx`` graph of the shape ``make_fx`` builds in
    real mode: a placeholder per input, a ``get_attr`` per tensor the function closes over (or creates from Python
    data), a ``call_function`` node per ``OpOverload`` (``operator.getitem`` nodes for ops returning several tensors)
    and one output node. Unlike ``make_fx`` it never imports ``torch._inductor``, ``torch._dynamo`` or sympy (about
    3.5 s on a first call; tests/test_first_call.py).

    Tensors are matched to nodes by identity, through weak references: the recorder keeps no intermediate alive (a
    trace's peak memory is the function's own), and an identity reused after a tensor died never matches the dead
    tensor's node (tests/test_first_call.py::test_the_recorder_keeps_no_intermediate_alive). What ``make_fx`` does to an op that reaches it, the recorder does too: a
    ``CompositeImplicitAutograd`` op that autograd would have decomposed is decomposed (and its parts recorded),
    ``lift_fresh`` becomes ``lift_fresh_copy``, and reading the value of a tensor that depends on an input
    (``.item()``, ``if tensor:``) raises, since the graph would bake the value in. (``make_fx`` also refuses to read
    values computed from constants alone; the recorder lets the graph hold those, which are the same at every point.)
    """

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.graph = torch.fx.Graph()
        self.constants: dict[str, torch.Tensor] = {}
        self._nodes: dict[int, tuple[weakref.ref, torch.fx.Node]] = {}  # id(tensor) -> (weak tensor, node)
        self._traced: set[torch.fx.Node] = set()  # nodes whose value depends on an input
        for k, t in enumerate(inputs):
            node = self.graph.placeholder(f"arg{k}_1")
            self._track(t, node, traced=True)

    def _track(self, t: torch.Tensor, node: torch.fx.Node, traced: bool) -> None:
        self._nodes[id(t)] = (weakref.ref(t), node)
        if traced:
            self._traced.add(node)

    def node_of(self, t: torch.Tensor) -> torch.fx.Node:
        """The node that produced ``t``, or a new ``get_attr`` constant for a tensor the trace did not produce."""
        entry = self._nodes.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        name = f"_tensor_constant{len(self.constants)}"
        self.constants[name] = t
        node = self.graph.get_attr(name)
        self._track(t, node, traced=False)
        return node

    def _arg(self, v):
        return self.node_of(v) if isinstance(v, torch.Tensor) else v

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = tree_flatten((args, kwargs))[0]
        if func not in (aten.size.default, aten.stride.default, aten.storage_offset.default) \
                and autograd_would_have_decomposed(func, flat):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if func is aten.is_nonzero.default:
            with self:
                return bool((args[0] != 0).item())
        node_args, node_kwargs = tree_map(self._arg, (args, kwargs))
        traced = any(isinstance(v, torch.fx.Node) and v in self._traced
                     for v in tree_flatten((node_args, node_kwargs))[0])
        if torch.Tag.data_dependent_output in func.tags:
            if traced:
                raise RuntimeError(f"func reads the value of a traced tensor with {func} (data-dependent control "
                                   "flow or .item()): the graph would bake that value in")
            return func(*args, **kwargs)  # a value of constants only: the same at every point
        if func is aten.lift_fresh.default:  # as make_fx: the lifted constant is copied, so it is never mutated
            func = aten.lift_fresh_copy.default
        node = self.graph.create_node("call_function", func, tuple(node_args), node_kwargs,
                                      name=self.graph._target_to_str(func.overloadpacket.__name__))
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self._track(out, node, traced)
        elif isinstance(out, (tuple, list)):
            for k, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    self._track(t, self.graph.call_function(operator.getitem, (node, k)), traced)
        return out

    def module(self, outputs) -> torch.fx.GraphModule:
        """The graph module, its output node made from ``outputs`` (a pytree of tensors and constants)."""
        self.graph.output(tree_map(self._arg, outputs))
        return torch.fx.GraphModule(self.constants, self.graph)


def _record(func: Callable, args: list[torch.Tensor]) -> torch.fx.GraphModule:
    recorder = _GraphRecorder(args)
    try:
        with recorder:
            out = func(*args)
        return recorder.module(out)
    finally:
        recorder._nodes.clear()  # a raised exception's traceback holds this frame: let it hold no map either


def trace(func: Callable, args: list[torch.Tensor]) -> torch.fx.GraphModule:
    """``func`` traced to an aten-level graph on ``args`` (functionalized where possible: in-place ops of ``func``
    become out-of-place ops), by :class:`_GraphRecorder` (a light stand-in for ``make_fx``).

    Raises:
        StructuredUnsupported: when tracing fails (data-dependent control flow, ``.item()``, ...).
    """
    try:
        with torch.no_grad():
            try:
                return _record(torch.func.functionalize(func, remove="mutations"), args)
            except CANNOT_RUN_THAT_WAY as exc:
                if "_local_scalar_dense" in str(exc):
                    raise
            # functionalization is unavailable for some calls (autograd.Function): trace as is; the in-place ops
            # left in the graph are rewritten out of place or refused by Analysis
            return _record(func, args)
    except CANNOT_RUN_THAT_WAY as exc:  # the trace is only a means: say why it failed and let the caller fall back
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        op = "aten._local_scalar_dense (data-dependent control flow or .item())" if "_local_scalar_dense" in text \
            else "tracing"
        raise StructuredUnsupported(op, f"func could not be traced to an aten graph ({type(exc).__name__}: {text})") \
            from exc
    except Exception as exc:  # not a tracing failure (CANNOT_RUN_THAT_WAY): func's own, propagated
        note(exc, "gradfd: raised while tracing func for the structured engine (at the unperturbed params)")
        raise


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.__name__}" if target.namespace == "aten" else str(target)
    return getattr(target, "__name__", str(target))


_VIEW_IDENTITY = {aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default}
_SHAPE_ONLY = {aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
               aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
               aten.sym_size.int, aten.sym_numel.default}
_REDUCTIONS = {aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim, aten.amax.default,
               aten.amin.default, aten.logsumexp.default}
_RELATIVE_LINEAR = {aten.neg.default, aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar,
                    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
_FULL_SUMS = {aten.sum.default: "sum", aten.sum.dim_IntList: "sum", aten.mean.default: "mean", aten.mean.dim: "mean"}
# elementwise losses: op -> position of the reduction argument (none=0, mean=1, sum=2)
_LOSSES = {aten.mse_loss.default: 2, aten.binary_cross_entropy_with_logits.default: 4,
           aten.binary_cross_entropy.default: 3, aten.smooth_l1_loss.default: 2, aten.huber_loss.default: 2}


def _functional_variant(node) -> torch._ops.OpOverload:
    """The out-of-place twin of an in-place node that functionalization left in the graph (decompositions such as
    cross-entropy's label smoothing mutate fresh intermediates in place). Allowed only when the mutated tensor is
    a fresh intermediate (not an input, a constant or a view) used by nothing else, so the rewrite cannot be seen.

    Raises:
        StructuredUnsupported: naming the op otherwise.
    """
    op = node.target
    name = _op_name(op)
    schema = op._schema
    mutated = [k for k, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    packet = schema.name.split("::")[-1]
    functional = None
    if mutated == [0] and packet.endswith("_") and node.args and isinstance(node.args[0], torch.fx.Node):
        target = node.args[0]
        fresh = (target.op == "call_function" and isinstance(target.target, torch._ops.OpOverload)
                 and all(r.alias_info is None for r in target.target._schema.returns))
        if fresh and len(target.users) == 1:
            functional = getattr(getattr(aten, packet[:-1], None), op._overloadname, None)
    if functional is None or functional._schema.is_mutable:
        raise StructuredUnsupported(name, "an in-place op the structured engine cannot rewrite out of place")
    return functional


def _pointwise(op) -> bool:
    return (isinstance(op, torch._ops.OpOverload) and torch.Tag.pointwise in op.tags
            and torch.Tag.nondeterministic_seeded not in op.tags and not op._schema.is_mutable
            and len(op._schema.returns) == 1)


# --------------------------------------------------------------------------------------------------------------
# the analysis and the interpreter


class Analysis:
    """``func`` traced once, with the base value of every node; :meth:`run` evaluates a chunk of perturbations.

    Args:
        problem: the engine's :class:`gradfd.engine.Problem` (private copies of the arguments, base loss evaluated).

    Raises:
        StructuredUnsupported: the trace failed, uses random numbers, or does not reproduce ``func``'s loss.
    """

    def __init__(self, problem) -> None:
        if problem.rng.consumed:
            raise StructuredUnsupported("random numbers", "func draws random numbers; the generic engine replays the "
                                        "same draws at every point")
        self.problem = problem
        t0 = time.perf_counter()
        self.gm = trace(problem.plain_func, problem.args)  # func as written (this engine reduces in float64 itself)
        problem.rng.reset()
        self.trace_seconds = time.perf_counter() - t0
        self.nodes = list(self.gm.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != len(problem.args):
            raise StructuredUnsupported("tracing", f"the trace has {len(placeholders)} inputs for "
                                        f"{len(problem.args)} params")
        self.param_node = placeholders[problem.param_idx]
        for node in self.nodes:
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                if torch.Tag.nondeterministic_seeded in node.target.tags:
                    raise StructuredUnsupported(_op_name(node.target), "func draws random numbers")
                if node.target._schema.is_mutable:
                    node.target = _functional_variant(node)
        # base values of every node, and where each value is used last
        self.env: dict = {}
        inputs = dict(zip(placeholders, problem.args))
        with torch.no_grad():
            for node in self.nodes:
                if node.op == "placeholder":
                    self.env[node] = inputs[node]
                elif node.op == "get_attr":
                    self.env[node] = functools.reduce(getattr, node.target.split("."), self.gm)
                elif node.op == "call_function":
                    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), self.env.__getitem__)
                    self.env[node] = node.target(*args, **kwargs)
                elif node.op == "output":
                    self.output = torch.fx.node.map_arg(node.args[0], self.env.__getitem__)
                else:
                    raise StructuredUnsupported(node.op, "unexpected graph node")
        problem.rng.reset()
        self.last_use = {}
        for i, node in enumerate(self.nodes):
            for inp in node.all_input_nodes:
                self.last_use[inp] = i
        out = self.output
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise StructuredUnsupported("output", f"the trace returned {type(out).__name__}, not one loss")
        want, got = float(problem.plain_base if problem.plain_base is not None else problem.base_loss), float(out)
        tol = 16 * torch.finfo(problem.dtype).eps * max(abs(want), 1e-300)
        if not (abs(want - got) <= tol or (math.isnan(want) and math.isnan(got))):
            raise StructuredUnsupported("tracing", f"the traced graph gives {got!r} where func gives {want!r}")
        self.cache: dict = {}
        self.fused: set[str] = set()
        self.densified: set[str] = set()
        self.bytes = 0
        self._seen: set[int] = set()

    # -- per chunk -----------------------------------------------------------------------------------------------
    def run(self, coords: torch.Tensor, moved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses at the stencil nodes of ``coords``.

        Args:
            coords: ``(C,)`` int64 flat indices into the parameter.
            moved: ``(S, C)`` node values in the parameter's dtype (``engine.node_values``).

        Returns:
            ``(S*C,)`` float64 changes of the loss from its base (node-major: ``s*C + c``), and that base (float64
            0-d): the loss at a node is their sum.
        """
        problem = self.problem
        s, c = moved.shape
        self.s, self.c = s, c
        self.bytes, self._seen = 0, set()
        shape = problem.shape
        flat = coords.repeat(s)
        pos = unravel_batch(flat, shape)
        param = Perturbed(self.env[self.param_node], tuple(range(len(shape))), pos, moved.reshape(-1), scalar=True)
        values: dict = {}
        with torch.no_grad():
            for i, node in enumerate(self.nodes):
                if node.op == "placeholder":
                    values[node] = param if node is self.param_node else self.env[node]
                elif node.op == "get_attr":
                    values[node] = self.env[node]
                elif node.op == "call_function":
                    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), values.__getitem__)
                    if not any(isinstance(v, Perturbed) for v in tree_flatten((args, kwargs))[0]):
                        values[node] = self.env[node]
                    else:
                        values[node] = self._dispatch(node, args, kwargs)
                        for v in tree_flatten(values[node])[0]:
                            if isinstance(v, Perturbed) and v.slab_ is not None:
                                self._count(v.slab_)
                elif node.op == "output":
                    out = torch.fx.node.map_arg(node.args[0], values.__getitem__)
                    return self._losses(out)
                for inp in node.all_input_nodes:
                    if self.last_use.get(inp) == i and inp is not self.param_node:
                        values.pop(inp, None)
        raise StructuredUnsupported("output", "the graph has no output")

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += storage.nbytes()

    def _losses(self, out) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,)`` float64 changes of the loss from the base, and the float64 base."""
        b = self.s * self.c
        if isinstance(out, Perturbed):
            if out.base.numel() != 1:
                raise StructuredUnsupported("output", f"the loss has shape {tuple(out.base.shape)}")
            base = out.base.reshape(()).to(torch.float64)
            if out.relative:
                return out.slab.reshape(b), base
            return out.slab.reshape(b).to(torch.float64) - base, base
        base = out.reshape(()).to(torch.float64)
        return torch.zeros(b, dtype=torch.float64, device=base.device), base

    def _cached(self, key, make: Callable[[], Any]):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    # -- dispatch --------------------------------------------------------------------------------------------------
    def _dispatch(self, node, args, kwargs):
        op = node.target
        name = _op_name(op)
        if op is operator.getitem:
            return args[0][args[1]]
        if not isinstance(op, torch._ops.OpOverload):
            raise StructuredUnsupported(name, "a Python-level call on a value that depends on the checked parameter")
        base = self.env[node]
        if op in _SHAPE_ONLY:
            return base
        if op in _RELATIVE_LINEAR:
            linear = self._relative_linear(node, op, args, kwargs)
            if linear is not None:
                return linear
        args, kwargs = tree_map(absolute, (args, kwargs))
        handler = _HANDLERS.get(op)
        if handler is not None:
            return handler(self, node, base, *args, **kwargs)
        if _pointwise(op):
            return self._pointwise(node, op, base, args, kwargs)
        raise StructuredUnsupported(
            name, f"applied (node '{node.name}') to a value that depends on params[{self.problem.param_idx}], and the "
                  "structured engine does not know how this op propagates a perturbation")

    # -- float64 reductions and what follows them -------------------------------------------------------------------
    def _relative_linear(self, node, op, args, kwargs) -> Perturbed | None:
        """Ops linear in their perturbed operands (add, sub, neg, multiplication or division by a constant) applied to
        relative values (the changes that float64 reductions return): the change of the output is the op's linear
        action on the changes. None when the op is not linear in the way it is used here."""
        leaves = tree_flatten((args, kwargs))[0]
        perturbed = [v for v in leaves if isinstance(v, Perturbed)]
        if not all(v.relative for v in perturbed):
            return None
        base = self._base_of(node, op, self.env[node], args, kwargs)[0]
        nd = base.dim()
        b = perturbed[0].batch

        def change(v):
            if isinstance(v, Perturbed):
                return v.slab.reshape(b, *([1] * (nd - v.base.dim())), *v.base.shape)
            return None

        if op is aten.neg.default:
            rel = -change(args[0])
        elif op in (aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar):
            alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
            a, c = change(args[0]), change(args[1]) if len(args) > 1 else None
            sign = -1 if op in (aten.sub.Tensor, aten.sub.Scalar) else 1
            if a is None:
                rel = sign * alpha * c
            elif c is None:
                rel = a
            else:
                rel = a + sign * alpha * c
        elif op in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            if kwargs or len(perturbed) != 1 or (op in (aten.div.Tensor, aten.div.Scalar) and args[0] is not
                                                  perturbed[0]):
                return None
            factor = args[1] if args[0] is perturbed[0] else args[0]
            if isinstance(factor, torch.Tensor):
                factor = factor.to(torch.float64)
            rel = change(perturbed[0])
            rel = rel * factor if op in (aten.mul.Tensor, aten.mul.Scalar) else rel / factor
        else:
            return None
        rel = rel.to(torch.float64).expand(b, *base.shape)
        return Perturbed(base.to(torch.float64), (), perturbed[0].pos[:, :0], rel, promoted=True, relative=True)

    # -- elementwise ---------------------------------------------------------------------------------------------
    def _base_of(self, node, op, base, args, kwargs) -> tuple[torch.Tensor, bool]:
        """The output's base: the traced one, or re-evaluated when an input's base was promoted."""
        leaves = tree_flatten((args, kwargs))[0]
        if not any(isinstance(v, Perturbed) and v.promoted for v in leaves):
            return base, False

        def make():
            a, k = tree_map(lambda v: v.base if isinstance(v, Perturbed) else v, (args, kwargs))
            return op(*a, **k)

        return self._cached((node.name, "base"), make), True

    def _pointwise(self, node, op, base, args, kwargs) -> Perturbed:
        base, promoted = self._base_of(node, op, base, args, kwargs)
        if not promoted:
            fused = self._extend_lineage(node, op, base, args, kwargs)
            if fused is not None:
                return fused
        shape = tuple(base.shape)
        perturbed = [v for v in tree_flatten((args, kwargs))[0] if isinstance(v, Perturbed)]
        perturbed = [broadcast_to(p, shape) if p.base.dim() <= len(shape) else p for p in perturbed]
        axes, pos = _common_region(perturbed)
        it = iter(perturbed)
        scalar = all(p.scalar for p in perturbed)

        def leaf(v):
            if isinstance(v, Perturbed):
                p = widen(next(it), axes)
                return p.slab
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                nonlocal scalar
                scalar = False
                return gather(v.expand(shape), axes, pos)
            return v

        a, k = tree_map(leaf, (args, kwargs))
        slab = op(*a, **k)
        if slab.dtype != base.dtype:
            slab = slab.to(base.dtype)
        rest_shape = [shape[d] for d in range(len(shape)) if d not in axes]
        b = pos.shape[0]
        if tuple(slab.shape) != (b, *rest_shape):
            slab = slab.expand(b, *rest_shape)
        return Perturbed(base, axes, pos, slab, scalar=scalar, promoted=promoted)

    def _extend_lineage(self, node, op, base, args, kwargs) -> Perturbed | None:
        """The fused path: keep the perturbed values lazy while the op is one the fused kernel reproduces."""
        leaves = tree_flatten((args, kwargs))[0]
        perturbed = list({id(v): v for v in leaves if isinstance(v, Perturbed)}.values())
        if len(perturbed) != 1 or base.dtype != perturbed[0].base.dtype:
            return None
        p = perturbed[0]
        alpha = kwargs.get("alpha", 1)
        if p.lineage is None:
            return self._start_lineage(node, op, base, p, args, alpha)
        if tuple(p.base.shape) != tuple(base.shape):
            return None
        L = p.lineage
        if op in (aten.add.Tensor, aten.sub.Tensor) and alpha == 1 and len(args) == 2:
            other = args[1] if args[0] is p else args[0]
            if isinstance(other, torch.Tensor) and other.dtype != base.dtype:
                return None
            if op is aten.sub.Tensor and args[0] is not p:
                return None
            if L.stage == "linear":  # a constant shift before any activation: fold it into z
                z = self._cached((node.name, "z"), lambda: columns(base, p.axes))
                return replace(p, base=base, lineage=replace(L, z=z), slab_=None)
            if L.stage == "activated":  # a target after the activation
                def make_target():
                    t = other if isinstance(other, torch.Tensor) else torch.tensor(other, dtype=base.dtype,
                                                                                    device=base.device)
                    t = columns(t.to(base.dtype).expand(base.shape), p.axes)
                    return t if op is aten.sub.Tensor else -t

                target = self._cached((node.name, "target"), make_target)
                return replace(p, base=base, lineage=replace(L, target=target), slab_=None)
            return None
        if op in _ACTIVATION_OPS and L.stage == "linear":
            return replace(p, base=base, lineage=replace(L, activation=_ACTIVATION_OPS[op]), slab_=None)
        squares = (op is aten.pow.Tensor_Scalar and args[1] == 2) or (op is aten.mul.Tensor and args[0] is args[1])
        if squares and L.stage != "squared":
            return replace(p, base=base, lineage=replace(L, squared=True), slab_=None)
        return None

    def _start_lineage(self, node, op, base, p: Perturbed, args, alpha) -> Perturbed | None:
        """``parameter * feature`` or ``feature + parameter`` (the parameter broadcast over a region): the region moves
        by ``delta * feature`` (or ``delta``), mul and add being linear in each operand."""
        if op not in (aten.mul.Tensor, aten.add.Tensor) or not p.scalar or alpha != 1 or len(args) != 2:
            return None
        other = args[1] if args[0] is p else args[0]
        if not isinstance(other, torch.Tensor) or other.dtype != base.dtype or base.dim() == 0:
            return None
        if p.base.dim() > base.dim():
            return None
        q = broadcast_to(p, base.shape)
        first = (slice(None),) + (0,) * (p.slab.dim() - 1)
        new = p.slab[first].double()
        old = gather(p.base, p.axes, p.pos)[first].double()
        col = ravel(q.pos, [base.shape[a] for a in q.axes])
        z = self._cached((node.name, "z"), lambda: columns(base, q.axes))
        if op is aten.mul.Tensor:  # the region moves by delta * feature
            features = self._cached((node.name, "features"), lambda: columns(other.expand(base.shape), q.axes))
            fi = col
        else:  # the region moves by delta
            features = self._cached((node.name, "features"), lambda: torch.ones(
                z.shape[0], 1, dtype=base.dtype, device=base.device))
            fi = torch.zeros_like(col)
        return Perturbed(base, q.axes, q.pos, None, Lineage(z, features, col, fi, (new - old).expand_as(col)))

    # -- products ----------------------------------------------------------------------------------------------------
    def _mm(self, node, base, a, b):
        if isinstance(a, Perturbed) and isinstance(b, Perturbed):
            self.densified.add(node.name)
            slab = torch.matmul(full(a), full(b))
            return Perturbed(base, (), a.pos.new_zeros((a.batch, 0)), slab.to(base.dtype))
        if isinstance(b, Perturbed):
            return self._mm_right(node, base, a, b)
        # a @ b = (b^T @ a^T)^T: the parameter on the left is the right-hand case transposed
        out_t = self._mm_right(node, base.t(), b.t(), _permute(a, [1, 0], a.base.t()))
        return _permute(out_t, [1, 0], base)

    def _mm_right(self, node, base, a: torch.Tensor, p: Perturbed) -> Perturbed:
        """``a @ p`` with ``a`` (n, d) constant and ``p`` (d, k) perturbed; ``base`` (n, k)."""
        if p.promoted or a.dtype != p.base.dtype:
            raise StructuredUnsupported(_op_name(node.target), "operands of different dtypes")
        p = unit_axes(p)
        b = p.batch
        dtype = base.dtype
        if p.axes == (0, 1):  # one entry W[i, j]: column j moves by delta * a[:, i]
            i, j = p.pos[:, 0], p.pos[:, 1]
            delta = p.slab.reshape(b).double() - p.base[i, j].double()
            features = self._cached((node.name, "a", base.shape), lambda: a.contiguous())
            z = self._cached((node.name, "z", base.shape), lambda: columns(base, (1,)))
            return Perturbed(base, (1,), j.unsqueeze(1), None, Lineage(z, features, j, i, delta))
        if p.axes == (1,):  # column j replaced: recompute that column of the product
            return Perturbed(base, (1,), p.pos, torch.mm(p.slab, a.t()).to(dtype))
        self.densified.add(node.name)
        if p.axes == (0,):  # row i replaced: every output moves by a[:, i] (x) (new row - old row)
            i = p.pos[:, 0]
            drow = p.slab.double() - p.base[i].double()  # (B, k)
            slab = torch.addcmul(base.double().unsqueeze(0), a.t()[i].double().unsqueeze(2), drow.unsqueeze(1))
            slab = slab.to(dtype)
            return Perturbed(base, (), p.pos[:, :0], slab)
        return Perturbed(base, (), p.pos, torch.matmul(a, p.slab).to(dtype))


def _common_region(perturbed: list[Perturbed]) -> tuple[tuple[int, ...], torch.Tensor]:
    """The axes (and positions) on which every operand's region agrees for every perturbation."""
    first = perturbed[0]
    axes = list(first.axes)
    for p in perturbed[1:]:
        keep = []
        for a in axes:
            if a in p.axes and torch.equal(first.pos[:, first.axes.index(a)], p.pos[:, p.axes.index(a)]):
                keep.append(a)
        axes = keep
    axes = tuple(axes)
    pos = first.pos[:, [first.axes.index(a) for a in axes]]
    return axes, pos


def _permute(p: Perturbed, perm, base: torch.Tensor) -> Perturbed:
    """``p.permute(perm)`` (``base`` is the permuted base). Keeps the lineage when the order of the region's entries
    and of its axes is unchanged."""
    nd = p.base.dim()
    perm = [d % nd for d in perm] if nd else []
    new_of_old = [perm.index(a) for a in p.axes]
    order = sorted(range(len(new_of_old)), key=new_of_old.__getitem__)
    axes = tuple(new_of_old[k] for k in order)
    pos = p.pos[:, order]
    new_rest = [e for e in range(nd) if perm[e] not in p.axes]
    old_rest = p.rest
    keeps_order = order == sorted(order) and [perm[e] for e in new_rest] == sorted(perm[e] for e in new_rest)
    if p.slab_ is None and keeps_order:
        return Perturbed(base, axes, pos, None, p.lineage, p.scalar, p.promoted)
    slab = p.slab.permute(0, *[old_rest.index(perm[e]) + 1 for e in new_rest])
    return Perturbed(base, axes, pos, slab, scalar=p.scalar, promoted=p.promoted)


# --------------------------------------------------------------------------------------------------------------
# op handlers: (analysis, node, base, *args, **kwargs) -> value


def _h_mm(an: Analysis, node, base, a, b):
    return an._mm(node, base, a, b)


def _h_addmm(an: Analysis, node, base, bias, a, b, *, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        raise StructuredUnsupported(_op_name(node.target), f"beta={beta}, alpha={alpha} (only 1 is supported)")
    mm_base = an._cached((node.name, "mm"), lambda: torch.mm(_base(a), _base(b)))
    product = an._mm(node, mm_base, a, b) if isinstance(a, Perturbed) or isinstance(b, Perturbed) else mm_base
    return an._pointwise(node, aten.add.Tensor, base, (product, bias), {})


def _h_mv(an: Analysis, node, base, a, v):
    col = _unsqueeze(v, 1, _base(v).unsqueeze(1)) if isinstance(v, Perturbed) else v.unsqueeze(1)
    out = an._mm(node, base.unsqueeze(1), a, col)
    return _squeeze(out, [1], base)


def _base(v):
    return v.base if isinstance(v, Perturbed) else v


def _h_permute(an, node, base, p, dims):
    return _permute(p, list(dims), base)


def _h_t(an, node, base, p):
    return _permute(p, [1, 0], base) if p.base.dim() == 2 else _identity(p, base)


def _h_transpose(an, node, base, p, dim0, dim1):
    nd = p.base.dim()
    if nd == 0:
        return _identity(p, base)
    perm = list(range(nd))
    d0, d1 = dim0 % nd, dim1 % nd
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return _permute(p, perm, base)


def _identity(p: Perturbed, base: torch.Tensor) -> Perturbed:
    return replace(p, base=base)


def _h_identity(an, node, base, p, *args, **kwargs):
    return _identity(p, base)


def _h_to_copy(an, node, base, p, **kwargs):
    if kwargs.get("device") is not None and torch.device(kwargs["device"]) != p.base.device:
        raise StructuredUnsupported(_op_name(node.target), "moves the value to another device")
    return Perturbed(base, p.axes, p.pos, p.slab.to(base.dtype), scalar=p.scalar, promoted=p.promoted)


def _unsqueeze(p: Perturbed, dim: int, base: torch.Tensor) -> Perturbed:
    nd = p.base.dim() + 1
    dim %= nd
    axes = tuple(a + (a >= dim) for a in p.axes)
    new_rest = [d for d in range(nd) if d not in axes]
    if p.slab_ is None:
        return Perturbed(base, axes, p.pos, None, p.lineage, p.scalar, p.promoted)
    return Perturbed(base, axes, p.pos, p.slab.unsqueeze(new_rest.index(dim) + 1), scalar=p.scalar,
                     promoted=p.promoted)


def _squeeze(p: Perturbed, dims, base: torch.Tensor) -> Perturbed:
    nd = p.base.dim()
    if nd == 0:
        return _identity(p, base)
    dims = sorted({d % nd for d in dims if p.base.shape[d % nd] == 1})
    if not dims:
        return _identity(p, base)
    keep_axes = [k for k, a in enumerate(p.axes) if a not in dims]
    axes = tuple(a - sum(d < a for d in dims) for a in p.axes if a not in dims)
    pos = p.pos[:, keep_axes]
    if p.slab_ is None:
        return Perturbed(base, axes, pos, None, p.lineage, p.scalar, p.promoted)
    old_rest = p.rest
    slab = p.slab
    for d in sorted((d for d in dims if d in old_rest), reverse=True):
        slab = slab.squeeze(old_rest.index(d) + 1)
    return Perturbed(base, axes, pos, slab, scalar=p.scalar, promoted=p.promoted)


def _h_unsqueeze(an, node, base, p, dim):
    return _unsqueeze(p, dim, base)


def _h_squeeze(an, node, base, p, dims=None):
    if dims is None:
        dims = list(range(p.base.dim()))
    elif isinstance(dims, int):
        dims = [dims]
    return _squeeze(p, dims, base)


def _h_expand(an, node, base, p, sizes, *, implicit=False):
    if tuple(base.shape) == tuple(p.base.shape):
        return _identity(p, base)
    q = broadcast_to(p, base.shape)
    return replace(q, base=base)


def _groups(old, new) -> list[tuple[list[int], list[int]]]:
    """Pair runs of dims of ``old`` and ``new`` with equal element counts (a reshape maps each run onto its pair)."""
    groups, i, j = [], 0, 0
    while i < len(old) or j < len(new):
        go, gn, po, pn = [], [], 1, 1
        if i < len(old):
            go.append(i)
            po *= old[i]
            i += 1
        if j < len(new):
            gn.append(j)
            pn *= new[j]
            j += 1
        while po != pn:
            if po < pn and i < len(old):
                go.append(i)
                po *= old[i]
                i += 1
            elif j < len(new):
                gn.append(j)
                pn *= new[j]
                j += 1
            else:
                raise ValueError("shapes do not match")
        groups.append((go, gn))
    return groups


def _h_view(an, node, base, p, *args):
    old, new = tuple(p.base.shape), tuple(base.shape)
    if old == new:
        return _identity(p, base)
    if 0 in old:
        raise StructuredUnsupported(_op_name(node.target), "a reshape of an empty tensor")
    groups = _groups(old, new)
    # a run of dims that mixes region axes with whole dims becomes whole
    mixed = {a for go, _ in groups if not all(d in p.axes for d in go) for a in go if a in p.axes}
    p = widen(p, tuple(a for a in p.axes if a not in mixed))
    axes, cols = [], []
    for go, gn in groups:
        if go and all(d in p.axes for d in go):
            flat = ravel(p.pos[:, [p.axes.index(d) for d in go]], [old[d] for d in go])
            new_pos = unravel_batch(flat, [new[e] for e in gn])
            axes += gn
            cols += [new_pos[:, k] for k in range(len(gn))]
    rest_shape = [new[e] for e in range(len(new)) if e not in axes]
    pos = torch.stack(cols, 1) if cols else p.pos[:, :0]
    return Perturbed(base, tuple(axes), pos, p.slab.reshape(p.batch, *rest_shape), scalar=p.scalar,
                     promoted=p.promoted)


def _h_slice(an, node, base, p, dim=0, start=None, end=None, step=1):
    nd = p.base.dim()
    dim %= nd
    size = p.base.shape[dim]
    r = range(size)[slice(start, end, step)]
    if len(r) == size:
        return _identity(p, base)
    if dim not in p.axes:
        k = p.rest.index(dim) + 1
        idx = [slice(None)] * p.slab.dim()
        idx[k] = slice(r.start, r.stop, r.step)
        return Perturbed(base, p.axes, p.pos, p.slab[tuple(idx)], scalar=p.scalar, promoted=p.promoted)
    if len(r) == 0:
        raise StructuredUnsupported(_op_name(node.target), "an empty slice")
    a = p.axes.index(dim)
    pk = p.pos[:, a]
    inside = (pk >= r.start) & (pk < r.stop) & ((pk - r.start) % r.step == 0)
    new_pk = torch.where(inside, torch.div(pk - r.start, r.step, rounding_mode="floor"), torch.zeros_like(pk))
    pos = p.pos.clone()
    pos[:, a] = new_pk
    q = Perturbed(base, p.axes, pos, p.slab, scalar=p.scalar, promoted=p.promoted)
    return _with_unaffected(q, inside)


def _h_select(an, node, base, p, dim, index):
    nd = p.base.dim()
    dim %= nd
    index %= p.base.shape[dim]
    if dim not in p.axes:
        return Perturbed(base, tuple(a - (a > dim) for a in p.axes), p.pos, p.slab.select(p.rest.index(dim) + 1, index),
                         scalar=p.scalar, promoted=p.promoted)
    a = p.axes.index(dim)
    inside = p.pos[:, a] == index
    keep = [k for k in range(len(p.axes)) if k != a]
    axes = tuple(x - (x > dim) for x in p.axes if x != dim)
    q = Perturbed(base, axes, p.pos[:, keep], p.slab, scalar=p.scalar, promoted=p.promoted)
    return _with_unaffected(q, inside)


def _reduce_dims(p: Perturbed, dims) -> list[int]:
    nd = p.base.dim()
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(nd))
    if isinstance(dims, int):
        dims = [dims]
    return sorted({d % nd for d in dims}) if nd else []


def _full_sum(an: Analysis, node, p: Perturbed, mean: bool, keep_shape) -> Perturbed:
    """A full sum (or mean) over the changed terms only, in float64: the change of each perturbation is
    ``sum(new values - base values)`` over its region, every term the element's new value minus its base value.
    Returns a relative value (its base the float64 sum of the base)."""
    b = p.batch
    count = max(p.base.numel(), 1)
    total = an._cached((node.name, "total"), lambda: p.base.double().sum())
    slab = p.slab
    old = gather(p.base, p.axes, p.pos)
    terms = slab.double() - old.double()
    rel = terms.sum(list(range(1, terms.dim()))) if terms.dim() > 1 else terms.reshape(b)
    base = total
    if mean:
        rel, base = rel / count, base / count
    shape = tuple(keep_shape)
    return Perturbed(base.reshape(shape), (), p.pos[:, :0], rel.expand(b).reshape(b, *shape), promoted=True,
                     relative=True)


def _fused_sum(an: Analysis, node, p: Perturbed, target: torch.Tensor | None, mean: bool, keep_shape) -> Perturbed:
    """The fused kernel: how every perturbation changes the squared-error sum of the lineage, in one pass."""
    L = p.lineage
    s, c = an.s, an.c
    col, fi = L.col.view(s, c), L.fi.view(s, c)
    if s > _MAX_NODES or not (torch.equal(col, col[:1].expand_as(col)) and torch.equal(fi, fi[:1].expand_as(fi))):
        return _full_sum(an, node, p, mean, keep_shape)
    if target is None:
        target = an._cached((node.name, "zeros"), lambda: torch.zeros_like(L.z))
    an.fused.add(node.name)

    def base_total():
        a = _ACTIVATION_FUNCS[L.activation](L.z) if L.activation else L.z
        return ((a.double() - target.double()) ** 2).sum()

    total = an._cached((node.name, "fused_total"), base_total)
    rel = linear_update_mse(L.z, L.features, target, col[0].contiguous(), fi[0].contiguous(),
                            L.delta.view(s, c).contiguous(), L.activation).reshape(-1)
    base = total
    if mean:
        count = max(p.base.numel(), 1)
        rel, base = rel / count, base / count
    shape = tuple(keep_shape)
    return Perturbed(base.reshape(shape), (), p.pos[:, :0], rel.reshape(-1, *shape), promoted=True, relative=True)


def _h_reduction(an: Analysis, node, base, p, dims=None, keepdim=False, *, dtype=None):
    op = node.target
    if op in (aten.sum.default, aten.mean.default):
        dims, keepdim = None, False
    red = _reduce_dims(p, dims)
    nd = p.base.dim()
    if op in _FULL_SUMS and len(red) == nd:
        keep_shape = [1] * nd if keepdim else []
        mean = _FULL_SUMS[op] == "mean"
        if p.lineage is not None and p.slab_ is None and p.lineage.squared and not p.promoted:
            return _fused_sum(an, node, p, p.lineage.target, mean, keep_shape)
        return _full_sum(an, node, p, mean, keep_shape)
    base, promoted = an._base_of(node, op, base, (p, dims, keepdim), {"dtype": dtype} if dtype else {})
    p = widen(p, tuple(a for a in p.axes if a not in red))
    slab_dims = [p.rest.index(d) + 1 for d in red]
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if op in (aten.sum.default, aten.mean.default):
        op = aten.sum.dim_IntList if op is aten.sum.default else aten.mean.dim
    slab = op(p.slab, slab_dims, keepdim, **kwargs)
    axes = p.axes if keepdim else tuple(a - sum(d < a for d in red) for a in p.axes)
    return Perturbed(base, axes, p.pos, slab.to(base.dtype), promoted=promoted)


def _h_softmax(an: Analysis, node, base, p, dim, half_to_float):
    nd = p.base.dim()
    dim = dim % nd if nd else 0
    if nd:
        p = widen(p, tuple(a for a in p.axes if a != dim))
        d = p.rest.index(dim) + 1
    else:
        d = 1
    slab = node.target(p.slab if nd else p.slab.unsqueeze(1), d, half_to_float)
    if not nd:
        slab = slab.squeeze(1)
    return Perturbed(base, p.axes, p.pos, slab.to(base.dtype), promoted=p.promoted)


def _broadcasts_to(small: tuple, shape: tuple) -> bool:
    """Whether ``small`` broadcasts to exactly ``shape`` (``torch.broadcast_shapes(small, shape) == shape``, without
    the sympy import that ``torch.broadcast_shapes`` costs on its first call)."""
    if len(small) > len(shape):
        return False
    return all(a in (1, b) for a, b in zip(small[::-1], shape[::-1]))


def _h_loss(an: Analysis, node, base, p, target, *args, **kwargs):
    """Elementwise losses (mse, BCE-with-logits, BCE, smooth L1, Huber): the op's own forward with reduction 'none' on
    the region, then a float64 changed-terms sum (or mean)."""
    op = node.target
    name = _op_name(op)
    if isinstance(target, Perturbed) or any(isinstance(v, Perturbed) for v in tree_flatten((args, kwargs))[0]):
        raise StructuredUnsupported(name, "the target (or a weight) depends on the checked parameter")
    where = _LOSSES[op]
    all_args = [p, target, *args]
    names = [a.name for a in op._schema.arguments]
    for key, value in kwargs.items():
        idx = names.index(key)
        while len(all_args) <= idx:
            all_args.append(op._schema.arguments[len(all_args)].default_value)
        all_args[idx] = value
    while len(all_args) <= where:
        all_args.append(op._schema.arguments[len(all_args)].default_value)
    reduction = int(all_args[where])
    if p.promoted:
        raise StructuredUnsupported(name, "a loss of a float64-reduced value")
    shape = tuple(p.base.shape)
    if op is aten.mse_loss.default and p.lineage is not None and p.slab_ is None and \
            p.lineage.stage in ("linear", "activated") and reduction in (1, 2) and \
            _broadcasts_to(tuple(target.shape), shape) and target.dtype == p.base.dtype:
        tcols = an._cached((node.name, "target"), lambda: columns(target.expand(shape), p.axes))
        return _fused_sum(an, node, replace(p, lineage=replace(p.lineage, squared=True)), tcols, reduction == 1, [])
    none_args = list(all_args)
    none_args[where] = 0
    elementwise_base = an._cached((node.name, "none"), lambda: op(p.base, *none_args[1:]))
    pointwise = functools.partial(_loss_none, op, where)
    value = an._pointwise(node, pointwise, elementwise_base, tuple(none_args[:where]), {})
    if reduction == 0:
        return value
    return _full_sum(an, node, value, reduction == 1, [])


def _loss_none(op, where, *args):
    args = list(args)
    args.insert(where, 0)
    return op(*args)


def _h_nll(an: Analysis, node, base, p, target, weight, reduction, ignore_index):
    """``nll_loss_forward``: per row ``-weight[t] * logp[row, t]`` (0 where ignored), then the float64 changed-terms
    sum, divided by the (constant) total weight for the mean."""
    name = _op_name(node.target)
    if isinstance(target, Perturbed) or isinstance(weight, Perturbed):
        raise StructuredUnsupported(name, "the target or weight depends on the checked parameter")
    if p.base.dim() != 2 or p.promoted:
        raise StructuredUnsupported(name, f"log-probabilities of shape {tuple(p.base.shape)} (only (N, C) is "
                                    "supported)")
    out_base, total_weight = base
    n = p.base.shape[0]
    keep = an._cached((node.name, "keep"), lambda: target != ignore_index)
    safe = an._cached((node.name, "safe"), lambda: torch.where(keep, target, torch.zeros_like(target)))
    w = an._cached((node.name, "w"), lambda: (weight[safe] if weight is not None else torch.ones(
        n, dtype=p.base.dtype, device=p.base.device)) * keep.to(p.base.dtype))
    rows_base = an._cached((node.name, "rows"), lambda: -p.base.gather(1, safe.unsqueeze(1)).squeeze(1) * w)
    p = widen(p, tuple(a for a in p.axes if a != 1))
    if p.axes == (0,):
        r = p.pos[:, 0]
        picked = p.slab.gather(1, safe[r].unsqueeze(1)).squeeze(1)
        rows = Perturbed(rows_base, (0,), p.pos, (-picked * w[r]).to(p.base.dtype))
    else:
        idx = safe.view(1, n, 1).expand(p.batch, n, 1)
        picked = p.slab.expand(p.batch, *p.base.shape).gather(2, idx).squeeze(2)
        rows = Perturbed(rows_base, (), p.pos, (-picked * w).to(p.base.dtype))
    if reduction == 0:
        return (rows, total_weight)
    summed = _full_sum(an, node, rows, False, [])
    if reduction == 1:  # the total weight does not depend on the parameter
        tw = total_weight.double()
        summed = replace(summed, base=summed.base / tw, slab_=summed.slab / tw)
    return (summed, total_weight)


_HANDLERS: dict = {
    aten.mm.default: _h_mm,
    aten.addmm.default: _h_addmm,
    aten.mv.default: _h_mv,
    aten.t.default: _h_t,
    aten.transpose.int: _h_transpose,
    aten.permute.default: _h_permute,
    aten.unsqueeze.default: _h_unsqueeze,
    aten.squeeze.dim: _h_squeeze,
    aten.squeeze.dims: _h_squeeze,
    aten.squeeze.default: _h_squeeze,
    aten.expand.default: _h_expand,
    aten.view.default: _h_view,
    aten._unsafe_view.default: _h_view,
    aten.reshape.default: _h_view,
    aten.slice.Tensor: _h_slice,
    aten.select.int: _h_select,
    aten._to_copy.default: _h_to_copy,
    aten._log_softmax.default: _h_softmax,
    aten._softmax.default: _h_softmax,
    aten.nll_loss_forward.default: _h_nll,
    **{op: _h_identity for op in _VIEW_IDENTITY},
    **{op: _h_reduction for op in _REDUCTIONS},
    **{op: _h_loss for op in _LOSSES},
}


# --------------------------------------------------------------------------------------------------------------
# the engine's entry point


def evaluate_into(problem, result, moved: torch.Tensor, chunk_size: int | None, budget: int | None) -> None:
    """Fill ``result.losses`` (an :class:`gradfd.engine.Evaluation`) with the structured engine.

    Args:
        problem: the prepared :class:`gradfd.engine.Problem`.
        result: the Evaluation to fill (coords, steps, displacement set). On success its ``engine`` is
            ``"structured"``, its ``losses`` and ``base_loss`` (0) are changes from the loss at the base point, and
            ``loss_offset`` is that loss (float64 reductions).
        moved: ``(S, M)`` node values in the parameter's dtype (``engine.node_values``).
        chunk_size: coordinates per chunk (honoured as given); default from ``budget``.
        budget: bytes of perturbed values per chunk; default from free memory (capped on a CPU).

    Raises:
        StructuredUnsupported: naming the op (or step) that stopped the analysis; ``result`` is then incomplete.
    """

    analysis = Analysis(problem)
    s, m = moved.shape
    device = problem.device
    if budget is None:
        budget = default_memory_budget(device)
        if device.type == "cpu":
            budget = min(budget, STRUCTURED_CPU_WORKING_SET)
    chunk = chunk_size or min(m, _PROBE_COORDS)
    start = 0
    base = None
    while start < m:
        this = min(chunk, m - start)
        vals, base = analysis.run(result.coords[start:start + this], moved[:, start:start + this])
        if result.sink is not None:  # a sink (gradfd.check) takes whole losses: the change plus the float64 base
            result.store(start, start + this, vals.view(s, this) + float(base))
        else:
            result.store(start, start + this, vals.view(s, this))
        if start == 0 and chunk_size is None:
            per_coord = analysis.bytes / this + 96 * s  # + indices, positions and displacements
            chunk = int(max(1, min(m, budget // max(per_coord, 1))))
        start += this
    if result.sink is None:  # losses are changes from the float64 base loss, which is the offset
        result.loss_offset = float(base) if base is not None else float(problem.base_loss)
        result.base_loss = torch.zeros((), dtype=torch.float64, device=device)
    result.engine, result.batching, result.chunk_size = "structured", None, chunk
    result.notes.append(f"structured: traced {sum(n.op == 'call_function' for n in analysis.nodes)} aten ops in "
                        f"{analysis.trace_seconds * 1e3:.0f} ms; chunks of {chunk} coordinates")
    if analysis.fused:
        result.notes.append("structured: fused kernel gradfd::linear_update_mse at "
                            + ", ".join(sorted(analysis.fused)))
    if analysis.densified:
        result.notes.append("structured: region widened to whole tensors at " + ", ".join(sorted(analysis.densified)))
    result.notes.append(f"structured: losses are changes from the base loss {result.loss_offset!r} (loss_offset), "
                        "summed over the changed terms in float64")


_MIN_WORK = 1e8  # bytes the generic engine would touch below which "auto" does not trace (tracing costs ~10 ms)


def worthwhile(problem, evaluations: int, notes: list[str]) -> bool:
    """Whether ``engine="auto"`` should try the structured engine: when the generic engine's work (evaluations times
    the bytes of one evaluation's activations and parameter copy) outweighs the cost of tracing ``func``. Records the
    decision in ``notes`` when it declines."""
    work = evaluations * (problem.activation_bytes() + problem.numel * problem.flat.element_size())
    if work >= _MIN_WORK:
        return True
    notes.append(f"structured engine not tried: generic work ~{work / 1e6:.1f} MB is below {_MIN_WORK / 1e6:.0f} MB")
    return False
