"""The routes: health, the Open Inference (V2) and KServe V1 protocols, `POST /explain` for an encoded image,
the web page and the metrics. Errors are raised (HTTPError, OnnxcamError) and answered by the app's
exception handlers."""

from __future__ import annotations

import base64
import json
from importlib import resources

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..core import COLORMAPS, overlay, top_classes
from ..core.errors import OnnxcamError
from ..core.files import decode_image, encode_png
from ..core.images import annotate
from ..explainer import Explainer
from ..explanation import Explanation
from ..methods import METHODS
from . import protocol
from .batcher import MicroBatcher
from .middleware import Metrics
from .protocol import HTTPError


class Service:
    """One explainable model behind the routes."""

    def __init__(self, explainer: Explainer, name: str, batcher: MicroBatcher, metrics: Metrics, max_body: int,
                 max_pixels: int):
        self.explainer, self.spec, self.name = explainer, explainer.spec, name
        self.batcher, self.metrics = batcher, metrics
        self.max_body, self.max_pixels = max_body, max_pixels
        self.draining = False  # set on SIGTERM: readiness turns false while accepted requests are answered
        reasons = explainer.capabilities()  # per method: None where this file supports it, else why not
        self.methods = [method for method, reason in reasons.items() if reason is None]
        unavailable = {method: reason for method, reason in reasons.items() if reason is not None}
        self.task = task_of(explainer)
        config = {"methods": self.methods, "unavailable": unavailable, "model": name, "task": self.task}
        self.page_html = resources.files(__package__).joinpath("page.html").read_text().replace(
            "__CONFIG__", json.dumps(config))

    def routes(self) -> list[Route]:
        return [
            Route("/", self.page, name="/"),
            Route("/v2/health/live", self.live, name="live"),
            Route("/v2/health/ready", self.ready, name="ready"),
            Route("/v2/models/{name}", self.metadata, name="metadata"),
            Route("/v2/models/{name}/infer", self.infer_v2, methods=["POST"], name="infer"),
            Route("/v2/models/{name}/explain", self.explain_v2, methods=["POST"], name="explain"),
            Route("/v1/models", self.models_v1, name="v1 models"),
            Route("/v1/models/{name}", self.model_v1, name="v1 model"),
            Route("/v1/models/{name}:predict", self.predict_v1, methods=["POST"], name="v1 predict"),
            Route("/v1/models/{name}:explain", self.explain_v1, methods=["POST"], name="v1 explain"),
            Route("/explain", self.explain_image, methods=["POST"], name="/explain"),
            Route("/metrics", self.metrics_route),
        ]

    # checks shared by the routes
    def model_or_404(self, request: Request) -> None:
        if request.path_params["name"] != self.name:
            raise HTTPError(404, f"unknown model '{request.path_params['name']}'; this server has '{self.name}'")

    def method_of(self, value) -> str:
        method = value or "gradcam"
        if method not in METHODS:
            raise HTTPError(400, f"unknown method '{method}'; choose from {', '.join(METHODS)}")
        return method

    async def json_of(self, request: Request):
        self.model_or_404(request)
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HTTPError(400, "the body is not JSON") from None

    async def run(self, asked: protocol.Request, explain: bool) -> tuple[str, Explanation]:
        """(method, explanation) for a parsed request, through the micro-batcher; boxes in the pixels of the
        images as sent."""
        method = self.method_of(asked.method) if explain else "gradcam"
        batch, sizes = asked.batch, None
        if batch is None:
            images = [await run_in_threadpool(decode_image, data, f"instance {i}", self.max_pixels)
                      for i, data in enumerate(asked.images)]
            sizes = [image.shape[:2] for image in images]
            batch = await run_in_threadpool(self.explainer.prepare, images)
        targets = protocol.checked_targets(asked.parameters if explain else {}, self.explainer, len(batch))
        result = await self.batcher.submit(batch, targets, method)
        return method, protocol.in_image_pixels(result, sizes, self.spec.input_size)

    # health, metadata, metrics, page
    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self.batcher.running and not self.draining
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def metadata(self, request: Request) -> Response:
        self.model_or_404(request)
        return JSONResponse(protocol.v2_metadata(self.name, self.spec, list(METHODS)))

    async def metrics_route(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def page(self, request: Request) -> Response:
        return HTMLResponse(self.page_html)

    # Open Inference Protocol (V2)
    async def infer_v2(self, request: Request) -> Response:
        _, result = await self.run(protocol.parse_v2(await self.json_of(request), self.spec), explain=False)
        return JSONResponse(protocol.v2_response(self.name, self.spec, result.logits))

    async def explain_v2(self, request: Request) -> Response:
        asked = protocol.parse_v2(await self.json_of(request), self.spec)
        _, result = await self.run(asked, explain=True)
        return JSONResponse(protocol.v2_response(self.name, self.spec, result.logits, result))

    # KServe V1
    async def models_v1(self, request: Request) -> Response:
        return JSONResponse({"models": [self.name]})

    async def model_v1(self, request: Request) -> Response:
        self.model_or_404(request)
        return JSONResponse({"name": self.name, "ready": self.batcher.running and not self.draining})

    async def predict_v1(self, request: Request) -> Response:
        _, result = await self.run(protocol.parse_v1(await self.json_of(request), self.spec), explain=False)
        return JSONResponse({"predictions": protocol.v1_predictions(result.logits, self.explainer.labels)})

    async def explain_v1(self, request: Request) -> Response:
        asked = protocol.parse_v1(await self.json_of(request), self.spec)
        method, result = await self.run(asked, explain=True)
        labels = self.explainer.labels
        return JSONResponse({"predictions": protocol.v1_predictions(result.logits, labels),
                             "explanations": protocol.v1_explanations(result.heatmaps, result.classes, method, labels,
                                                                      result)})

    # an encoded image, for people and the page
    async def image_of(self, request: Request) -> np.ndarray:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_part_size=self.max_body)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise HTTPError(400, "multipart body without a file field named 'file'")
            data = await upload.read()
        else:
            data = await request.body()
        return await run_in_threadpool(decode_image, data, "request body", self.max_pixels)

    async def explain_image(self, request: Request) -> Response:
        """One encoded image: the first map's overlay (Accept: image/png), or JSON with every map's overlay and
        heatmap (base64 PNGs), class, score and box. Targets as query parameters: `target` (repeatable, or
        comma-separated: several classes), `top`, `task`, `score_threshold`, `concept`, `output`, `ranks`."""
        query = request.query_params
        method = self.method_of(query.get("method"))
        try:
            alpha = float(query.get("alpha", 0.4))
        except ValueError:
            raise HTTPError(400, "alpha must be a number") from None
        colormap = query.get("colormap", "jet")
        if not 0 <= alpha <= 1 or colormap not in COLORMAPS:
            raise HTTPError(400, f"alpha must lie in [0, 1] and colormap be one of {', '.join(COLORMAPS)}")
        image = await self.image_of(request)
        targets = protocol.checked_targets(query_parameters(query), self.explainer, 1)
        # pixel work runs in worker threads (OpenCV releases the GIL): the event loop stays free
        batch = await run_in_threadpool(self.explainer.prepare, image)
        result = protocol.in_image_pixels(await self.batcher.submit(batch, targets, method), [image.shape[:2]],
                                          self.spec.input_size)
        labels = self.explainer.labels
        if "image/png" in request.headers.get("accept", ""):
            if not len(result.heatmaps):
                raise HTTPError(422, "no map to draw: this target gives none for this image (for detections: "
                                     "nothing scored at least the score threshold)")
            picture = await run_in_threadpool(lambda: encode_png(drawn(image, result, 0, labels, alpha, colormap)))
            return Response(picture, media_type="image/png")
        maps = await run_in_threadpool(lambda: [map_entry(image, result, row, labels, alpha, colormap)
                                                for row in range(len(result.heatmaps))])
        first = maps[0] if maps else {"target": None, "target_label": None, "overlay_png": None, "heatmap_png": None}
        top5 = top_classes(result.logits, min(5, result.logits.shape[1]), labels)[0] if self.task == "classify" else []
        return JSONResponse({"method": method, "target": first["target"], "target_label": first["target_label"],
                             "top5": top5, "overlay_png": first["overlay_png"], "heatmap_png": first["heatmap_png"],
                             "maps": maps})


