"""Memory budgets: parsing the user's ``memory_budget`` and the defaults for one chunk of work.

Imports nothing of gradfd's but :mod:`gradfd.validation`.
"""

from __future__ import annotations

import os
import re

import torch

from .validation import describe

__all__ = ["parse_memory_budget", "default_memory_budget", "GENERIC_CPU_WORKING_SET", "GENERIC_CPU_MIN_CHUNK",
           "STRUCTURED_CPU_WORKING_SET"]

# On a CPU, chunks larger than the caches stop paying. The two engines hold different things per coordinate, so
# each has its own cap (measured on a 2-core Xeon; benchmarks/bench_engine.py and bench_structured.py):
GENERIC_CPU_WORKING_SET = 16 << 20  # bytes of perturbed rows and activations per batched call of func
GENERIC_CPU_MIN_CHUNK = 16  # coordinates per batched call at least, whatever the working set says
STRUCTURED_CPU_WORKING_SET = 64 << 20  # bytes of perturbed values per chunk of the structured engine

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9,
          "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_memory_budget(value) -> int | None:
    """Parse a memory budget: an int number of bytes, or a string such as ``"512MB"`` or ``"2GiB"``.

    Raises:
        TypeError / ValueError naming ``memory_budget`` when the value is not a positive size.
    """
    if value is None:
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory_budget must be bytes (int) or a size like '512MB' or '2GiB', got {value!r}")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    elif isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"memory_budget must be an int number of bytes or a size string, got {describe(value)}")
    if value <= 0:
        raise ValueError(f"memory_budget must be positive, got {value} bytes")
    return value


def default_memory_budget(device: torch.device) -> int:
    """Default working-memory budget for one chunk: half the free GPU memory, or a quarter of the available
    RAM capped at 2 GiB on the CPU (larger chunks stop paying there)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(int(free * 0.5), 1 << 20)
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 8 << 30
    return max(min(avail // 4, 2 << 30), 1 << 20)

# Jacobian checks (gradfd.jacobian, gradfd.verdict): memory and performance constants, not verdict thresholds.
# None of them changes a verdict: tests/test_jacobian.py::test_a_colored_check_judged_in_blocks_judges_as_one.
DENSE_ENTRIES = 1 << 21  # keep every entry's values in the report up to this many (output, input) pairs
VJP_ROW_BYTES = 1 << 26  # bytes of analytical rows computed per batched backward
JUDGED_PAIRS = 1 << 20  # pattern entries of a colored pass estimated and judged per block
COLORED_SAVING = 4  # the colored pass runs when it needs at most 1/4 of the exact columns' evaluations
PATTERN_ENTRY_BYTES = 64  # bytes a colored pass holds per pattern entry (indices, keys, values)
DIRECTIONAL_NODE_COPIES = 3  # float64 copies of a node's entries directional mode holds while it builds the point
COLORED_NODE_COPIES = 16  # float64 copies of a color's nodes and outputs a colored pass holds at once
COLORING_TRIES = 9  # colorings q = lower .. lower + 8 are tried, then 2 lower + 1 and 4 lower + 1 (COLORING_WIDE)
COLORING_WIDE = 4
COMPRESSION_SHARE = 10  # colored backward passes pay while there are at most 1/10 as many colors as outputs
COMPRESSION_MIN_OUTPUTS = 16  # ... and the function has this many output entries or more
SEQUENTIAL_VJPS = 4  # up to this many colors' backward passes run one by one, more as one batched backward
NODE_ACTIVATIONS = 4  # a coordinate's nodes hold S x (this x outputs + inputs) float64 values (chunk sizing)
MIN_RECOMPUTED_CHUNK = 64  # where analytical rows are recomputed per chunk: chunks of this many columns or more,
RECOMPUTED_CHUNKS = 16  # ... and at most this many chunks, as far as the budget allows
