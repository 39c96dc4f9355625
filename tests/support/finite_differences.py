"""Finite-difference checks of an exported gradient against the original ONNX file, no torch involved.

The target tensor is fed from outside while everything else is computed as usual from the image, so paths
that go around the target (residual connections, a CLS token) count as they do in the exported gradient:
d score / d target is the derivative of score(image, target) in its second argument. Half-precision models
are differenced in float32 (a copy with every float16 constant and cast widened), where steps small enough
for the network's kinks still move the score by more than its rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxcam.exporters.precision import float32_twin

STEPS = (1e-3, 1e-4, 1e-5)  # relative to the activation's mean magnitude; the best agreeing one is kept
HALF = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


def with_target_as_input(model: onnx.ModelProto, target: str, elem_type: int) -> onnx.ModelProto:
    """The model with `target` an input: its readers read the input, its producer's value goes unused."""
    fed = onnx.ModelProto()
    fed.CopyFrom(model)
    name = f"{target}/fed"
    for node in fed.graph.node:
        node.input[:] = [name if i == target else i for i in node.input]
    fed.graph.input.append(helper.make_tensor_value_info(name, elem_type, None))
    return fed


def in_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy computing in float32 where the model computes in float16 or bfloat16."""
    return float32_twin(model, HALF)


def directional_check(original: onnx.ModelProto, target: str, feeds: dict, activation: np.ndarray,
                      gradient: np.ndarray, classes: np.ndarray, score: str, directions: int = 3,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(exported <gradient, v>, central difference of the class score along v), per image and direction, with
    the step of STEPS whose differences agree best with the exported ones (a wrong gradient agrees with none).

    `activation` and `gradient` are the explainable file's outputs for `feeds`. `classes` holds each image's class
    (an index into its flattened output), or each image's seed shaped like its output: the score is then
    sum(seed * output), the seed held fixed (a detection target's linearised score).
    """
    model = in_float32(original)
    fed = with_target_as_input(model, target, onnx.TensorProto.FLOAT)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(fed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {k: v.astype(np.float32) if v.dtype in (np.float16,) else v for k, v in feeds.items()}
    point = activation.astype(np.float32)
    rng = np.random.default_rng(seed)
    directions_ = [rng.standard_normal(point.shape).astype(np.float32) for _ in range(directions)]
    exported = np.concatenate([(gradient.astype(np.float64) * v).reshape(len(v), -1).sum(axis=1)
                               for v in directions_])
    scale = float(np.abs(point).mean()) or 1.0
    best = None
    for step in STEPS:
        differences = []
        for v in directions_:
            eps = step * scale / float(np.abs(v).mean())
            plus = _scores(session, feeds, point + eps * v, target, score, classes)
            minus = _scores(session, feeds, point - eps * v, target, score, classes)
            differences.append((plus - minus) / (2 * eps))
        differences = np.concatenate(differences)
        error = np.linalg.norm(differences - exported) / max(np.linalg.norm(exported), 1e-30)
        if best is None or error < best[0]:
            best = (error, differences)
    return exported, best[1]


def _scores(session, feeds: dict, activation: np.ndarray, target: str, score: str, classes: np.ndarray) -> np.ndarray:
    outputs = session.run([score], {**feeds, f"{target}/fed": activation})[0]
    flat = outputs.reshape(len(classes), -1).astype(np.float64)
    if classes.ndim > 1:
        return (flat * classes.reshape(len(classes), -1)).sum(axis=1)
    return flat[np.arange(len(classes)), classes]
