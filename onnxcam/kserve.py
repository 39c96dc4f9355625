"""Explanations under KServe's own ModelServer: a `kserve.Model` whose `predict` and `explain` speak KServe's
V1 protocol (`POST /v1/models/NAME:predict` and `:explain`), packaged as a custom predictor or explainer of an
InferenceService (the README gives the YAML).

    python -m onnxcam.kserve --model_name lite0 --model_path /mnt/models/lite0.onnx

Instances are C x H x W nested lists of preprocessed numbers or encoded images as `{"b64": ...}`; the request's
`parameters` may name the `method` and the targets, as the built-in server's V1 routes take them
(serving.protocol.targets_of: `target`, `classes`, `top`, `task`, ...); each explanation names its instance.
Needs the `kserve` extra.
"""

from __future__ import annotations

import argparse
import asyncio

import kserve
from kserve.errors import InvalidInput

from .core.errors import OnnxcamError
from .core.files import MAX_PIXELS, decode_image
from .explainer import Explainer
from .methods import METHODS
from .runtimes import PROVIDER_CHOICES
from .serving import protocol


class ExplainerModel(kserve.Model):
    """One explainable ONNX file behind KServe's V1 `predict` and `explain` verbs."""

    def __init__(self, name: str, model_path: str, provider: str = "auto", max_pixels: int = MAX_PIXELS):
        super().__init__(name)
        self.model_path, self.provider, self.max_pixels = model_path, provider, max_pixels
        self.explainer: Explainer | None = None
        self.load()

    def load(self) -> bool:
        self.explainer = Explainer(self.model_path, provider=self.provider)
        self.ready = True
        return self.ready

    def _answer(self, payload, explain: bool) -> dict:
        explainer = self.explainer
        if not isinstance(payload, dict):
            raise InvalidInput("this model speaks KServe's V1 protocol: POST {'instances': [...]} to :predict or "
                               ":explain")
        try:
            asked = protocol.parse_v1(payload, explainer.spec)
            method = asked.method or "gradcam"
            if explain and method not in METHODS:
                raise InvalidInput(f"unknown method '{method}'; choose from {', '.join(METHODS)}")
            batch, sizes = asked.batch, None
            if batch is None:
                images = [decode_image(data, f"instance {i}", self.max_pixels) for i, data in enumerate(asked.images)]
                sizes = [image.shape[:2] for image in images]
                batch = explainer.prepare(images)
            targets = protocol.checked_targets(asked.parameters if explain else {}, explainer, len(batch))
            result = explainer.explain(batch, method if explain else "gradcam", targets)
            result = protocol.in_image_pixels(result, sizes, explainer.spec.input_size)
        except (protocol.HTTPError, OnnxcamError, TypeError) as error:
            raise InvalidInput(str(error)) from None
        answer = {"predictions": protocol.v1_predictions(result.logits, explainer.labels)}
        if explain:
            answer["explanations"] = protocol.v1_explanations(result.heatmaps, result.classes, method,
                                                              explainer.labels, result)
        return answer

    async def predict(self, payload, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> dict:
        return await asyncio.to_thread(self._answer, payload, False)

    async def explain(self, payload, headers: dict[str, str] | None = None) -> dict:
        return await asyncio.to_thread(self._answer, payload, True)


def main(argv: list[str] | None = None) -> None:
    """Serve one explainable file under KServe's ModelServer (its own flags, such as --http_port, apply)."""
    parser = argparse.ArgumentParser(parents=[kserve.model_server.parser], conflict_handler="resolve")
    parser.add_argument("--model_name", default="model", help="The name in /v1/models/NAME routes.")
    parser.add_argument("--model_path", required=True, help="The explainable ONNX file.")
    parser.add_argument("--provider", default="auto", choices=PROVIDER_CHOICES)
    args, _ = parser.parse_known_args(argv)
    model = ExplainerModel(args.model_name, args.model_path, args.provider)
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, enable_grpc=args.enable_grpc).start([model])


if __name__ == "__main__":
    main()
