"""A detector's raw head, in numpy: its layouts, its decoding into boxes, scores and seeds, and NMS.

Shared by the Detection target (onnxcam.targets), which explains the detections of an image, and by the export
(exporters.discovery), which confirms a detector's default target layers with the detections of random images.

Layouts, per image: YOLOv8/v11's (4 + K) x A (box rows cx cy w h, then one row per class), YOLOv5's A x (5 + K)
(cx cy w h, objectness, then class probabilities), or a head that already ran NMS, D x 6 rows of x1 y1 x2 y2
score class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from .errors import ExplainError

DETECTION_LAYOUTS = ("yolov5", "yolov8", "nms")
YOLO_STRIDES = (8, 16, 32)  # the P3, P4, P5 scales of YOLOv5/v8/v11 heads
YOLOV5_ANCHORS = 3  # anchor boxes per cell of a YOLOv5 head


def guess_detection_layout(shape: tuple[int, ...]) -> str:
    """nms for D x 6 (up to 1000 rows); else yolov8 when the rows are fewer than the anchors ((4 + K) x N); else
    yolov5 (N x (5 + K))."""
    if len(shape) != 2:
        raise ExplainError(f"Detection needs an output of rows x columns per image; this one is "
                           f"{' x '.join(map(str, shape)) or 'a scalar'}")
    rows, columns = shape
    if columns == 6 and rows <= 1000:
        return "nms"
    return "yolov8" if rows < columns else "yolov5"


def yolo_anchor_counts(size: tuple[int, int]) -> set[int]:
    """The number of anchor points of a YOLOv8/v11 head over an H x W image: one per cell of its stride 8, 16 and
    32 grids, with each side rounded up (strided convolutions with padding) or down."""
    height, width = size
    return {sum(rounding(height / s) * rounding(width / s) for s in YOLO_STRIDES) for rounding in (math.ceil,
                                                                                                  math.floor)}


def yolo_layout(shape, size: tuple[int, int]) -> str | None:
    """yolov8 or yolov5 where a score output's shape per image is a YOLO head's raw output for an H x W image,
    else None. Strict: (4 + K) x A with A the head's anchor points at strides 8, 16, 32 (yolov8, also v11), or
    A' x (5 + K) with A' three anchor boxes per point (yolov5); K >= 1."""
    if len(shape) != 2 or None in shape:
        return None
    rows, columns = shape
    anchors = yolo_anchor_counts(size)
    if columns in anchors and 4 < rows < columns:
        return "yolov8"
    if rows in {YOLOV5_ANCHORS * a for a in anchors} and 5 < columns < rows:
        return "yolov5"
    return None


def class_and_box_masks(layout: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks shaped like one image's output: where its class scores lie, and where its box coordinates
    do (YOLOv5's objectness is in neither; after NMS the class scores are the score column)."""
    classes, boxes = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    if layout == "yolov8":
        classes[4:], boxes[:4] = True, True
    elif layout == "yolov5":
        classes[:, 5:], boxes[:, :4] = True, True
    else:
        classes[:, 4], boxes[:, :4] = True, True
    return classes, boxes


def decode(layout: str, scores: np.ndarray):
    """Boxes (x1 y1 x2 y2), confidences, labels, and a function giving the seed of detection i (the gradient of its
    score, its class score at its anchor, with respect to the output)."""
    if layout == "nms":
        if scores.shape[1] != 6:
            raise ExplainError(f"a head with NMS must give rows of 6 values (x1 y1 x2 y2 score class); these have "
                               f"{scores.shape[1]}")
        return (scores[:, :4].astype(np.float64), scores[:, 4].astype(np.float64), scores[:, 5].astype(np.int64),
                lambda i: _one_hot(scores.shape, i * 6 + 4))
    rows = scores.T if layout == "yolov8" else scores
    first = 4 if layout == "yolov8" else 5
    if rows.shape[1] <= first:
        raise ExplainError(f"a {layout} head needs more than {first} values per anchor; it has {rows.shape[1]}")
    centre, size = rows[:, :2].astype(np.float64), rows[:, 2:4].astype(np.float64)
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    classes = rows[:, first:].astype(np.float64)
    if layout == "yolov5":
        classes = classes * rows[:, 4:5]
    labels = classes.argmax(axis=1)
    confidence = classes[np.arange(len(rows)), labels]

    def seed(i: int) -> np.ndarray:
        grad = np.zeros(rows.shape, dtype=np.float32)
        if layout == "yolov5":  # d(obj * cls) = cls d obj + obj d cls
            grad[i, 4], grad[i, first + labels[i]] = rows[i, first + labels[i]], rows[i, 4]
        else:
            grad[i, first + labels[i]] = 1.0
        return grad.T.copy() if layout == "yolov8" else grad

    return boxes, confidence, labels, seed


def kept(layout: str, boxes: np.ndarray, confidence: np.ndarray, labels: np.ndarray, candidates: np.ndarray,
         score_threshold: float, iou_threshold: float) -> np.ndarray:
    """Of the `candidates` (indices of rows scoring at least the threshold), those that per-class NMS keeps (OpenCV's
    NMSBoxesBatched; all of them after a head's own NMS), best first."""
    index = np.asarray(candidates, dtype=np.int64)
    if layout != "nms" and index.size:
        xywh = np.concatenate([boxes[index, :2], boxes[index, 2:] - boxes[index, :2]], axis=1)
        chosen = cv2.dnn.NMSBoxesBatched(xywh.tolist(), confidence[index].tolist(), labels[index].tolist(),
                                         score_threshold, iou_threshold)
        index = index[np.asarray(chosen, dtype=np.int64).reshape(-1)]
    return index[np.argsort(-confidence[index], kind="stable")]


def best_detections(layout: str, scores: np.ndarray, count: int, iou_threshold: float = 0.45,
                    within: Sequence[range] | None = None) -> list[int]:
    """The rows of the `count` best detections after NMS with no score threshold; with `within` (ranges of anchors),
    the best one in each range instead, where a range holds one."""
    boxes, confidence, labels, _ = decode(layout, scores)
    order = kept(layout, boxes, confidence, labels, np.arange(len(confidence)), 0.0, iou_threshold)
    if within is None:
        return [int(i) for i in order[:count]]
    return [int(next(i for i in order if i in span)) for span in within if any(i in span for i in order)]


def _one_hot(shape: tuple[int, ...], index: int) -> np.ndarray:
    seed = np.zeros(int(np.prod(shape)), dtype=np.float32)
    seed[index] = 1.0
    return seed.reshape(shape)
