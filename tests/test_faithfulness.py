"""Faithfulness metrics: checked against plain references, and on a localisation set where the right
answer is known, Grad-CAM points at the object far above chance and beats its own inverse."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli
from support import shapes

import onnxcam
from onnxcam.core.metrics import average_drop_increase, deletion_insertion, pointing_game
from onnxcam.evaluation import evaluate, predictor
from onnxcam.exporters import export_torch


@pytest.fixture(scope="module")
def localisation(tmp_path_factory):
    model = shapes.trained_classifier()
    path = tmp_path_factory.mktemp("shapes") / "shapes.onnx"
    export_torch(model, path, input_shape=(3, 32, 32), mean=[0.5] * 3, std=[0.5] * 3, labels=["plus", "ring", "cross"])
    images, labels, boxes = shapes.make(96, seed=123)
    return model, onnxcam.Explainer(path, provider="cpu"), images, labels, boxes, path


def test_classifier_learned_the_shapes(localisation):
    model, explainer, images, labels, _, _ = localisation
    assert (explainer.explain(list(images)).classes == labels).mean() > 0.95


def test_gradcam_points_at_the_object(localisation):
    """The 16 x 16 target map puts Grad-CAM's peak within 4 pixels of the 7-pixel shape; Grad-CAM++,
    whose pixel weights sharpen the map, within 2."""
    _, explainer, images, _, boxes, _ = localisation
    chance = ((shapes.SHAPE + 8) ** 2) / shapes.SIZE ** 2  # share of the image a random point would hit
    hits = pointing_game(explainer.explain(list(images)).heatmaps, boxes, tolerance=4).mean()
    assert hits > 0.85 > 3 * chance
    sharp = pointing_game(explainer.explain(list(images), method="gradcam++").heatmaps, boxes, tolerance=2).mean()
    assert sharp > 0.9


def test_metrics_prefer_the_map_to_its_inverse(localisation):
    _, explainer, images, _, boxes, _ = localisation
    batch = explainer.prepare(list(images[:32]))
    result = explainer.explain(batch)
    predict = predictor(explainer)
    inverse = 1 - result.heatmaps
    drop, _ = average_drop_increase(predict, batch, result.heatmaps, result.classes)
    drop_inverse, _ = average_drop_increase(predict, batch, inverse, result.classes)
    deletion, _, _, _ = deletion_insertion(predict, batch, result.heatmaps, result.classes, steps=16)
    deletion_inv, _, _, _ = deletion_insertion(predict, batch, inverse, result.classes, steps=16)
    assert drop < drop_inverse
    assert deletion.mean() < deletion_inv.mean()
    # (insertion from a blurred image says little here: the blurred shape alone is often recognised)
    summary = evaluate(explainer, list(images[:32]), boxes=boxes[:32], steps=16, tolerance=4)
    assert summary.pointing_accuracy > 0.85 and summary.deletion_auc < summary.insertion_auc


def test_metric_arithmetic_against_references(localisation):
    """Average Drop / Increase and the deletion curve, recomputed by hand in torch."""
    model, explainer, images, _, _, _ = localisation
    batch = explainer.prepare(list(images[:6]))
    result = explainer.explain(batch, method="gradcam++")
    with torch.no_grad():
        full = torch.softmax(model(torch.from_numpy(batch)), 1)
        masked = torch.softmax(model(torch.from_numpy(batch * result.heatmaps[:, None])), 1)
    rows = np.arange(6)
    y, o = full.numpy()[rows, result.classes], masked.numpy()[rows, result.classes]
    drop, increase = average_drop_increase(predictor(explainer), batch, result.heatmaps, result.classes)
    assert drop == pytest.approx(100 * np.mean(np.maximum(y - o, 0) / y), rel=1e-4)
    assert increase == pytest.approx(100 * np.mean(o > y))
    deletion, _, curves, inserted = deletion_insertion(predictor(explainer), batch, result.heatmaps,
                                                       result.classes, steps=4)
    np.testing.assert_allclose(inserted[:, -1], y, rtol=1e-4)  # everything inserted: the full image again
    image, heat, target = batch[0], result.heatmaps[0], result.classes[0]
    order = np.argsort(-heat.ravel(), kind="stable")
    for k, fraction in enumerate(np.linspace(0, 1, 5)):
        removed = image.reshape(3, -1).copy()
        removed[:, order[:int(round(fraction * heat.size))]] = 0
        with torch.no_grad():
            expected = torch.softmax(model(torch.from_numpy(removed.reshape(1, *image.shape))), 1)[0, target]
        assert curves[0, k] == pytest.approx(float(expected), abs=1e-5)
    assert deletion[0] == pytest.approx(np.trapezoid(curves[0], dx=1 / 4), rel=1e-6)


def test_evaluate_command(localisation, tmp_path):
    import cv2

    _, _, images, _, boxes, path = localisation
    folder = tmp_path / "images"
    folder.mkdir()
    box_file = {}
    for i, (image, box) in enumerate(zip(images[:12], boxes[:12])):
        cv2.imwrite(str(folder / f"{i:02d}.png"), image[..., ::-1])
        box_file[f"{i:02d}.png"] = box.tolist()
    (tmp_path / "boxes.json").write_text(json.dumps(box_file))
    result = run_cli("evaluate", path, folder, "--boxes", tmp_path / "boxes.json", "--steps", "8", "--tolerance", "4")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 12 and report["pointing_accuracy"] > 0.8
    assert set(report) >= {"average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc"}
