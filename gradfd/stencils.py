"""Finite-difference stencils, step selection and Richardson extrapolation.

Every stencil here is a ladder of central differences ``D(m*h)`` at step multiples ``m`` (``(1,)`` for plain
central differences, ``(1, 2)`` for the 4-point stencil, ``(1, 2, 4)`` for two rounds of Richardson
extrapolation), combined by Neville's scheme in ``t = H**2``. ``H`` is the *realised* half-spacing of each
pair of nodes (the steps after rounding ``x + m*h`` to the parameter's dtype), so rounding of the nodes does
not enter the estimate. The 4-point stencil ``(-f(x+2h) + 8f(x+h) - 8f(x-h) + f(x-2h)) / 12h`` is exactly the
first Richardson step ``(4 D(h) - D(2h)) / 3``.

The difference between the last two extrapolants is the truncation part of each entry's error estimate
(cf. numdifftools' Richardson error estimate, scipy.differentiate's ``error`` output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Stencil", "STENCILS", "DEFAULT_STENCIL", "get_stencil", "automatic_steps", "coarsest", "extrapolate", "eps",
           "representable"]


@dataclass(frozen=True)
class Stencil:
    """A central-difference ladder.

    Attributes:
        name: public name (``"central"``, ``"four_point"``, ``"richardson"``).
        multiples: step multiples of the levels, smallest first.
        order: truncation order of the extrapolated estimate (error ~ ``h**order``).
        step_exponent, step_scale: the automatic step is ``step_scale * eps**step_exponent * max(1, |x|)``.
            ``1/(order+1)`` balances truncation against rounding for the estimate itself; the 4-point stencil uses
            the smaller ``eps**(1/4)`` so that its error *estimate* (dominated by the central difference's
            ``O(h**2)`` spread) stays tight enough to flag a 1e-3 error in float32, at no loss of accuracy
            (measured by ``benchmarks/bench_accuracy.py``).
    """

    name: str
    multiples: tuple[int, ...]
    order: int
    step_exponent: float
    step_scale: float = 1.0

    @property
    def offsets(self) -> tuple[float, ...]:
        """Node offsets in units of ``h``, in ``(+m, -m)`` pairs: the row order of the batched evaluation."""
        return tuple(float(s * m) for m in self.multiples for s in (1, -1))

    @property
    def evaluations(self) -> int:
        """Function evaluations per coordinate."""
        return 2 * len(self.multiples)

    def _level_weights(self) -> list[float]:
        """Weight of each level's central difference in the extrapolant: the Lagrange basis at ``t = 0`` in
        ``t = m**2``. Level ``i`` contributes ``+-w_i / (2 m_i h)`` on its two nodes."""
        t = [m * m for m in self.multiples]
        weights = []
        for i, ti in enumerate(t):
            w = 1.0
            for j, tj in enumerate(t):
                if j != i:
                    w *= tj / (tj - ti)
            weights.append(w)
        return weights

    @property
    def weight_norm(self) -> float:
        """Euclidean norm of the extrapolated stencil's weights in units of ``1/h``: the standard deviation of its
        output for independent unit noise on each loss value."""
        return sum(2 * (w / (2 * m)) ** 2 for w, m in zip(self._level_weights(), self.multiples)) ** 0.5

    @property
    def abs_weight_sum(self) -> float:
        """Sum of |weights| of the extrapolated stencil in units of ``1/h``: how much it amplifies noise in f."""
        return sum(abs(w) / m for w, m in zip(self._level_weights(), self.multiples))


STENCILS: dict[str, Stencil] = {
    "central": Stencil("central", (1,), 2, 1 / 3),
    "four_point": Stencil("four_point", (1, 2), 4, 1 / 4),
    "richardson": Stencil("richardson", (1, 2, 4), 6, 1 / 7, step_scale=0.5),
}
DEFAULT_STENCIL = "four_point"
# the fourth difference f(x+2h) - 4f(x+h) + 6f(x) - 4f(x-h) + f(x-2h): its binomial weights (1, -4, 6, -4, 1)
FOURTH_DIFFERENCE_INNER, FOURTH_DIFFERENCE_CENTRE = 4, 6
FOURTH_DIFFERENCE_NORM = 70.0**0.5  # sqrt(1 + 16 + 36 + 16 + 1): its noise for unit noise on each value
FOURTH_DIFFERENCE_GROWTH = 16.0  # a smooth function's fourth difference grows as h^4: 2^4 as h doubles
# the second difference S(h) = f(h) + f(-h) - 2 f(0) of a function whose slope jumps by J near 0 is
# J h + a h^2 + b h^4 + ...: this combination of S(h), S(2h), S(4h) is J h (a and b cancel), and its noise
# for unit noise on each value is SWITCH_NORM (the nodes +-h, +-2h, +-4h once each, f(0) in all three)
SWITCH_COMBINATION = (64.0 / 28.0, -20.0 / 28.0, 1.0 / 28.0)
SWITCH_NORM = (2.0 * sum(c * c for c in SWITCH_COMBINATION) + 4.0 * sum(SWITCH_COMBINATION) ** 2) ** 0.5
DEPENDENCE_NUDGE = 2.0**-10  # an output depends on the inputs when it moves as every input moves by this (relative)
_ALIASES = {"4-point": "four_point", "4point": "four_point", "fourpoint": "four_point", "2-point": "central"}


def get_stencil(name: str) -> Stencil:
    """Look up a stencil by name (``"central"``, ``"four_point"`` or ``"richardson"``).

    Raises:
        ValueError: naming the argument and the accepted values.
    """
    if not isinstance(name, str) or _ALIASES.get(name, name) not in STENCILS:
        raise ValueError(f"stencil must be one of {sorted(STENCILS)}, got {name!r}")
    return STENCILS[_ALIASES.get(name, name)]


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype."""
    return torch.finfo(dtype).eps


