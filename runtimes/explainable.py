"""An explainable file on ONNX Runtime (or OpenVINO): its contract, its session, the sessions methods derive from it.

The file is read from disk once. The derived sessions (the head of each output explained, the forward part that
the perturbation methods run, the forward head of Ablation-CAM, the guided copy) are built on first use and
belong to this object: they live as long as it does, and a server's threads share them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import cached_property

import numpy as np
import onnx

from ..core.contract import ExplainSpec
from ..core.errors import ExplainError
from ..exporters.autodiff.guided import guided
from .binding import Runner, runner_for
from .head import HeadRunner
from .linear_head import HeadScores, forward_head_session, forward_model, read_linear_head
from .session import create_session, sibling_session


class ExplainableModel:
    """The sessions of one explainable file (`onnxcam export`'s output)."""

    def __init__(self, path, provider: str = "auto", threads: int | None = None):
        self.path = path
        self.session = create_session(path, provider, threads)
        self.runner = runner_for(self.session)
        spec = ExplainSpec.from_metadata(self.session.get_modelmeta().custom_metadata_map)
        if spec is None:
            raise ExplainError(f"{path} has no gradient outputs: make it explainable first with "
                               f"`onnxcam export {path} -o OUT.onnx`")
        self.spec: ExplainSpec = spec
        self._built: dict[object, object] = {}
        self._building = threading.RLock()  # a server's threads may ask for the same session at once

    @cached_property
    def fixed_batch(self) -> int | None:
        """The batch size the file's image input is fixed at, or None where it is free."""
        size = next(i.shape[0] for i in self.session.get_inputs() if i.name == self.spec.input)
        return size if isinstance(size, int) and size > 0 else None

    def run(self, batch, classes: np.ndarray, names: list[str]) -> list[np.ndarray]:
        """One session run fetching the scores, the explained classes and `names`, nothing else. Tensors of a
        half- or double-precision model come back as float32, the precision of the numpy core."""
        spec = self.spec
        tensors = self.runner.run([spec.scores, spec.selected, *names], {spec.input: batch, spec.class_input: classes})
        return [t.astype(np.float32, copy=False) if t.dtype.kind == "f" else t for t in tensors]

    def _once(self, key, build: Callable[[], object]):
        """What `build` returns (or the ExplainError it raises), built on first use and kept."""
        with self._building:
            if key not in self._built:
                try:
                    self._built[key] = build()
                except ExplainError as error:
                    self._built[key] = error
        found = self._built[key]
        if isinstance(found, ExplainError):
            raise found
        return found

    @property
    def model(self) -> onnx.ModelProto:
        """The file's graph, read once."""
        return self._once("model", lambda: onnx.load(str(self.path)))

    @property
    def head(self) -> HeadRunner:
        """The head runner: the gradients of any output at the target layers (targets set after the outputs)."""
        return self._once("head", lambda: HeadRunner(self.model, self.session, self.spec))

    @property
    def scores_runner(self) -> Runner:
        """A session computing the scores alone: ONNX Runtime runs every node of a graph whatever is fetched, so
        the explainable file would pay its backward pass on every masked batch (linear_head.forward_model)."""
        return self._once("scores", lambda: runner_for(sibling_session(forward_model(self.model, self.spec),
                                                                        self.session)))

    def forward_runner(self, outputs: tuple[str, ...]) -> Runner:
        """A session computing the file's `outputs` from the image alone, without the backward pass that a run of the
        file pays whatever it fetches: for targets set after the outputs, whose maps the head computes."""
        return self._once(("forward",) + tuple(outputs), lambda: runner_for(
            sibling_session(forward_model(self.model, self.spec, list(outputs)), self.session)))

    @property
    def forward_head(self) -> HeadScores:
        """The nodes from the target activation and the cuts to the scores, forward only (Ablation-CAM)."""
        return self._once("forward_head", lambda: forward_head_session(self.model, self.spec, self.session))

    @property
    def guided_runner(self) -> Runner:
        """A second session on the file with its ReLU masks rewritten to guided backpropagation's."""
        def build() -> Runner:
            copy = onnx.ModelProto()
            copy.CopyFrom(self.model)
            return runner_for(sibling_session(guided(copy), self.session))

        return self._once("guided", build)

    @property
    def linear_head_weights(self) -> np.ndarray:
        """num_classes x K: the linear layer after global average pooling of the target layer (CAM); a head of
        another shape is refused in one line (ExplainError), every time it is asked for."""
        return self._once("linear_head", lambda: read_linear_head(self.model, self.spec))
