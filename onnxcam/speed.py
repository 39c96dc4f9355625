"""`onnxcam bench`: explanations timed against inference on one session, the calls interleaved so that a change
in the machine's load falls on all of them alike (core.timing)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .core.timing import interleaved
from .explainer import Explainer

FLOOR = "inference (scores only)"


@dataclass
class Timing:
    batch: int
    name: str  # a method, or FLOOR
    median_ms: float
    floor_ms: float  # the same batch's inference

    @property
    def images_per_s(self) -> float:
        return self.batch / self.median_ms * 1000

    @property
    def times_floor(self) -> float:
        return self.median_ms / self.floor_ms


def time_methods(explainer: Explainer, batch_sizes: Sequence[int], methods: Sequence[str], repeats: int,
                 budget_s: float = 30.0) -> Iterator[Timing]:
    """Per batch size, the median time of the floor (the same session asked for the scores alone) and of each
    method's whole explain() call (session run and numpy core), on a random batch in the model's layout."""
    spec = explainer.spec
    height, width = spec.input_size
    channels = len(spec.mean) if spec.mean else 3
    for batch_size in batch_sizes:
        shape = (batch_size, height, width, channels) if spec.input_layout == "nhwc" else \
            (batch_size, channels, height, width)
        batch = np.random.default_rng(0).standard_normal(shape).astype(spec.input_type)
        classes = np.full(batch_size, -1, np.int64)
        feeds = {spec.input: batch, spec.class_input: classes}
        calls = {FLOOR: lambda f=feeds: explainer.model.runner.run([spec.scores], f)}
        calls.update({method: (lambda m=method, b=batch: explainer.explain(b, method=m)) for method in methods})
        medians = {name: float(np.median(t)) * 1000 for name, t in interleaved(calls, repeats, budget_s).items()}
        for name, ms in medians.items():
            yield Timing(batch_size, name, ms, medians[FLOOR])