def coarsest(dtypes) -> torch.dtype:
    """The floating dtype with the largest machine epsilon among ``dtypes``."""
    return max(dtypes, key=eps)


def automatic_steps(x: torch.Tensor, stencil: Stencil, scale: float = 1.0,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-element steps ``h_i ~ scale * step_scale * eps**step_exponent * max(1, |x_i|)``, rounded to powers of two.

    The exponent balances truncation (``~h**order``) against rounding of the loss (``~eps/h``): ``eps**(1/3)``
    for central differences, ``eps**(1/4)`` for the 4-point stencil, ``eps**(1/7)/2`` for Richardson. Powers of
    two keep ``x + m*h`` exact for most ``x``; the realised steps are used regardless.

    Args:
        x: the flattened parameter values (any floating dtype); its dtype sets ``eps`` unless ``dtype`` is given.
        stencil: the stencil the steps are for.
        scale: extra factor on the step.
        dtype: the dtype whose ``eps`` sets the step, when the function's values are coarser than ``x`` (a float16
            output of a float64 input: steps sized for float64 would move it by less than its rounding).

    Returns:
        ``(numel,)`` float64 steps on ``x``'s device.
    """
    base = scale * stencil.step_scale * eps(dtype or x.dtype) ** stencil.step_exponent
    mag = x.detach().to(torch.float64).abs().clamp(min=1.0)
    mag = torch.where(torch.isfinite(mag), mag, torch.ones_like(mag))
    return torch.exp2(torch.round(torch.log2(base * mag)))


def extrapolate(levels: torch.Tensor, half_spacing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Richardson-extrapolate central differences to zero step.

    Args:
        levels: ``(K, M)`` float64 central differences ``D_k`` at the K step levels, smallest step first.
        half_spacing: ``(K, M)`` float64 realised half-spacings ``H_k`` of those levels.

    Returns:
        ``(estimate, spread)``: ``(M,)`` extrapolated derivatives and ``(M,)`` absolute difference between the
        last two extrapolants (the truncation-error estimate), or ``None`` for a single level.
    """
    t = half_spacing * half_spacing
    cur = list(levels.unbind(0))
    k = len(cur)
    previous = None
    for m in range(1, k):
        previous = cur[0]
        cur = [(t[i] * cur[i + 1] - t[i + m] * cur[i]) / (t[i] - t[i + m]) for i in range(k - m)]
    estimate = cur[0]
    spread = None if previous is None else (estimate - previous).abs()
    return estimate, spread


def representable(x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Boolean mask: ``x + h`` differs from ``x`` when rounded to ``x``'s dtype (the step is not lost)."""
    moved = (x.detach().to(torch.float64) + steps).to(x.dtype)
    return moved != x.detach()
