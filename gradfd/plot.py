"""One checked entry, drawn: ``func`` along one coordinate of its input, the stencil nodes at each step tried,
autograd's tangent and the finite-difference slope, and where the function has a kink
(:meth:`gradfd.report.CheckReport.plot_entry`).

What lives here: :class:`EntryContext` (what :func:`gradfd.check` attaches to each record so that ``func`` can be
evaluated again), :class:`EntryView` (what the record says about the entry), :func:`along` (``func`` along the
coordinate, on private copies), :func:`steps_tried`, :func:`kinks` and :func:`draw`. What does not: finding the
record and the entry (:mod:`gradfd.report`), the verdicts themselves (:mod:`gradfd.verdict`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch

from . import stencils

__all__ = ["EntryContext", "EntryView", "along", "steps_tried", "kinks", "draw", "GRID_POINTS", "GRID_SPAN",
           "KINK_RATIO"]

GRID_POINTS = 201  # points of the fine grid along the coordinate (odd: the unperturbed point is one of them)
GRID_SPAN = 2.0  # the grid spans this many times the first round's outer node offset on either side
KINK_RATIO = 10.0  # a grid point is a kink where |second difference| exceeds this many times its typical size
ROUNDING_SPREAD = 4.0  # |second difference| of values rounded to eps * |f| is below ~2 eps |f|; the typical size
# is never taken below this many eps * max |f| (a piecewise-linear function's median is rounding, often exactly 0)


@dataclass
class EntryContext:
    """What :func:`gradfd.check` attaches to each full/sample-mode record (``TensorReport.plot_context``) so that
    ``func`` can be evaluated along one coordinate later.

    Attributes:
        func: the checked function.
        params: the caller's arguments themselves (references: a check keeps no copy of a model's parameters);
            :meth:`fresh` verifies that none changed in place since the check (by their version counters, which
            writes through ``.data`` and ``set_`` do not bump: those go unseen) and returns a context on clones.
        k: which argument the record checks.
        output: for a tensor-valued ``func``, the number of the compared output in what ``func`` returns (the
            record's output); None for a loss.
        stencil, h: the check's stencil and step (None: automatic, :func:`gradfd.stencils.automatic_steps`).
        step_dtype: the dtype the automatic steps are sized for (the coarsest of the input and compared outputs).
        refine, rounds, min_step_ulps: the policy's ``refine``, ``refine_rounds + curvature_rounds`` (the most
            rounds an entry can take) and ``min_step_ulps``.
        guard: a context manager factory the check ran under (TF32 off).
        rng: the CPU RNG state the check's finite differences saw (each evaluation starts from it), or None.
    """

    func: Callable
    params: tuple[torch.Tensor, ...]
    k: int
    output: int | None
    stencil: stencils.Stencil
    h: float | None
    step_dtype: torch.dtype
    refine: int
    rounds: int
    min_step_ulps: int
    guard: Callable[[], ContextManager] = contextlib.nullcontext
    rng: torch.Tensor | None = None
    versions: tuple[int | None, ...] | None = None  # the params' version counters at the check (None: inference)
    rng_cuda: list | None = None  # the initialised CUDA devices' RNG states the check saw
    label: str = "params"  # how the record names the checked tensor (check_module: a parameter name)

    def fresh(self) -> "EntryContext":
        """This context on private clones of the params, after verifying that their version counters are those
        seen at the check (ValueError naming the argument otherwise: the plot would show another function)."""
        if self.versions is not None:
            changed = [i for i, (q, v) in enumerate(zip(self.params, self.versions))
                       if v is not None and q._version != v]
            if changed:
                which = self.label if changed[0] == self.k else f"params[{changed[0]}]"
                raise ValueError(f"{which} was modified in place since the check (an optimizer step?): "
                                 "plot_entry would evaluate another function; check again to plot")
        clones = tuple(q.detach().clone() for q in self.params)
        return dataclasses.replace(self, params=clones, versions=None)


@dataclass
class EntryView:
    """What the record says about the drawn entry: its label (``"params[0] [2]"``), verdict name, values, and its
    flat input (and output) positions."""

    label: str
    verdict: str
    analytical: float
    numerical: float
    error_estimate: float
    tolerance: float
    input_flat: int
    output_flat: int | None


def first_step(ctx: EntryContext, input_flat: int) -> float:
    """The entry's first-round step, as :func:`gradfd.verdict.plan.make_plan` sets it."""
    if ctx.h is not None:
        return float(ctx.h)
    x = ctx.params[ctx.k].detach().reshape(-1)[input_flat:input_flat + 1]
    return float(stencils.automatic_steps(x, ctx.stencil, dtype=ctx.step_dtype)[0])


