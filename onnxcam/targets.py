"""What a map explains: one or more classes, a segment, a detection, a concept, a contrast between classes.

Every target is a function of one output of the model. Its seed is the gradient of its score with respect
to that output (for one image: an array shaped like the image's slice of the output), computed here in
numpy; the engine differentiates from the output back to the target layers with that seed (exporters.head).
A target may give several maps per image (Classes(top=5), every detection), or none. A target may also read
other outputs to make its picks (a DETR's boxes beside its class logits: `Target.reads`); they are fetched in
the same session run, and the seed stays on the output explained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from .core.detections import DETECTION_LAYOUTS, decode, guess_detection_layout, kept
from .core.errors import ExplainError

QUERY_LAYOUTS = ("detr", "rtdetr")  # one row of class logits per query, the boxes in a second output
LAYOUTS = (*DETECTION_LAYOUTS, *QUERY_LAYOUTS)


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

    def reads(self, output: str, shapes: Mapping[str, tuple]) -> tuple[str, ...]:
        """The other outputs picks() reads beside the one it explains (`output`, by name), fetched in the same
        session run; `shapes` gives every output of the model with its shape per image (None for a size the file
        leaves open). Refuses, in one line, a target that these outputs show would be read wrong. None here."""
        return ()

    def picks(self, scores: np.ndarray, others: Mapping[str, np.ndarray] | None = None,
              input_size: tuple[int, int] | None = None) -> list[Pick]:
        """The maps of one image, from its slice of the output; `others`: its slices of the outputs reads()
        named; `input_size`: the model input's H x W (for boxes given relative to the image, masks given at it)."""
        raise NotImplementedError


def _one_hot(shape: tuple[int, ...], index: int) -> np.ndarray:
    seed = np.zeros(int(np.prod(shape)), dtype=np.float32)
    seed[index] = 1.0
    return seed.reshape(shape)


def _check_class(index: int, count: int, what: str = "class index") -> int:
    if not 0 <= index < count:
        raise ExplainError(f"{what} {index} is out of range: the output has {count} classes (0 to {count - 1})")
    return index


def _wins(scores: np.ndarray, index: int) -> np.ndarray:
    """The pixels of K x h x w class maps whose argmax is class `index` (the first of equal maxima, as argmax takes
    it), without argmax along the class axis: numpy's argmax reduces that axis several times slower than max."""
    best = scores.max(axis=0)
    mask = scores[index] == best
    for earlier in scores[:index]:
        mask &= earlier != best
    return mask


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

    def picks(self, scores: np.ndarray, others=None, input_size=None) -> list[Pick]:
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
    array; by default the pixels predicted as that class, as pytorch-grad-cam's SemanticSegmentationTarget
    tutorial does).

    The mask is at the output's resolution, or at the model input's H x W where the output is smaller (SegFormer's
    logits are at a quarter of the image): it is then resized to the output's h x w, nearest with pixel centres
    aligned (an output pixel is in the mask when the image pixel at its centre is). The map's mask
    (`Explanation.masks`) is always at the output's resolution."""

    class_index: int
    mask: np.ndarray | None = None
    output: str | None = None

    def picks(self, scores: np.ndarray, others=None, input_size: tuple[int, int] | None = None) -> list[Pick]:
        if scores.ndim != 3:
            raise ExplainError(f"Segmentation needs an output of K x h x w per image; this one is "
                               f"{' x '.join(map(str, scores.shape)) or 'a scalar'}")
        _check_class(self.class_index, scores.shape[0])
        if self.mask is None:
            mask = _wins(scores, self.class_index)
        else:
            mask = _mask_at(np.asarray(self.mask, dtype=bool), scores.shape[1:], input_size)
        seed = np.zeros(scores.shape, dtype=np.float32)
        seed[self.class_index] = mask
        return [Pick(self.class_index, seed, float(scores[self.class_index][mask].sum()), mask=mask)]


def _mask_at(mask: np.ndarray, size: tuple[int, int], input_size: tuple[int, int] | None) -> np.ndarray:
    """A segment's mask at the output's h x w: as given, or resized (nearest) from the model input's H x W."""
    if mask.ndim != 2:
        raise ExplainError(f"the mask must be a 2-D boolean array, got shape {mask.shape}")
    if mask.shape == tuple(size):
        return mask
    if input_size is not None and mask.shape == tuple(input_size):
        return cv2.resize(mask.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST_EXACT) > 0
    image = f" or the image's {input_size[0]} x {input_size[1]}" if input_size is not None else ""
    raise ExplainError(f"the mask is {mask.shape[0]} x {mask.shape[1]}; give it at the output's {size[0]} x "
                       f"{size[1]}{image}")


