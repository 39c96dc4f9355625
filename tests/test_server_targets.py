"""Targets beyond one class over HTTP: several classes, detections and bad targets on the image route and the
JSON protocols, checked against the Python API (onnxcam.targets)."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import cv2
import httpx
import numpy as np
import pytest
from conftest import random_images

import onnxcam
from onnxcam.core.files import decode_image, encode_png
from onnxcam.serving import create_app, serving
from onnxcam.targets import Classes, Detection


@pytest.fixture(scope="module")
def url(small_onnx):
    with serving(create_app(small_onnx, name="small", provider="cpu", max_wait_ms=50)) as base:
        yield base


@pytest.fixture(scope="module")
def explainer(small_onnx):
    return onnxcam.Explainer(small_onnx, provider="cpu")


@pytest.fixture(scope="module")
def png():
    return encode_png(random_images(1, seed=11, size=(45, 60))[0])


def _grey(encoded: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(encoded), np.uint8), cv2.IMREAD_GRAYSCALE)


def _uint8(heatmaps: np.ndarray) -> np.ndarray:
    return (heatmaps * 255 + 0.5).astype(np.uint8)


def _v2(batch: np.ndarray, **parameters) -> dict:
    tensor = {"name": "input", "shape": list(batch.shape), "datatype": "FP32", "data": batch.ravel().tolist()}
    return {"inputs": [tensor], "parameters": parameters}


def _outputs(answer: dict) -> dict:
    return {o["name"]: np.reshape(o["data"], o["shape"]) for o in answer["outputs"]}


def test_several_classes_on_the_image_route_match_the_python_api(url, explainer, png):
    expected = explainer.explain(decode_image(png), "layercam", targets=Classes(4, 1))
    answer = httpx.post(f"{url}/explain?method=layercam&target=4&target=1", content=png).json()
    assert [m["target"] for m in answer["maps"]] == [4, 1] and answer["target"] == 4
    assert [m["target_label"] for m in answer["maps"]] == ["class 4", "class 1"]
    np.testing.assert_allclose([m["score"] for m in answer["maps"]], expected.scores, rtol=1e-5)
    heat = np.stack([_grey(m["heatmap_png"]) for m in answer["maps"]])
    np.testing.assert_array_equal(heat, _uint8(expected.heatmaps))
    overlays = [_grey(m["overlay_png"]).astype(float) for m in answer["maps"]]
    assert overlays[0].shape == (45, 60) and np.abs(overlays[0] - overlays[1]).mean() > 1  # one overlay per map
    same = httpx.post(f"{url}/explain?method=layercam&target=4,1", content=png).json()
    assert [m["heatmap_png"] for m in same["maps"]] == [m["heatmap_png"] for m in answer["maps"]]
    top = httpx.post(f"{url}/explain?top=3", content=png).json()
    assert [m["target"] for m in top["maps"]] == [c["class"] for c in top["top5"][:3]]


def test_several_classes_over_the_json_protocols_match_the_python_api(url, explainer, png):
    batch = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    expected = explainer.explain(batch, "gradcam++", targets=Classes(2, 0))
    answer = httpx.post(f"{url}/v2/models/small/explain", json=_v2(batch, method="gradcam++", classes=[2, 0]))
    outputs = _outputs(answer.json())
    np.testing.assert_allclose(outputs["heatmaps"], expected.heatmaps, atol=1e-6)
    np.testing.assert_array_equal(outputs["targets"], [2, 0] * 3)
    np.testing.assert_array_equal(outputs["image_index"], [0, 0, 1, 1, 2, 2])
    np.testing.assert_allclose(outputs["scores"], expected.scores, rtol=1e-5)
    assert "boxes" not in outputs

    body = {"instances": [{"b64": base64.b64encode(png).decode()}] * 2, "parameters": {"classes": [3, 1]}}
    explanations = httpx.post(f"{url}/v1/models/small:explain", json=body).json()["explanations"]
    single = explainer.explain(decode_image(png), targets=Classes(3, 1))
    assert [(e["instance"], e["target"]) for e in explanations] == [(0, 3), (0, 1), (1, 3), (1, 1)]
    np.testing.assert_allclose([e["heatmap"] for e in explanations[2:]], single.heatmaps, atol=1e-6)


@pytest.mark.parametrize("path, parameters, message", [
    ("/explain", "task=segment&target=1", "Segmentation needs an output of K x h x w per image; this one is 5"),
    ("/explain", "target=1&target=9", "class index 9 is out of range: the output has 5 classes (0 to 4)"),
    ("/explain", "task=magic", "unknown task 'magic'; choose from classify, segment, detect, embed"),
    ("/explain", "top=two", "top must be an integer, got 'two'"),
    ("/explain", "task=embed&concept=1,2,3", "the concept has 3 values; the embedding has 5"),
    ("v2", {"task": "embed", "concept": [1.0, 2.0]}, "the concept has 2 values; the embedding has 5"),
    ("v2", {"target": [1, 2], "top": 2}, "a list as target gives one class per image"),
    ("v2", {"top": 2, "classes": [1]}, "give class indices or a number of top classes, not both"),
    ("v2", {"classes": [1, 7]}, "class index 7 is out of range"),
])
def test_bad_targets_get_400_and_one_line(url, png, path, parameters, message):
    if path == "v2":
        batch = np.zeros((2, 3, 32, 32), np.float32)
        response = httpx.post(f"{url}/v2/models/small/explain", json=_v2(batch, **parameters))
    else:
        response = httpx.post(f"{url}{path}?{parameters}", content=png)
    error = response.json()["error"]
    assert response.status_code == 400 and message in error and "\n" not in error, response.text


def test_a_bad_target_spares_the_requests_batched_with_it(url, png):
    """A class out of range in Classes(1, 9) shows only once the outputs are seen, in a run shared with others."""
    def call(bad: bool):
        return httpx.post(f"{url}/explain?target=1&target={9 if bad else 2}", content=png, timeout=60)

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(call, [False, True, False, False, True, False]))
    assert [a.status_code for a in answers] == [200, 400, 200, 200, 400, 200]
    assert all([m["target"] for m in a.json()["maps"]] == [1, 2] for a in answers if a.status_code == 200)


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    from test_targets import TinyYolo, _explainable

    folder = tmp_path_factory.mktemp("detector")
    _explainable(TinyYolo().eval(), folder, "backbone.3")
    path = folder / "explain.onnx"
    with serving(create_app(path, name="yolo", provider="cpu")) as base:
        yield base, onnxcam.Explainer(path, provider="cpu")


def test_detections_come_back_in_the_pixels_of_the_image_as_sent(detector):
    from onnxcam.core import overlay
    from onnxcam.core.images import annotate

    base, explainer = detector
    image = cv2.GaussianBlur(random_images(1, seed=12, size=(64, 48))[0], (9, 9), 0)
    expected = explainer.explain(image, targets=Detection(score_threshold=0.575))
    assert len(expected.boxes) >= 2 and (expected.boxes[:, [1, 3]] > 32).any()  # past the model's 32 x 32
    answer = httpx.post(f"{base}/explain?task=detect&score_threshold=0.575", content=encode_png(image)).json()
    assert answer["top5"] == [] and [m["target"] for m in answer["maps"]] == expected.classes.tolist()
    np.testing.assert_allclose([m["box"] for m in answer["maps"]], expected.boxes, atol=1e-3)
    np.testing.assert_allclose([m["score"] for m in answer["maps"]], expected.scores, rtol=1e-5)
    np.testing.assert_array_equal(np.stack([_grey(m["heatmap_png"]) for m in answer["maps"]]),
                                  _uint8(expected.heatmaps))
    second = httpx.post(f"{base}/explain?task=detect&score_threshold=0.575&ranks=1", content=encode_png(image),
                        headers={"Accept": "image/png"})
    label = f"class {expected.classes[1]} {expected.scores[1]:.2f}"
    drawn = annotate(overlay(image, expected.heatmaps[1]), box=expected.boxes[1], label=label)
    np.testing.assert_array_equal(_rgb(second.content), drawn)  # the second detection's map, box and label
    assert (drawn != overlay(image, expected.heatmaps[1])).any()

    none = httpx.post(f"{base}/explain?task=detect&score_threshold=0.99", content=encode_png(image))
    assert none.status_code == 200 and none.json()["maps"] == [] and none.json()["overlay_png"] is None
    none = httpx.post(f"{base}/explain?task=detect&score_threshold=0.99", content=encode_png(image),
                      headers={"Accept": "image/png"})
    assert none.status_code == 422 and "no map to draw" in none.json()["error"]

    batch = explainer.prepare(image)
    tensors = _outputs(httpx.post(f"{base}/v2/models/yolo/explain", json=_v2(batch, task="detect",
                                                                              score_threshold=0.575)).json())
    np.testing.assert_allclose(tensors["boxes"] * np.array([48, 64, 48, 64]) / 32, expected.boxes, atol=1e-3)
    np.testing.assert_allclose(tensors["heatmaps"], expected.heatmaps, atol=1e-6)


def _rgb(content: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_a_segment_is_drawn_with_its_mask_outline(tmp_path):
    from test_targets import TinySegmenter, _explainable

    from onnxcam.core import overlay
    from onnxcam.core.images import annotate
    from onnxcam.targets import Segmentation

    explainer = _explainable(TinySegmenter().eval(), tmp_path, "encoder.3")
    image = random_images(1, seed=13, size=(50, 70))[0]
    found = [explainer.explain(image, targets=Segmentation(k)) for k in range(4)]
    expected = next(r for r in found if r.masks[0].any())  # a class predicted somewhere
    segment = int(expected.classes[0])
    drawn = annotate(overlay(image, expected.heatmaps[0], 0.5, "jet"), mask=expected.masks[0])
    with serving(create_app(tmp_path / "explain.onnx", name="seg", provider="cpu")) as base:
        answer = httpx.post(f"{base}/explain?task=segment&target={segment}&alpha=0.5", content=encode_png(image),
                            headers={"Accept": "image/png"})
        np.testing.assert_array_equal(_rgb(answer.content), drawn)
        assert (drawn != overlay(image, expected.heatmaps[0], 0.5, "jet")).any()  # the outline is there
        entry = httpx.post(f"{base}/explain?task=segment&target={segment}", content=encode_png(image)).json()["maps"][0]
        assert entry["target"] == segment and entry["score"] == pytest.approx(float(expected.scores[0]), rel=1e-5)


def test_the_batcher_splits_maps_by_image_and_a_bad_target_spares_its_neighbours(explainer):
    """Jobs with several maps per image share one run and get their own maps back; a target that fails once the
    outputs are seen fails its job alone (the others rerun alone); class jobs run apart from target jobs."""
    import asyncio

    from prometheus_client import CollectorRegistry, Histogram

    from onnxcam.core.errors import ExplainError
    from onnxcam.serving.batcher import MicroBatcher

    registry = CollectorRegistry()
    sizes = Histogram("sizes", "images per run", registry=registry)
    batches = [np.random.default_rng(i).standard_normal((n, 3, 32, 32)).astype(np.float32)
               for i, n in enumerate((2, 1, 3, 2))]
    asked = [Classes(3, 0), Classes(1, 9), Classes(top=2), np.array([2, 4])]

    async def submit_all():
        batcher = MicroBatcher(explainer, sizes, max_batch=16, max_wait=0.2, queue_size=8)
        await batcher.start()
        try:
            return await asyncio.gather(*[batcher.submit(b, t, "gradcam") for b, t in zip(batches, asked, strict=True)],
                                        return_exceptions=True)
        finally:
            await batcher.stop(0)

    results = asyncio.run(submit_all())
    assert isinstance(results[1], ExplainError) and "class index 9 is out of range" in str(results[1])
    for index in (0, 2, 3):
        expected = explainer.explain(batches[index], targets=asked[index])
        np.testing.assert_array_equal(results[index].image_index, expected.image_index)
        np.testing.assert_array_equal(results[index].classes, expected.classes)
        np.testing.assert_allclose(results[index].heatmaps, expected.heatmaps, atol=1e-6)
    assert results[0].heatmaps.shape == (4, 32, 32) and results[2].image_index.tolist() == [0, 0, 1, 1, 2, 2]
    # the three target jobs together (6 images), each again alone, and the class job on its own
    assert registry.get_sample_value("sizes_count") == 5 and registry.get_sample_value("sizes_sum") == 6 + 6 + 2
