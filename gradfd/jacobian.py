"""Entry-by-entry checks of Jacobians, chunk by chunk, without ever forming the dense numerical Jacobian.

A scalar loss is the one-output case. For each checked input tensor the engine evaluates the function at the
stencil's nodes for a chunk of input coordinates at a time; each chunk's values -- ``(S, c, O)`` for ``O``
compared output entries -- arrive here, become numerical Jacobian columns with error estimates
(:mod:`gradfd.accuracy`'s rules, per output entry), and are compared with the same columns of the analytical
Jacobian, obtained from batched vector-Jacobian products (one-hot cotangents through
``torch.autograd.grad(..., is_grads_batched=True)``, falling back to one backward per row). The analytical
Jacobian is held densely only when it fits the memory budget; otherwise its rows are recomputed per chunk. Only
statistics, the worst entries and the entries that did not agree are kept (all entries when there are few),
so memory never grows as inputs x outputs.

Full mode first tries :class:`_ColoredPass` for elementwise, broadcasting and row-wise patterns: many inputs
perturbed together, a few weighted backward passes, the pattern verified on both sides, and exact columns
whenever anything does not hold.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import accuracy, stencils
from . import engine as _engine
from .errors import note
from .report import AGREE, DISAGREE, REL_FLOOR, UNRESOLVED, TensorReport, relative_errors

__all__ = ["Analytical", "column_entries", "check_coordinates", "DENSE_ENTRIES"]

DENSE_ENTRIES = 1 << 21  # keep every entry's values in the report up to this many (output, input) pairs
_VJP_ROW_BYTES = 1 << 26  # bytes of analytical rows computed per batched backward


def grad(outs: list[torch.Tensor], inputs: list[torch.Tensor], cots: list[torch.Tensor]) -> tuple:
    """``torch.autograd.grad(outs, inputs, grad_outputs=cots, retain_graph=True, allow_unused=True)``.

    Rule: one-element outputs whose cotangents are all exactly 1 (a loss) are differentiated without
    ``grad_outputs``: the same values, and torch then does not import sympy (``torch.autograd._make_grads`` imports
    ``torch.fx.experimental.symbolic_shapes`` for any ``grad_outputs``: ~1.5 s of a process's first check;
    ``tests/test_first_call.py``)."""
    if all(o.numel() == 1 and c.numel() == 1 and bool(c.reshape(()) == 1) for o, c in zip(outs, cots)):
        return torch.autograd.grad(outs, inputs, retain_graph=True, allow_unused=True)
    return torch.autograd.grad(outs, inputs, grad_outputs=cots, retain_graph=True, allow_unused=True)


class Analytical:
    """Autograd's Jacobian of ``func`` at the unperturbed point, for the checked inputs, row-chunk by row-chunk.

    Args:
        func: the function; called once here, with autograd enabled, on clones of ``params``.
        params: the caller's tensors (cloned; never modified).
        wrt: indices of the inputs to differentiate.
        budget: bytes the dense Jacobian of one input may take; above it, rows are recomputed when needed.

    Attributes:
        spec: the :class:`~gradfd.engine.OutputSpec` of the compared outputs.
        scalar: ``func`` returned a single one-element tensor (a loss).
    """

    def __init__(self, func: Callable, params: Sequence[torch.Tensor], wrt: Sequence[int], budget: int):
        self.clones = [p.detach().clone().requires_grad_(k in wrt) for k, p in enumerate(params)]
        self.wrt = list(wrt)
        with torch.enable_grad(), _engine.noting("gradfd: raised while evaluating func at the unperturbed params "
                                                 "for autograd (on clones)"):
            out = func(*self.clones)
        self.scalar = isinstance(out, torch.Tensor) and out.numel() == 1 and out.is_floating_point()
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        # floating outputs without a gradient although a checked input requires one: autograd treats them as
        # non-differentiable (torch.autograd.Function.mark_non_differentiable, or ops such as native_layer_norm's
        # mean and rstd); like torch.autograd.gradcheck, they are left out, and listed
        self.nondifferentiable = [k for k, o in enumerate(outs) if isinstance(o, torch.Tensor) and not self.scalar
                                  and o.is_floating_point() and not o.requires_grad and any(
                                      self.clones[i].requires_grad for i in self.wrt) and o.grad_fn is None
                                  and _depends_on_inputs(func, self.clones, k)]
        self.spec = _engine.OutputSpec(out, self.nondifferentiable)
        self.outputs = [outs[k] for k in self.spec.kept]
        self.budget = budget
        self._dense: dict[int, torch.Tensor] = {}
        device = params[self.wrt[0]].device if self.wrt else torch.device("cpu")
        self.device = device

    def _rows(self, k: int, rows: torch.Tensor) -> torch.Tensor:
        """``(r, N_k)`` float64 rows of the Jacobian of the concatenated outputs with respect to ``params[k]``."""
        x = self.clones[k]
        r = rows.numel()
        depends = [o.requires_grad for o in self.outputs]
        if r == 0 or not any(depends):
            return torch.zeros(r, x.numel(), dtype=torch.float64, device=x.device)
        cots = []
        for j, o in enumerate(self.outputs):
            cot = torch.zeros(r, o.numel(), dtype=o.dtype, device=o.device)
            lo, hi = self.spec.offsets[j], self.spec.offsets[j] + self.spec.numels[j]
            inside = (rows >= lo) & (rows < hi)
            cot[inside.nonzero().flatten(), rows[inside] - lo] = 1
            cots.append(cot.view(r, *o.shape))
        outs = [o for o, d in zip(self.outputs, depends) if d]
        cots = [c for c, d in zip(cots, depends) if d]
        grads = None
        if r > 1:  # one row goes unbatched (a loss's gradient then takes grad's path without grad_outputs)
            try:
                (g,) = torch.autograd.grad(outs, [x], grad_outputs=cots, retain_graph=True, allow_unused=True,
                                           is_grads_batched=True)
                grads = torch.zeros_like(x).expand(r, *x.shape) if g is None else g
            except RuntimeError:  # a backward that cannot be batched: one backward per row
                pass
        if grads is None:
            grads = []
            for q in range(r):
                (g,) = grad(outs, [x], [c[q] for c in cots])
                grads.append(torch.zeros_like(x) if g is None else g)
            grads = torch.stack(grads)
        return grads.reshape(r, -1).to(torch.float64)

    def columns(self, k: int, cols: torch.Tensor) -> torch.Tensor:
        """``(c, O)`` float64: Jacobian columns ``cols`` (flat input indices of ``params[k]``), transposed."""
        size = self.spec.size
        n = self.clones[k].numel()
        if k not in self._dense and size * n * 8 <= self.budget:
            self._dense[k] = self._all_rows(k).t().contiguous()  # (N, O): a chunk of columns is a block of rows
        if k in self._dense:
            return self._dense[k][cols]
        step = self._row_step(n)
        parts = [self._rows(k, torch.arange(a, min(a + step, size), device=self.device))[:, cols]
                 for a in range(0, size, step)]
        return torch.cat(parts, dim=0).t()

    def _row_step(self, n: int) -> int:
        """Rows per batched backward: their float64 values (and a few intermediates of that size) within the budget."""
        return max(1, min(_VJP_ROW_BYTES, self.budget // 8) // (8 * max(n, 1)))

    def _all_rows(self, k: int) -> torch.Tensor:
        size, n = self.spec.size, self.clones[k].numel()
        step = self._row_step(n)
        return torch.cat([self._rows(k, torch.arange(a, min(a + step, size), device=self.device))
                          for a in range(0, size, step)], dim=0) if size else torch.zeros(0, n, dtype=torch.float64)

    def vjp(self, k: int, cotangent: torch.Tensor) -> torch.Tensor:
        """``(N_k,)`` float64: ``cotangentᵀ J`` for a ``(O,)`` cotangent over the concatenated outputs."""
        x = self.clones[k]
        outs, cots = [], []
        for j, o in enumerate(self.outputs):
            if o.requires_grad:
                lo = self.spec.offsets[j]
                outs.append(o)
                cots.append(cotangent[lo:lo + o.numel()].to(o.dtype).view(o.shape))
        if not outs:
            return torch.zeros(x.numel(), dtype=torch.float64, device=x.device)
        (g,) = grad(outs, [x], cots)
        return torch.zeros(x.numel(), dtype=torch.float64, device=x.device) if g is None else \
            g.reshape(-1).to(torch.float64)

    def vjp_batched(self, k: int, cotangents: torch.Tensor) -> torch.Tensor:
        """``(r, N_k)`` float64: ``cotangents (r, O)`` times the Jacobian, in one batched backward when possible."""
        x = self.clones[k]
        r = cotangents.shape[0]
        outs, cots = [], []
        for j, o in enumerate(self.outputs):
            if o.requires_grad:
                lo = self.spec.offsets[j]
                outs.append(o)
                cots.append(cotangents[:, lo:lo + o.numel()].to(o.dtype).reshape(r, *o.shape))
        if not outs:
            return torch.zeros(r, x.numel(), dtype=torch.float64, device=x.device)
        try:
            (g,) = torch.autograd.grad(outs, [x], grad_outputs=cots, retain_graph=True, allow_unused=True,
                                       is_grads_batched=True)
        except RuntimeError:
            return torch.stack([self.vjp(k, cotangents[q]) for q in range(r)])
        return torch.zeros(r, x.numel(), dtype=torch.float64, device=x.device) if g is None else \
            g.reshape(r, -1).to(torch.float64)

    def scale(self, k: int, group: int) -> float | None:
        """Largest |entry| of the Jacobian block (output ``group``, input ``k``) when it is held densely."""
        if k not in self._dense:
            return None
        lo = self.spec.offsets[group]
        block = self._dense[k][:, lo:lo + self.spec.numels[group]]
        return _largest(block)


def _largest(t: torch.Tensor) -> float:
    """The largest finite ``|t|`` (0.0 if none): the scale of a Jacobian block, whose NaN entries (a NaN from the
    backward) are judged on their own and must not make every tolerance NaN."""
    a = t.abs()
    a = a[torch.isfinite(a)]
    return float(a.max()) if a.numel() else 0.0


def _depends_on_inputs(func: Callable, clones: Sequence[torch.Tensor], k: int) -> bool:
    """Whether output ``k`` changes at all when every floating input is nudged (so that a constant output, which
    must have a zero gradient, is still compared)."""
    with torch.no_grad(), _engine.noting(f"gradfd: raised while testing whether output {k} depends on the inputs "
                                         "(func at the unperturbed params and at all inputs nudged by 2^-10)"):
        base = func(*[c.detach() for c in clones])
        nudged = func(*[c.detach() * (1 + 2.0**-10) + 2.0**-10 if c.is_floating_point() else c.detach()
                        for c in clones])
    pick = lambda out: (list(out) if isinstance(out, (tuple, list)) else [out])[k]  # noqa: E731
    return not torch.equal(pick(base), pick(nudged))


class _Compressed:
    """The analytical Jacobian of one input from a few colored vector-Jacobian products (Curtis-Powell-Reid).

    Outputs are colored ``o mod q``; one backward per color (cotangent = the color's indicator) gives, for every
    input column, the sum of the Jacobian entries of that color. Where each column moves at most one output of
    each color -- as the numerical side shows exactly (which outputs changed at any node) -- those sums are the
    entries themselves: an elementwise op needs one backward, a row-wise op one per row length, instead of one per
    output. A color whose outputs the column did not move must sum to zero; a nonzero sum (a backward that leaks
    into entries the function does not depend on) or any disagreement makes the caller redo the tensor with exact
    rows, so that the reported entries are exact.
    """

    def __init__(self, analytical: Analytical, k: int):
        self.analytical, self.k = analytical, k
        self.size = analytical.spec.size
        self.q: int | None = None
        self.rows: torch.Tensor | None = None  # (q, N)

    def fit(self, moved: torch.Tensor) -> bool:
        """Make the coloring valid for the columns of ``moved`` (``(c, O)`` bool); False when compression no
        longer pays (more than a tenth as many colors as outputs)."""
        if self.q is not None and not self._collides(moved, self.q):
            return True
        start = max(1, int(moved.sum(dim=1).max()) if moved.numel() else 1, 2 * self.q if self.q else 1)
        q = start
        while q <= self.size // 10:
            if not self._collides(moved, q):
                self.q = q
                colors = torch.arange(self.size, device=moved.device) % q
                cot = torch.zeros(q, self.size, dtype=torch.float64, device=moved.device)
                cot[colors, torch.arange(self.size, device=moved.device)] = 1.0
                self.rows = torch.stack([self.analytical.vjp(self.k, cot[c]) for c in range(q)]) if q <= 4 else \
                    self.analytical.vjp_batched(self.k, cot)
                return True
            q *= 2
        return False

    @staticmethod
    def _collides(moved: torch.Tensor, q: int) -> bool:
        c, o = moved.shape
        counts = torch.zeros(c, q, dtype=torch.int64, device=moved.device)
        cols, outs = moved.nonzero(as_tuple=True)
        counts.index_put_((cols, outs % q), torch.ones_like(cols), accumulate=True)
        return bool((counts > 1).any())

    def entries(self, cols: torch.Tensor, moved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c, O)`` analytical values at the moved pairs (0 elsewhere) and the ``(c, q)`` sums of the colors the
        column did not move (which must vanish)."""
        sums = self.rows[:, cols].t()  # (c, q)
        colors = torch.arange(self.size, device=moved.device) % self.q
        values = torch.where(moved, sums[:, colors], torch.zeros(moved.shape, dtype=torch.float64,
                                                                  device=moved.device))
        used = torch.zeros(sums.shape, dtype=torch.bool, device=moved.device)
        cc, oo = moved.nonzero(as_tuple=True)
        used[cc, oo % self.q] = True
        return values, torch.where(used, torch.zeros_like(sums), sums)


_COLORED_SAVING = 4  # the colored pass runs when it needs at most 1/4 of the exact columns' evaluations
_JUDGED_PAIRS = 1 << 20  # pattern entries estimated and judged per block
NOISE_PROBE = 256  # the noise probe's steps are this many times smaller than the first round's ...
NOISE_PROBE_COLUMNS = 32  # ... on this many columns (a seeded random choice)
_PROBE_SEED = 7
PROBE_ZEROS = 0.1  # the probe's fourth differences of an output may be exactly zero for this fraction at most
_PATTERNS = (0, 1)  # the hypothesised patterns, in order: elementwise/broadcast, row-wise (see _pattern)


def _pattern(in_shape: Sequence[int], out_shape: Sequence[int], whole: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A hypothesised sparsity pattern, as ``(outs, ins)`` flat index pairs, or None when the shapes rule it out.

    The input is aligned with the output from the right as in broadcasting (or, having as many entries, taken
    as reshaped to it); output entry ``(a, b)`` -- ``a`` its leading indices, ``b`` its last ``whole`` -- depends
    on the input entries ``(a', *)``, ``a'`` being ``a`` with broadcast dimensions at 0: ``whole=0`` is an
    elementwise (or broadcasting) op, ``whole=1`` a row-wise op along the last dimension (softmax, normalisation).
    """
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if whole > len(out_shape):
        return None
    lead = len(out_shape) - whole

    def aligned(shape: tuple) -> tuple | None:
        if len(shape) > len(out_shape):
            return None
        padded = (1,) * (len(out_shape) - len(shape)) + shape
        ok = all(i in (1, o) for i, o in zip(padded[:lead], out_shape[:lead])) and padded[lead:] == out_shape[lead:]
        return padded if ok else None

    # an input with as many entries as the output may enter reshaped (x.view(-1, 100)): flat index for flat index
    padded = aligned(in_shape) or (aligned(out_shape) if math.prod(in_shape) == math.prod(out_shape) else None)
    if padded is None:
        return None
    numel_out = math.prod(out_shape)
    if numel_out == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    idx = torch.arange(math.prod(padded)).view(padded)
    width = math.prod(out_shape[lead:])
    rows = idx.reshape(*padded[:lead], width).expand(*out_shape[:lead], width).reshape(-1, width)  # per leading
    outs = torch.arange(numel_out).repeat_interleave(width)
    ins = rows[torch.div(torch.arange(numel_out), width, rounding_mode="floor")].reshape(-1)
    return outs, ins


def _mod_coloring(a: torch.Tensor, b: torch.Tensor, limit: int) -> int | None:
    """The smallest tried ``q <= limit`` such that no ``a`` value has two ``b`` values of one color ``b mod q``."""
    lower = int(torch.bincount(a).max()) if a.numel() else 1
    tried = list(range(lower, lower + 9)) + [2 * lower + 1, 4 * lower + 1]
    for q in tried:
        if q > limit:
            return None
        key = a * q + b % q
        if torch.unique(key).numel() == key.numel():
            return q
    return None


class _ColoredPass:
    """Full mode for structured Jacobians from a few perturbations and a few backward passes (column and row
    compression, Curtis-Powell-Reid), verified on both sides.

    A sparsity pattern is hypothesised from the shapes (:func:`_pattern`: elementwise or broadcasting, then
    row-wise). Inputs are colored ``i mod q`` so that no output depends (in the pattern) on two inputs of one
    color, outputs ``o mod p`` likewise. One stencil of perturbations per input color -- every input of the color
    moved by its own step times a seeded random weight in [0.7, 1.3] -- gives, for each output, the numerical entry
    of its pattern input of that color; one backward pass per output color, with seeded random cotangent weights,
    gives the analytical entries. The pattern is only a hypothesis, so both sides test it:

    - an output that moves (bitwise) under an input color where the pattern has no entry, or a backward pass that
      gives an input a gradient (above the absolute floor of the verdicts) from an output color where the pattern
      has none, abandons the pass for exact columns;
    - a dependence outside the pattern that shares a color with a pattern entry adds its randomly weighted (so
      never cancelling) term to that entry, which then disagrees; every disagreement is re-located with exact
      columns before an entry is pointed at.

    Only a pass in which all of this holds is reported from colors.
    """

    def __init__(self, analytical: Analytical, k: int, outs: torch.Tensor, ins: torch.Tensor, q: int, p: int,
                 steps: torch.Tensor, stencil: stencils.Stencil, name: str):
        self.analytical, self.k, self.q, self.p, self.stencil, self.name = analytical, k, q, p, stencil, name
        self.size = analytical.spec.size
        order = torch.argsort(ins * self.size + outs)
        self.outs, self.ins = outs[order], ins[order]
        self.key = self.ins * self.size + self.outs
        self.colors = torch.arange(steps.numel(), device=steps.device) % q
        self.steps = steps
        self.batching = None
        self.vals: torch.Tensor | None = None

    @classmethod
    def build(cls, analytical: Analytical, k: int, base_steps: torch.Tensor, stencil: stencils.Stencil,
              whole: int) -> "_ColoredPass | None":
        """The pass for pattern ``whole`` (see :func:`_pattern`), or None when it does not apply or would not pay."""
        spec, shape = analytical.spec, tuple(analytical.clones[k].shape)
        n, size = base_steps.numel(), spec.size
        parts = [_pattern(shape, spec.shapes[j], whole) for j in range(len(spec.kept))]
        if any(pt is None for pt in parts):
            return None
        nnz = sum(pt[0].numel() for pt in parts)
        if nnz * 64 > analytical.budget:
            return None
        device = base_steps.device
        outs = torch.cat([pt[0] + spec.offsets[j] for j, pt in enumerate(parts)]).to(device)
        ins = torch.cat([pt[1] for pt in parts]).to(device)
        q = _mod_coloring(outs, ins, n // _COLORED_SAVING)
        p = _mod_coloring(ins, outs, size // _COLORED_SAVING) if q is not None else None
        if q is None or p is None or q * len(stencil.offsets) * 8 * size * 2 > analytical.budget:  # the node values
            return None
        gen = torch.Generator().manual_seed(7919 * (k + 1) + whole)
        weights = (0.7 + 0.6 * torch.rand(n, generator=gen, dtype=torch.float64)).to(device)
        name = "elementwise/broadcast" if whole == 0 else f"row-wise over the last {whole} dimension(s)"
        return cls(analytical, k, outs, ins, q, p, base_steps * weights, stencil, name)

    def describe(self) -> str:
        return (f"{self.name} pattern ({self.key.numel()} entries), verified: {self.q} input color(s) perturbed "
                f"together, {self.p} output color(s) per backward pass (Curtis-Powell-Reid compression)")

    def analytical_entries(self, atol_floor: Callable[[float], float]) -> str | None:
        """Decode the pattern's analytical entries from ``p`` weighted backward passes; None, or why the pattern
        is refuted (a gradient from an output color where the pattern has no entry)."""
        device = self.colors.device
        gen = torch.Generator().manual_seed(7919 * (self.k + 2))
        u = (0.7 + 0.6 * torch.rand(self.size, generator=gen, dtype=torch.float64)).to(device)
        out_colors = torch.arange(self.size, device=device) % self.p
        cot = torch.zeros(self.p, self.size, dtype=torch.float64, device=device)
        cot[out_colors, torch.arange(self.size, device=device)] = u
        sums = self.analytical.vjp_batched(self.k, cot)  # (p, N)
        self.vals = sums[self.outs % self.p, self.ins] / u[self.outs]
        claimed = torch.zeros_like(sums, dtype=torch.bool)
        claimed[self.outs % self.p, self.ins] = True
        if not bool(torch.isfinite(sums).all()):
            return "non-finite analytical gradients (reported entry by entry from exact columns)"
        scale = float(self.vals.abs().max()) if self.vals.numel() else 0.0
        leak = torch.where(claimed, torch.zeros_like(sums), sums).abs()
        if bool((leak > atol_floor(scale)).any()):
            d, i = (int(v) for v in (leak > atol_floor(scale)).nonzero()[0])
            return (f"autograd gives input {i} a gradient from output color {d}, where the {self.name} pattern has "
                    "no entry")
        return None

    def values(self, problem: _engine.Problem, colors: torch.Tensor, factor: float):
        """``(S, len(colors), O)`` outputs at the stencil's nodes for each color and the ``(S, N)`` realised
        displacement of every input (within its own color), with steps ``1/factor`` as large."""
        x = problem.flat
        x64 = x.to(torch.float64)
        steps = self.steps / factor
        offsets = torch.tensor(self.stencil.offsets, dtype=torch.float64, device=x.device)
        s_ = offsets.numel()
        disp = (x64 + offsets.view(-1, 1) * steps).to(x.dtype).to(torch.float64) - x64
        out = torch.empty(s_, colors.numel(), self.size, dtype=torch.float64, device=x.device)
        per = max(1, self.analytical.budget // (16 * s_ * 8 * (x.numel() + self.size)))
        for a in range(0, colors.numel(), per):
            cs = colors[a:a + per]
            moved = (self.colors.unsqueeze(0) == cs.unsqueeze(1)).to(torch.float64) * steps  # (c, N)
            points = (x64 + offsets.view(-1, 1, 1) * moved).to(x.dtype).reshape(-1, x.numel())
            vals, self.batching = _engine.evaluate_points(problem, points, warn=False)
            out[:, a:a + cs.numel()] = vals.view(s_, cs.numel(), self.size)
        return out, disp

    def first_round(self, problem: _engine.Problem, base: torch.Tensor, judge: Callable, flagged: list) -> str | None:
        """Evaluate every input color, test the pattern and judge its entries; None, or why the pass stopped."""
        try:
            values, disp = self.values(problem, torch.arange(self.q, device=base.device), 1.0)
        finally:
            problem.rng.close()
        if not bool(torch.isfinite(values).all()):
            return "non-finite outputs at perturbed points"
        moved = (values != base.view(1, 1, -1)).any(dim=0)  # (q, O)
        claimed = torch.zeros_like(moved)
        claimed[self.colors[self.ins], self.outs] = True
        surprise = (moved & ~claimed).nonzero()
        if surprise.numel():
            color, out = (int(v) for v in surprise[0])
            return f"output entry {out} moved under input color {color}, where the {self.name} pattern has no entry"
        x64 = problem.flat.to(torch.float64)
        n = x64.numel()
        terms = self.vals.abs() * _term_sizes(x64)[self.ins]
        # judged a block of inputs at a time (the pairs are sorted by input), so that memory stays bounded; each
        # block's terms are summed per output as the dense path sums a chunk's columns (judge accumulates them)
        bounds = torch.searchsorted(self.ins, torch.arange(0, n + 1, device=base.device)).tolist()
        start = 0
        while start < n:
            stop = min(n, max(start + 1, bisect.bisect_right(bounds, bounds[start] + _JUDGED_PAIRS) - 1))
            lo, hi = bounds[start], bounds[stop]
            ins, outs = self.ins[lo:hi], self.outs[lo:hi]
            magnitude = torch.zeros(self.size, dtype=torch.float64, device=base.device).index_add_(
                0, outs, terms[lo:hi])
            bad = judge(start, stop, ins - start, outs, values[:, self.colors[ins], outs], disp[:, ins],
                        self.vals[lo:hi], magnitude)
            if bad is not None:
                flagged.append(bad)
            start = stop
        return None

    def pairs(self, problem: _engine.Problem, ins: torch.Tensor, outs: torch.Tensor, factor: float):
        """Re-evaluate the colors of the pattern entries (``ins``, ``outs``) at steps ``1/factor`` as large: their
        ``(S, n)`` values and displacements, and their analytical entries."""
        uniq, inverse = torch.unique(self.colors[ins], return_inverse=True)
        try:
            values, disp = self.values(problem, uniq, factor)
        finally:
            problem.rng.close()
        at = torch.searchsorted(self.key, ins * self.size + outs)
        return values[:, inverse, outs], disp[:, ins], self.vals[at]


@dataclass
class _Columns:
    """First-round results for a chunk of columns: all ``(c, O)``."""

    numerical: torch.Tensor
    error: torch.Tensor
    rounding: torch.Tensor
    kink: torch.Tensor
    finite: torch.Tensor


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """``(n,)`` float64 spacing of ``x``'s dtype at ``|x|`` (NaN at inf)."""
    a = x.detach().abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).to(torch.float64)


def _term_sizes(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` in float64 for the noise model's ``sum_i |J_oi x_i|``, with non-finite inputs (an ``-inf`` mask
    entry, whose derivative is 0) left out rather than turning the sum into NaN."""
    size = x.detach().to(torch.float64).abs()
    return torch.where(torch.isfinite(size), size, torch.zeros_like(size))


def entry_estimates(values: torch.Tensor, displacement: torch.Tensor, base: torch.Tensor, stencil: stencils.Stencil,
                    out_eps: torch.Tensor, outputs: torch.Tensor, n_outputs: int,
                    noise: torch.Tensor | None, magnitude: torch.Tensor | None = None,
                    reliable_eps: torch.Tensor | None = None) -> tuple[_Columns, torch.Tensor]:
    """Numerical Jacobian entries with error estimates, for ``n`` (input column, output entry) pairs.

    Args:
        values: ``(S, n)`` float64 output entry ``outputs[e]`` at the stencil's nodes around column ``e``'s input.
        displacement: ``(S, n)`` float64 realised steps of each entry's column.
        base: ``(n,)`` float64 output values at the unperturbed point.
        stencil: the stencil (rows of ``values`` in ``stencil.offsets`` order).
        out_eps: ``(n,)`` machine epsilon of each output's dtype.
        outputs: ``(n,)`` int64 output entry of each pair; ``n_outputs`` their number.
        noise: ``(n_outputs,)`` loss-noise per output entry to use, or None to measure it here: the median of the
            fourth differences over the pairs that moved each output (:func:`~gradfd.accuracy.noise_median`), never
            below the model ``eps * (|f| + magnitude)``.
        magnitude: ``(n_outputs,)`` size of the terms each output sums (``sum_i |J_oi x_i|``): an output that is a
            sum with cancellation rounds like its terms, not like its value.
        reliable_eps: ``(n,)`` the model's epsilon where the median is reliable (``RELIABLE_MEDIAN`` draws or
            more); default ``out_eps / 4``. A loss whose reduction was taken in float64 passes float64's: its rounding
            is what the fourth differences measure, far below ``eps * |loss|`` of its dtype.

    Returns:
        ``(entries, noise)`` with ``(n,)`` tensors and the ``(n_outputs,)`` noise.
    """
    offsets = stencil.offsets
    diff = displacement[0::2] - displacement[1::2]  # (K, n)
    levels = (values[0::2] - values[1::2]) / diff
    numerical, spread = stencils.extrapolate(levels, diff / 2)
    finite = torch.isfinite(values).all(dim=0) & torch.isfinite(numerical)
    h = diff[0].abs() / 2
    if all(v in offsets for v in (1.0, -1.0, 2.0, -2.0)):
        p1, m1, p2, m2 = (offsets.index(v) for v in (1.0, -1.0, 2.0, -2.0))
        fourth = values[p2] - 4 * values[p1] + 6 * base - 4 * values[m1] + values[m2]
        kink = fourth.abs() / (2 * h)
    else:
        fourth = None
        i_p, i_m = offsets.index(1.0), offsets.index(-1.0)
        kink = (values[i_p] - 2 * base + values[i_m]).abs() / h
    if noise is None:
        model = torch.zeros(n_outputs, dtype=torch.float64, device=values.device)
        trusted = torch.zeros(n_outputs, dtype=torch.float64, device=values.device)
        size = base.abs() + (magnitude[outputs] if magnitude is not None else 0)
        model[outputs] = out_eps * size
        trusted[outputs] = (out_eps / 4 if reliable_eps is None else reliable_eps) * size
        if fourth is None:
            noise = model
        else:
            moved = finite & (values != base).any(dim=0)
            measured = accuracy.noise_median(fourth.abs()[moved], outputs[moved], n_outputs)
            moved_count = torch.bincount(outputs[moved], minlength=n_outputs)
            measured = measured.nan_to_num(0.0) * accuracy.NOISE_FROM_FOURTH_DIFFERENCE
            reliable = moved_count >= accuracy.RELIABLE_MEDIAN
            noise = torch.maximum(torch.where(reliable, trusted, model), measured)
    rounding = accuracy.ROUNDING_SAFETY * noise[outputs] * stencil.weight_norm / h
    truncation = spread if spread is not None else torch.zeros_like(numerical)
    nan = torch.full_like(numerical, math.nan)
    entries = _Columns(torch.where(finite, numerical, nan), torch.where(finite, truncation + rounding, nan), rounding,
                       torch.where(finite, kink, nan), finite)
    return entries, noise


def _has_fourth(stencil: stencils.Stencil) -> bool:
    return all(v in stencil.offsets for v in (1.0, -1.0, 2.0, -2.0))


def probe_noise(values: torch.Tensor, displacement: torch.Tensor, base: torch.Tensor, stencil: stencils.Stencil,
                out_eps: torch.Tensor, reliable_eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss noise of each output measured by the noise probe: fourth differences at steps so small that kinks
    inside the stencils are rare.

    Args:
        values: ``(S, c, O)`` float64 outputs at the stencil's nodes around ``c`` probe columns.
        displacement: ``(S, c)`` float64 realised steps of the nodes.
        base, out_eps, reliable_eps: ``(O,)`` as in :func:`entry_estimates` (per output entry).

    Returns:
        ``(noise, draws)``: ``(O,)`` float64 noise (as :func:`entry_estimates` measures it) and ``(O,)`` int64 number
        of columns that moved each output (0 where the probe measured a rounding pattern: see below). Columns whose
        realised nodes are off the stencil's grid by more than 1e-3 of a step (a step of a few ulps of its input)
        are left out: their fourth difference is no noise.
    """
    s_, c, o = values.shape
    p1, m1 = stencil.offsets.index(1.0), stencil.offsets.index(-1.0)
    unit = (displacement[p1] - displacement[m1]) / 2  # (c,)
    offsets = torch.tensor(stencil.offsets, dtype=torch.float64, device=values.device).view(-1, 1)
    on_grid = (unit != 0) & ((displacement - offsets * unit).abs() <= 1e-3 * unit.abs()).all(dim=0)
    values, displacement = values[:, on_grid], displacement[:, on_grid]
    c = values.shape[1]
    outputs = torch.arange(o, device=values.device).repeat(c)
    flat = values.reshape(s_, c * o)
    pair_base = base.repeat(c)
    _, noise = entry_estimates(flat, displacement.repeat_interleave(o, dim=1), pair_base, stencil, out_eps.repeat(c),
                               outputs, o, None, None, reliable_eps.repeat(c) if reliable_eps is not None else None)
    moved = torch.isfinite(flat).all(dim=0) & (flat != pair_base).any(dim=0)
    draws = torch.bincount(outputs[moved], minlength=o)
    # a fourth difference of exactly zero is a rounding pattern, not noise: at steps of a few thousand ulps the
    # roundings of a polynomial (x**3 + x**2, elementwise) follow the nodes regularly, and half of them cancel
    # exactly; an output with more than PROBE_ZEROS of them is not measured by the probe
    offs = stencil.offsets
    fourth = (flat[offs.index(2.0)] - 4 * flat[offs.index(1.0)] + 6 * pair_base - 4 * flat[offs.index(-1.0)]
              + flat[offs.index(-2.0)])
    zeros = torch.bincount(outputs[moved & (fourth == 0)], minlength=o)
    return noise, torch.where(zeros > PROBE_ZEROS * draws, torch.zeros_like(draws), draws)


def column_entries(values: torch.Tensor, displacement: torch.Tensor, base: torch.Tensor, stencil: stencils.Stencil,
                   out_eps: torch.Tensor, noise: torch.Tensor | None) -> tuple[_Columns, torch.Tensor]:
    """:func:`entry_estimates` for every pair of a chunk: ``values (S, c, O)``, ``displacement (S, c)``,
    ``base (O,)``, ``out_eps (O,)``; the returned entries are ``(c, O)``."""
    s_, c, o = values.shape
    outputs = torch.arange(o, device=values.device).repeat(c)
    entries, noise = entry_estimates(values.reshape(s_, c * o), displacement.repeat_interleave(o, dim=1),
                                     base.repeat(c), stencil, out_eps.repeat(c), outputs, o, noise)
    return _Columns(*(t.view(c, o) for t in (entries.numerical, entries.error, entries.rounding, entries.kink,
                                              entries.finite))), noise


def check_coordinates(
    func: Callable,
    params: Sequence[torch.Tensor],
    k: int,
    analytical: Analytical,
    coords: torch.Tensor,
    *,
    h: float | None,
    stencil: stencils.Stencil,
    engine: str,
    batching: str,
    chunk_size: int | None,
    memory_budget,
    atol: float | None,
    rtol: float | None,
    mode: str,
    compress: bool = True,
    colored: int | None = 0,
    progress: Callable[[int], None] | None = None,
    notes: Sequence[str] = (),
) -> list[TensorReport]:
    """Full or sample mode for input ``params[k]``: one :class:`TensorReport` per compared output.

    The first round streams through the engine; entries that do not agree are then re-evaluated at smaller steps
    (:func:`gradfd.check.refine`). For tensor-valued functions the analytical Jacobian comes from colored
    vector-Jacobian products (:class:`_Compressed`) while that is valid and cheaper; a disagreement or a leak
    makes the tensor be redone with exact rows (``compress=False``). In full mode with automatic steps and
    engine choices, the hypothesised patterns of :class:`_ColoredPass` are tried first, from ``_PATTERNS[colored]``
    on (``colored=None``: exact columns only); ``notes`` are carried into the report's details.
    """
    from .check import FLOOR_EPS, MIN_STEP_ULPS, _Entries, _verdicts, domain_margin, refine, second_look

    spec = analytical.spec
    p = params[k]
    n, size = p.numel(), spec.size
    m = coords.numel()
    out_eps = torch.cat([torch.full((spec.numels[j],), stencils.eps(dt), dtype=torch.float64)
                         for j, dt in enumerate(spec.dtypes)]).to(p.device) if size else torch.zeros(0)
    # the spacing of each output's subnormals: no value rounds more finely (the model's absolute floor)
    out_tiny = torch.cat([torch.full((spec.numels[j],), torch.finfo(dt).smallest_normal * stencils.eps(dt),
                                     dtype=torch.float64) for j, dt in enumerate(spec.dtypes)]
                         ).to(p.device) if size else torch.zeros(0)
    group = torch.cat([torch.full((spec.numels[j],), j, dtype=torch.int64) for j in range(len(spec.kept))]
                      ).to(p.device) if size else torch.zeros(0, dtype=torch.int64)
    # the dtype floor, of the coarser of each output and the input: backward rounds the Jacobian's entries to the
    # input's dtype (softmax(x, dtype=torch.float64) of a float32 x: float32 entries, 3.6e-8 off the float64 ones)
    floor = FLOOR_EPS * torch.clamp(out_eps, min=stencils.eps(p.dtype))
    rtol_ = floor if rtol is None else torch.full_like(floor, rtol)
    scales = [analytical.scale(k, j) for j in range(len(spec.kept))]
    flat_x = p.detach().reshape(-1)
    # steps sized for the coarser of the input and the compared outputs: a float16 output of a float64 input
    base_steps = (stencils.automatic_steps(flat_x, stencil, dtype=stencils.coarsest([p.dtype, *spec.dtypes]))
                  if h is None
                  else torch.full(flat_x.shape, h, dtype=torch.float64, device=p.device))
    keep_all = m * size <= DENSE_ENTRIES
    user_chunk = chunk_size
    if chunk_size is None and size * n * 8 > analytical.budget:
        # the analytical rows are recomputed for every chunk: make the chunks few, as far as the budget allows
        # (a coordinate's nodes hold S x (outputs + a few activations of them) float64 values)
        per_coordinate = len(stencil.offsets) * 8 * (4 * size + n)
        chunk_size = max(1, min(max(64, -(-m // 16)), analytical.budget // per_coordinate))
    state: dict = {"noise": None, "probe": None, "probe_noted": False,
                   "kinked": torch.zeros(size, dtype=torch.bool, device=p.device), "details": {}, "fallback": False,
                   "measured": torch.zeros(size, dtype=torch.float64, device=p.device),
                   "magnitude": torch.zeros(size, dtype=torch.float64, device=p.device),
                   "compressed": _Compressed(analytical, k) if compress and not analytical.scalar and size >= 16
                   else None}
    store = {name: torch.empty(m, size, dtype=torch.float64, device=p.device) if keep_all else None
             for name in ("numerical", "analytical", "error", "tolerance")}
    verdict_all = torch.empty(m, size, dtype=torch.int8, device=p.device) if keep_all else None
    agg = [dict(agree=0, max_abs=0.0, max_rel=0.0, worst=None) for _ in spec.kept]
    flagged: list[tuple] = []  # (pair index, numerical, analytical, error, rounding, kink, finite, verdict, tol, ns)
    errors = _engine.NodeErrors()  # what func raised at perturbed nodes (their values are NaN: see refine)

    def floor_of(analytical_values: torch.Tensor, outs: torch.Tensor) -> torch.Tensor:
        if atol is not None:
            atol_ = torch.full_like(analytical_values, atol)
        else:
            sc = torch.tensor([s if s is not None else 0.0 for s in scales], dtype=torch.float64,
                              device=analytical_values.device)[group[outs]]
            atol_ = floor[outs] * sc
        return atol_ + rtol_[outs] * analytical_values.abs()

    def evaluate_columns(cols: torch.Tensor, factor: float, on_chunk: Callable, report: bool = False) -> None:
        problem = _engine.prepare(func, params, k, vector=not analytical.scalar,
                                  skip_outputs=analytical.nondifferentiable, node_errors=errors)

        def sink(start, stop, values, disp):
            if analytical.scalar:
                values = values.unsqueeze(-1)
            on_chunk(start, stop, values, disp)

        ev = _engine.evaluate(func, params, k, steps=base_steps[cols] / factor, stencil=stencil, coords=cols,
                              engine=engine, batching=batching, chunk_size=chunk_size, memory_budget=memory_budget,
                              problem=problem, sink=sink, progress=progress if report else None)
        if report:  # the first round's engine choices (not the probe's or the refinement's)
            state["details"] = {"engine": ev.engine, "batching": ev.batching, "chunk_size": ev.chunk_size,
                                "notes": list(ev.notes)}

    base_values = None

    def first_round(start, stop, values, disp):
        if state["fallback"]:
            return  # the tensor will be redone with exact rows
        cols = coords[start:stop]
        comp = state["compressed"]
        if comp is not None:
            moved = (values != base_values).any(dim=0)  # NaN and inf compare unequal: they count as moved
            if comp.fit(moved):
                ana, unused_sums = comp.entries(cols, moved)
                h_col = (disp[0] - disp[1]).abs() / 2  # (c,)
                lo_hi = [(spec.offsets[j], spec.offsets[j] + spec.numels[j]) for j in range(len(spec.kept))]
                allowed = (float(floor.max()) * max((float(ana[:, a:b].abs().max()) if b > a else 0.0)
                                                    for a, b in lo_hi)
                           + float((out_eps * base_values.abs()).sum()) / h_col.unsqueeze(1))
                if bool((unused_sums.abs() > allowed).any()):
                    state["fallback"] = True  # a leak: redo with exact rows, which say where
                    return
            else:
                state["compressed"] = comp = None
        if comp is None:
            ana = analytical.columns(k, cols)  # (c, O)
        for j in range(len(spec.kept)):  # a chunk-local scale where the Jacobian is not held densely
            if scales[j] is None:
                sel = group == j
                scales[j] = _largest(ana[:, sel])
        # Pairs whose output no node moved (exactly) and whose analytical entry is exactly zero agree with zero
        # error: most of a Jacobian, for elementwise and row-wise ops. Only the others are estimated and judged.
        active = (moved if comp is not None else (values != base_values).any(dim=0)) | (ana != 0)
        jj, oo = active.nonzero(as_tuple=True)
        terms = ana.abs() * _term_sizes(flat_x[cols]).unsqueeze(1)  # a NaN analytical entry is judged, not summed
        magnitude = torch.where(torch.isfinite(terms), terms, torch.zeros_like(terms)).sum(dim=0)  # (O,)
        bad = judge(start, stop, jj, oo, values[:, jj, oo], disp[:, jj], ana[jj, oo], magnitude)
        if bad is not None:
            if comp is not None and bool((bad[1] == DISAGREE).any()):
                state["fallback"] = True  # report exact values: redo with exact rows
                return
            flagged.append(bad)

    def judge(start: int, stop: int, jj: torch.Tensor, oo: torch.Tensor, vals: torch.Tensor, disp_pairs: torch.Tensor,
              ana_pairs: torch.Tensor, magnitude: torch.Tensor):
        """Estimate, judge and tally the pairs (``start + jj``, ``oo``) of the columns ``start:stop``; every other
        pair of those columns agrees exactly (no node moved its output, and its analytical entry is zero). Returns
        the pairs that did not agree as ``(entries, verdict, tolerance, nonsmooth)``, or None."""
        c = stop - start
        g_pairs = group[oo]
        for j in range(len(spec.kept)):  # a chunk-local scale where the Jacobian is not held densely
            if scales[j] is None:
                sel = g_pairs == j
                scales[j] = _largest(ana_pairs[sel])
        est, noise = entry_estimates(vals, disp_pairs, base_values[oo], stencil, out_eps[oo], oo, size, None,
                                     magnitude, reliable_eps[oo] if reliable_eps is not None else None)
        if state["probe"] is not None:  # a chunk's measurement far above the probe's measured kinks (see probe)
            probed, draws = state["probe"]
            measured = torch.bincount(oo, minlength=size) >= accuracy.RELIABLE_MEDIAN
            kinked = measured & (draws >= accuracy.RELIABLE_MEDIAN) & (noise > accuracy.SEPARATION * probed)
            if bool(kinked.any()):
                note_probe(float(probed[kinked].max()), float(noise[kinked].max()))
                state["kinked"] |= kinked
                noise = torch.where(kinked, probed, noise)
                est, _ = entry_estimates(vals, disp_pairs, base_values[oo], stencil, out_eps[oo], oo, size, noise)
        # each chunk measures its own noise (the largest seen per output entry is kept: see the refinement)
        state["noise"] = noise if state["noise"] is None else torch.maximum(state["noise"], noise)
        reliable = torch.bincount(oo, minlength=size) >= accuracy.RELIABLE_MEDIAN  # (a measured median, per output)
        state["measured"] = torch.maximum(state["measured"], torch.where(reliable, noise, 0.0))
        # (an output no reliable median measured yet: the model's rounding, for check._unsettled)
        unmeasured = ((torch.bincount(oo, minlength=size)[oo] < accuracy.RELIABLE_MEDIAN)
                      & ~(state["measured"][oo] > 0))
        state["magnitude"] += magnitude
        model = out_eps[oo] * (base_values[oo].abs() + magnitude[oo]) + out_tiny[oo]
        model = torch.where(unmeasured, est.rounding * model / noise[oo].clamp(min=1e-300), 0.0)
        e = _Entries((start + jj) * size + oo, est.numerical, ana_pairs, est.error, est.rounding, est.kink,
                     est.finite, model)
        verdict, tol, nonsmooth = _verdicts(e, floor_of(e.analytical, oo))
        if keep_all:
            zeros = torch.zeros(c, size, dtype=torch.float64, device=p.device)
            store["numerical"][start:stop] = zeros
            store["analytical"][start:stop] = zeros
            store["error"][start:stop] = zeros
            outs = torch.arange(size, device=p.device).expand(c, size)
            store["tolerance"][start:stop] = floor_of(zeros.reshape(-1), outs.reshape(-1)).view(c, size)
            verdict_all[start:stop] = AGREE
            store["numerical"][start + jj, oo] = e.numerical
            store["analytical"][start + jj, oo] = e.analytical
            store["error"][start + jj, oo] = e.error
            store["tolerance"][start + jj, oo] = tol
            verdict_all[start + jj, oo] = verdict
        for j in range(len(spec.kept)):
            agg[j]["agree"] += c * spec.numels[j] - int((g_pairs == j).sum())  # the pairs not judged
        good = (verdict == AGREE) & ~second_look(e, verdict, tol)  # (the others are refined before they count)
        few = torch.bincount(oo, minlength=size)[oo] < accuracy.RELIABLE_MEDIAN
        if analytical.scalar:
            # A loss's chunk of fewer columns than a reliable median takes (the engine's timing probe evaluates
            # 2 and 4) is judged with the model eps * (|f| + its terms), far above the rounding of a loss reduced
            # in float64: a 1e-3 error on a float32 network's first 6 weights was never flagged (0 of 10 draws).
            # Its entries are judged again at the end, with what the other chunks measured.
            good &= ~few
        if bool(good.any()):
            diff = (e.numerical - e.analytical).abs()
            sc = torch.tensor([s if s is not None else 0.0 for s in scales], dtype=torch.float64,
                              device=diff.device)[g_pairs]
            rel = torch.where(e.analytical.abs() >= REL_FLOOR * sc, diff / e.analytical.abs().clamp(min=1e-300),
                              torch.zeros_like(diff))
            excess = diff / tol.clamp(min=1e-300)
            for j in range(len(spec.kept)):
                sel = good & (g_pairs == j)
                if not bool(sel.any()):
                    continue
                a = agg[j]
                a["agree"] += int(sel.sum())
                a["max_abs"] = max(a["max_abs"], float(diff[sel].max()))
                a["max_rel"] = max(a["max_rel"], float(rel[sel].max()))
                w = int(torch.where(sel, excess, torch.full_like(excess, -1.0)).argmax())
                if a["worst"] is None or float(excess[w]) > a["worst"][0]:
                    a["worst"] = (float(excess[w]), int(e.index[w]), float(e.analytical[w]),
                                  float(e.numerical[w]), float(e.error[w]), float(tol[w]))
        bad = (~good).nonzero().flatten()
        half_step = (disp_pairs[0] - disp_pairs[1]).abs() / 2  # the realised h of each pair's smallest level
        # (few: the noise of an output measured from fewer pairs than a reliable median takes: judged again at the end)
        return ((e.take(bad), verdict[bad], tol[bad], nonsmooth[bad], half_step[bad], few[bad])
                if bad.numel() else None)

    def probe():
        """The noise probe's ``(noise, draws)`` per output (:func:`probe_noise`), measured once: fourth differences
        at steps NOISE_PROBE times smaller on NOISE_PROBE_COLUMNS columns, where kinks inside the stencils are
        rare. A kinked majority (a float32 ReLU network: most first-round stencils of a weight straddle a switch)
        carries a chunk's measured noise far above the rounding, which widens its tolerances and blinds the kink
        tests; where that is SEPARATION times the probe's, the probe's is used. Run before the first round of a
        scalar loss with RELIABLE_MEDIAN columns or more; None without fourth differences, and for tensor-valued
        functions: an output is moved by few of the probe's columns (one, elementwise), and their fourth differences
        cost a pass over every output (2x the time of a row-wise softmax's full check)."""
        if state["probe"] is None and analytical.scalar and _has_fourth(stencil):
            gen = torch.Generator().manual_seed(_PROBE_SEED)
            pick = torch.randperm(m, generator=gen)[:NOISE_PROBE_COLUMNS].sort().values.to(coords.device)
            parts: list = []
            evaluate_columns(coords[pick], float(NOISE_PROBE), lambda a, b, v, d: parts.append((v, d)))
            state["probe"] = probe_noise(torch.cat([v for v, _ in parts], dim=1), torch.cat([d for _, d in parts], 1),
                                         base_values, stencil, out_eps, reliable_eps)
            state["probe_columns"] = int(pick.numel())
        return state["probe"]

    def note_probe(probed: float, first: float) -> None:
        if not state["probe_noted"]:
            state["probe_noted"] = True
            state["probe_note"] = (f"rounding noise measured at 1/{NOISE_PROBE} of the steps on "
                                   f"{state['probe_columns']} columns: {probed:.2g}, where the stencils of the first "
                                   f"round measured up to {first:.2g} (kinks inside most stencils)")

    def set_base(problem_base):
        nonlocal base_values
        base_values = problem_base

    # the base values of the compared outputs at the unperturbed point (the engine evaluates them too)
    problem = _engine.prepare(func, params, k, vector=not analytical.scalar,
                                  skip_outputs=analytical.nondifferentiable, node_errors=errors)
    problem.rng.close()
    set_base(problem.base_loss.to(torch.float64).reshape(-1))
    # a loss reduced in float64 (gradfd.reductions): its measured noise is trusted down to float64's rounding
    reliable_eps = torch.full_like(out_eps, stencils.eps(torch.float64)) if problem.reduce64 else None
    redo = dict(h=h, stencil=stencil, engine=engine, batching=batching, chunk_size=user_chunk,
                memory_budget=memory_budget, atol=atol, rtol=rtol, mode=mode, progress=progress)
    sparse = None
    if (colored is not None and mode == "full" and h is None and engine == "auto" and batching == "auto"
            and user_chunk is None and not analytical.scalar and n >= 2 * _COLORED_SAVING and size >= 16):
        # try the hypothesised patterns in turn (each in a fresh call, so that a refuted one leaves no state)
        following = colored + 1 if colored + 1 < len(_PATTERNS) else None
        atol_floor = (lambda scale: atol) if atol is not None else (
            lambda scale: float(floor.max()) * scale)
        sparse = _ColoredPass.build(analytical, k, base_steps, stencil, _PATTERNS[colored])
        why = None if sparse is None else sparse.analytical_entries(atol_floor)
        if sparse is not None and why is None:
            # every analytical entry is known now: each block's scale is the whole block's, not its first judged
            # block's (the floor, and so the verdicts, do not depend on _JUDGED_PAIRS)
            for j in range(len(spec.kept)):
                if scales[j] is None:
                    scales[j] = _largest(sparse.vals[group[sparse.outs] == j])
            problem = _engine.prepare(func, params, k, vector=True, skip_outputs=analytical.nondifferentiable,
                                      node_errors=errors)
            why = sparse.first_round(problem, base_values, judge, flagged)
        if sparse is None or why is not None:
            return check_coordinates(func, params, k, analytical, coords, compress=compress, colored=following,
                                     notes=list(notes) + ([f"colored pass: {why}"] if why else []), **redo)
        state["details"] = {"engine": "colored", "batching": sparse.batching, "chunk_size": None,
                            "notes": [sparse.describe()]}
    else:
        if m >= accuracy.RELIABLE_MEDIAN:
            probe()  # before the first round: a loss's chunks are judged with it
        evaluate_columns(coords, 1.0, first_round, report=True)
        if state["fallback"]:
            return check_coordinates(func, params, k, analytical, coords, compress=False, colored=None,
                                     notes=notes, **redo)
    state["details"]["notes"] = list(notes) + state["details"].get("notes", [])

    refined = 0
    if flagged:
        e = _Entries(*(torch.cat([getattr(f[0], name) for f in flagged]) for name in _Entries.__dataclass_fields__))
        verdict = torch.cat([f[1] for f in flagged])
        tol = torch.cat([f[2] for f in flagged])
        nonsmooth = torch.cat([f[3] for f in flagged])
        half_step = torch.cat([f[4] for f in flagged])  # the realised h of each entry's smallest level
        few = torch.cat([f[5] for f in flagged])
        outs = e.index % size
        # The noise each entry is judged with, from here on: its chunk's, measured on the chunk's columns. A median
        # of a few draws can sit well below the noise: those entries get at least the largest noise seen for their
        # output (matrix_exp: 4 columns of 25 measured 1.5e-13 where all 25 measure 5.4e-13, and a correct entry
        # failed at 1.6x its tolerance).
        gain = accuracy.ROUNDING_SAFETY * stencil.weight_norm / half_step.clamp(min=1e-300)
        noise_e = torch.where(few, torch.maximum(e.rounding / gain, state["noise"][outs]), e.rounding / gain)
        if analytical.scalar:
            # a loss's few-column chunk: what the chunks of a reliable median measured (the largest of them), where
            # one did, instead of the model (see judge)
            measured = state["measured"][outs]
            noise_e = torch.where(few & (measured > 0), measured, noise_e)
        # A kinked majority (a float32 ReLU network: most first-round stencils of a weight straddle a switch)
        # carries a chunk's measured noise far above the rounding and blinds the kink tests: the noise is measured
        # again where kinks are rare, at steps NOISE_PROBE times smaller, and replaces a noise SEPARATION times
        # larger.
        if state["probe"] is not None:  # (measured before the first round: see probe)
            probed, draws = state["probe"]
            # (a measured noise; or the model eps * (|f| + its terms) of a chunk of a few draws -- the engine's
            # timing probe evaluates 2 and 4 columns -- only where another chunk of the output measured kinks: a
            # smooth function's probe can undercut that model many times, as rounding at steps of a few thousand
            # ulps follows the nodes regularly: the tanh network's W2 measured 20x less at h/16 than at h)
            kinked = ((~few | state["kinked"][outs]) & (draws[outs] >= accuracy.RELIABLE_MEDIAN)
                      & (noise_e > accuracy.SEPARATION * probed[outs]))
            if bool(kinked.any()):
                note_probe(float(probed[outs[kinked]].max()), float(noise_e[kinked].max()))
                noise_e = torch.where(kinked, probed[outs], noise_e)
        # A median is the noise of a typical column; the terms of an elementwise sum round like themselves, and
        # the largest-gradient entry of x**3 - 2x**2 + x is its noisiest: no entry is judged with less than a
        # quarter of eps times the size of the terms its input enters, |x_i df/dx_i| (3x**3 for x**3)
        terms = _term_sizes(flat_x[coords[torch.div(e.index, size, rounding_mode="floor")]]) * e.analytical.abs()
        noise_e = torch.maximum(noise_e, out_eps[outs] / 4 * torch.where(terms.isfinite(), terms, 0.0))
        # the entries whose output no chunk of a reliable median measured (nor the probe): the model's rounding
        # eps * (|f| + its terms), as a share of the noise they are judged with (_Entries.model)
        unmeasured = few & ~(state["measured"][outs] > 0)
        if state["probe"] is not None and bool(kinked.any()):
            unmeasured &= ~kinked
        size_e = base_values[outs].abs() + torch.maximum(state["magnitude"][outs],
                                                          torch.where(terms.isfinite(), terms, 0.0))
        # (+ the subnormals' spacing: an attention weight of 1e-42 in float32 rounds to 1.4e-45)
        model_share = torch.where(unmeasured, (out_eps[outs] * size_e + out_tiny[outs]) / noise_e.clamp(min=1e-300),
                                  0.0)
        e.rounding, e.error = (torch.where(e.finite, noise_e * gain, e.rounding),
                               torch.where(e.finite, e.error - e.rounding + noise_e * gain, e.error))
        e.model = e.rounding * model_share
        verdict, tol, nonsmooth = _verdicts(e, floor_of(e.analytical, outs))
        order = torch.argsort(e.index)
        sorted_index = e.index[order]

        def own_noise(pairs: torch.Tensor, entries: _Entries) -> _Entries:
            """``entries`` (evaluated with the output's pooled noise) with the rounding of each pair's own noise."""
            pooled = state["noise"][pairs % size]
            at = order[torch.searchsorted(sorted_index, pairs)]
            mine = noise_e[at]
            rounding = torch.where(pooled > 0, entries.rounding * mine / pooled.clamp(min=1e-300), entries.rounding)
            entries.model = rounding * model_share[at]
            # (an entry no reliable median measured: the noise of its own fourth difference at this step where that
            # is smaller than the first round's -- which may be a pole its stencil straddled then -- scaled to this
            # step; both bound the rounding from above, curvature included; and never below the model's)
            own = 2 * accuracy.ROUNDING_SAFETY * stencil.weight_norm * accuracy.NOISE_FROM_FOURTH_DIFFERENCE
            alone = (entries.model > 0) & entries.finite
            # (a fourth difference that is exactly 0 measured nothing -- (w + 1000)**2 - 2000 w - 1e6 in float64 rounds
            # to the same few values at all five nodes -- and leaves the scaled first-round rounding in place)
            mine_kink = torch.where(entries.kink > 0, own * entries.kink, rounding)
            rounding = torch.where(alone, torch.maximum(entries.model, torch.minimum(rounding, mine_kink)), rounding)
            entries.error = entries.error - entries.rounding + rounding
            entries.rounding = rounding
            return entries

        def evaluator(pairs: torch.Tensor, factor: float) -> _Entries:
            positions = torch.div(pairs, size, rounding_mode="floor")
            outs_ = pairs % size
            if sparse is not None:
                values, disp, ana_pairs = sparse.pairs(problem, positions, outs_, factor)
                est, _ = entry_estimates(values, disp, base_values[outs_], stencil, out_eps[outs_], outs_, size,
                                         state["noise"])
                return _Entries(pairs, est.numerical, ana_pairs, est.error, est.rounding, est.kink, est.finite,
                                torch.zeros_like(est.rounding))  # (model: see own_noise)
            uniq, inverse = torch.unique(positions, return_inverse=True)
            cols = coords[uniq]
            got: dict = {}

            def collect(start, stop, values, disp):
                ecols, _ = column_entries(values, disp, base_values, stencil, out_eps, state["noise"])
                got.setdefault("parts", []).append((start, ecols))

            evaluate_columns(cols, factor, collect)
            parts = sorted(got["parts"], key=lambda t: t[0])
            cat = lambda name: torch.cat([getattr(pc, name) for _, pc in parts])  # noqa: E731
            num, err, rnd, knk, fin = (cat(nm) for nm in ("numerical", "error", "rounding", "kink", "finite"))
            comp = state["compressed"]
            if comp is not None:  # the refined pairs were moved in the first round: their color sums are theirs
                ana_pairs = comp.rows[outs_ % comp.q, cols[inverse]]
            else:
                ana_pairs = analytical.columns(k, cols)[inverse, outs_]
            return _Entries(pairs, num[inverse, outs_], ana_pairs, err[inverse, outs_], rnd[inverse, outs_],
                            knk[inverse, outs_], fin[inverse, outs_], torch.zeros_like(ana_pairs))  # (see own_noise)

        def remeasure(entries: _Entries, factors: torch.Tensor) -> _Entries:
            """Entries moved to smaller steps by a non-finite first stencil (see refine), with each output's noise
            measured again from their own fourth differences where RELIABLE_MEDIAN of them or more are finite: the
            first round measured log(x)'s curvature near 0, not its rounding (1e-3 for float32 logs of x < 1e-4,
            whose rounding is 1e-6), and the steps are small now (1/x: the noise over the step is the error)."""
            outs_ = entries.index % size
            cols_ = coords[torch.div(entries.index, size, rounding_mode="floor")]
            h_ = base_steps[cols_] / factors
            fin = entries.finite
            fourth = entries.kink * 2 * h_  # kink = |fourth difference| / (2h)
            measured = accuracy.noise_median(fourth[fin], outs_[fin], size) * accuracy.NOISE_FROM_FOURTH_DIFFERENCE
            draws = torch.bincount(outs_[fin], minlength=size)
            terms = _term_sizes(flat_x[cols_]) * entries.analytical.abs()
            new = torch.maximum(measured.nan_to_num(0.0)[outs_],
                                out_eps[outs_] / 4 * torch.where(terms.isfinite(), terms, 0.0))
            ok = fin & (draws[outs_] >= accuracy.RELIABLE_MEDIAN)
            rounding = torch.where(ok, accuracy.ROUNDING_SAFETY * stencil.weight_norm * new / h_, entries.rounding)
            entries.error = entries.error - entries.rounding + rounding
            entries.rounding = rounding
            at = order[torch.searchsorted(sorted_index, entries.index[ok])]
            noise_e[at] = new[ok]  # for the later rounds, which measure these kinks against it
            model_share[at] = 0.0
            entries.model = torch.where(ok, 0.0, entries.model)
            return entries

        entry_x = flat_x[coords[torch.div(e.index, size, rounding_mode="floor")]]
        limit = (base_steps[coords[torch.div(e.index, size, rounding_mode="floor")]]
                 / (MIN_STEP_ULPS * _ulp(entry_x))).nan_to_num(nan=math.inf)
        domain: dict = {}
        e, verdict, tol, refined = refine(e, verdict, tol, nonsmooth,
                                          lambda pairs, factor: own_noise(pairs, evaluator(pairs, factor)),
                                          lambda entries: floor_of(entries.analytical, entries.index % size),
                                          limit, domain, remeasure,
                                          domain_margin(stencil, stencils.coarsest([p.dtype, *spec.dtypes])))
        if domain["retreated"]:
            state["domain_note"] = (f"{domain['retreated']} entries had a non-finite loss or an error of func at a "
                                    f"node (outside its domain): checked at steps down to 1/{domain['smallest']:.0f} "
                                    "of the automatic ones, where their stencils are finite")
        if sparse is not None and bool((verdict == DISAGREE).any()):
            # a wrong pattern, or a wrong gradient: an entry of a colored pass may sum in an input outside the
            # pattern, so the disagreement is located with the next pattern or with exact columns
            return check_coordinates(func, params, k, analytical, coords, compress=compress, colored=following,
                                     notes=list(notes) + [f"colored pass: the {sparse.name} pattern gave "
                                                          "disagreements"], **redo)
        if keep_all:
            pos, outs_ = torch.div(e.index, size, rounding_mode="floor"), e.index % size
            store["numerical"][pos, outs_] = e.numerical
            store["error"][pos, outs_] = e.error
            store["tolerance"][pos, outs_] = tol
            verdict_all[pos, outs_] = verdict
    else:
        e, verdict, tol = None, None, None
    if sparse is not None and progress is not None:
        progress(m)

    if state["probe_noted"]:
        state["details"]["notes"] = state["details"].get("notes", []) + [state["probe_note"]]
    if errors.count:
        if e is not None and not bool(e.finite.any()) and not any(a["agree"] for a in agg):
            # not one perturbed evaluation succeeded, at any step: no domain boundary, an error of func
            note(errors.first, f"gradfd: raised while evaluating func at {errors.where}, and at every "
                                        f"perturbed node of params[{k}] ({errors.count} nodes) at every step tried")
            raise errors.first
        state["details"]["notes"] = state["details"].get("notes", []) + [errors.describe()]
    if state.get("domain_note"):
        state["details"]["notes"] = state["details"].get("notes", []) + [state["domain_note"]]
    details = {**state["details"], "stencil": stencil.name, "step": "automatic" if h is None else h,
               "refined": refined, "analytical": (f"{sparse.p} colored backward passes" if sparse is not None else
                              f"{state['compressed'].q} colored backward passes" if state["compressed"] is not None
                              else "exact rows"), "loss_noise": float(state["noise"].max()) if state["noise"] is not None and
               state["noise"].numel() else 0.0, "truncation_estimated": len(stencil.multiples) > 1}
    reports = []
    for j, out_k in enumerate(spec.kept):
        name = f"params[{k}]" if analytical.scalar else f"output[{out_k}] wrt params[{k}]"
        lo, hi = spec.offsets[j], spec.offsets[j] + spec.numels[j]
        a = agg[j]
        counts = {AGREE: a["agree"], DISAGREE: 0, UNRESOLVED: 0}
        worst = a["worst"]
        max_abs, max_rel = a["max_abs"], a["max_rel"]
        if e is not None:
            sel = ((e.index % size) >= lo) & ((e.index % size) < hi)
            for v in (AGREE, DISAGREE, UNRESOLVED):
                counts[v] += int((verdict[sel] == v).sum())
            if bool(sel.any()):
                diff = (e.numerical - e.analytical).abs()
                fin = e.finite & sel
                if bool(fin.any()):
                    rel = relative_errors(diff, e.analytical, scales[j] or 0.0)
                    max_abs = max(max_abs, float(diff[fin].max()))
                    max_rel = max(max_rel, float(rel[fin].max()))
                excess = torch.where(sel & (verdict != UNRESOLVED), diff / tol.clamp(min=1e-300),
                                     torch.full_like(diff, -1.0))
                jj = int(excess.argmax())
                if float(excess[jj]) >= 0 and (worst is None or float(excess[jj]) > worst[0]):
                    worst = (float(excess[jj]), int(e.index[jj]), float(e.analytical[jj]), float(e.numerical[jj]),
                             float(e.error[jj]), float(tol[jj]))
        if keep_all:
            idx = (torch.arange(m, device=p.device) * size).unsqueeze(1) + torch.arange(lo, hi, device=p.device)
            entries = {"index": idx.reshape(-1)}
            for nm in ("numerical", "analytical", "error", "tolerance"):
                entries[nm] = store[nm][:, lo:hi].reshape(-1)
            entries["verdict"] = verdict_all[:, lo:hi].reshape(-1)
        else:
            sel = ((e.index % size) >= lo) & ((e.index % size) < hi) if e is not None else torch.zeros(0, dtype=bool)
            entries = {"index": e.index[sel] if e is not None else torch.zeros(0, dtype=torch.int64),
                       "numerical": e.numerical[sel] if e is not None else torch.zeros(0),
                       "analytical": e.analytical[sel] if e is not None else torch.zeros(0),
                       "error": e.error[sel] if e is not None else torch.zeros(0),
                       "tolerance": tol[sel] if e is not None else torch.zeros(0),
                       "verdict": verdict[sel] if e is not None else torch.zeros(0, dtype=torch.int8)}
        entries = {("error_estimate" if nm == "error" else nm): v.cpu() for nm, v in entries.items()}
        # pair index -> position in this report's (input coordinate, output entry) space
        pos = torch.div(entries["index"], size, rounding_mode="floor")
        entries["index"] = coords.cpu()[pos] * spec.numels[j] + (entries["index"] % size - lo)
        checked = m * spec.numels[j]
        worst_index = None
        if worst is not None:
            w_pos, w_out = divmod(worst[1], size)
            in_idx = _engine.unravel(int(coords[w_pos]), tuple(p.shape))
            worst_index = in_idx if analytical.scalar else (_engine.unravel(w_out - lo, spec.shapes[j]), in_idx)
        reports.append(TensorReport(
            name=name, shape=tuple(p.shape), dtype=p.dtype, mode=mode, checked=checked,
            total=n * spec.numels[j], max_abs_error=max_abs, max_rel_error=max_rel, worst_index=worst_index,
            worst_analytical=worst[2] if worst else math.nan, worst_numerical=worst[3] if worst else math.nan,
            worst_error_estimate=worst[4] if worst else math.nan, worst_tolerance=worst[5] if worst else math.nan,
            agree=counts[AGREE], disagree=counts[DISAGREE], unresolved=counts[UNRESOLVED], entries=entries,
            details={**details, "checked_inputs": m, "inputs": n},
            output_shape=None if analytical.scalar else spec.shapes[j],
        ))
    return reports
