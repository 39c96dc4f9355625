"""How faithful an explainer's maps are: the metrics of core.metrics run on an explainable file, one
session run per batch of perturbed images."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .core.errors import ExplainError
from .core.files import read_image
from .core.images import box_scale
from .core.metrics import average_drop_increase, confidence_change, deletion_insertion, pointing_game, road
from .core.scores import probabilities as as_probabilities
from .explainer import Explainer


@dataclass
class Faithfulness:
    average_drop: float
    increase_in_confidence: float
    deletion_auc: float
    insertion_auc: float
    pointing_accuracy: float | None
    confidence_change: float | None = None  # pytorch-grad-cam's CamMultImageConfidenceChange, mean
    road_morf: float | None = None  # ROAD, most relevant first (lower is better), mean over images
    road_lerf: float | None = None  # ROAD, least relevant first (nearer 0 is better)


def predictor(explainer: Explainer):
    """`predict` for the metrics: the explainable session's scores (softmax for several classes)."""

    spec = explainer.spec

    def predict(batch: np.ndarray) -> np.ndarray:
        classes = np.full(len(batch), -1, np.int64)  # any class: only the scores are fetched
        (scores,) = explainer.model.runner.run([spec.scores], {spec.input: batch, spec.class_input: classes})
        return as_probabilities(scores.reshape(len(batch), -1))

    return predict


def evaluate(explainer: Explainer, inputs, method: str = "gradcam", targets=None, boxes=None, steps: int = 32,
             batch_size: int = 16, tolerance: int = 15, with_road: bool = False) -> Faithfulness:
    """All metrics for `inputs` (uint8 RGB images or a float32 batch), explained with `method`;
    `boxes` (x0, y0, x1, y1 per image, in the model's input pixels) add the pointing game. `with_road` adds ROAD
    (18 sparse linear solves per image, seconds each at 224 x 224: opt-in)."""
    batch = explainer.prepare(inputs)
    predict = predictor(explainer)
    drops, increases, deletions, insertions, maps, classes = [], [], [], [], [], []
    changes, morf, lerf = [], [], []
    for start in range(0, len(batch), batch_size):
        part = batch[start:start + batch_size]
        wanted = None if targets is None else np.asarray(targets).reshape(-1)[start:start + batch_size]
        result = explainer.explain(part, method=method, targets=wanted)
        drop, increase = average_drop_increase(predict, part, result.heatmaps, result.classes)
        deletion, insertion, _, _ = deletion_insertion(predict, part, result.heatmaps, result.classes, steps)
        drops.append(drop * len(part))
        increases.append(increase * len(part))
        deletions += list(deletion)
        changes += list(confidence_change(predict, part, result.heatmaps, result.classes))
        if with_road:
            part_morf, part_lerf = road(predict, part, result.heatmaps, result.classes)
            morf, lerf = morf + list(part_morf), lerf + list(part_lerf)
        insertions += list(insertion)
        maps.append(result.heatmaps)
        classes.append(result.classes)
    pointing = None if boxes is None else float(pointing_game(np.concatenate(maps), boxes, tolerance).mean())
    return Faithfulness(sum(drops) / len(batch), sum(increases) / len(batch), float(np.mean(deletions)),
                        float(np.mean(insertions)), pointing, float(np.mean(changes)),
                        float(np.mean(morf)) if with_road else None, float(np.mean(lerf)) if with_road else None)


def evaluate_files(explainer: Explainer, paths: list[Path], boxes_file=None, **options) -> Faithfulness:
    """`evaluate` on image files; `boxes_file` (JSON: file name -> [x0, y0, x1, y1] in the image's pixels) adds the
    pointing game, its boxes moved into the model input's pixels."""
    pictures = [read_image(path) for path in paths]
    boxes = None
    if boxes_file:
        given = json.loads(Path(boxes_file).read_text())
        boxes = []
        for path, picture in zip(paths, pictures, strict=True):
            if path.name not in given:
                raise ExplainError(f"{boxes_file} has no box for {path.name}")
            boxes.append(tuple(np.asarray(given[path.name], np.float64)
                               / box_scale(picture.shape[:2], explainer.spec.input_size)))
    return evaluate(explainer, pictures, boxes=boxes, **options)