@dataclass
class Detection(Target):
    """For a detector's raw head: YOLOv5's N x (5 + K), YOLOv8/v11's (4 + K) x N, or a head that already
    ran NMS, D x 6 rows of x1 y1 x2 y2 score class (layout guessed from the shape where not given); or a
    DETR-style head, Q x C class logits per image (one row per query) with the boxes in a second output
    (`boxes`, Q x 4 normalised cx cy w h, as Hugging Face's DETR and RT-DETR write `pred_boxes`), whose
    layout must be given:

    - "detr": softmax class logits whose last class is "no object" (DETR, YOLOS, Table Transformer). A query's
      score is the softmax probability of its best real class, as Hugging Face's post_process_object_detection
      computes it; one map per query kept.
    - "rtdetr": sigmoid class logits, no "no object" class (RT-DETR, Deformable DETR, focal loss). As Hugging
      Face's RTDetrImageProcessor does, the Q best (query, class) pairs by sigmoid probability are the
      detections: one map per pair kept (a query may give maps for two classes).

    In both the map explains the chosen class's logit at that query (a one-hot seed at [query, class] of the
    logits output: the score before the softmax or sigmoid, as every class score here is); NMS does not run
    (queries are already unique); boxes are turned into x1 y1 x2 y2 in model-input pixels. `boxes` may be left
    out where the model has exactly one other output of Q x 4 per image. A head whose logits have a Q x 4
    output beside them is refused without a layout, in one line: the shape cannot tell DETR from RT-DETR, nor
    either from a YOLOv5 head.

    For YOLO heads and NMS output, boxes are decoded, NMS runs per class (OpenCV's NMSBoxesBatched), and each
    detection's score is its class score at its anchor: the class column for YOLOv8, objectness times class
    probability for YOLOv5, the score column after NMS. For every layout, each detection scoring at least
    `score_threshold` (of class in `classes`, when given) is explained, best first, at most `max_detections`;
    or only those of `ranks` (0 = the best detection), as a page that lists the detections asks for one.
    """

    score_threshold: float = 0.25
    iou_threshold: float = 0.45
    classes: Sequence[int] | None = None
    layout: str | None = None
    max_detections: int = 100
    ranks: Sequence[int] | None = None
    output: str | None = None
    boxes: str | None = None

    def reads(self, output: str, shapes: Mapping[str, tuple]) -> tuple[str, ...]:
        """The boxes output named; else, for a query layout or none given, every output that may be Q x 4 per
        image (picks() tells them apart by their values' shapes)."""
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ExplainError(f"unknown detection layout '{self.layout}'; choose from {', '.join(LAYOUTS)}")
        if self.boxes is not None and self.layout not in QUERY_LAYOUTS:
            raise ExplainError(f"boxes='{self.boxes}' are read by the layouts {' and '.join(QUERY_LAYOUTS)} only; "
                               f"give layout='detr' (softmax, last class 'no object') or 'rtdetr' (sigmoid)"
                               if self.layout is None else f"layout '{self.layout}' reads its boxes from "
                               f"'{output}' itself: boxes= is for the layouts {' and '.join(QUERY_LAYOUTS)}")
        if self.boxes is not None:
            if self.boxes == output:
                raise ExplainError(f"boxes='{self.boxes}' is the output explained; name the boxes output")
            return (self.boxes,)
        if self.layout is None or self.layout in QUERY_LAYOUTS:
            return tuple(_box_candidates(output, shapes))
        return ()

    def picks(self, scores: np.ndarray, others: Mapping[str, np.ndarray] | None = None,
              input_size: tuple[int, int] | None = None) -> list[Pick]:
        layout = self.layout or self._guessed(scores.shape, others or {})
        if layout not in LAYOUTS:
            raise ExplainError(f"unknown detection layout '{layout}'; choose from {', '.join(LAYOUTS)}")
        if layout in QUERY_LAYOUTS:
            boxes, confidence, labels, seeds = _decode_queries(layout, scores, self._boxes(scores, others or {}),
                                                               input_size)
        else:
            boxes, confidence, labels, seeds = decode(layout, scores)
        keep = confidence >= self.score_threshold
        if self.classes is not None:
            keep &= np.isin(labels, list(self.classes))
        index = np.flatnonzero(keep)
        if layout in QUERY_LAYOUTS:  # queries are unique detections: no NMS
            index = index[np.argsort(-confidence[index], kind="stable")][:self.max_detections]
        else:
            index = kept(layout, boxes, confidence, labels, index, self.score_threshold,
                         self.iou_threshold)[:self.max_detections]
        if self.ranks is not None:
            index = index[[rank for rank in self.ranks if 0 <= rank < len(index)]]
        return [Pick(int(labels[i]), seeds(i), float(confidence[i]), boxes[i].astype(np.float32)) for i in index]

    def _guessed(self, shape: tuple[int, ...], others: Mapping[str, np.ndarray]) -> str:
        """The layout guessed from the shape; refused where a boxes output lies beside Q x C logits."""
        layout = guess_detection_layout(shape)
        beside = [name for name, value in others.items() if value.shape == (shape[0], 4)]
        if beside:
            raise ExplainError(f"the output explained has boxes beside it ({', '.join(beside)}: {shape[0]} x 4): a "
                               f"DETR-style head; give layout='detr' (softmax, last class 'no object') or "
                               f"layout='rtdetr' (sigmoid), and boxes='{beside[0]}'")
        return layout

    def _boxes(self, scores: np.ndarray, others: Mapping[str, np.ndarray]) -> np.ndarray:
        """This image's Q x 4 boxes: the output named, or the only one of Q x 4 among those reads() gave."""
        if self.boxes is not None:
            if self.boxes not in others:
                raise ExplainError(f"layout '{self.layout}' needs the values of boxes='{self.boxes}' beside the logits")
            return others[self.boxes]
        rows = scores.shape[0] if scores.ndim == 2 else None
        found = [name for name, value in others.items() if value.shape == (rows, 4)]
        if len(found) != 1:
            named = f"candidates: {', '.join(found)}" if found else "none of the other outputs is Q x 4"
            raise ExplainError(f"layout '{self.layout}' reads its boxes from a second output: give boxes=NAME "
                               f"({named})")
        return others[found[0]]


