"""Byte and rate units for the planning package, defined once.

The planner, its report, the memory simulation, the tests and the benchmarks all print and compare GiB; one
definition keeps a "GiB" in a test assertion the same 2**30 bytes as in the prediction it checks.
"""

from __future__ import annotations

GiB = 1024**3
MiB = 1024**2
TERA = 1e12
GIGA = 1e9


def readable_count(n: float) -> str:
    """A parameter count people read at a glance: 8.03 B, 4.2 M, 12.3 K."""
    for scale, suffix, digits in ((1e9, "B", 2), (1e6, "M", 1), (1e3, "K", 1)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {suffix}"
    return f"{n:.0f}"
