"""Finite-difference checks of an exported gradient against the original ONNX file, no torch involved.

The target tensor is fed from outside while everything else is computed as usual from the image, so paths
that go around the target (residual connections, a CLS token) count as they do in the exported gradient:
d score / d target is the derivative of score(image, target) in its second argument.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper


def with_target_as_input(model: onnx.ModelProto, target: str, elem_type: int) -> onnx.ModelProto:
    """The model with `target` an input: its readers read the input, its producer's value goes unused."""
    fed = onnx.ModelProto()
    fed.CopyFrom(model)
    name = f"{target}/fed"
    for node in fed.graph.node:
        node.input[:] = [name if i == target else i for i in node.input]
    for output in fed.graph.output:
        if output.name == target:
            raise ValueError(f"target {target} is a graph output")
    fed.graph.input.append(helper.make_tensor_value_info(name, elem_type, None))
    return fed


def directional_check(original: onnx.ModelProto, target: str, feeds: dict, activation: np.ndarray,
                      gradient: np.ndarray, classes: np.ndarray, score: str, directions: int = 3,
                      seed: int = 0) -> list[tuple[float, float]]:
    """(exported <gradient, v>, central difference of the class score along v) per image and direction.

    `activation` and `gradient` are the explainable file's outputs for `feeds`; the score of each image's class
    is summed, so each image's directional derivative is checked on its own rows.
    """
    elem_type = helper.np_dtype_to_tensor_dtype(activation.dtype)
    fed = with_target_as_input(original, target, elem_type)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(fed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    pairs = []
    scale = float(np.abs(activation).mean()) or 1.0
    for _ in range(directions):
        v = rng.standard_normal(activation.shape).astype(activation.dtype)
        eps = 1e-3 * scale / float(np.abs(v).mean())
        plus = _scores(session, feeds, activation + eps * v, target, score, classes)
        minus = _scores(session, feeds, activation - eps * v, target, score, classes)
        exported = (gradient.astype(np.float64) * v).reshape(len(v), -1).sum(axis=1)
        pairs += list(zip(exported, (plus - minus) / (2 * eps), strict=True))
    return pairs


def _scores(session, feeds: dict, activation: np.ndarray, target: str, score: str, classes: np.ndarray) -> np.ndarray:
    outputs = session.run([score], {**feeds, f"{target}/fed": activation})[0]
    flat = outputs.reshape(len(classes), -1).astype(np.float64)
    return flat[np.arange(len(classes)), classes]
