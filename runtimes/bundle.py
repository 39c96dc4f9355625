"""Running a bundle from Python: the same session any other ONNX Runtime binding would create."""

from __future__ import annotations

import numpy as np

from ..core.contract import BYTES_INPUT, CLASS_INPUT, HEATMAP_OUTPUT, ExplainSpec
from .session import create_session


class Bundle:
    """A file written by `onnxcam export --bundle`: encoded JPEG/PNG bytes in; logits, class, heatmap out."""

    def __init__(self, path, provider: str = "auto"):
        self.session = create_session(path, provider, extensions=True)
        self.spec = ExplainSpec.from_metadata(self.session.get_modelmeta().custom_metadata_map)

    def explain(self, data: bytes, target: int = -1) -> tuple[np.ndarray, int, np.ndarray]:
        """(logits [num_classes], explained class, heatmap H x W in [0, 1]) for one encoded image."""
        feeds = {BYTES_INPUT: np.frombuffer(data, np.uint8), CLASS_INPUT: np.array([target], np.int64)}
        scores, selected, heatmap = self.session.run([self.spec.scores, self.spec.selected, HEATMAP_OUTPUT], feeds)
        return scores.reshape(-1), int(selected[0]), heatmap[0]
