"""What a map explains: one or more classes, a segment, a detection, a concept, a contrast between classes.

Every target is a function of one output of the model. Its seed is the gradient of its score with respect
to that output (for one image: an array shaped like the image's slice of the output), computed here in
numpy; the engine differentiates from the output back to the target layers with that seed (exporters.head).
A target may give several maps per image (Classes(top=5), every detection), or none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .core.detections import DETECTION_LAYOUTS, decode, guess_detection_layout, kept
from .core.errors import ExplainError


@dataclass
class Pick:
    """One map to compute: the class it explains (-1 where none), its seed (d score / d output for one image),
    its score, and for a detection its box (x1 y1 x2 y2 in model-input pixels), for a segment its mask."""

    target: int
    seed: np.ndarray
    score: float
    box: np.ndarray | None = None
    mask: np.ndarray | None = None  # a segment's mask, at the output's resolution


class Target:
    """A function of one model output (`output`: its name; None for the output the file was exported with)."""

    output: str | None = None

    def fixed_class(self) -> int | None:
        """The single class this target explains when it is known before the run (one session run then serves)."""
        return None

    def picks(self, scores: np.ndarray) -> list[Pick]:
        """The maps of one image, from its slice of the output."""
        raise NotImplementedError


def _one_hot(shape: tuple[int, ...], index: int) -> np.ndarray:
    seed = np.zeros(int(np.prod(shape)), dtype=np.float32)
    seed[index] = 1.0
    return seed.reshape(shape)


def _check_class(index: int, count: int, what: str = "class index") -> int:
    if not 0 <= index < count:
        raise ExplainError(f"{what} {index} is out of range: the output has {count} classes (0 to {count - 1})")
    return index


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


@dataclass
class Classes(Target):
    """Several class maps of one image: the classes given, the `top` best, or every class whose probability
    is above `above` (the sigmoid of the score, for multi-label models whose output is logits; the score
    itself where the output already lies in [0, 1])."""

    classes: tuple[int, ...] = ()
    top: int | None = None
    above: float | None = None
    output: str | None = None

    def __init__(self, *classes: int, top: int | None = None, above: float | None = None, output: str | None = None):
        self.classes, self.top, self.above, self.output = tuple(int(c) for c in classes), top, above, output
        if (len(self.classes) > 0) + (top is not None) + (above is not None) != 1:
            raise ExplainError("Classes takes class indices, or top=K, or above=P: exactly one of them")
        if top is not None and top < 1:
            raise ExplainError(f"top must be at least 1, got {top}")

    def fixed_class(self) -> int | None:
        return self.classes[0] if len(self.classes) == 1 else None

    def picks(self, scores: np.ndarray) -> list[Pick]:
        flat = scores.reshape(-1)
        if self.top is not None:
            chosen = np.argsort(-flat, kind="stable")[:self.top]
        elif self.above is not None:
            inside = flat.min() >= 0 and flat.max() <= 1
            chosen = np.flatnonzero((flat if inside else _sigmoid(flat)) > self.above)
        else:
            chosen = [_check_class(c, flat.size) for c in self.classes]
        return [Pick(int(c), _one_hot(scores.shape, int(c)), float(flat[c])) for c in chosen]


@dataclass
class Segmentation(Target):
    """For an output of K x h x w per image: the sum of class channel `class_index` over `mask` (a boolean h x w
    array at the output's resolution; by default the pixels predicted as that class, as pytorch-grad-cam's
    SemanticSegmentationTarget tutorial does)."""

    class_index: int
    mask: np.ndarray | None = None
    output: str | None = None

    def picks(self, scores: np.ndarray) -> list[Pick]:
        if scores.ndim != 3:
            raise ExplainError(f"Segmentation needs an output of K x h x w per image; this one is "
                               f"{' x '.join(map(str, scores.shape)) or 'a scalar'}")
        _check_class(self.class_index, scores.shape[0])
        if self.mask is None:
            mask = scores.argmax(axis=0) == self.class_index
        else:
            mask = np.asarray(self.mask, dtype=bool)
            if mask.shape != scores.shape[1:]:
                raise ExplainError(f"the mask is {mask.shape[0]} x {mask.shape[1]}; the output's maps are "
                                   f"{scores.shape[1]} x {scores.shape[2]}" if mask.ndim == 2 else
                                   f"the mask must be a 2-D boolean array, got shape {mask.shape}")
        seed = np.zeros(scores.shape, dtype=np.float32)
        seed[self.class_index] = mask
        return [Pick(self.class_index, seed, float(scores[self.class_index][mask].sum()), mask=mask)]


@dataclass
class Detection(Target):
    """For a detector's raw head: YOLOv5's N x (5 + K), YOLOv8/v11's (4 + K) x N, or a head that already
    ran NMS, D x 6 rows of x1 y1 x2 y2 score class (layout guessed from the shape where not given).

    Boxes are decoded, NMS runs per class (OpenCV's NMSBoxesBatched), and each detection scoring at least
    `score_threshold` (of class in `classes`, when given) is explained, best first, at most `max_detections`;
    or only those of `ranks` (0 = the best detection), as a page that lists the detections asks for one.
    Its score is its class score at its anchor: the class column for YOLOv8, objectness times class
    probability for YOLOv5, the score column after NMS.
    """

    score_threshold: float = 0.25
    iou_threshold: float = 0.45
    classes: Sequence[int] | None = None
    layout: str | None = None
    max_detections: int = 100
    ranks: Sequence[int] | None = None
    output: str | None = None

    def picks(self, scores: np.ndarray) -> list[Pick]:
        layout = self.layout or guess_detection_layout(scores.shape)
        if layout not in DETECTION_LAYOUTS:
            raise ExplainError(f"unknown detection layout '{layout}'; choose from {', '.join(DETECTION_LAYOUTS)}")
        boxes, confidence, labels, seeds = decode(layout, scores)
        keep = confidence >= self.score_threshold
        if self.classes is not None:
            keep &= np.isin(labels, list(self.classes))
        index = kept(layout, boxes, confidence, labels, np.flatnonzero(keep), self.score_threshold,
                     self.iou_threshold)[:self.max_detections]
        if self.ranks is not None:
            index = index[[rank for rank in self.ranks if 0 <= rank < len(index)]]
        return [Pick(int(labels[i]), seeds(i), float(confidence[i]), boxes[i].astype(np.float32)) for i in index]


@dataclass
class Similarity(Target):
    """For an embedding model: the cosine similarity between the image's embedding and `concept`
    (pytorch-grad-cam's SimilarityToConceptTarget). Seed: d cos(e, c) / d e = c / (|e||c|) - cos e / |e|^2."""

    concept: np.ndarray
    output: str | None = None

    def picks(self, scores: np.ndarray) -> list[Pick]:
        embedding = scores.reshape(-1).astype(np.float64)
        concept = np.asarray(self.concept, dtype=np.float64).reshape(-1)
        if concept.size != embedding.size:
            raise ExplainError(f"the concept has {concept.size} values; the embedding has {embedding.size}")
        norm_e, norm_c = np.linalg.norm(embedding), np.linalg.norm(concept)
        if norm_e == 0 or norm_c == 0:
            raise ExplainError("cosine similarity is undefined for a zero embedding or concept")
        cosine = embedding @ concept / (norm_e * norm_c)
        seed = concept / (norm_e * norm_c) - cosine * embedding / norm_e ** 2
        return [Pick(-1, seed.reshape(scores.shape).astype(np.float32), float(cosine))]


@dataclass
class Contrast(Target):
    """Finer-CAM (Zhang et al., arXiv 2501.11309): the class score minus `strength` times the scores of the
    classes it is compared with, y_c - strength * sum_d w_d y_d / sum_d w_d, so that the map shows what tells
    them apart. `against` defaults to the `count` best-scoring other classes; the weights w_d are their
    softmax probabilities, held constant (with one class compared, the paper's y_c - gamma y_d)."""

    class_index: int
    against: Sequence[int] | None = None
    strength: float = 1.0
    count: int = 1
    output: str | None = field(default=None)

    def picks(self, scores: np.ndarray) -> list[Pick]:
        flat = scores.reshape(-1).astype(np.float64)
        target = _check_class(self.class_index, flat.size)
        if self.against is not None:
            against = [_check_class(int(c), flat.size, "contrast class") for c in self.against]
        else:
            order = [int(c) for c in np.argsort(-flat, kind="stable") if c != target]
            against = order[:self.count]
        if not against or target in against:
            raise ExplainError("Contrast needs at least one class to compare with, other than the class itself")
        weights = np.exp(flat[against] - flat.max())
        weights /= weights.sum()
        seed = np.zeros(flat.size, dtype=np.float64)
        seed[target] = 1.0
        np.subtract.at(seed, against, self.strength * weights)
        return [Pick(target, seed.reshape(scores.shape).astype(np.float32), float(seed @ flat))]


def per_image(targets, count: int) -> list:
    """One entry per image: an int (a class; -1 the top-1), None (the top-1) or a Target."""
    if targets is None or isinstance(targets, (int, np.integer, Target)):
        return [targets] * count
    items = list(targets.reshape(-1)) if isinstance(targets, np.ndarray) else list(targets)
    if len(items) == 1:
        items = items * count
    if len(items) != count:
        raise ExplainError(f"{len(items)} targets given for {count} images")
    for item in items:
        if not (item is None or isinstance(item, (int, np.integer, Target))):
            raise ExplainError(f"a target is a class index, None or an onnxcam.targets object, got "
                               f"{type(item).__name__}")
    return items


def fixed_classes(items: list, default_output: str) -> list[int] | None:
    """The class of every image when each is known before the run on the exported output, else None."""
    classes = []
    for item in items:
        if item is None:
            classes.append(-1)
        elif isinstance(item, Target):
            fixed = item.fixed_class()
            if fixed is None or item.output not in (None, default_output):
                return None
            classes.append(fixed)
        else:
            classes.append(int(item))
    return classes


def as_target(item) -> Target:
    """An int or None as the Target it means: that class, or the top-1."""
    if isinstance(item, Target):
        return item
    return Classes(top=1) if item is None or int(item) == -1 else Classes(int(item))


TASKS = ("classify", "segment", "detect", "embed")


def from_options(classes: Sequence[int] = (), *, top: int | None = None, task: str = "classify",
                 score_threshold: float = 0.25, concept=None, output: str | None = None,
                 ranks: Sequence[int] | None = None):
    """The `targets` that plain options ask for (the CLI's flags, a server's query): None (the top-1), a class
    index, or a Target. `classes` are class indices; `concept` an embedding-sized vector (task embed)."""
    classes = [int(c) for c in classes]
    if task not in TASKS:
        raise ExplainError(f"unknown task '{task}'; choose from {', '.join(TASKS)}")
    if task == "detect":
        return Detection(score_threshold=score_threshold, classes=classes or None, output=output, ranks=ranks)
    if task == "segment":
        if len(classes) != 1:
            raise ExplainError("segmentation explains one class: give its index as the target")
        return Segmentation(classes[0], output=output)
    if task == "embed":
        if concept is None:
            raise ExplainError("an embedding is explained by its similarity to a concept vector: give one")
        return Similarity(np.asarray(concept, dtype=np.float32), output=output)
    if top is not None:
        if classes:
            raise ExplainError("give class indices or a number of top classes, not both")
        return Classes(top=top, output=output)
    if len(classes) > 1 or output:
        return Classes(*classes, output=output) if classes else Classes(top=1, output=output)
    return classes[0] if classes else None
