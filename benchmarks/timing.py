"""Timing shared by the benchmark scripts (run as `python benchmarks/NAME.py`, which puts this folder on the path)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_seconds(steps: dict[str, Callable[[], object]], iters: int,
                        clock: Callable[[], float] = time.process_time) -> dict[str, float]:
    """Median seconds per call of each step, the steps taking turns so drifting machine load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            start = clock()
            step()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}