def steps_tried(ctx: EntryContext, input_flat: int) -> list[float]:
    """The first-round step and the refined ones, ``step / refine**r`` for ``r = 0 .. rounds``, as long as a step
    stays ``min_step_ulps`` ulps of the input or more (the refinement's own limit)."""
    x = ctx.params[ctx.k].detach().reshape(-1)[input_flat]
    a = x.abs()
    ulp = float((torch.nextafter(a, torch.full_like(a, math.inf)) - a).to(torch.float64))
    step = first_step(ctx, input_flat)
    out = [step]
    for r in range(1, ctx.rounds + 1):
        s = step / ctx.refine**r
        if not math.isfinite(ulp) or s < ctx.min_step_ulps * ulp:
            break
        out.append(s)
    return out


def _value(ctx: EntryContext, out, output_flat: int | None) -> float:
    if ctx.output is None:
        return float(out.detach().reshape(-1)[0].to(torch.float64))
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return float(outs[ctx.output].detach().reshape(-1)[output_flat].to(torch.float64))


def along(ctx: EntryContext, input_flat: int, output_flat: int | None, displacements: Sequence[float]
          ) -> tuple[torch.Tensor, torch.Tensor, float, torch.dtype]:
    """``func`` (the compared output entry, or the loss) with input entry ``input_flat`` moved by each displacement,
    on private copies, under ``torch.no_grad``.

    Returns:
        ``(t, f, f0, dtype)``: ``(n,)`` float64 realised displacements (after rounding ``x + t`` to the input's
        dtype) and values, NaN where ``func`` raised a domain error (``ValueError``, ``RuntimeError``,
        ``ArithmeticError``); ``f0``, the value at the unperturbed point; ``dtype``, the value's own dtype.

    Raises:
        What ``func`` raises at the unperturbed point.
    """
    base = ctx.params[ctx.k].detach().clone(memory_format=torch.contiguous_format)
    x0 = float(base.reshape(-1)[input_flat].to(torch.float64))
    saved = torch.get_rng_state()
    saved_cuda = torch.cuda.get_rng_state_all() if ctx.rng_cuda is not None else None

    def evaluate(x: torch.Tensor):
        if ctx.rng is not None:
            torch.set_rng_state(ctx.rng)
        if ctx.rng_cuda is not None:
            torch.cuda.set_rng_state_all(ctx.rng_cuda)
        args = list(ctx.params)
        args[ctx.k] = x
        return ctx.func(*args)

    ts, fs = [], []
    try:
        with torch.no_grad(), ctx.guard():
            out = evaluate(base.clone())
            f0 = _value(ctx, out, output_flat)
            dtype = out.dtype if ctx.output is None else (list(out) if isinstance(out, (tuple, list)) else [out])[
                ctx.output].dtype
            for d in displacements:
                x = base.clone()
                x.view(-1)[input_flat] = x0 + float(d)
                ts.append(float(x.view(-1)[input_flat].to(torch.float64)) - x0)
                try:
                    fs.append(_value(ctx, evaluate(x), output_flat))
                except (ValueError, RuntimeError, ArithmeticError):
                    fs.append(math.nan)
    finally:
        torch.set_rng_state(saved)
        if saved_cuda is not None:
            torch.cuda.set_rng_state_all(saved_cuda)
    return torch.tensor(ts, dtype=torch.float64), torch.tensor(fs, dtype=torch.float64), f0, dtype