def _box_candidates(output: str, shapes: Mapping[str, tuple]) -> list[str]:
    """The outputs other than `output` that may be Q x 4 per image beside its Q x C (None: a size left open)."""
    own = shapes.get(output)
    rows = own[0] if own is not None and len(own) == 2 else None
    return [name for name, shape in shapes.items() if name != output and shape is not None and len(shape) == 2
            and shape[1] in (4, None) and (rows is None or shape[0] in (rows, None))]


def _decode_queries(layout: str, logits: np.ndarray, boxes: np.ndarray, input_size: tuple[int, int] | None):
    """A DETR-style head: boxes (x1 y1 x2 y2 in model-input pixels), confidences, labels, and the seed of
    detection i (one-hot at its [query, class] logit). Detections are queries (detr) or (query, class) pairs
    (rtdetr)."""
    if logits.ndim != 2:
        raise ExplainError(f"a {layout} head gives Q x C class logits per image; this one is "
                           f"{' x '.join(map(str, logits.shape)) or 'a scalar'}")
    queries, columns = logits.shape
    if boxes.shape != (queries, 4):
        raise ExplainError(f"the boxes must be Q x 4 (cx cy w h) per image, one per query of the logits ({queries}); "
                           f"they are {' x '.join(map(str, boxes.shape))}")
    if input_size is None:
        raise ExplainError(f"a {layout} head's boxes are relative to the image: its size is needed")
    height, width = input_size
    centre, size = boxes[:, :2].astype(np.float64), boxes[:, 2:].astype(np.float64)
    corners = np.concatenate([centre - size / 2, centre + size / 2], axis=1) * [width, height, width, height]
    values = logits.astype(np.float64)
    if layout == "detr":
        if columns < 2:
            raise ExplainError(f"a detr head's logits need a class and the 'no object' class; these have {columns}")
        probabilities = np.exp(values - values.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        labels = probabilities[:, :-1].argmax(axis=1)
        confidence = probabilities[np.arange(queries), labels]
        query = np.arange(queries)
    else:  # the Q best (query, class) pairs by sigmoid probability
        flat = _sigmoid(values).reshape(-1)
        best = np.argsort(-flat, kind="stable")[:queries]
        query, labels, confidence = best // columns, best % columns, flat[best]
    return corners[query], confidence, labels, lambda i: _one_hot(logits.shape, int(query[i] * columns + labels[i]))


@dataclass
class Similarity(Target):
    """For an embedding model: the cosine similarity between the image's embedding and `concept`
    (pytorch-grad-cam's SimilarityToConceptTarget). Seed: d cos(e, c) / d e = c / (|e||c|) - cos e / |e|^2."""

    concept: np.ndarray
    output: str | None = None

    def picks(self, scores: np.ndarray, others=None, input_size=None) -> list[Pick]:
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

    def picks(self, scores: np.ndarray, others=None, input_size=None) -> list[Pick]:
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
                 ranks: Sequence[int] | None = None, layout: str | None = None, boxes: str | None = None):
    """The `targets` that plain options ask for (the CLI's flags, a server's query): None (the top-1), a class
    index, or a Target. `classes` are class indices; `concept` an embedding-sized vector (task embed); `layout` and
    `boxes` a detector head's (Detection's)."""
    if (layout is not None or boxes is not None) and task != "detect":
        raise ExplainError("a detection layout and a boxes output are options of task detect")
    classes = [int(c) for c in classes]
    if task not in TASKS:
        raise ExplainError(f"unknown task '{task}'; choose from {', '.join(TASKS)}")
    if task == "detect":
        return Detection(score_threshold=score_threshold, classes=classes or None, output=output, ranks=ranks,
                         layout=layout, boxes=boxes)
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
