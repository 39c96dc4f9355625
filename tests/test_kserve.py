"""onnxcam.kserve under KServe's own ModelServer, started as a KServe container starts it, on loopback."""

from __future__ import annotations

import base64
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from conftest import random_images

import onnxcam
from onnxcam.core.files import decode_image, encode_png
from onnxcam.targets import Classes

pytest.importorskip("kserve")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def url(small_onnx):
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "onnxcam.kserve", "--model_name", "small", "--model_path",
                               str(small_onnx), "--provider", "cpu", "--http_port", str(port), "--grpc_port",
                               str(_free_port()), "--enable_grpc", "false", "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            try:
                if httpx.get(f"{base}/v1/models/small").json().get("ready"):
                    break
            except (httpx.TransportError, ValueError):
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"KServe's ModelServer did not start: {server.stderr.read()[-2000:]}")
            time.sleep(0.3)
        yield base
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_predict_under_kserves_model_server(url, small_onnx):
    batch = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
    answer = httpx.post(f"{url}/v1/models/small:predict", json={"instances": batch.tolist()}, timeout=60).json()
    expected = onnxcam.Explainer(small_onnx, provider="cpu").explain(batch)
    np.testing.assert_allclose([p["scores"] for p in answer["predictions"]], expected.logits, rtol=1e-5)
    assert [p["label"] for p in answer["predictions"]] == [f"class {c}" for c in expected.logits.argmax(1)]


def test_explain_under_kserves_model_server(url, small_onnx):
    png = encode_png(random_images(1, seed=9, size=(36, 44))[0])
    body = {"instances": [{"b64": base64.b64encode(png).decode()}], "parameters": {"method": "gradcam++", "target": 2}}
    answer = httpx.post(f"{url}/v1/models/small:explain", json=body, timeout=60).json()
    expected = onnxcam.Explainer(small_onnx, provider="cpu").explain(decode_image(png), "gradcam++", 2)
    (explanation,) = answer["explanations"]
    assert explanation["target"] == 2 and explanation["method"] == "gradcam++"
    np.testing.assert_allclose(explanation["heatmap"], expected.heatmaps[0], atol=1e-6)


def test_explain_takes_the_servers_targets_under_kserve(url, small_onnx):
    """`top` (as the CLI's --top): every instance's two best classes, each map naming its instance; with a family
    method too."""
    images = random_images(2, seed=4, size=(30, 40))
    body = {"instances": [{"b64": base64.b64encode(encode_png(image)).decode()} for image in images],
            "parameters": {"method": "scorecam", "top": 2}}
    answer = httpx.post(f"{url}/v1/models/small:explain", json=body, timeout=60).json()
    expected = onnxcam.Explainer(small_onnx, provider="cpu").explain(images, "scorecam", Classes(top=2))
    assert [(e["instance"], e["target"]) for e in answer["explanations"]] == list(
        zip(expected.image_index.tolist(), expected.classes.tolist(), strict=True))
    assert len(answer["explanations"]) == 4
    np.testing.assert_allclose([e["heatmap"] for e in answer["explanations"]], expected.heatmaps, atol=1e-6)
    np.testing.assert_allclose([e["score"] for e in answer["explanations"]], expected.scores, rtol=1e-6)


@pytest.mark.parametrize("body, message", [
    ({"instances": [{"b64": "aGVsbG8="}]}, "not a PNG"),
    ({"instances": [[0.0]]}, "3 x 32 x 32 nested list"),
    ({"instances": [[[[0.0] * 32] * 32] * 3], "parameters": {"target": 7}}, "class index 7 is out of range"),
])
def test_bad_requests_get_400_from_kserve(url, body, message):
    response = httpx.post(f"{url}/v1/models/small:explain", json=body, timeout=60)
    assert response.status_code == 400 and message in response.text, response.text
