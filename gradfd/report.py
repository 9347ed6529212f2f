"""Check reports: one record per checked tensor, a readable table, JSON, per-entry tensors, and plots."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["AGREE", "DISAGREE", "UNRESOLVED", "TensorReport", "CheckReport", "GradientCheckError",
           "InvalidReferenceError"]

AGREE, DISAGREE, UNRESOLVED = 0, 1, 2
# the rule checks whose findings a record holds (TensorReport.findings), as the report names them
RULES = {"batched_grad": "batched backward", "batched_forward_grad": "batched forward AD",
         "grad_dtypes": "gradient dtype"}
VERDICT_NAMES = {AGREE: "agree", DISAGREE: "disagree", UNRESOLVED: "unresolved"}


def unravel(flat: int, shape: Sequence[int]) -> tuple[int, ...]:
    """Index tuple of flat (row-major) position ``flat`` in ``shape``."""
    out = []
    for n in reversed(shape):
        out.append(flat % n)
        flat //= n
    return tuple(reversed(out))


def entry_name(param_idx: int, shape: Sequence[int], flat: int) -> str:
    """``params[k][i, j]`` for the flat entry ``flat`` of a parameter of ``shape``."""
    idx = unravel(flat, shape)
    return f"params[{param_idx}][{', '.join(map(str, idx))}]" if idx else f"params[{param_idx}]"


def _part(index: tuple, complex_: bool) -> str:
    """``[i, j]``, or for the real pairs of a complex tensor ``[i, j].re`` / ``.im`` (the last index is the part)."""
    if complex_ and index:
        part = "im" if index[-1] else "re"
        return f"[{', '.join(map(str, index[:-1]))}].{part}" if len(index) > 1 else f".{part}"
    return f"[{', '.join(map(str, index))}]"


def _fmt_index(index, complex_input: bool = False, complex_output: bool = False) -> str:
    if index is None:
        return "-"
    if isinstance(index, int):
        return f"dir {index}"
    if index and isinstance(index[0], tuple):  # (output index, input index)
        return f"out{_part(index[0], complex_output)} in{_part(index[1], complex_input)}"
    return _part(index, complex_input)


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


@dataclass
class TensorReport:
    """The check of one tensor (or, for tensor-valued functions, one output/input pair).

    Attributes:
        name: e.g. ``"params[0]"`` or ``"output[0] wrt params[1]"``.
        shape, dtype: of the checked input tensor.
        output_shape: for a tensor-valued function, the shape of the compared output (None for a loss). Indices
            are then ``(output index, input index)`` pairs, and ``entries["index"]`` is ``input_flat * n_out +
            output_flat``.
        mode: ``"full"``, ``"sample"`` or ``"directional"``.
        checked, total: entries (or directions) checked, out of how many entries.
        max_abs_error, max_rel_error: over checked entries; the relative error is taken over entries whose
            analytical value is at least ``Policy.rel_floor`` (1e-3) of the largest (see :func:`relative_errors`).
        worst_index: index tuple of the worst entry (largest error over tolerance), or a direction number.
        worst_analytical, worst_numerical, worst_error_estimate, worst_tolerance: values there.
        agree, disagree, unresolved: counts.
        passed: no disagreeing entry.
        entries: per-entry tensors (CPU): ``index`` (flat indices, or direction numbers), ``numerical``,
            ``analytical``, ``error_estimate``, ``tolerance``, ``verdict`` (int8: 0 agree, 1 disagree, 2 unresolved).
        details: engine, stencil, steps, noise estimate and other notes; ``switches`` where most first-round
            kinks are switches', in full and sample modes (the shares of clean and of tall stencils, and
            whether the rule on switches held: docs/verdicts.md, "Switches at scale").
        nondeterminism: set (to what was measured) when two backward passes differed by more than ``nondet_tol``.
        complex_input, complex_output: the checked input (the compared output) is complex, checked as its real
            pairs (:mod:`gradfd.wirtinger`): ``shape`` (``output_shape``) is the real view's, its last index the
            part (0 real, 1 imaginary), which the table names (``[2, 1].im``); ``dtype`` is the complex one.
        findings: what the other rule checks found wrong, by option: ``"batched_grad"``, ``"batched_forward_grad"``,
            ``"grad_dtypes"`` (:mod:`gradfd.rules`); empty when they passed or were not asked for. Any finding fails
            the record.
        undefined_grad: set (to what the backward did) when ``check_undefined_grad`` found that the backward does not
            treat undefined output gradients as zeros: it raised, or gave this input a nonzero gradient.
        detection_limit: the smallest error on a single entry, relative to the tensor's RMS gradient (of the
            Jacobian's entries the function depends on, for a tensor-valued function), that this check flags with
            95% probability
            (:mod:`gradfd.verdict.detection`): over the entries looked at, so in sample mode per sampled entry;
            inf where more than 5% of them could never be flagged (kinked or non-finite at every step), NaN where
            it is not known (a zero gradient).
        unexamined: the share of the tensor's entries this check did not look at (sample mode): an error there
            cannot be found.
        plot_context: what :meth:`CheckReport.plot_entry` needs to evaluate ``func`` again
            (:class:`gradfd.plot.EntryContext`), attached by :func:`gradfd.check` in full and sample mode; None
            otherwise. Left out of ``repr``, comparisons and :meth:`to_dict`.
    """

    name: str
    shape: tuple
    dtype: torch.dtype
    mode: str
    checked: int
    total: int
    max_abs_error: float
    max_rel_error: float
    worst_index: tuple | int | None
    worst_analytical: float
    worst_numerical: float
    worst_error_estimate: float
    worst_tolerance: float
    agree: int
    disagree: int
    unresolved: int
    entries: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    output_shape: tuple | None = None
    nondeterminism: str | None = None
    undefined_grad: str | None = None
    findings: dict[str, str] = field(default_factory=dict)
    complex_input: bool = False
    complex_output: bool = False
    detection_limit: float = math.nan
    unexamined: float = 0.0
    plot_context: Any = field(default=None, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        """No checked entry disagrees, the backward was not found non-deterministic, and (where checked) it treats
        undefined output gradients as zeros and the other rule checks found nothing (:attr:`findings`). Unresolved
        entries do not fail: a tensor whose every entry is unresolved passes (see :attr:`nothing_compared`)."""
        return self.disagree == 0 and self.nondeterminism is None and self.undefined_grad is None and not self.findings

    @property
    def nothing_compared(self) -> bool:
        """Entries were checked, but every one is unresolved: no numerical value could be set against an analytical
        one (``sqrt`` at 0, where every stencil leaves the domain). An empty tensor (0 entries) is not this."""
        return self.checked > 0 and self.unresolved == self.checked

    @property
    def verdict(self) -> str:
        """``"FAIL"`` (a disagreement, nondeterminism, an undefined-gradient or other rule finding), ``"UNRESOLVED"``
        (none, but no entry could be compared either: every one is unresolved) or ``"PASS"``."""
        if not self.passed:
            return "FAIL"
        return "UNRESOLVED" if self.unresolved and not self.agree else "PASS"

    def detection_text(self) -> str:
        """:attr:`detection_limit` as the table shows it: ``"2.1e-03 rms"``, with the share of entries not looked
        at in sample mode (``"... on 10%"``)."""
        if math.isnan(self.detection_limit):
            return "-"
        text = "none" if math.isinf(self.detection_limit) else f"{self.detection_limit:.1e} rms"
        return text + (f" on {100 * (1 - self.unexamined):.3g}%" if self.unexamined > 0 else "")

    def disagreeing(self, limit: int = 10) -> list[tuple]:
        """Index tuples (or direction numbers) of up to ``limit`` disagreeing entries, worst first."""
        v = self.entries["verdict"]
        bad = (v == DISAGREE).nonzero().flatten()
        if bad.numel() == 0:
            return []
        excess = (self.entries["numerical"] - self.entries["analytical"]).abs() / self.entries["tolerance"]
        order = bad[excess[bad].argsort(descending=True)][:limit]
        return [self._index_of(int(self.entries["index"][j])) for j in order]

    def flagged(self, limit: int = 5) -> list:
        """Indices (as :meth:`disagreeing` gives them) of up to ``limit`` flagged entries: the disagreeing ones,
        worst first, then the unresolved ones, largest ``|numerical - analytical| / tolerance`` first."""
        if not self.entries:
            return []
        if self.mode == "directional":
            return self.disagreeing(limit)
        e = self.entries
        excess = ((e["numerical"] - e["analytical"]).abs() / e["tolerance"]).nan_to_num(nan=math.inf)
        out = []
        for verdict in (DISAGREE, UNRESOLVED):
            rows = (e["verdict"] == verdict).nonzero().flatten()
            rows = rows[excess[rows].argsort(descending=True, stable=True)]
            out += [self._index_of(int(e["index"][j])) for j in rows[: limit - len(out)]]
        return out

    def _flat_of(self, index) -> int:
        """The ``entries["index"]`` value of ``index`` (an index as :meth:`disagreeing` gives it).

        Raises:
            ValueError: naming ``index``, when it has the wrong form or lies outside the shapes.
        """
        def ravel(idx, shape, what: str) -> int:
            if isinstance(idx, int) and not isinstance(idx, bool) and len(shape) == 1:
                idx = (idx,)
            if not isinstance(idx, (tuple, list)) or len(idx) != len(shape) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i, n in zip(idx, shape)):
                raise ValueError(f"index: expected {what}, a tuple of {len(shape)} int(s) within shape "
                                 f"{tuple(shape)}, got {idx!r}")
            flat = 0
            for i, n in zip(idx, shape):
                flat = flat * n + i
            return flat

        if self.output_shape is None:
            return ravel(index, self.shape, f"an entry index of {self.name}")
        if not isinstance(index, (tuple, list)) or len(index) != 2:
            raise ValueError(f"index: {self.name} is a tensor-valued function's record; expected (output index, "
                             f"input index), a pair of tuples as report[name].disagreeing() gives it, got {index!r}")
        out_flat = ravel(index[0], self.output_shape, "an output index")
        return ravel(index[1], self.shape, "an input index") * math.prod(self.output_shape) + out_flat

    def _index_of(self, flat: int):
        if self.mode == "directional":
            return flat
        if self.output_shape is None:
            return unravel(flat, self.shape)
        n_out = math.prod(self.output_shape)
        i, o = divmod(flat, n_out)
        return unravel(o, self.output_shape), unravel(i, self.shape)

    def to_dict(self) -> dict:
        """JSON-serialisable summary (no tensors)."""
        return {
            "name": self.name, "shape": list(self.shape), "dtype": str(self.dtype).replace("torch.", ""),
            "mode": self.mode, "checked": self.checked, "total": self.total, "passed": self.passed,
            "verdict": self.verdict,
            "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
            "worst_index": _jsonable(self.worst_index), "output_shape": _jsonable(self.output_shape),
            "nondeterminism": self.nondeterminism, "undefined_grad": self.undefined_grad,
            "findings": dict(self.findings),
            "detection_limit": self.detection_limit,
            "complex_input": self.complex_input, "complex_output": self.complex_output,
            "unexamined": self.unexamined,
            "worst_analytical": self.worst_analytical, "worst_numerical": self.worst_numerical,
            "worst_error_estimate": self.worst_error_estimate, "worst_tolerance": self.worst_tolerance,
            "agree": self.agree, "disagree": self.disagree, "unresolved": self.unresolved,
            "disagreeing": [_jsonable(i) for i in self.disagreeing()],
            "details": {k: (v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else str(v))
                        for k, v in self.details.items()},
        }


TINY = 1e-300  # the guard against division by zero: far below any tolerance, above float64's smallest normal


def relative_errors(diff: torch.Tensor, analytical: torch.Tensor, scale: float, rel_floor: float) -> torch.Tensor:
    """``|numerical - analytical| / |analytical|`` where ``|analytical| >= rel_floor * scale``, else 0: a relative
    error of an entry that is (numerically) zero says nothing, and most Jacobian entries are zero (``rel_floor``:
    :attr:`gradfd.verdict.policy.Policy.rel_floor`)."""
    big = analytical.abs() >= rel_floor * scale
    return torch.where(big & (analytical != 0), diff / analytical.abs().clamp(min=TINY), torch.zeros_like(diff))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


@dataclass
class CheckReport:
    """The result of :func:`gradfd.check`: one :class:`TensorReport` per checked tensor.

    ``str(report)`` is a table; ``report.passed`` the verdict; ``report.tensors`` the records;
    ``report.to_dict()`` JSON; ``report.plot()`` a matplotlib figure.
    """

    tensors: list[TensorReport]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """No checked entry of any tensor disagrees, no backward was found non-deterministic (``nondet_tol``), none
        mishandles undefined output gradients (``check_undefined_grad``), and no other rule check found anything
        (:attr:`TensorReport.findings`: batched gradients, gradient dtypes).

        This is "no disagreement", not "verified": a tensor whose every entry is unresolved (a kink, a jump or a
        non-finite value of ``func`` within every step tried) passes, and the table's headline then reads
        ``PASSED (but nothing could be compared for ...)``. :attr:`uncompared` lists such tensors, and
        :attr:`verified` requires that there be none (``gradfd.gradcheck`` and
        ``gradfd.testing.assert_gradients_match`` fail unless the report is verified). Partly unresolved tensors
        (a ReLU's kinks among agreeing entries) pass either way. ``notes`` never change the verdict."""
        return all(t.passed for t in self.tensors)

    @property
    def uncompared(self) -> list[str]:
        """Names of the checked tensors (records) whose every entry is unresolved: nothing was compared there."""
        return [t.name for t in self.tensors if t.nothing_compared]

    @property
    def verified(self) -> bool:
        """:attr:`passed`, and at least one entry of every checked tensor was compared (:attr:`uncompared` is
        empty): what ``gradfd.gradcheck`` returns."""
        return self.passed and not self.uncompared

    def uncompared_message(self) -> str:
        """One line per tensor in :attr:`uncompared` saying that nothing could be compared there and why; "" when
        there is none."""
        lines = []
        for t in self.tensors:
            if t.nothing_compared:
                what = "directions" if t.mode == "directional" else "entries"
                lines.append(f"nothing could be compared for {t.name} (all {t.checked} {what} unresolved: a kink, "
                             "a discontinuity or a non-finite value of func within every step tried); check at a "
                             "point where func is differentiable")
        return "\n".join(lines)

    def __getitem__(self, key: int | str) -> TensorReport:
        if isinstance(key, int):
            return self.tensors[key]
        for t in self.tensors:
            if t.name == key:
                return t
        raise KeyError(f"no checked tensor named {key!r}; have {[t.name for t in self.tensors]}")

    def to_dict(self) -> dict:
        return {"passed": self.passed, "verified": self.verified, "uncompared": self.uncompared,
                "tensors": [t.to_dict() for t in self.tensors], "notes": list(self.notes)}

    def __str__(self) -> str:
        head = ["tensor", "shape", "dtype", "checked", "max abs err", "max rel err", "worst index", "analytical",
                "numerical", "est. FD error", "agree/disagree/unresolved", "detects (95%)", "verdict"]
        if self.tensors and all(t.mode == "reference" for t in self.tensors):  # reference mode's two sides
            head[7:10] = ["func", "reference (f64)", "ref. rounding"]
        rows = []
        for t in self.tensors:
            worst = _fmt_index(t.worst_index, t.complex_input, t.complex_output)
            checked = f"{t.checked}/{t.total}" + (" dirs" if t.mode == "directional" else "")
            rows.append([t.name, "x".join(map(str, t.shape)) or "scalar", str(t.dtype).replace("torch.", ""),
                         checked, _fmt(t.max_abs_error), _fmt(t.max_rel_error), worst, _fmt(t.worst_analytical),
                         _fmt(t.worst_numerical), _fmt(t.worst_error_estimate),
                         f"{t.agree}/{t.disagree}/{t.unresolved}", t.detection_text(), t.verdict])
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        headline = f"gradfd.check: {'PASSED' if self.passed else 'FAILED'}"
        vacuous = [t.name for t in self.tensors if t.verdict == "UNRESOLVED"]
        if vacuous:
            headline += (f" (but nothing could be compared for {', '.join(vacuous)}: every entry is unresolved, "
                         "see below)")
        out = [headline, line(head), line(["-" * w for w in widths])]
        out += [line(r) for r in rows]
        for t in self.tensors:
            bad = t.disagreeing(5)
            if bad:
                shown = ", ".join(_fmt_index(b, t.complex_input, t.complex_output)
                                  if t.output_shape is not None or t.complex_input else str(b) for b in bad)
                out.append(f"  {t.name}: disagreeing entries (worst first): {shown}")
            if t.nondeterminism:
                out.append(f"  {t.name}: backward is not deterministic: {t.nondeterminism}")
            if t.undefined_grad:
                kind = "undefined tangents" if t.details.get("ad") == "forward" else "undefined output gradients"
                out.append(f"  {t.name}: {kind}: {t.undefined_grad}")
            for rule, text in t.findings.items():
                out.append(f"  {t.name}: {RULES.get(rule, rule)}: {text}")
            ref = t.details.get("reference")
            if ref:
                out.append(f"  {t.name} against the reference: func's largest error {_fmt(ref['op_error'])}, the "
                           f"reference's own in {ref['dtype']} {_fmt(ref['reference_error'])} (ratio "
                           f"{ref['ratio']:.3g}); per entry within {ref['factor']:g} x the reference's rounding there"
                           " (+ its RMS) + the floor; " + ref["validation"])
            if t.unresolved:
                out.append(f"  {t.name}: {t.unresolved} unresolved entries (kink, discontinuity or non-finite loss "
                           "nearby); they do not fail the check")
        out += [f"  note: {n}" for n in self.notes]
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"<CheckReport {'passed' if self.passed else 'FAILED'}: {len(self.tensors)} tensor(s)>"

    def plot(self, path: str | None = None):
        """Analytical vs numerical scatter for every tensor, and the error heat-map of the worst tensor, with
        disagreeing entries marked. Returns the matplotlib figure (saved to ``path`` when given).

        Raises:
            ImportError: when matplotlib is missing, saying how to install it.
        """
        plt = _pyplot()
        worst = max(self.tensors, key=lambda t: (t.disagree, t.max_rel_error)) if self.tensors else None
        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4.5))
        for t in self.tensors:
            e = {name: v.numpy() for name, v in t.entries.items()}
            ax0.scatter(e["analytical"], e["numerical"], s=8, label=t.name, alpha=0.7)
            bad = e["verdict"] == DISAGREE
            if bool(bad.any()):
                ax0.scatter(e["analytical"][bad], e["numerical"][bad], s=40, facecolors="none", edgecolors="red")
        shown = [t.entries["analytical"] for t in self.tensors if t.entries["analytical"].numel()]
        lo_hi = [min(float(a.min()) for a in shown), max(float(a.max()) for a in shown)] if shown else [0, 1]
        ax0.plot(lo_hi, lo_hi, "k--", lw=0.8)
        ax0.set_xlabel("analytical")
        ax0.set_ylabel("numerical")
        ax0.set_title("analytical vs numerical (red: disagree)")
        ax0.legend(fontsize=7)
        if worst is not None and worst.entries["index"].numel():
            e = worst.entries
            ratio = ((e["numerical"] - e["analytical"]).abs() / e["tolerance"]).double().numpy()
            bad = (e["verdict"] == DISAGREE).numpy()
            complete = worst.mode == "full" and len(ratio) == worst.total
            if complete:  # the whole tensor (or Jacobian block: inputs down, outputs across) as an image
                shape = tuple(worst.shape)
                rows = shape[0] if len(shape) >= 2 else 1
                grid = ratio.reshape(rows, -1) if worst.output_shape is None else ratio.reshape(worst.checked // max(
                    1, math.prod(worst.output_shape)), -1)
                im = ax1.imshow(np.log10(np.clip(grid, 1e-3, None)), aspect="auto", cmap="viridis")
                fig.colorbar(im, ax=ax1, label="log10(|error| / tolerance)")
                ys, xs = np.nonzero(bad.reshape(grid.shape))
                ax1.scatter(xs, ys, marker="x", c="red", s=25)
            else:  # the entries that were kept, as bars
                ax1.bar(range(len(ratio)), ratio, color=["red" if b else "C0" for b in bad])
                ax1.axhline(1.0, color="k", lw=0.8)
                ax1.set_yscale("log")
                ax1.set_ylabel("|error| / tolerance")
            ax1.set_title(f"{worst.name}: error / tolerance (red: disagree)")
        fig.tight_layout()
        if path:
            fig.savefig(path, dpi=120)
        return fig

    def plot_entry(self, name: str, index, path: str | None = None):
        """Draw ``func`` (the loss, or the compared output entry of a tensor-valued ``func``) along one checked
        coordinate: is a flagged entry a wrong backward or a kink?

        The figure shows, as changes from the unperturbed value against the entry's displacement: ``func`` on a
        fine grid (:data:`gradfd.plot.GRID_POINTS` points over :data:`gradfd.plot.GRID_SPAN` times the first
        round's outer node offset either side); the stencil nodes at each step tried (the first-round step and
        ``step / refine**r`` for the policy's ``refine_rounds``, one colour per step); autograd's tangent (slope:
        the analytical entry) and the finite-difference slope (the numerical entry) through the origin; red
        crosses where the grid's second difference exceeds :data:`gradfd.plot.KINK_RATIO` times its median (a
        kink). The title holds the verdict, the analytical and numerical values, the error estimate and the
        tolerance. ``func`` runs on private copies under ``torch.no_grad``, starting each evaluation from the RNG
        state the check saw; the caller's tensors and RNG state are untouched. A tensor-valued ``func`` whose full
        check ran as a colored pass weighted its first-round steps by up to 1.3x; the drawn steps are the
        automatic ones.

        Args:
            name: the record's name, as ``report[name]`` takes it (``"params[0]"``, ``"0.weight"``).
            index: the entry, as ``report[name].disagreeing()`` gives it: a tuple for a loss, ``(output index,
                input index)`` for a tensor-valued ``func``.
            path: where to write a PNG, or None.

        Returns:
            The matplotlib figure.

        Raises:
            KeyError: no record named ``name`` (the message lists the names).
            ValueError: a directional-mode record (no per-entry coordinate); a report not made by
                :func:`gradfd.check` in this process (no function to evaluate); an ``index`` of the wrong form,
                outside the shapes, or not among the record's checked entries.
            ImportError: matplotlib is missing.
        """
        from . import plot as _plot

        t = self[name]
        if t.mode == "directional":
            raise ValueError(f"name: {t.name} was checked in directional mode; directional mode has no per-entry "
                             "coordinate to draw: check it with mode='full' or 'sample' to plot an entry")
        ctx = t.plot_context
        if ctx is None:
            raise ValueError(f"name: {t.name} has no function to evaluate: plot_entry needs a report made by "
                             "gradfd.check (or check_module) in this process, not one rebuilt or copied without it")
        ctx = ctx.fresh()
        flat = t._flat_of(tuple(index) if isinstance(index, list) else index)
        rows = (t.entries["index"] == flat).nonzero().flatten()
        if rows.numel() == 0:
            raise ValueError(f"index: {index!r} is not among the checked entries of {t.name} (sample mode checks a "
                             "subset, and a large full check keeps only the entries it refined: see "
                             f"report[{t.name!r}].entries['index'] and .flagged())")
        j = int(rows[0])
        e = t.entries
        n_out = 1 if t.output_shape is None else math.prod(t.output_shape)
        label = f"{t.name} {_fmt_index(t._index_of(flat), t.complex_input, t.complex_output)}"
        view = _plot.EntryView(label, VERDICT_NAMES[int(e["verdict"][j])], float(e["analytical"][j]),
                               float(e["numerical"][j]), float(e["error_estimate"][j]), float(e["tolerance"][j]),
                               flat // n_out, None if t.output_shape is None else flat % n_out)
        fig = _plot.draw(_pyplot(), ctx, view)
        if path:
            fig.savefig(path, dpi=120)
        return fig


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - exercised by monkeypatching in the tests
        raise ImportError("plotting needs matplotlib: pip install 'gradfd[plot]' (or: uv add matplotlib)") from exc
    return plt


class GradientCheckError(AssertionError):
    """Raised by :func:`gradfd.check` when a gradient disagrees; ``.report`` holds the :class:`CheckReport` and the
    message is its table."""

    def __init__(self, report: CheckReport):
        super().__init__(str(report))
        self.report = report


class InvalidReferenceError(ValueError):
    """Raised by :func:`gradfd.check` with ``reference=`` when the reference's float64 gradient disagrees with its
    float64 finite differences, or none of its entries could be compared: the truth the op would be held to is not
    established. ``.report`` holds that check's :class:`CheckReport`; the message names the entries."""

    def __init__(self, report: CheckReport):
        lines = []
        for t in report.tensors:
            bad = t.disagreeing(5)
            if bad:
                shown = ", ".join(str(list(b)) if isinstance(b, tuple) else f"dir {b}" for b in bad)
                lines.append(f"{t.name}: {t.disagree} entries disagree, worst first {shown}")
        why = "; ".join(lines) or report.uncompared_message()
        super().__init__(f"reference: its float64 autograd gradient fails its own float64 finite-difference check "
                         f"({why}); the reference must be a correct, differentiable plain-PyTorch version of func\n"
                         f"{report}")
        self.report = report
