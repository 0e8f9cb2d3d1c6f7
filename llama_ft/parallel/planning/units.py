"""Byte and rate units for the planning package, defined once.

The planner, its report, the memory simulation, the tests and the benchmarks all print and compare GiB; one
definition keeps a "GiB" in a test assertion the same 2**30 bytes as in the prediction it checks.
"""

from __future__ import annotations

GiB = 1024**3
MiB = 1024**2
TERA = 1e12
GIGA = 1e9
