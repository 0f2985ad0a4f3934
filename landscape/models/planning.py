"""Cost plans: how long a long computation will take on this machine, measured before it starts (``--dry-run``).

A plan times a few units of the real work (grid cells, Hessian-vector products) on the real model, data and device
and multiplies the median by the number of units the computation will run; the units' count is exact for grids and
an upper bound for Lanczos (it may converge before ``max_iter``). Nothing is written.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """``units`` of ``unit`` (e.g. 625 "cells"), each taking ``seconds_per_unit`` (median of ``timed`` runs)."""

    what: str
    unit: str
    units: int
    seconds_per_unit: float
    timed: int
    bound: bool = False  # units is an upper bound (Lanczos may stop earlier)

    @property
    def seconds(self) -> float:
        return self.units * self.seconds_per_unit

    def describe(self) -> str:
        count = f"at most {self.units}" if self.bound else str(self.units)
        return (
            f"{self.what}: {count} {self.unit} × {self.seconds_per_unit:.3g} s (median of {self.timed} timed on this "
            f"machine) ≈ {format_duration(self.seconds)}; nothing was written"
        )


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``work`` (after one untimed call that warms caches up)."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
