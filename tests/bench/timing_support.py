"""Timing helpers the benchmarks share: one timed call, sides measured in turn, a median and its spread.

Imported as ``from timing_support import ...`` (tests/bench is the script directory of run.py and
of a bench run on its own); the name does not start with ``bench_``, so run.py does not run it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` took (wall clock)."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def alternate(sides: Mapping[str, Callable[[], float]], rounds: int, *,
              warmup: int = 1) -> dict[str, list[float]]:
    """Each side's sample (its callable returns seconds) in turn, ``warmup`` untimed rounds first, then
    ``rounds`` timed ones: a noisy machine then moves every side alike. Samples per side, in order."""
    for _ in range(warmup):
        for measure in sides.values():
            measure()
    samples: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, measure in sides.items():
            samples[name].append(measure())
    return samples


def spread(samples: Sequence[float], unit: str = "s") -> str:
    """``median (min-max)``, e.g. ``2.91 s (2.74-3.79)``."""
    return f"{statistics.median(samples):.2f} {unit} ({min(samples):.2f}-{max(samples):.2f})"
