"""Request and response shapes of the two inference protocols, checked before anything is allocated.

- Open Inference Protocol (KServe V2, Triton): `{"inputs": [{"name", "shape", "datatype", "data"}]}` ->
  `{"model_name", "model_version", "outputs": [...]}`.
- KServe V1 (TensorFlow Serving's REST API plus `:explain`): `{"instances": [...]}` -> `{"predictions": [...]}`,
  and for explain `{"predictions": [...], "explanations": [...]}`. An instance is a C x H x W nested list of
  preprocessed numbers, or an encoded image as `{"b64": ...}` (TensorFlow Serving's binary convention, also
  `{"image_bytes": {"b64": ...}}`).

Both take the targets of the CLI in their `parameters` (`targets_of`); the maps come back one per (image, target)
pair, with the image each belongs to, its class, and its score and box where the target gives them.

No web framework here: the embedded server and the KServe model (`onnxcam.kserve`) share it.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..core import top_classes
from ..core.contract import ExplainSpec
from ..explanation import Explanation
from ..targets import Target, from_options

MAX_IMAGES = 256  # per request: a claimed batch beyond this is refused before anything is read


class HTTPError(Exception):
    """A request the server refuses, with the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Request:
    """What an inference request asks, in either protocol: a float32 batch, or encoded images to decode and
    preprocess first (V1 `b64` instances); the method and target from its `parameters`."""

    batch: np.ndarray | None
    images: list[bytes]
    method: str | None
    target: object
    parameters: dict = field(default_factory=dict)


def _input_shape(spec: ExplainSpec) -> list[int]:
    channels = len(spec.mean) if spec.mean else 3
    return [channels, *spec.input_size]


def _parameters(payload: dict) -> dict:
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise HTTPError(400, "parameters must be an object")
    return parameters


def parse_v2(payload, spec: ExplainSpec) -> Request:
    """The one input tensor of an Open Inference request, checked against the model's name, datatype and
    shape; the claimed shape is checked against the data's length before any array is made."""
    expected = f"expected {{'inputs': [{{'name': '{spec.input}', 'shape', 'datatype', 'data'}}]}}"
    try:
        inputs = payload["inputs"]
        (tensor,) = [t for t in inputs if t.get("name") == spec.input] or inputs[:1]
        shape, datatype, data = tensor["shape"], tensor["datatype"], tensor["data"]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise HTTPError(400, expected) from None
    if datatype != "FP32":
        raise HTTPError(400, f"input datatype must be FP32, got {datatype}")
    image_shape = _input_shape(spec)
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(d) is int for d in shape)
            and shape[1:] == image_shape and 1 <= shape[0] <= MAX_IMAGES):
        raise HTTPError(400, f"input shape must be [N, {', '.join(map(str, image_shape))}] with 1 <= N <= "
                             f"{MAX_IMAGES}, got {shape}")
    needed = math.prod(shape)
    if not isinstance(data, list) or len(data) != needed:
        held = len(data) if isinstance(data, list) else "no list of"
        raise HTTPError(400, f"input data holds {held} values, shape {shape} needs {needed} (a flat list)")
    try:
        array = np.asarray(data, dtype=np.float32)
    except (TypeError, ValueError):
        raise HTTPError(400, "input data must be a flat list of numbers") from None
    if array.shape != (needed,):
        raise HTTPError(400, "input data must be a flat list of numbers")
    parameters = _parameters(payload)
    return Request(array.reshape(shape), [], parameters.get("method"), parameters.get("target"), parameters)


def v2_tensor(name: str, array: np.ndarray, datatype: str) -> dict:
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": array.ravel().tolist()}


TARGET_OPTIONS = ("classes", "top", "task", "score_threshold", "concept", "output", "ranks")


def _number(value, kind: type, name: str):
    """An int or float parameter, from JSON or from a query string's text."""
    wanted = "an integer" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise HTTPError(400, f"{name} must be {wanted}, got {type(value).__name__}")
    try:
        number = kind(value)
    except ValueError:
        raise HTTPError(400, f"{name} must be {wanted}, got '{str(value)[:40]}'") from None
    if kind is int and isinstance(value, float) and number != value:
        raise HTTPError(400, f"{name} must be {wanted}, got {value}")
    return number


