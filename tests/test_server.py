"""The explanation server, served by uvicorn on loopback and used over real HTTP (and by a browser)."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import cv2
import httpx
import numpy as np
import pytest
from conftest import random_images

import onnxcam
from onnxcam.core.files import encode_png
from onnxcam.serving import create_app, serving


@pytest.fixture(scope="module")
def url(small_onnx):
    with serving(create_app(small_onnx, name="small", provider="cpu", max_body=2 ** 20)) as base:
        yield base


@pytest.fixture(scope="module")
def png():
    return encode_png(random_images(1, seed=7, size=(45, 60))[0])


def _tensor(batch):
    tensor = {"name": "input", "shape": list(batch.shape), "datatype": "FP32", "data": batch.ravel().tolist()}
    return {"inputs": [tensor]}


def test_health_and_metadata(url):
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    meta = httpx.get(f"{url}/v2/models/small").json()
    assert meta["name"] == "small"
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}
    assert meta["outputs"][0]["shape"] == [-1, 5]
    missing = httpx.get(f"{url}/v2/models/other")
    assert missing.status_code == 404 and "unknown model 'other'" in missing.json()["error"]


def test_infer_and_explain_tensors_match_the_python_api(url, small_onnx):
    batch = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    expected = onnxcam.Explainer(small_onnx, provider="cpu").explain(batch, method="xgradcam", targets=[1, 3])
    infer = httpx.post(f"{url}/v2/models/small/infer", json=_tensor(batch)).json()
    assert infer["outputs"][0]["shape"] == [2, 5]
    np.testing.assert_allclose(np.reshape(infer["outputs"][0]["data"], (2, 5)), expected.logits, rtol=1e-5)
    body = {**_tensor(batch), "parameters": {"method": "xgradcam", "target": [1, 3]}}
    outputs = {o["name"]: o for o in httpx.post(f"{url}/v2/models/small/explain", json=body).json()["outputs"]}
    np.testing.assert_allclose(np.reshape(outputs["heatmaps"]["data"], (2, 32, 32)), expected.heatmaps, atol=1e-6)
    assert outputs["targets"]["data"] == [1, 3]


@pytest.mark.parametrize("body, status, message", [
    ({"inputs": [{"name": "input", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": [0.0] * 768}]}, 400,
     "input shape must be [N, 3, 32, 32]"),
    ({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "INT8", "data": [0] * 3072}]}, 400,
     "input datatype must be FP32"),
    ({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 5}]}, 400,
     "input data holds 5 values"),
    ({"nothing": 1}, 400, "expected {'inputs'"),
    ({**_tensor(np.zeros((1, 3, 32, 32), np.float32)), "parameters": {"target": 9}}, 400,
     "class index 9 is out of range"),
    ({**_tensor(np.zeros((1, 3, 32, 32), np.float32)), "parameters": {"method": "magic"}}, 400,
     "unknown method 'magic'"),
])
def test_bad_tensor_requests_get_400(url, body, status, message):
    response = httpx.post(f"{url}/v2/models/small/explain", json=body)
    assert response.status_code == status and message in response.json()["error"]


def test_explain_image_as_png_and_json(url, png):
    picture = httpx.post(f"{url}/explain?method=gradcam%2B%2B&alpha=0.5", content=png, headers={"Accept": "image/png"})
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert cv2.imdecode(np.frombuffer(picture.content, np.uint8), cv2.IMREAD_COLOR).shape == (45, 60, 3)
    answer = httpx.post(f"{url}/explain?target=2", files={"file": ("x.png", png, "image/png")},
                        headers={"Accept": "application/json"}).json()
    assert answer["target"] == 2 and answer["target_label"] == "class 2" and len(answer["top5"]) == 5
    heat = cv2.imdecode(np.frombuffer(base64.b64decode(answer["heatmap_png"]), np.uint8), cv2.IMREAD_GRAYSCALE)
    assert heat.shape == (32, 32) and heat.max() == 255


def test_bad_images_get_400_and_the_server_stays_up(url, png):
    huge = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (70000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"
            + b"\0" * 40)
    for body, message in [(png[:100], "truncated PNG"), (b"hello", "not a PNG, JPEG"), (b"", "empty"),
                          (huge, "refusing a 70000 x 70000 image")]:
        response = httpx.post(f"{url}/explain", content=body)
        assert response.status_code == 400 and message in response.json()["error"], response.text
    too_big = httpx.post(f"{url}/explain", content=b"\0" * (2 ** 20 + 1))
    assert too_big.status_code == 413
    assert httpx.post(f"{url}/explain?method=nope", content=png).status_code == 400
    assert httpx.get(f"{url}/v2/health/live").status_code == 200


def test_load_is_micro_batched(url, png):
    """16 clients x 10 requests on loopback: all answered, and requests share session runs."""
    def client(_):
        with httpx.Client(timeout=60) as session:
            return [session.post(f"{url}/explain", content=png, headers={"Accept": "image/png"}).status_code
                    for _ in range(10)]
    before = _batch_histogram(url)
    with ThreadPoolExecutor(16) as pool:
        statuses = [s for batch in pool.map(client, range(16)) for s in batch]
    assert statuses == [200] * 160
    runs, images = (a - b for a, b in zip(_batch_histogram(url), before, strict=True))
    assert images == 160 and runs < 160  # fewer session runs than requests: batching happened


def _batch_histogram(url):
    text = httpx.get(f"{url}/metrics").text
    def value(name: str) -> float:
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))
    return value("onnxcam_batch_size_count"), value("onnxcam_batch_size_sum")


def test_full_queue_answers_503_at_once(small_onnx, png):
    app = create_app(small_onnx, provider="cpu", queue_size=1, max_batch=1, max_wait_ms=0)
    with serving(app) as base:
        def call(_):
            return httpx.post(f"{base}/explain", content=png, timeout=60).status_code
        with ThreadPoolExecutor(24) as pool:
            statuses = list(pool.map(call, range(48)))
        assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses
        assert httpx.get(f"{base}/v2/health/live").status_code == 200
        metrics = httpx.get(f"{base}/metrics").text
        assert 'onnxcam_requests_total{route="/explain",status="503"}' in metrics

