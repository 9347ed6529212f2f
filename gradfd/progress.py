"""What a check will cost, said while it runs: a progress bar for long checks, and a warning for very long ones.

Rule: the estimate is the check's own measured rate -- coordinates (or directions) done per second since the
first chunk finished (setup and autograd excluded) -- times what is left, taken once at least ``MEASURE_SECONDS``
have passed; nothing is guessed from sizes. With ``progress=None`` (the default) a check estimated above
``BAR_SECONDS`` shows a tqdm bar with the time left, when stderr is a terminal; one above ``COST_WARNING_SECONDS``
issues a :class:`gradfd.CostWarning` giving the estimate and those of the cheaper modes
(tests/test_check.py::test_a_long_check_warns_with_its_estimate).
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Callable

from .errors import CostWarning

__all__ = ["Progress", "BAR_SECONDS", "COST_WARNING_SECONDS", "MEASURE_SECONDS"]

MEASURE_SECONDS = 1.0  # the rate is taken over at least this long before any estimate
BAR_SECONDS = 10.0  # progress=None: a check estimated to take longer shows a bar (stderr a terminal)
COST_WARNING_SECONDS = 600.0  # a check estimated to take longer warns, naming the cheaper modes


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


class Progress:
    """``check``'s progress: ``tick(n)`` after ``n`` more coordinates (or directions), ``close()`` at the end.

    Args:
        progress: True (a bar from the start), False (nothing), None (automatic: see the module docstring) or a
            ``callable(done, total)``.
        total: coordinates (or directions) the check will do.
        mode: the check's mode. cheaper: ``{mode: units}`` that the cheaper modes would do instead (for the
            warning's estimates, at the same rate).
        clock: the timer (tests pass a fake one).
    """

    def __init__(self, progress: bool | None | Callable[[int, int], None], total: int, mode: str,
                 cheaper: dict[str, int], clock: Callable[[], float] = time.perf_counter):
        self.progress, self.total, self.mode, self.cheaper, self.clock = progress, total, mode, cheaper, clock
        self.done = 0
        self.start: float | None = None  # when the first units finished (setup and autograd are not the rate)
        self.start_done = 0
        self.estimated = progress is not None  # automatic mode estimates once
        self.bar = None
        if progress is True:
            self._open_bar()

    def _open_bar(self) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, initial=self.done, unit="coord", desc="gradfd.check", leave=False)

    def tick(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif callable(self.progress):
            self.progress(self.done, self.total)
        if not self.estimated:
            if self.start is None:
                self.start, self.start_done = self.clock(), self.done
                return
            elapsed = self.clock() - self.start
            if elapsed >= MEASURE_SECONDS and self.done > self.start_done:
                self.estimated = True
                self._estimate(elapsed / (self.done - self.start_done))

    def _estimate(self, per_unit: float) -> None:
        left = per_unit * (self.total - self.done)
        whole = per_unit * self.total
        if left > BAR_SECONDS and sys.stderr is not None and sys.stderr.isatty():
            self._open_bar()
        if whole > COST_WARNING_SECONDS:
            alternatives = "; ".join(f"mode={m!r} about {_seconds(per_unit * u)}" for m, u in self.cheaper.items())
            warnings.warn(f"gradfd.check: this {self.mode} check of {self.total:,} coordinates is estimated to take "
                          f"{_seconds(whole)} (measured {per_unit * 1e3:.3g} ms per coordinate over "
                          f"{self.done - self.start_done:,} of them)" + (f"; {alternatives}" if alternatives else ""), CostWarning,
                          stacklevel=4)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
