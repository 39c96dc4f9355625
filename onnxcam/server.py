"""An embeddable ASGI explanation server (the `serve` extra): Open Inference Protocol routes, an image
route for people, a web page, micro-batching and Prometheus metrics.

    app = create_app("model.onnx")        # mount it in another Starlette/FastAPI app, or:
    onnxcam serve model.onnx --port 8000
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .core import COLORMAPS, overlay
from .explainer import ALL_METHODS, ROLLOUT_METHODS, ExplainError, Explainer, top_classes
from .images import MAX_PIXELS, ImageError, decode_image, encode_png

DATATYPES = {"FP32": np.float32, "INT64": np.int64}


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    batch: np.ndarray
    classes: np.ndarray
    method: str
    future: asyncio.Future


class MicroBatcher:
    """Requests that arrive together run as one session: up to `max_batch` images, waiting at most
    `max_wait` seconds after the first. The queue is bounded; a full queue refuses at once (503)."""

    def __init__(self, explainer: Explainer, metrics: "Metrics", max_batch: int, max_wait: float, queue_size: int):
        self.explainer, self.metrics = explainer, metrics
        self.max_batch, self.max_wait = max_batch, max_wait
        self.queue: asyncio.Queue[Job] | None = None
        self.queue_size = queue_size
        self.worker: asyncio.Task | None = None

    async def start(self):
        self.queue = asyncio.Queue(self.queue_size)
        self.worker = asyncio.create_task(self._work())

    async def stop(self):
        if self.worker:
            self.worker.cancel()

    async def submit(self, batch: np.ndarray, classes: np.ndarray, method: str):
        job = Job(batch, classes, method, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise HTTPError(503, "server busy: the request queue is full, try again") from None
        return await job.future

    async def _work(self):
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while sum(len(j.batch) for j in jobs) < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            for method in dict.fromkeys(j.method for j in jobs):
                group = [j for j in jobs if j.method == method]
                await self._run(loop, method, group)

    async def _run(self, loop, method, jobs):
        batch = np.concatenate([j.batch for j in jobs])
        classes = np.concatenate([j.classes for j in jobs])
        self.metrics.batch_size.observe(len(batch))
        try:
            result = await loop.run_in_executor(None, lambda: self.explainer.explain(batch, method, classes))
        except Exception as error:  # one bad batch must not stop the worker
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        start = 0
        for job in jobs:
            end = start + len(job.batch)
            if not job.future.done():
                job.future.set_result((result.logits[start:end], result.heatmaps[start:end], result.targets[start:end]))
            start = end


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("onnxcam_requests", "Requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.batch_size = Histogram("onnxcam_batch_size", "Images per session run", buckets=(1, 2, 4, 8, 16, 32, 64),
                                    registry=self.registry)
        self.latency = Histogram("onnxcam_request_seconds", "Request latency", ["route"], registry=self.registry)


def create_app(model_path, *, name: str | None = None, provider: str = "auto", max_batch: int = 8,
               max_wait_ms: float = 5.0, queue_size: int = 64, max_body: int = 32 * 2 ** 20,
               max_pixels: int = MAX_PIXELS) -> Starlette:
    """The ASGI application serving one explainable model."""
    explainer = Explainer(model_path, provider=provider)
    spec = explainer.spec
    name = name or Path(model_path).name.split(".")[0]
    metrics = Metrics()
    batcher = MicroBatcher(explainer, metrics, max_batch, max_wait_ms / 1000, queue_size)
    channels = len(spec.mean) if spec.mean else 3

    def model_or_404(request: Request):
        if request.path_params["name"] != name:
            raise HTTPError(404, f"unknown model '{request.path_params['name']}'; this server has '{name}'")

    async def body_of(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body:
            raise HTTPError(413, f"request body over the limit of {max_body} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise HTTPError(413, f"request body over the limit of {max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def class_indices(target, count: int) -> np.ndarray:
        try:
            return explainer.class_indices(None if target in (None, "") else target, count)
        except (ExplainError, ValueError, TypeError) as error:
            raise HTTPError(400, str(error)) from None

    def method_of(value: str | None) -> str:
        method = value or "gradcam"
        if method not in ALL_METHODS:
            raise HTTPError(400, f"unknown method '{method}'; choose from {', '.join(ALL_METHODS)}")
        return method

    async def live(request):
        return JSONResponse({"live": True})

    async def ready(request):
        return JSONResponse({"ready": batcher.worker is not None and not batcher.worker.done()})

    async def metadata(request):
        model_or_404(request)
        height, width = spec.input_size
        return JSONResponse({
            "name": name, "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": spec.input, "datatype": "FP32", "shape": [-1, channels, height, width]}],
            "outputs": [{"name": spec.scores, "datatype": "FP32", "shape": [-1, spec.num_classes]},
                        {"name": "heatmaps", "datatype": "FP32", "shape": [-1, height, width]},
                        {"name": "targets", "datatype": "INT64", "shape": [-1]}],
            "parameters": {"methods": list(ALL_METHODS), "labels": bool(spec.labels)},
        })

    def tensor_input(payload) -> np.ndarray:
        """The request's one input tensor, checked against the model's name, datatype and shape."""
        try:
            inputs = payload["inputs"]
            (tensor,) = [t for t in inputs if t.get("name") == spec.input] or inputs[:1]
            shape, datatype, data = tensor["shape"], tensor["datatype"], tensor["data"]
        except (KeyError, TypeError, ValueError):
            raise HTTPError(400, f"expected {{'inputs': [{{'name': '{spec.input}', 'shape', 'datatype', 'data'}}]}}")
        height, width = spec.input_size
        if datatype != "FP32":
            raise HTTPError(400, f"input datatype must be FP32, got {datatype}")
        if not (isinstance(shape, list) and len(shape) == 4 and shape[1:] == [channels, height, width] and shape[0] >= 1):
            raise HTTPError(400, f"input shape must be [N, {channels}, {height}, {width}], got {shape}")
        try:
            array = np.asarray(data, dtype=np.float32)
        except (TypeError, ValueError):
            raise HTTPError(400, "input data must be a flat list of numbers") from None
        if array.size != int(np.prod(shape)):
            raise HTTPError(400, f"input data holds {array.size} values, shape {shape} needs {int(np.prod(shape))}")
        return array.reshape(shape)

    def tensor(name_, array, datatype):
        return {"name": name_, "shape": list(array.shape), "datatype": datatype, "data": array.ravel().tolist()}

    async def infer(request, explain: bool):
        model_or_404(request)
        try:
            payload = json.loads(await body_of(request))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HTTPError(400, "the body is not JSON") from None
        batch = tensor_input(payload)
        parameters = payload.get("parameters") or {}
        method = method_of(parameters.get("method")) if explain else "gradcam"
        classes = class_indices(parameters.get("target"), len(batch))
        logits, heatmaps, targets = await batcher.submit(batch, classes, method)
        outputs = [tensor(spec.scores, logits, "FP32")]
        if explain:
            outputs += [tensor("heatmaps", heatmaps, "FP32"), tensor("targets", targets, "INT64")]
        return JSONResponse({"model_name": name, "model_version": "1", "outputs": outputs})

    async def image_of(request: Request) -> np.ndarray:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_part_size=max_body)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPError(400, "multipart body without a file field named 'file'")
            data = await upload.read()
        else:
            data = await body_of(request)
        try:
            return await run_in_threadpool(decode_image, data, "request body", max_pixels)
        except ImageError as error:
            raise HTTPError(400, str(error)) from None

    async def explain_image(request):
        query = request.query_params
        method = method_of(query.get("method"))
        try:
            alpha = float(query.get("alpha", 0.4))
        except ValueError:
            raise HTTPError(400, "alpha must be a number") from None
        colormap = query.get("colormap", "jet")
        if not 0 <= alpha <= 1 or colormap not in COLORMAPS:
            raise HTTPError(400, f"alpha must lie in [0, 1] and colormap be one of {', '.join(COLORMAPS)}")
        image = await image_of(request)
        classes = class_indices(query.get("target"), 1)
        # pixel work runs in worker threads (OpenCV releases the GIL): the event loop stays free
        batch = await run_in_threadpool(explainer.prepare, image)
        logits, heatmaps, targets = await batcher.submit(batch, classes, method)
        picture = await run_in_threadpool(lambda: encode_png(overlay(image, heatmaps[0], alpha=alpha, colormap=colormap)))
        if "image/png" in request.headers.get("accept", ""):
            return Response(picture, media_type="image/png")
        result = top_classes(logits, 5, explainer.labels)[0]
        grey = np.repeat((heatmaps[0] * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
        heat = await run_in_threadpool(encode_png, grey)
        return JSONResponse({"method": method, "target": int(targets[0]),
                             "target_label": explainer.labels[int(targets[0])] if explainer.labels else None,
                             "top5": result, "overlay_png": base64.b64encode(picture).decode(),
                             "heatmap_png": base64.b64encode(heat).decode()})

    page_html = resources.files("onnxcam").joinpath("page.html").read_text().replace(
        "__METHODS__", json.dumps([m for m in ALL_METHODS if spec.attentions or m not in ROLLOUT_METHODS]))

    async def page(request):
        return HTMLResponse(page_html)

    async def metrics_route(request):
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def handler(route: str, function):
        async def handle(request):
            start = time.perf_counter()
            try:
                response = await function(request)
            except HTTPError as error:
                response = JSONResponse({"error": str(error)}, status_code=error.status)
            except ExplainError as error:
                response = JSONResponse({"error": str(error)}, status_code=400)
            metrics.requests.labels(route, str(response.status_code)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)
            return response
        return handle

    routes = [
        Route("/", handler("/", page)),
        Route("/v2/health/live", handler("live", live)),
        Route("/v2/health/ready", handler("ready", ready)),
        Route("/v2/models/{name}", handler("metadata", metadata)),
        Route("/v2/models/{name}/infer", handler("infer", lambda r: infer(r, explain=False)), methods=["POST"]),
        Route("/v2/models/{name}/explain", handler("explain", lambda r: infer(r, explain=True)), methods=["POST"]),
        Route("/explain", handler("/explain", explain_image), methods=["POST"]),
        Route("/metrics", metrics_route),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.explainer, app.state.model_name, app.state.metrics = explainer, name, metrics
    return app


@contextlib.contextmanager
def serving(app, host: str = "127.0.0.1", port: int = 0):
    """Serve `app` with uvicorn in a background thread (port 0: a free one); yields the base URL."""
    import socket
    import threading

    import uvicorn

    if port == 0:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
