"""The server under clients that misbehave: oversized bodies sent whole (as urllib does), slow senders, absurd
tensors, missing API keys, SIGTERM mid-load; and the KServe V1 routes."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import random_images

import onnxcam
from onnxcam.core.files import decode_image, encode_png
from onnxcam.serving import create_app, serving


@pytest.fixture(scope="module")
def url(small_onnx):
    app = create_app(small_onnx, name="small", provider="cpu", max_body=2 ** 20, request_timeout=2.0)
    with serving(app) as base:
        yield base


@pytest.fixture(scope="module")
def png():
    return encode_png(random_images(1, seed=3, size=(40, 50))[0])


def _urllib_post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    """POST the way Python's urllib does it: the whole body is written before the answer is read."""
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_oversized_body_gets_413_even_from_a_client_that_sends_it_whole(url):
    status, answer = _urllib_post(f"{url}/explain", b"\0" * (16 * 2 ** 20))
    assert status == 413 and "over the limit of 1048576 bytes" in answer["error"]

    def chunks():  # no Content-Length: the limit is found while reading
        for _ in range(8):
            yield b"\0" * 2 ** 18
    response = httpx.post(f"{url}/explain", content=chunks())
    assert response.status_code == 413
    assert httpx.get(f"{url}/v2/health/live").status_code == 200


def test_a_slow_sender_is_cut_off_by_the_request_timeout(url):
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"POST /explain HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"\0" * 10)
        start = time.monotonic()
        answer = raw.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 408") and time.monotonic() - start < 5


def test_an_answer_later_than_the_request_timeout_is_a_504(small_onnx, png):
    """A lone request is held by the batcher, which waits ten minutes for a batch of two: no answer can come
    before the request's timeout, so it gets a 504 whatever the machine's speed. A second request then fills the
    batch, which runs without the request that went away (one image), and the server goes on."""
    app = create_app(small_onnx, provider="cpu", max_wait_ms=600_000, max_batch=2, request_timeout=2.0)
    with serving(app) as base:
        # the client waits a minute, a tenth of the batcher's hold: an answer at all is one cut short in time
        response = httpx.post(f"{base}/explain", content=png, timeout=60)
        assert response.status_code == 504 and "no answer within 2 s" in response.json()["error"]
        assert _batch_sizes(base) == {}  # the request went away unanswered: nothing has run yet
        follower = httpx.post(f"{base}/explain", content=png, timeout=60)
        assert follower.status_code == 200 and follower.json()["maps"], follower.text
        assert _batch_sizes(base) == {1.0: 1.0}  # one run, of the follower's image alone
        assert httpx.get(f"{base}/v2/health/live").status_code == 200


def _batch_sizes(base: str) -> dict[float, float]:
    """The server's session runs so far, {bucket (at most that many images): runs}, from onnxcam_batch_size."""
    buckets = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("onnxcam_batch_size_bucket") and 'le="+Inf"' not in line:
            buckets[float(line.split('le="')[1].split('"')[0])] = float(line.split()[-1])
    runs, below = {}, 0.0
    for size, cumulative in sorted(buckets.items()):
        if cumulative > below:
            runs[size] = cumulative - below
        below = cumulative
    return runs


def test_a_stalled_oversized_upload_is_cut_off_not_waited_for(url, monkeypatch):
    """An oversized body is drained only while it keeps coming: a sender that stops is let go."""
    from onnxcam.serving import middleware

    monkeypatch.setattr(middleware, "DRAIN_IDLE_SECONDS", 0.5)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(b"POST /explain HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n" + b"\0" * 4096)
        start = time.monotonic()
        answer = raw.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 413") and time.monotonic() - start < 1.5
    assert httpx.get(f"{url}/v2/health/live").status_code == 200


@pytest.mark.parametrize("tensor, message", [
    ({"shape": [10 ** 12, 3, 32, 32], "data": [0.0]}, "1 <= N <= 256"),
    ({"shape": [2, 3, 32, 32], "data": [0.0] * 3072}, "holds 3072 values, shape [2, 3, 32, 32] needs 6144"),
    ({"shape": [1.5, 3, 32, 32], "data": []}, "input shape must be"),
    ({"shape": [1, 3, 32, 32], "data": [[0.0]] * 3072}, "flat list of numbers"),
    ({"shape": [1, 3, 32, 32], "data": "x" * 3072}, "a flat list"),
])
def test_claimed_shapes_are_checked_before_allocation(url, tensor, message):
    body = {"inputs": [{"name": "input", "datatype": "FP32", **tensor}]}
    response = httpx.post(f"{url}/v2/models/small/infer", json=body)
    assert response.status_code == 400 and message in response.json()["error"], response.text


