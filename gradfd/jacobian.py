"""The analytical side of the checks: autograd's Jacobian of ``func`` at the unperturbed point, column-chunk by
column-chunk, without ever forming it densely unless it fits the memory budget; and the colored machinery that
gets many entries from a few perturbations and backward passes.

What lives here: :class:`Analytical` (rows from batched vector-Jacobian products -- one-hot cotangents through
``torch.autograd.grad(..., is_grads_batched=True)``, falling back to one backward per row), :class:`Compressed`
(colored backward passes for exact columns), :class:`ColoredPass` (elementwise, broadcasting and row-wise patterns
hypothesised from the shapes and verified on both sides) and :func:`term_sizes`. What does not: estimates, verdicts
and the pipeline that uses these (:mod:`gradfd.verdict`); this module never imports it, nor :mod:`gradfd.check`.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD

from . import budget as _budget
from . import engine as _engine
from . import stencils

__all__ = ["Analytical", "ForwardAnalytical", "Compressed", "ColoredPass", "PATTERNS", "grad", "largest", "term_sizes"]

_F64 = torch.float64.itemsize  # bytes of a float64 value
_JUDGED_PAIRS = _budget.JUDGED_PAIRS  # (read here at every colored pass, so that a test may patch it)


def grad(outs: list[torch.Tensor], inputs: list[torch.Tensor], cots: list[torch.Tensor]) -> tuple:
    """``torch.autograd.grad(outs, inputs, grad_outputs=cots, retain_graph=True, allow_unused=True)``.

    Rule: one-element outputs whose cotangents are all exactly 1 (a loss) are differentiated without
    ``grad_outputs``: the same values, and torch then does not import sympy (``torch.autograd._make_grads`` imports
    ``torch.fx.experimental.symbolic_shapes`` for any ``grad_outputs``: ~1.5 s of a process's first check,
    which ``benchmarks/bench_first_call.py`` times)."""
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
        forward: False: this class's Jacobian is reverse-mode's (vjps); :class:`ForwardAnalytical`'s is forward-mode's.
    """

    forward = False

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
        if k not in self._dense and size * n * _F64 <= self.budget:
            self._dense[k] = self._all_rows(k).t().contiguous()  # (N, O): a chunk of columns is a block of rows
        if k in self._dense:
            return self._dense[k][cols]
        step = self._row_step(n)
        parts = [self._rows(k, torch.arange(a, min(a + step, size), device=self.device))[:, cols]
                 for a in range(0, size, step)]
        return torch.cat(parts, dim=0).t()

    def _row_step(self, n: int) -> int:
        """Rows per batched backward: their float64 values (and a few intermediates of that size) within the budget."""
        return max(1, min(_budget.VJP_ROW_BYTES, self.budget // _F64) // (_F64 * max(n, 1)))

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
        return largest(block)


class ForwardAnalytical(Analytical):
    """Forward-mode AD's Jacobian of ``func`` (``torch.autograd.forward_ad``: a hand-written ``jvp`` rule is what is
    checked), with :class:`Analytical`'s interface, so that every mode's verdicts judge it as they judge reverse mode.

    Rule: a column is one jvp with a one-hot tangent, exact in the input's dtype, one jvp per call of ``func`` (as in
    ``torch.autograd.gradcheck``: a batching rule is not what this judges; ``check_batched_forward_grad`` does); a
    colored pass's columns are one jvp per input color (:meth:`ColoredPass.analytical_entries`).
    Every jvp replays ``func``'s random draws from the caller's RNG
    state (the state at construction), and leaves the global RNG as it found it. Rows (vjps) need every column: they
    cost ``N`` jvps, so the checks that only need columns (full and sample mode, exact or colored columns) or a few
    jvps (directional mode: :meth:`jvp`) use those, and compressed rows are not used.
    """

    forward = True

    def __init__(self, func: Callable, params: Sequence[torch.Tensor], wrt: Sequence[int], budget: int):
        self.func = func
        self._rng = _engine.RngGuard()
        super().__init__(func, params, wrt, budget)
        self._rng.observe()  # func draws random numbers: every jvp starts from the same state
        for k in self.wrt:  # one jvp each now: a missing or failing jvp rule raises here, before any evaluation
            if self.clones[k].numel():
                self._jvp_columns(k, torch.zeros(1, dtype=torch.long, device=self.device))

    def _one(self, k: int, tangent: torch.Tensor) -> tuple:
        """The output tangents (None where an output does not depend on ``params[k]``) of one jvp."""
        args = [c.detach() for c in self.clones]
        with fwAD.dual_level():
            args[k] = fwAD.make_dual(args[k], tangent.view(args[k].shape))
            out = self.func(*args)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            return tuple(fwAD.unpack_dual(outs[j]).tangent for j in self.spec.kept)

    def jvp(self, k: int, tangents: torch.Tensor) -> torch.Tensor:
        """``(r, O)`` float64: ``J v`` for each row of ``tangents`` (``(r, N_k)``, rounded to the input's dtype)."""
        x = self.clones[k]
        t = tangents.to(x.dtype)
        r = t.shape[0]
        parts = [torch.zeros(r, n, dtype=torch.float64, device=x.device) for n in self.spec.numels]
        saved = _engine.RngGuard()
        try:
            with torch.no_grad(), _engine.noting(f"gradfd: raised in forward-mode AD (a jvp) of func for params[{k}] "
                                                 "at the unperturbed params"):
                for q in range(r):
                    self._rng.reset()
                    for part, g in zip(parts, self._one(k, t[q])):
                        if g is not None:
                            part[q] = g.reshape(-1).to(torch.float64)
        finally:
            saved.close()
        return torch.cat(parts, dim=1) if parts else torch.zeros(r, 0, dtype=torch.float64, device=x.device)

    def _jvp_columns(self, k: int, cols: torch.Tensor) -> torch.Tensor:
        """``(c, O)`` float64 Jacobian columns ``cols`` from one-hot jvps, as many per batch as the budget holds."""
        n = self.clones[k].numel()
        step = max(1, self.budget // (_F64 * (n + self.spec.size) * 2))
        parts = []
        for a in range(0, cols.numel(), step):
            c = cols[a:a + step]
            onehot = torch.zeros(c.numel(), n, dtype=torch.float64, device=self.device)
            onehot[torch.arange(c.numel(), device=self.device), c] = 1.0
            parts.append(self.jvp(k, onehot))
        return torch.cat(parts) if parts else torch.zeros(0, self.spec.size, dtype=torch.float64, device=self.device)

    def _all_rows(self, k: int) -> torch.Tensor:
        n = self.clones[k].numel()
        return self._jvp_columns(k, torch.arange(n, device=self.device)).t()

    def _rows(self, k: int, rows: torch.Tensor) -> torch.Tensor:
        return self._all_rows(k)[rows]

    def columns(self, k: int, cols: torch.Tensor) -> torch.Tensor:
        n = self.clones[k].numel()
        if k not in self._dense and self.spec.size * n * _F64 <= self.budget and cols.numel() == n:
            self._dense[k] = self._all_rows(k).t().contiguous()
        return self._dense[k][cols] if k in self._dense else self._jvp_columns(k, cols)

    def vjp(self, k: int, cotangent: torch.Tensor) -> torch.Tensor:
        return self.vjp_batched(k, cotangent.view(1, -1))[0]

    def vjp_batched(self, k: int, cotangents: torch.Tensor) -> torch.Tensor:
        """``cotangents (r, O)`` times the forward-mode Jacobian: every column (``N_k`` jvps, chunked)."""
        n = self.clones[k].numel()
        if k in self._dense:
            return cotangents @ self._dense[k].t()
        step = max(1, self.budget // (_F64 * (n + self.spec.size) * 2))
        return torch.cat([cotangents @ self._jvp_columns(k, torch.arange(a, min(a + step, n), device=self.device)).t()
                          for a in range(0, n, step)], dim=1)


def largest(t: torch.Tensor) -> float:
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
        nudge = stencils.DEPENDENCE_NUDGE
        base = func(*[c.detach() for c in clones])
        nudged = func(*[c.detach() * (1 + nudge) + nudge if c.is_floating_point() else c.detach()
                        for c in clones])
    pick = lambda out: (list(out) if isinstance(out, (tuple, list)) else [out])[k]  # noqa: E731
    return not torch.equal(pick(base), pick(nudged))


class Compressed:
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
        while q <= self.size // _budget.COMPRESSION_SHARE:
            if not self._collides(moved, q):
                self.q = q
                colors = torch.arange(self.size, device=moved.device) % q
                cot = torch.zeros(q, self.size, dtype=torch.float64, device=moved.device)
                cot[colors, torch.arange(self.size, device=moved.device)] = 1.0
                self.rows = torch.stack([self.analytical.vjp(self.k, cot[c]) for c in range(q)]) if q <= _budget.SEQUENTIAL_VJPS else \
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


PATTERNS = (0, 1)  # the hypothesised patterns, in order: elementwise/broadcast, row-wise (see _pattern)


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
    tried = list(range(lower, lower + _budget.COLORING_TRIES)) + [2 * lower + 1, _budget.COLORING_WIDE * lower + 1]
    for q in tried:
        if q > limit:
            return None
        key = a * q + b % q
        if torch.unique(key).numel() == key.numel():
            return q
    return None


class ColoredPass:
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
              whole: int, weights: Callable[[int], torch.Tensor]) -> "ColoredPass | None":
        """The pass for pattern ``whole`` (see :func:`_pattern`), or None when it does not apply or would not pay;
        ``weights(n)`` draws the inputs' ``(n,)`` float64 random step weights (the caller's seeds)."""
        spec, shape = analytical.spec, tuple(analytical.clones[k].shape)
        n, size = base_steps.numel(), spec.size
        parts = [_pattern(shape, spec.shapes[j], whole) for j in range(len(spec.kept))]
        if any(pt is None for pt in parts):
            return None
        nnz = sum(pt[0].numel() for pt in parts)
        if nnz * _budget.PATTERN_ENTRY_BYTES > analytical.budget:
            return None
        device = base_steps.device
        outs = torch.cat([pt[0] + spec.offsets[j] for j, pt in enumerate(parts)]).to(device)
        ins = torch.cat([pt[1] for pt in parts]).to(device)
        q = _mod_coloring(outs, ins, n // _budget.COLORED_SAVING)
        p = _mod_coloring(ins, outs, size // _budget.COLORED_SAVING) if q is not None else None
        if q is None or p is None or q * len(stencil.offsets) * _F64 * size * 2 > analytical.budget:  # the node values
            return None
        weights = weights(n).to(device)
        name = "elementwise/broadcast" if whole == 0 else f"row-wise over the last {whole} dimension(s)"
        return cls(analytical, k, outs, ins, q, p, base_steps * weights, stencil, name)

    def describe(self) -> str:
        analytical = (f"{self.q} jvp(s), one per input color" if self.analytical.forward else
                      f"{self.p} output color(s) per backward pass")
        return (f"{self.name} pattern ({self.key.numel()} entries), verified: {self.q} input color(s) perturbed "
                f"together, {analytical} (Curtis-Powell-Reid compression)")

    def passes(self) -> str:
        """What the analytical side cost, for the report: ``"3 colored backward passes"`` or ``"1 colored jvp"``."""
        return f"{self.q} colored jvps" if self.analytical.forward else f"{self.p} colored backward passes"

    def analytical_entries(self, atol_floor: Callable[[float], float], u: torch.Tensor,
                           tangent_weights: torch.Tensor) -> str | None:
        """Decode the pattern's analytical entries from ``p`` backward passes weighted by ``u`` (``(O,)`` float64
        random weights, on the device) -- in forward mode from ``q`` jvps, one per input color (the columns the
        numerical side perturbs together), weighted by ``tangent_weights`` (``(N,)`` float64) --; None, or why the
        pattern is refuted (a gradient from an output color, or a tangent from an input color, where the pattern has
        no entry)."""
        device = self.colors.device
        if self.analytical.forward:  # forward mode: one jvp per input color (the numerical side's own colors), the
            # tangent weighted by seeded random weights (rounded to the input's dtype, as the jvp sees them) of their
            # own seed, so that a jvp that does not use its tangent entry by entry (ignores, moves or averages it)
            # cannot match on the all-ones direction of a one-color pattern
            x = self.analytical.clones[self.k]
            v = tangent_weights.to(device).to(x.dtype).to(torch.float64)
            tangents = (self.colors.unsqueeze(0) == torch.arange(self.q, device=device).unsqueeze(1)) * v
            sums = self.analytical.jvp(self.k, tangents)  # (q, O)
            self.vals = sums[self.colors[self.ins], self.outs] / v[self.ins]
            claimed = torch.zeros_like(sums, dtype=torch.bool)
            claimed[self.colors[self.ins], self.outs] = True
        else:
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
            if self.analytical.forward:
                return (f"forward AD gives output {i} a tangent from input color {d}, where the {self.name} pattern "
                        "has no entry")
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
        per = max(1, self.analytical.budget // (_budget.COLORED_NODE_COPIES * s_ * _F64 * (x.numel() + self.size)))
        for a in range(0, colors.numel(), per):
            cs = colors[a:a + per]
            moved = (self.colors.unsqueeze(0) == cs.unsqueeze(1)).to(torch.float64) * steps  # (c, N)
            points = (x64 + offsets.view(-1, 1, 1) * moved).to(x.dtype).reshape(-1, x.numel())
            vals, self.batching = _engine.evaluate_points(problem, points, warn=False)
            out[:, a:a + cs.numel()] = vals.view(s_, cs.numel(), self.size)
        return out, disp

    def first_round(self, problem: _engine.Problem, base: torch.Tensor, judge: Callable) -> str | None:
        """Evaluate every input color, test the pattern and hand its entries to ``judge(start, stop, ins, outs,
        values (S, n), displacement (S, n), analytical (n,), magnitude (O,))`` a block of inputs at a time; None, or
        why the pass stopped."""
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
        terms = self.vals.abs() * term_sizes(x64)[self.ins]
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
            judge(start, stop, ins - start, outs, values[:, self.colors[ins], outs], disp[:, ins], self.vals[lo:hi],
                  magnitude)
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


def term_sizes(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` in float64 for the noise model's ``sum_i |J_oi x_i|``, with non-finite inputs (an ``-inf`` mask
    entry, whose derivative is 0) left out rather than turning the sum into NaN."""
    size = x.detach().to(torch.float64).abs()
    return torch.where(torch.isfinite(size), size, torch.zeros_like(size))