def kinks(f: torch.Tensor, eps: float) -> torch.Tensor:
    """Positions in ``f`` (values on an even grid) whose second difference ``f[i-1] - 2 f[i] + f[i+1]`` exceeds
    ``KINK_RATIO`` times its median over the grid (never taken below ``ROUNDING_SPREAD * eps * max|f|``: the
    rounding of the values). Non-finite values are left out."""
    if f.numel() < 3:
        return torch.zeros(0, dtype=torch.long)
    d2 = (f[:-2] - 2 * f[1:-1] + f[2:]).abs()
    finite = torch.isfinite(d2)
    if not bool(finite.any()):
        return torch.zeros(0, dtype=torch.long)
    typical = float(d2[finite].median())
    scale = float(f[torch.isfinite(f)].abs().max())
    threshold = KINK_RATIO * max(typical, ROUNDING_SPREAD * eps * scale)
    return (finite & (d2 > threshold)).nonzero().flatten() + 1


def draw(plt, ctx: EntryContext, view: EntryView):
    """The figure of one entry (see :meth:`gradfd.report.CheckReport.plot_entry`)."""
    steps = steps_tried(ctx, view.input_flat)
    outer = max(ctx.stencil.offsets) * steps[0]
    half = GRID_POINTS // 2
    grid = GRID_SPAN * outer * torch.arange(-half, half + 1, dtype=torch.float64) / half  # 0 exactly in the middle
    nodes = [s * o for s in steps for o in ctx.stencil.offsets]
    t, f, f0, dtype = along(ctx, view.input_flat, view.output_flat, [*grid.tolist(), *nodes])
    tg, fg = t[:GRID_POINTS].numpy(), (f[:GRID_POINTS] - f0).numpy()
    fig, ax = plt.subplots(figsize=(8, 5))
    what = "loss" if ctx.output is None else "output entry"
    ax.plot(tg, fg, color="0.3", lw=1.2, label=f"{what} - its unperturbed value", gid="function")
    n = len(ctx.stencil.offsets)
    for r, s in enumerate(steps):
        tn, fn = t[GRID_POINTS + r * n:GRID_POINTS + (r + 1) * n], f[GRID_POINTS + r * n:GRID_POINTS + (r + 1) * n]
        ax.plot(tn.numpy(), (fn - f0).numpy(), linestyle="none", marker="o", ms=6 - min(r, 3), color=f"C{2 + r}",
                label=f"stencil nodes, step {s:.3g}" + (" (first round)" if r == 0 else f" (h / {ctx.refine**r})"),
                gid=f"nodes{r}")
    ends = [float(tg.min()), float(tg.max())]
    ax.plot(ends, [view.analytical * e for e in ends], color="C0", lw=1.5,
            label=f"autograd tangent (slope {view.analytical:.6g})", gid="analytical")
    ax.plot(ends, [view.numerical * e for e in ends], color="C1", lw=1.5, ls="--",
            label=f"finite-difference slope ({view.numerical:.6g})", gid="numerical")
    where = kinks(f[:GRID_POINTS], stencils.eps(dtype) if dtype.is_floating_point else 0.0)
    if where.numel():
        ax.plot(tg[where.numpy()], fg[where.numpy()], linestyle="none", marker="x", ms=12, mew=2, color="red",
                label=f"kink (second difference > {KINK_RATIO:g}x its median)", gid="kink")
        for i in where.tolist():
            ax.axvline(float(tg[i]), color="red", lw=0.6, alpha=0.5)
    ax.axhline(0.0, color="k", lw=0.5)
    ax.axvline(0.0, color="k", lw=0.5)
    ax.set_xlabel(f"displacement of {view.label} from {_x0(ctx, view):.6g}")
    ax.set_ylabel(f"change of the {what}")
    ax.set_title(f"{view.label}: {view.verdict}\nanalytical {view.analytical:.6g}, numerical {view.numerical:.6g}, "
                 f"est. FD error {view.error_estimate:.3g}, tolerance {view.tolerance:.3g}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _x0(ctx: EntryContext, view: EntryView) -> float:
    return float(ctx.params[ctx.k].detach().reshape(-1)[view.input_flat].to(torch.float64))