def _numbers(value, kind: type, name: str) -> list:
    """A list parameter: a JSON list, a single number, or comma-separated text."""
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    elif not isinstance(value, list):
        value = [value]
    return [_number(item, kind, name) for item in value]


def targets_of(parameters: Mapping):
    """Explainer.explain's `targets` from a request's parameters. `target` alone keeps its meaning: a class index
    for every image, or a list of one per image (None: each image's top-1). The CLI's options ask for more
    (onnxcam.targets.from_options): `classes` (several classes of every image; with `target`, added to it),
    `top`, `task` (classify, segment, detect, embed), `score_threshold`, `concept` (a list of numbers),
    `output` and `ranks` (detections by rank, 0 the best)."""
    target = parameters.get("target")
    asked = {name: parameters[name] for name in TARGET_OPTIONS if parameters.get(name) not in (None, "", [])}
    if not asked:
        return None if target in (None, "") else target
    classes = _numbers(asked.pop("classes", []), int, "classes")
    if isinstance(target, list):
        raise HTTPError(400, "a list as target gives one class per image; several classes of every image are "
                             "given as classes")
    if target not in (None, ""):
        classes = [_number(target, int, "target"), *classes]
    options = {name: _number(asked[name], kind, name) for name, kind in (("top", int), ("score_threshold", float))
               if name in asked}
    options |= {name: _numbers(asked[name], kind, name) for name, kind in (("concept", float), ("ranks", int))
                if name in asked}
    for name in ("task", "output"):
        if name in asked:
            if not isinstance(asked[name], str):
                raise HTTPError(400, f"{name} must be a string, got {type(asked[name]).__name__}")
            options[name] = asked[name]
    return from_options(classes, **options)


def checked_targets(parameters: Mapping, explainer, count: int):
    """targets_of for `count` images, class indices range-checked now (a target object is checked once the outputs
    are seen); a bad one is a 400."""
    targets = targets_of(parameters)
    if isinstance(targets, Target):
        return targets
    try:
        return explainer.class_indices(targets, count)
    except (ValueError, TypeError) as error:
        raise HTTPError(400, str(error)) from None


def in_image_pixels(result: Explanation, sizes: list[tuple[int, int]] | None, input_size) -> Explanation:
    """`result` with its boxes in the pixels of each image as sent (height, width in `sizes`); tensors (sizes None)
    were sent at the model's size already."""
    return result if sizes is None else result.in_image_pixels(sizes, input_size)


def label_of(target: int, labels: list[str] | None) -> str | None:
    return labels[target] if labels and 0 <= target < len(labels) else None


def has_boxes(result: Explanation) -> bool:
    """Whether every map is a detection with its box (a map of another target has NaN there)."""
    return result.boxes is not None and len(result.boxes) > 0 and not np.isnan(result.boxes).any()


def v2_response(name: str, spec: ExplainSpec, logits, result: Explanation | None = None) -> dict:
    """The scores output; with an explanation, per map: heatmaps, targets (the class, -1 where none), image_index,
    and scores and boxes (x1 y1 x2 y2) where the targets give them."""
    outputs = [v2_tensor(spec.scores, logits, "FP32")]
    if result is not None:
        outputs += [v2_tensor("heatmaps", result.heatmaps, "FP32"), v2_tensor("targets", result.classes, "INT64"),
                    v2_tensor("image_index", result.image_index, "INT64")]
        if result.scores is not None:
            outputs.append(v2_tensor("scores", result.scores, "FP32"))
        if has_boxes(result):
            outputs.append(v2_tensor("boxes", result.boxes, "FP32"))
    return {"model_name": name, "model_version": "1", "outputs": outputs}


