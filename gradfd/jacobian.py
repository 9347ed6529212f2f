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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import accuracy, stencils
from . import engine as _engine
from .report import AGREE, DISAGREE, REL_FLOOR, UNRESOLVED, TensorReport, relative_errors

__all__ = ["Analytical", "column_entries", "check_coordinates", "DENSE_ENTRIES"]

DENSE_ENTRIES = 1 << 21  # keep every entry's values in the report up to this many (output, input) pairs
_VJP_ROW_BYTES = 1 << 26  # bytes of analytical rows computed per batched backward


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
        with torch.enable_grad():
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
        try:
            (g,) = torch.autograd.grad(outs, [x], grad_outputs=cots, retain_graph=True, allow_unused=True,
                                       is_grads_batched=True)
            grads = torch.zeros_like(x).expand(r, *x.shape) if g is None else g
        except RuntimeError:  # a backward that cannot be batched: one backward per row
            grads = []
            for q in range(r):
                (g,) = torch.autograd.grad(outs, [x], grad_outputs=[c[q] for c in cots], retain_graph=True,
                                           allow_unused=True)
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
        step = max(1, _VJP_ROW_BYTES // (8 * max(n, 1)))
        parts = [self._rows(k, torch.arange(a, min(a + step, size), device=self.device))[:, cols]
                 for a in range(0, size, step)]
        return torch.cat(parts, dim=0).t()

    def _all_rows(self, k: int) -> torch.Tensor:
        size, n = self.spec.size, self.clones[k].numel()
        step = max(1, _VJP_ROW_BYTES // (8 * max(n, 1)))
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
        (g,) = torch.autograd.grad(outs, [x], grad_outputs=cots, retain_graph=True, allow_unused=True)
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
        return float(block.abs().max()) if block.numel() else 0.0


def _depends_on_inputs(func: Callable, clones: Sequence[torch.Tensor], k: int) -> bool:
    """Whether output ``k`` changes at all when every floating input is nudged (so that a constant output, which
    must have a zero gradient, is still compared)."""
    with torch.no_grad():
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


@dataclass
class _Columns:
    """First-round results for a chunk of columns: all ``(c, O)``."""

    numerical: torch.Tensor
    error: torch.Tensor
    rounding: torch.Tensor
    kink: torch.Tensor
    finite: torch.Tensor


def _segment_median(values: torch.Tensor, segments: torch.Tensor, count: int) -> torch.Tensor:
    """``(count,)``: the (lower) median of ``values`` within each segment id, NaN for empty segments."""
    out = torch.full((count,), math.nan, dtype=values.dtype, device=values.device)
    if values.numel() == 0:
        return out
    order = torch.argsort(values)
    v, s = values[order], segments[order]
    order = torch.argsort(s, stable=True)
    v, s = v[order], s[order]
    counts = torch.bincount(s, minlength=count)
    starts = torch.cumsum(counts, 0) - counts
    mid = (starts + (counts - 1).clamp(min=0) // 2).clamp(max=v.numel() - 1)
    return torch.where(counts > 0, v[mid], out)


def entry_estimates(values: torch.Tensor, displacement: torch.Tensor, base: torch.Tensor, stencil: stencils.Stencil,
                    out_eps: torch.Tensor, outputs: torch.Tensor, n_outputs: int,
                    noise: torch.Tensor | None, magnitude: torch.Tensor | None = None) -> tuple[_Columns, torch.Tensor]:
    """Numerical Jacobian entries with error estimates, for ``n`` (input column, output entry) pairs.

    Args:
        values: ``(S, n)`` float64 output entry ``outputs[e]`` at the stencil's nodes around column ``e``'s input.
        displacement: ``(S, n)`` float64 realised steps of each entry's column.
        base: ``(n,)`` float64 output values at the unperturbed point.
        stencil: the stencil (rows of ``values`` in ``stencil.offsets`` order).
        out_eps: ``(n,)`` machine epsilon of each output's dtype.
        outputs: ``(n,)`` int64 output entry of each pair; ``n_outputs`` their number.
        noise: ``(n_outputs,)`` loss-noise per output entry to use, or None to measure it here: the median of the
            fourth differences over the pairs that moved each output, never below the model ``eps * (|f| +
            magnitude)``.
        magnitude: ``(n_outputs,)`` size of the terms each output sums (``sum_i |J_oi x_i|``): an output that is a
            sum with cancellation rounds like its terms, not like its value.

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
        model[outputs] = out_eps * base.abs()
        if magnitude is not None:
            model[outputs] = out_eps * (base.abs() + magnitude[outputs])
        if fourth is None:
            noise = model
        else:
            moved = finite & (values != base).any(dim=0)
            measured = _segment_median(fourth.abs()[moved], outputs[moved], n_outputs)
            moved_count = torch.bincount(outputs[moved], minlength=n_outputs)
            measured = measured.nan_to_num(0.0) * accuracy.NOISE_FROM_FOURTH_DIFFERENCE
            reliable = moved_count >= accuracy.RELIABLE_MEDIAN
            noise = torch.maximum(torch.where(reliable, model / 4, model), measured)
    rounding = accuracy.ROUNDING_SAFETY * noise[outputs] * stencil.weight_norm / h
    truncation = spread if spread is not None else torch.zeros_like(numerical)
    nan = torch.full_like(numerical, math.nan)
    entries = _Columns(torch.where(finite, numerical, nan), torch.where(finite, truncation + rounding, nan), rounding,
                       torch.where(finite, kink, nan), finite)
    return entries, noise


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
    progress: Callable[[int], None] | None = None,
) -> list[TensorReport]:
    """Full or sample mode for input ``params[k]``: one :class:`TensorReport` per compared output.

    The first round streams through the engine; entries that do not agree are then re-evaluated at smaller steps
    (:func:`gradfd.check.refine`). For tensor-valued functions the analytical Jacobian comes from colored
    vector-Jacobian products (:class:`_Compressed`) while that is valid and cheaper; a disagreement or a leak
    makes the tensor be redone with exact rows (``compress=False``).
    """
    from .check import FLOOR_EPS, _Entries, _verdicts, refine

    spec = analytical.spec
    p = params[k]
    n, size = p.numel(), spec.size
    m = coords.numel()
    out_eps = torch.cat([torch.full((spec.numels[j],), stencils.eps(dt), dtype=torch.float64)
                         for j, dt in enumerate(spec.dtypes)]).to(p.device) if size else torch.zeros(0)
    group = torch.cat([torch.full((spec.numels[j],), j, dtype=torch.int64) for j in range(len(spec.kept))]
                      ).to(p.device) if size else torch.zeros(0, dtype=torch.int64)
    floor = FLOOR_EPS * out_eps
    rtol_ = floor if rtol is None else torch.full_like(floor, rtol)
    scales = [analytical.scale(k, j) for j in range(len(spec.kept))]
    flat_x = p.detach().reshape(-1)
    base_steps = (stencils.automatic_steps(flat_x, stencil) if h is None
                  else torch.full(flat_x.shape, h, dtype=torch.float64, device=p.device))
    keep_all = m * size <= DENSE_ENTRIES
    if chunk_size is None and size * n * 8 > analytical.budget:
        # the analytical rows are recomputed for every chunk: make the chunks few
        chunk_size = max(64, -(-m // 16))
    state: dict = {"noise": None, "details": {}, "fallback": False,
                   "compressed": _Compressed(analytical, k) if compress and not analytical.scalar and size >= 16
                   else None}
    store = {name: torch.empty(m, size, dtype=torch.float64, device=p.device) if keep_all else None
             for name in ("numerical", "analytical", "error", "tolerance")}
    verdict_all = torch.empty(m, size, dtype=torch.int8, device=p.device) if keep_all else None
    agg = [dict(agree=0, max_abs=0.0, max_rel=0.0, worst=None) for _ in spec.kept]
    flagged: list[tuple] = []  # (pair index, numerical, analytical, error, rounding, kink, finite, verdict, tol, ns)

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
                                  skip_outputs=analytical.nondifferentiable)

        def sink(start, stop, values, disp):
            if analytical.scalar:
                values = values.unsqueeze(-1)
            on_chunk(start, stop, values, disp)

        ev = _engine.evaluate(func, params, k, steps=base_steps[cols] / factor, stencil=stencil, coords=cols,
                              engine=engine, batching=batching, chunk_size=chunk_size, memory_budget=memory_budget,
                              problem=problem, sink=sink, progress=progress if report else None)
        if not state["details"]:
            state["details"] = {"engine": ev.engine, "batching": ev.batching, "chunk_size": ev.chunk_size,
                                "notes": list(ev.notes)}

    base_values = None

    def first_round(start, stop, values, disp):
        if state["fallback"]:
            return  # the tensor will be redone with exact rows
        cols = coords[start:stop]
        c = cols.numel()
        comp = state["compressed"]
        if comp is not None:
            moved = (values != base_values).any(dim=0)  # NaN and inf compare unequal: they count as moved
            if comp.fit(moved):
                ana, unused_sums = comp.entries(cols, moved)
                h_col = (disp[0] - disp[1]).abs() / 2  # (c,)
                lo_hi = [(spec.offsets[j], spec.offsets[j] + spec.numels[j]) for j in range(len(spec.kept))]
                allowed = (FLOOR_EPS * float(out_eps.max()) * max((float(ana[:, a:b].abs().max()) if b > a else 0.0)
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
                scales[j] = float(ana[:, sel].abs().max()) if ana[:, sel].numel() else 0.0
        # Pairs whose output no node moved (exactly) and whose analytical entry is exactly zero agree with zero
        # error: most of a Jacobian, for elementwise and row-wise ops. Only the others are estimated and judged.
        active = (moved if comp is not None else (values != base_values).any(dim=0)) | (ana != 0)
        jj, oo = active.nonzero(as_tuple=True)
        vals = values[:, jj, oo]
        magnitude = (ana.abs() * flat_x[cols].abs().to(torch.float64).unsqueeze(1)).sum(dim=0)  # (O,)
        est, noise = entry_estimates(vals, disp[:, jj], base_values[oo], stencil, out_eps[oo], oo, size, None,
                                     magnitude)
        # each chunk measures its own noise; the refinement rounds use the largest seen per output entry
        state["noise"] = noise if state["noise"] is None else torch.maximum(state["noise"], noise)
        e = _Entries((start + jj) * size + oo, est.numerical, ana[jj, oo], est.error, est.rounding, est.kink,
                     est.finite)
        verdict, tol, nonsmooth = _verdicts(e, floor_of(e.analytical, oo))
        inactive = ~active
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
            lo, hi = spec.offsets[j], spec.offsets[j] + spec.numels[j]
            agg[j]["agree"] += int(inactive[:, lo:hi].sum())
        good = verdict == AGREE
        if bool(good.any()):
            diff = (e.numerical - e.analytical).abs()
            g_out = group[oo]
            sc = torch.tensor([s if s is not None else 0.0 for s in scales], dtype=torch.float64,
                              device=diff.device)[g_out]
            rel = torch.where(e.analytical.abs() >= REL_FLOOR * sc, diff / e.analytical.abs().clamp(min=1e-300),
                              torch.zeros_like(diff))
            excess = diff / tol.clamp(min=1e-300)
            for j in range(len(spec.kept)):
                sel = good & (g_out == j)
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
        if bad.numel():
            if comp is not None and bool((verdict == DISAGREE).any()):
                state["fallback"] = True  # report exact values: redo with exact rows
                return
            flagged.append((e.take(bad), verdict[bad], tol[bad], nonsmooth[bad]))

    def set_base(problem_base):
        nonlocal base_values
        base_values = problem_base

    # the base values of the compared outputs at the unperturbed point (the engine evaluates them too)
    problem = _engine.prepare(func, params, k, vector=not analytical.scalar,
                                  skip_outputs=analytical.nondifferentiable)
    problem.rng.close()
    set_base(problem.base_loss.to(torch.float64).reshape(-1))
    evaluate_columns(coords, 1.0, first_round, report=True)
    if state["fallback"]:
        return check_coordinates(func, params, k, analytical, coords, h=h, stencil=stencil, engine=engine,
                                 batching=batching, chunk_size=chunk_size, memory_budget=memory_budget, atol=atol,
                                 rtol=rtol, mode=mode, compress=False, progress=progress)

    refined = 0
    if flagged:
        e = _Entries(*(torch.cat([getattr(f[0], name) for f in flagged]) for name in _Entries.__dataclass_fields__))
        verdict = torch.cat([f[1] for f in flagged])
        tol = torch.cat([f[2] for f in flagged])
        nonsmooth = torch.cat([f[3] for f in flagged])

        def evaluator(pairs: torch.Tensor, factor: float) -> _Entries:
            positions = torch.div(pairs, size, rounding_mode="floor")
            outs_ = pairs % size
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
                            knk[inverse, outs_], fin[inverse, outs_])

        e, verdict, tol, refined = refine(e, verdict, tol, nonsmooth, evaluator,
                                          lambda entries: floor_of(entries.analytical, entries.index % size))
        if keep_all:
            pos, outs_ = torch.div(e.index, size, rounding_mode="floor"), e.index % size
            store["numerical"][pos, outs_] = e.numerical
            store["error"][pos, outs_] = e.error
            store["tolerance"][pos, outs_] = tol
            verdict_all[pos, outs_] = verdict
    else:
        e, verdict, tol = None, None, None

    details = {**state["details"], "stencil": stencil.name, "step": "automatic" if h is None else h,
               "refined": refined, "analytical": (f"{state['compressed'].q} colored backward passes"
                                                  if state["compressed"] is not None else "exact rows"), "loss_noise": float(state["noise"].max()) if state["noise"] is not None and
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
