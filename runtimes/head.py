"""The head of an explainable file on ONNX Runtime: built from the file at load time (exporters.head), run on
the target activations and cut tensors of each map's image, with each map's seed."""

from __future__ import annotations

import threading

import numpy as np
import onnx
import onnxruntime as ort

from ..core.contract import ExplainSpec
from ..core.errors import ExplainError, ExportError
from ..exporters.head import SEED_INPUT, build_head, exposed_sources
from .binding import Runner, runner_for
from .session import sibling_session


class HeadRunner:
    """One session per output explained: the nodes between the targets and that output, and their backward pass."""

    def __init__(self, model: onnx.ModelProto, session: ort.InferenceSession, spec: ExplainSpec):
        self.model, self.session, self.spec = model, session, spec
        self._runners: dict[str, Runner] = {}
        self._building = threading.Lock()  # a server's threads may ask for the same head at once
        self.inputs = exposed_sources(model, spec.activations)
        self.cuts = exposed_sources(model, spec.cuts)

    def runner(self, output: str) -> Runner:
        """The head session for `output`, built on first use; for the scores output, the head ends at the tensor
        explained (its logits, where the output squashes them: ExplainSpec.score_tensor)."""
        if output == self.spec.scores:
            output = self.spec.score_tensor
        with self._building:
            if output not in self._runners:
                self._runners[output] = self._build(output)
        return self._runners[output]

    def _build(self, output: str) -> Runner:
        try:
            head = build_head(self.model, self.inputs, self.cuts, output)
        except ExportError as error:
            raise ExplainError(f"cannot explain output '{output}': {error.message}") from None
        del head.graph.value_info[:]  # the forward graph's sizes name its batch; the head's batch is the maps
        return runner_for(sibling_session(head, self.session))

    def gradients(self, output: str, activations: list[np.ndarray], cuts: list[np.ndarray],
                  image_index: np.ndarray, seeds: np.ndarray) -> list[np.ndarray]:
        """Per target layer, the gradient of each map's score (M rows): one head run for all the maps."""
        runner = self.runner(output)
        taken = {i.name for i in runner.session.get_inputs()}  # a target computed from another is not fed
        feeds = {name: np.ascontiguousarray(value[image_index])
                 for name, value in zip([*self.inputs, *self.cuts], [*activations, *cuts], strict=True)
                 if name in taken}
        seed_input = next(i for i in runner.session.get_inputs() if i.name == SEED_INPUT)
        if all(isinstance(d, int) for d in seed_input.shape[1:]):  # logits under a squashing: same elements, in order
            seeds = seeds.reshape(len(seeds), *seed_input.shape[1:])
        feeds[SEED_INPUT] = np.ascontiguousarray(seeds, dtype=np.float16 if seed_input.type == "tensor(float16)"
                                                 else np.float64 if seed_input.type == "tensor(double)" else np.float32)
        names = [o.name for o in runner.session.get_outputs()]
        return runner.run(names, feeds)
