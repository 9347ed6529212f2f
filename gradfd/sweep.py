"""``gradfd.step_sweep``: the error of finite differences against autograd as a function of the step h.

The lesson's exercise 3 (try h = 1e-3, 1e-5, 1e-7) done properly: a log-spaced sweep of h, each step evaluated by
the batched engine, with the central and 4-point errors against autograd. The curve is V-shaped: truncation
error (~h**2, ~h**4) on the right, rounding error (~eps/h) on the left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import engine, stencils
from .check import analytical_gradients, no_tf32
from .validation import check_params

__all__ = ["step_sweep", "SweepResult"]


@dataclass
class SweepResult:
    """Errors of the numerical gradient against autograd for each step.

    Attributes:
        hs: ``(H,)`` steps (absolute, the same for every entry).
        central, four_point: ``(H,)`` max |numerical - analytical| / max |analytical| for each stencil.
        dtype: the parameter's dtype.
        optimal: the theoretical optimal central-difference steps ``eps**(1/3)`` for float32 and float64.
    """

    hs: torch.Tensor
    central: torch.Tensor
    four_point: torch.Tensor
    dtype: torch.dtype
    optimal: dict = field(default_factory=dict)

    def best(self, stencil: str = "central") -> tuple[float, float]:
        """``(h, error)`` at the smallest error of ``stencil``."""
        errs = self.central if stencil == "central" else self.four_point
        j = int(torch.nan_to_num(errs, nan=math.inf).argmin())
        return float(self.hs[j]), float(errs[j])

    def plot(self, path: str | None = None):
        """The V-shaped error-vs-h curve on log axes, with the optimal steps for float32 and float64 marked.
        Returns the matplotlib figure (saved to ``path`` when given). Raises ImportError without matplotlib."""
        from .report import _pyplot

        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.loglog(self.hs, self.central, "o-", ms=3, label="central (2 evaluations)")
        ax.loglog(self.hs, self.four_point, "s-", ms=3, label="4-point (4 evaluations)")
        for name, h in self.optimal.items():
            ax.axvline(h, ls="--", lw=0.8, color="gray")
            ax.text(h, ax.get_ylim()[1], f" {name} eps^(1/3)", rotation=90, va="top", fontsize=8)
        ax.set_xlabel("step h")
        ax.set_ylabel("max |numerical - autograd| / max |autograd|")
        ax.set_title(f"finite-difference error vs step ({str(self.dtype).replace('torch.', '')}): "
                     "rounding (left) vs truncation (right)")
        ax.legend()
        fig.tight_layout()
        if path:
            fig.savefig(path, dpi=120)
        return fig


def step_sweep(
    func: Callable[..., torch.Tensor],
    params: Sequence[torch.Tensor],
    param_idx: int,
    hs: Sequence[float] | torch.Tensor | None = None,
    *,
    engine_name: str = "auto",
) -> SweepResult:
    """Error of central and 4-point differences against autograd for each step in ``hs``.

    Args:
        func, params, param_idx: as in :func:`gradfd.numerical_gradient`.
        hs: steps to try; default 30 log-spaced steps from 1e-12 (float64) or 1e-7 (float32) to 1e-1... 1.
        engine_name: engine for each evaluation (``"auto"``, ``"batched"`` or ``"loop"``).

    Returns:
        A :class:`SweepResult`; ``.plot()`` draws the curve.

    Raises:
        ValueError / TypeError for bad arguments (as :func:`gradfd.numerical_gradient`), or an ``hs`` that is
        empty or has a non-positive entry.
    """
    params, param_idx = check_params(params, param_idx)
    dtype = params[param_idx].dtype
    if hs is None:
        lo = {torch.float64: -12, torch.float32: -7}.get(dtype, -4)
        hs = torch.logspace(lo, 0, 30, dtype=torch.float64)
    hs = torch.as_tensor(hs, dtype=torch.float64).reshape(-1)
    if hs.numel() == 0 or not bool((hs > 0).all() & torch.isfinite(hs).all()):
        raise ValueError(f"hs must be a non-empty sequence of positive finite steps, got {hs.tolist()}")
    with no_tf32():
        (ana,) = analytical_gradients(func, params, [param_idx])
    ana = ana.reshape(-1).to(torch.float64)
    scale = float(ana.abs().max()) or 1.0
    errors = {"central": [], "four_point": []}
    x = params[param_idx].detach().reshape(-1)
    for h in hs.tolist():
        for name in errors:
            steps = torch.full(x.shape, h, dtype=torch.float64, device=x.device)
            # a step below the resolution of some entry has no meaningful difference there
            lost = bool(((x.to(torch.float64) + steps).to(x.dtype) == x).any()
                        | ((x.to(torch.float64) - steps).to(x.dtype) == x).any())
            if lost:
                errors[name].append(math.nan)
                continue
            ev = engine.evaluate(func, params, param_idx, steps=steps, stencil=name, engine=engine_name)
            est, _ = ev.estimate()
            errors[name].append(float((est - ana).abs().max()) / scale)
    optimal = {str(d).replace("torch.", ""): stencils.eps(d) ** (1 / 3) for d in (torch.float32, torch.float64)}
    return SweepResult(hs, torch.tensor(errors["central"]), torch.tensor(errors["four_point"]), dtype, optimal)
