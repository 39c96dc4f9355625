"""What an explanation returns: heatmaps and what each explains, with the scores they came from."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .core.errors import renamed
from .core.images import box_scale
from .core.scores import top_classes


@dataclass
class Explanation:
    heatmaps: np.ndarray  # float32, M x H x W in [0, 1], at the model's input resolution (M = B: one map each)
    logits: np.ndarray  # B x num_classes, the scores before softmax (or the single output)
    classes: np.ndarray  # int64, M: the class each map explains (-1 where none: a similarity)
    method: str
    image_index: np.ndarray | None = None  # int64, M: the image each map belongs to
    scores: np.ndarray | None = None  # float32, M: each map's score (onnxcam.targets), for targets other than a class
    boxes: np.ndarray | None = None  # float32, M x 4: x1 y1 x2 y2 (detections; NaN for maps that are not)
    masks: np.ndarray | None = None  # bool, M x h x w at the output's resolution: each segment's mask (segmentation)
    attributions: np.ndarray | None = None  # float32, M x C x H x W: input-gradient methods' raw attributions

    def __post_init__(self):
        if self.image_index is None:
            self.image_index = np.arange(len(self.classes), dtype=np.int64)

    @property
    def targets(self) -> np.ndarray:
        """The old name of `classes` ("targets" are what `explain` is asked to explain: onnxcam.targets)."""
        return renamed("Explanation.targets", "Explanation.classes", self.classes)

    def top_k(self, k: int = 5, labels: list[str] | None = None) -> list[list[dict]]:
        return top_classes(self.logits, k, labels)

    def maps_per_image(self) -> list[list[int]]:
        """For each image of the batch, the indices of its heatmaps (several where targets give several)."""
        grouped: list[list[int]] = [[] for _ in range(self.logits.shape[0])]
        for position, image in enumerate(np.asarray(self.image_index).tolist()):
            grouped[image].append(position)
        return grouped

    def in_image_pixels(self, sizes: list[tuple[int, int]], input_size: tuple[int, int]) -> Explanation:
        """This explanation with its boxes, found in the model input's pixels (`input_size`, height x width),
        moved into those of each image (`sizes`: its height and width) that was resized to the model's input."""
        if self.boxes is None:
            return self
        scales = np.array([box_scale(size, input_size) for size in sizes], dtype=np.float32).reshape(-1, 4)
        bounds = np.array([[w, h] * 2 for h, w in sizes], dtype=np.float32).reshape(-1, 4)
        index = self.image_index
        return replace(self, boxes=np.clip(self.boxes * scales[index], 0, bounds[index]))