def v2_metadata(name: str, spec: ExplainSpec, methods: list[str]) -> dict:
    height, width = spec.input_size
    return {
        "name": name, "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": spec.input, "datatype": "FP32", "shape": [-1, *_input_shape(spec)]}],
        "outputs": [{"name": spec.scores, "datatype": "FP32", "shape": [-1, spec.num_classes]},
                    {"name": "heatmaps", "datatype": "FP32", "shape": [-1, height, width]},
                    {"name": "targets", "datatype": "INT64", "shape": [-1]},
                    {"name": "image_index", "datatype": "INT64", "shape": [-1]},
                    {"name": "scores", "datatype": "FP32", "shape": [-1], "optional": True},
                    {"name": "boxes", "datatype": "FP32", "shape": [-1, 4], "optional": True}],
        "parameters": {"methods": methods, "labels": bool(spec.labels)},
    }


def _encoded(instance) -> bytes | None:
    """The bytes of a `{"b64": ...}` or `{"image_bytes": {"b64": ...}}` instance, None for a tensor."""
    if not isinstance(instance, dict):
        return None
    if isinstance(instance.get("image_bytes"), dict):
        instance = instance["image_bytes"]
    if not isinstance(instance.get("b64"), str):
        raise HTTPError(400, "an instance object must be {'b64': <base64 image>} or {'image_bytes': {'b64': ...}}")
    try:
        return base64.b64decode(instance["b64"], validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, "an instance's b64 field is not base64") from None


def _tensor_instance(instance, shape: list[int]) -> np.ndarray:
    """A C x H x W nested list, its nesting checked level by level before numpy sees it."""
    level = [instance]
    for size in shape:
        if not all(isinstance(row, list) and len(row) == size for row in level):
            raise HTTPError(400, f"each instance must be a {' x '.join(map(str, shape))} nested list of numbers "
                                 f"or {{'b64': <base64 image>}}")
        level = [item for row in level for item in row]
    try:
        return np.asarray(instance, dtype=np.float32)
    except (TypeError, ValueError):
        raise HTTPError(400, "instance values must be numbers") from None


def parse_v1(payload, spec: ExplainSpec) -> Request:
    """A KServe V1 request: all instances tensors, or all encoded images."""
    instances = payload.get("instances") if isinstance(payload, dict) else None
    if not isinstance(instances, list) or not 1 <= len(instances) <= MAX_IMAGES:
        raise HTTPError(400, f"expected {{'instances': [...]}} with 1 to {MAX_IMAGES} instances")
    encoded = [_encoded(instance) for instance in instances]
    parameters = _parameters(payload)
    if all(data is not None for data in encoded):
        return Request(None, encoded, parameters.get("method"), parameters.get("target"), parameters)
    if any(data is not None for data in encoded):
        raise HTTPError(400, "instances must be all tensors or all encoded images, not a mix")
    shape = _input_shape(spec)
    batch = np.stack([_tensor_instance(instance, shape) for instance in instances])
    return Request(batch, [], parameters.get("method"), parameters.get("target"), parameters)


def v1_predictions(logits: np.ndarray, labels: list[str] | None, k: int = 5) -> list[dict]:
    """Per instance: the scores, the top class and the top-k (TensorFlow Serving's one entry per instance)."""
    tops = top_classes(logits, min(k, logits.shape[1]), labels)
    return [{"scores": row.tolist(), "class": top[0]["class"], "label": top[0]["label"], "top": top}
            for row, top in zip(logits, tops, strict=True)]


def v1_explanations(heatmaps: np.ndarray, targets: np.ndarray, method: str, labels: list[str] | None,
                    result: Explanation | None = None) -> list[dict]:
    """Per map (one per instance for class targets): the class explained and its H x W heatmap in [0, 1] at the
    model's input resolution; with `result`, also the instance it belongs to, and its score and box (x1 y1 x2 y2
    in the pixels of the instance as sent) where the target gives them."""
    entries = [{"method": method, "target": int(target), "target_label": label_of(int(target), labels),
                "heatmap": heatmap.tolist()} for heatmap, target in zip(heatmaps, targets, strict=True)]
    if result is not None:
        for row, entry in enumerate(entries):
            entry["instance"] = int(result.image_index[row])
            if result.scores is not None:
                entry["score"] = float(result.scores[row])
            if has_boxes(result):
                entry["box"] = result.boxes[row].tolist()
    return entries