def task_of(explainer: Explainer) -> str:
    """What the file's score output holds, by its rank: classify (B x K), detect (a head, B x rows x columns),
    segment (B x K x h x w)."""
    shapes = {output.name: output.shape for output in explainer.session.get_outputs()}
    rank = len(shapes.get(explainer.spec.scores) or [None, None])
    return {3: "detect", 4: "segment"}.get(rank, "classify")


def query_parameters(query) -> dict:
    """A query string's target parameters; for one image, several `target`s are several classes."""
    parameters = {name: query[name] for name in protocol.TARGET_OPTIONS if name in query}
    classes = [part for value in query.getlist("target") for part in value.split(",") if part.strip()]
    if len(classes) == 1 and "classes" not in parameters:
        parameters["target"] = classes[0]
    elif classes:
        parameters["classes"] = ",".join([*classes, parameters.get("classes", "")])
    return parameters


def drawn(image: np.ndarray, result: Explanation, row: int, labels, alpha: float, colormap: str) -> np.ndarray:
    """Map `row`'s overlay on the image, with its detection's box and label, or its segment's mask outline."""
    picture = overlay(image, result.heatmaps[row], alpha, colormap)
    target = int(result.classes[row])
    if protocol.has_boxes(result):
        name = protocol.label_of(target, labels) or f"class {target}"
        score = f" {result.scores[row]:.2f}" if result.scores is not None else ""
        picture = annotate(picture, box=result.boxes[row], label=name + score)
    if result.masks is not None:
        picture = annotate(picture, mask=result.masks[row])
    return picture


def map_entry(image: np.ndarray, result: Explanation, row: int, labels, alpha: float, colormap: str) -> dict:
    """One map of the image route's JSON answer."""
    target = int(result.classes[row])
    grey = np.repeat((result.heatmaps[row] * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=2)
    entry = {"target": target, "target_label": protocol.label_of(target, labels),
             "overlay_png": base64.b64encode(encode_png(drawn(image, result, row, labels, alpha, colormap))).decode(),
             "heatmap_png": base64.b64encode(encode_png(grey)).decode()}
    if result.scores is not None:
        entry["score"] = float(result.scores[row])
    if protocol.has_boxes(result):
        entry["box"] = result.boxes[row].tolist()
    return entry


async def http_error(request: Request, error: Exception) -> Response:
    return JSONResponse({"error": str(error)}, status_code=getattr(error, "status", 400))


EXCEPTION_HANDLERS = {HTTPError: http_error, OnnxcamError: http_error}  # OnnxcamError: the asker's mistake