def test_kserve_v1_predict_and_explain(url, small_onnx, png):
    explainer = onnxcam.Explainer(small_onnx, provider="cpu")
    batch = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    assert httpx.get(f"{url}/v1/models").json() == {"models": ["small"]}
    assert httpx.get(f"{url}/v1/models/small").json() == {"name": "small", "ready": True}
    predictions = httpx.post(f"{url}/v1/models/small:predict", json={"instances": batch.tolist()}).json()["predictions"]
    expected = explainer.explain(batch, "gradcam")
    np.testing.assert_allclose([p["scores"] for p in predictions], expected.logits, rtol=1e-5)
    assert [p["class"] for p in predictions] == expected.logits.argmax(1).tolist()

    body = {"instances": [{"b64": base64.b64encode(png).decode()}], "parameters": {"method": "layercam", "target": 4}}
    answer = httpx.post(f"{url}/v1/models/small:explain", json=body).json()
    reference = explainer.explain(decode_image(png), "layercam", 4)
    (explanation,) = answer["explanations"]
    assert explanation["target"] == 4 and explanation["target_label"] == "class 4"
    np.testing.assert_allclose(explanation["heatmap"], reference.heatmaps[0], atol=1e-6)
    np.testing.assert_allclose(answer["predictions"][0]["scores"], reference.logits[0], rtol=1e-5)


@pytest.mark.parametrize("path, body, status, message", [
    ("/v1/models/other:predict", {"instances": [[0]]}, 404, "unknown model 'other'"),
    ("/v1/models/small:predict", {"instances": []}, 400, "1 to 256 instances"),
    ("/v1/models/small:predict", {"instances": [[[0.0] * 32] * 32]}, 400, "3 x 32 x 32 nested list"),
    ("/v1/models/small:predict", {"instances": [{"b64": "!!"}]}, 400, "not base64"),
    ("/v1/models/small:explain", {"instances": [{"b64": "aGVsbG8="}]}, 400, "instance 0: not a PNG"),
    ("/v1/models/small:explain", {"instances": [{"b64": "aGVsbG8="}], "parameters": {"method": "x"}}, 400,
     "unknown method 'x'"),
])
def test_kserve_v1_bad_requests(url, path, body, status, message):
    response = httpx.post(f"{url}{path}", json=body)
    assert response.status_code == status and message in response.json()["error"], response.text


def test_api_key_guards_all_but_health_and_metrics(small_onnx, png):
    with serving(create_app(small_onnx, provider="cpu", api_key="s3cret", max_body=2 ** 20)) as base:
        assert httpx.get(f"{base}/v2/health/live").status_code == 200
        assert httpx.get(f"{base}/v2/health/ready").status_code == 200
        assert httpx.get(f"{base}/metrics").status_code == 200
        for path in ("/", "/v2/models/small", "/v1/models"):
            assert httpx.get(f"{base}{path}").status_code == 401
        missing = httpx.post(f"{base}/explain", content=png)
        assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]
        wrong = httpx.post(f"{base}/explain", content=png, headers={"Authorization": "Bearer s3crex"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "wrong API key"
        status, _ = _urllib_post(f"{base}/explain", png * 100)  # refused, the body drained: a clean 401
        assert status == 401
        good = httpx.post(f"{base}/explain", content=png, headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sigterm_answers_accepted_requests_and_warns_without_a_key(small_onnx, png):
    """`onnxcam serve` on all addresses without a key warns; on SIGTERM readiness turns false first, the
    requests in flight are all answered at once (the batcher held them, waiting 10 minutes for a batch of 64),
    then a second SIGTERM ends the drain delay and the process exits cleanly. Nothing depends on timing."""
    port = _free_port()
    env = {**os.environ, "ONNXCAM_API_KEY": ""}
    server = subprocess.Popen([sys.executable, "-m", "onnxcam", "serve", str(small_onnx), "--host", "0.0.0.0",
                               "--port", str(port), "--provider", "cpu", "--max-batch", "64", "--max-wait-ms", "600000",
                               "--drain-delay", "600"],
                              stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(base, server)
        with ThreadPoolExecutor(12) as pool:
            calls = [pool.submit(httpx.post, f"{base}/explain", content=png, timeout=60) for _ in range(12)]
            _wait_in_flight(base, 12)  # the batcher holds them all
            server.send_signal(signal.SIGTERM)
            assert httpx.get(f"{base}/v2/health/ready").status_code == 503
            statuses = [call.result().status_code for call in calls]
        assert statuses == [200] * 12
        server.send_signal(signal.SIGTERM)  # the end of the drain delay
        assert server.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
    finally:
        server.kill()
        stderr = server.stderr.read()
    assert "without an API key" in stderr and "Traceback" not in stderr


def _wait_ready(base: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base}/v2/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become ready")


def _wait_in_flight(base: str, count: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(f"{base}/metrics").text
        value = float(next(line.split()[-1] for line in text.splitlines()
                           if line.startswith("onnxcam_requests_in_flight")))
        if value >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"fewer than {count} requests in flight")
