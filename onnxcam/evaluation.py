"""How faithful a map is: metrics that perturb the input as the map says and watch the class score.

All take `predict`, a function from a float32 N x C x H x W batch to class probabilities N x K, and
send their perturbed images in batches (one session run per batch on ONNX Runtime). Perturbations
happen in the model's input space: there, 0 is the normalisation mean, the usual "grey" baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .explainer import Explainer


def average_drop_increase(predict, inputs, heatmaps, classes) -> tuple[float, float]:
    """Average Drop and Increase in Confidence (Chattopadhay et al., arXiv 1710.11063, sec. 5.1.1).

    Y = p_c(image), O = p_c(image (.) map): Average Drop = 100 * mean(max(0, Y - O) / Y), in %;
    Increase in Confidence = 100 * mean(O > Y), in %. Lower drop and higher increase are better.
    """
    rows = np.arange(len(inputs))
    full = predict(inputs)[rows, classes]
    masked = predict(inputs * heatmaps[:, None].astype(inputs.dtype))[rows, classes]
    drop = np.maximum(full - masked, 0) / np.maximum(full, np.finfo(np.float32).tiny)
    return float(100 * drop.mean()), float(100 * (masked > full).mean())


def _auc(curve: np.ndarray) -> np.ndarray:
    """Area under curves sampled at evenly spaced fractions 0..1 (trapezoidal rule), per row."""
    return (curve[:, 1:] + curve[:, :-1]).sum(axis=1) / (2 * (curve.shape[1] - 1))


def deletion_insertion(predict, inputs, heatmaps, classes, steps: int = 32, blur_sigma: float = 5.0):
    """Deletion and insertion curves and their areas (Petsiuk et al., RISE, arXiv 1806.07421, sec. 4.1).

    Pixels are ranked by the map. Deletion replaces the top fraction k/steps of them with 0 (the
    mean) and tracks p_c: a faithful map makes it fall fast (low area). Insertion starts from a
    blurred image and restores the top pixels: p_c should rise fast (high area). One batched
    prediction per image, steps + 1 images each. Returns (deletion areas, insertion areas,
    deletion curves, insertion curves), per image.
    """
    count = inputs.shape[2] * inputs.shape[3]
    fractions = np.linspace(0, 1, steps + 1)
    deletions, insertions = [], []
    for image, heatmap, target in zip(inputs, heatmaps, classes):
        order = np.argsort(-heatmap.ravel(), kind="stable")
        rank = np.empty(count, np.int64)
        rank[order] = np.arange(count)
        shown = (rank[None, :] < np.round(fractions * count)[:, None]).reshape(len(fractions), 1, *heatmap.shape)
        blurred = np.stack([cv2.GaussianBlur(channel, (0, 0), blur_sigma) for channel in image])
        deleted = np.where(shown, 0, image[None]).astype(inputs.dtype)
        inserted = np.where(shown, image[None], blurred[None]).astype(inputs.dtype)
        scores = predict(np.concatenate([deleted, inserted]))[:, target]
        deletions.append(scores[:len(fractions)])
        insertions.append(scores[len(fractions):])
    deletions, insertions = np.array(deletions), np.array(insertions)
    return _auc(deletions), _auc(insertions), deletions, insertions


def pointing_game(heatmaps, boxes, tolerance: int = 15) -> np.ndarray:
    """Pointing game (Zhang et al., arXiv 1608.00507, sec. 5.1): a hit when the map's maximum falls
    in the object's box (x0, y0, x1, y1, in map pixels, inclusive) grown by `tolerance` pixels."""
    hits = []
    for heatmap, (x0, y0, x1, y1) in zip(heatmaps, boxes):
        y, x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        hits.append(x0 - tolerance <= x <= x1 + tolerance and y0 - tolerance <= y <= y1 + tolerance)
    return np.array(hits)


@dataclass
class Faithfulness:
    average_drop: float
    increase_in_confidence: float
    deletion_auc: float
    insertion_auc: float
    pointing_accuracy: float | None


def probabilities(explainer: Explainer):
    """`predict` for the metrics: the explainable session's scores (softmax for several classes)."""
    spec = explainer.spec

    def predict(batch: np.ndarray) -> np.ndarray:
        classes = np.full(len(batch), -1, np.int64)  # any class: only the scores are fetched
        (scores,) = explainer.session.run([spec.scores], {spec.input: batch, spec.class_input: classes})
        scores = scores.reshape(len(batch), -1)
        if scores.shape[1] == 1:
            return scores
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    return predict


def evaluate(explainer: Explainer, inputs, method: str = "gradcam", targets=None, boxes=None, steps: int = 32,
             batch_size: int = 16, tolerance: int = 15) -> Faithfulness:
    """All metrics for `inputs` (uint8 RGB images or a float32 batch), explained with `method`;
    `boxes` (x0, y0, x1, y1 per image, in the model's input pixels) add the pointing game."""
    batch = explainer.prepare(inputs)
    predict = probabilities(explainer)
    drops, increases, deletions, insertions, maps, classes = [], [], [], [], [], []
    for start in range(0, len(batch), batch_size):
        part = batch[start:start + batch_size]
        wanted = None if targets is None else np.asarray(targets).reshape(-1)[start:start + batch_size]
        result = explainer.explain(part, method=method, targets=wanted)
        drop, increase = average_drop_increase(predict, part, result.heatmaps, result.targets)
        deletion, insertion, _, _ = deletion_insertion(predict, part, result.heatmaps, result.targets, steps)
        drops.append(drop * len(part))
        increases.append(increase * len(part))
        deletions += list(deletion)
        insertions += list(insertion)
        maps.append(result.heatmaps)
        classes.append(result.targets)
    pointing = None if boxes is None else float(pointing_game(np.concatenate(maps), boxes, tolerance).mean())
    return Faithfulness(sum(drops) / len(batch), sum(increases) / len(batch), float(np.mean(deletions)),
                        float(np.mean(insertions)), pointing)
