"""Timing calls side by side: the measurement both `onnxcam bench` and benchmarks/bench.py use."""

from __future__ import annotations

import time


def interleaved(functions: dict, repeats: int, budget: float) -> dict[str, list[float]]:
    """Seconds per call of each function, timed in rounds (one call of each per round, in turn) so
    that drift of the machine falls on all alike; two warm-up rounds; 3 to `repeats` rounds, about
    `budget` seconds in all."""
    for _ in range(2):
        for function in functions.values():
            function()
    times = {name: [] for name in functions}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats and (rounds < 3 or time.perf_counter() - start < budget):
        for name, function in functions.items():
            begin = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - begin)
        rounds += 1
    return times
