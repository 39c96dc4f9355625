"""Heatmaps computed in the explainable graph itself, with standard ONNX operators only, for the CAMs that need
one run and no decomposition: any conforming runtime (onnxruntime-node, onnxruntime-web, OpenVINO, ...) then gets
the image-sized maps as an output, with no numpy core beside it.

GRAPH_CAMS is a table of one-line formulas, each the ONNX counterpart of core.methods' function of the same method
(cited there), on B x C x h x w activations A and gradients G in float32; `add_heatmaps` upsamples each target
layer's map bilinearly to the image, scales it to [0, 1] per image and averages the layers, as core.maps.heatmaps
does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from ..core.contract import HEATMAPS_OUTPUT, METADATA_KEY, ExplainSpec
from ..core.errors import ExportError
from ..core.layouts import parse_tokens
from .autodiff import GraphBuilder, Value

Formula = Callable[[GraphBuilder, Value, Value], Value]  # (g, A, G) -> B x 1 x h x w


def _reduce(g: GraphBuilder, op_type: str, x: Value, axes) -> Value:
    """A Reduce* keeping its axes, which ReduceSum takes as an input from opset 13, the others from opset 18."""
    if op_type == "ReduceSum" or g.opset >= 18:
        return g.op(op_type, x, g.ints(axes), keepdims=1)
    return g.op(op_type, x, axes=list(axes), keepdims=1)


def _sum(g: GraphBuilder, x: Value, axes) -> Value:
    return _reduce(g, "ReduceSum", x, axes)


def _relu(g: GraphBuilder, x: Value) -> Value:
    return g.op("Relu", x)


def _weighted(g: GraphBuilder, weights: Value, a: Value) -> Value:
    """ReLU(sum_k w_k A^k), the map of every channel-weighting method."""
    return _relu(g, _sum(g, weights * a, [1]))


def _safe_divide(g: GraphBuilder, numerator: Value, denominator: Value) -> Value:
    """numerator / denominator, 0 where the denominator is exactly 0 (core.methods._safe_divide)."""
    nonzero = g.op("Not", g.op("Equal", denominator, g.const(0.0)))
    return g.op("Where", nonzero, numerator / g.op("Where", nonzero, denominator, g.const(1.0)), g.const(0.0))


def _gradcam_plus_plus(g: GraphBuilder, a: Value, grad: Value) -> Value:
    squared = grad * grad
    alpha = _safe_divide(g, squared, squared * g.const(2.0) + _sum(g, a, [2, 3]) * squared * grad)
    return _weighted(g, _sum(g, alpha * _relu(g, grad), [2, 3]), a)


GRAPH_CAMS: dict[str, Formula] = {
    "gradcam": lambda g, a, grad: _weighted(g, _reduce(g, "ReduceMean", grad, [2, 3]), a),
    "gradcam++": _gradcam_plus_plus,
    "xgradcam": lambda g, a, grad: _weighted(g, _sum(g, _safe_divide(g, a, _sum(g, a, [2, 3])) * grad, [2, 3]), a),
    "hirescam": lambda g, a, grad: _relu(g, _sum(g, grad * a, [1])),
    "gradcam-elementwise": lambda g, a, grad: _sum(g, _relu(g, grad * a), [1]),
    "layercam": lambda g, a, grad: _relu(g, _sum(g, _relu(g, grad) * a, [1])),
}


def heatmap_nodes(g: GraphBuilder, spec: ExplainSpec, method: str) -> Value:
    """B x 1 x H x W heatmaps of `method` from the file's exposed activations and gradients (emitted into g)."""
    formula = GRAPH_CAMS.get(method)
    if formula is None:
        raise ExportError(f"method '{method}' has no in-graph form; these do: {', '.join(GRAPH_CAMS)}",
                          option="heatmaps")
    height, width = spec.input_size
    maps = []
    for activation, gradient, layout in zip(spec.activations, spec.gradients, spec.layouts, strict=True):
        a, grad = (_to_grid(g, g.op("Cast", name, to=onnx.TensorProto.FLOAT), layout)
                   for name in (activation, gradient))
        maps.append(normalise(g, _upsample(g, formula(g, a, grad), height, width)))
    return maps[0] if len(maps) == 1 else normalise(g, g.op("Sum", *maps) / g.const(float(len(maps))))


def add_heatmaps(model: onnx.ModelProto, method: str) -> onnx.ModelProto:
    """The explainable `model` with an output HEATMAPS_OUTPUT, B x H x W in [0, 1]: `method`'s heatmaps for the
    classes it explains, in the same run (in place)."""
    props = {p.key: p.value for p in model.metadata_props}
    spec = ExplainSpec.from_json(props[METADATA_KEY])
    g = GraphBuilder(model, prefix="onnxcam_heatmaps")
    heat = heatmap_nodes(g, spec, method)
    g.nodes.append(helper.make_node("Squeeze", [heat.name, g.ints([1]).name], [HEATMAPS_OUTPUT]))
    batch = next(i for i in model.graph.input if i.name == spec.input).type.tensor_type.shape.dim[0]
    model.graph.node.extend(g.nodes)
    model.graph.initializer.extend(g.initializers)
    model.graph.output.append(helper.make_tensor_value_info(
        HEATMAPS_OUTPUT, onnx.TensorProto.FLOAT, [batch.dim_param or batch.dim_value or None, *spec.input_size]))
    spec.heatmaps = method
    helper.set_model_props(model, {**props, METADATA_KEY: spec.to_json()})
    return model


def _to_grid(g: GraphBuilder, tensor: Value, layout: str) -> Value:
    """B x C x H x W from a target's layout, as core.layouts.to_grid: channels-last maps are transposed,
    token sequences lose their prefix tokens and are folded onto their grid."""
    if layout == "nchw":
        return tensor
    if layout != "nhwc":
        prefix, grid_height, grid_width = parse_tokens(layout)
        patches = g.op("Slice", tensor, g.ints([prefix]), g.ints([np.iinfo(np.int64).max]), g.ints([1]))
        tensor = g.op("Reshape", patches, g.ints([0, grid_height, grid_width, -1]))
    return g.op("Transpose", tensor, perm=[0, 3, 1, 2])


def _upsample(g: GraphBuilder, cam: Value, height: int, width: int) -> Value:
    """Bilinear, half-pixel centres (core.maps.upsample, torch's align_corners=False)."""
    sizes = g.op("Concat", g.op("Slice", g.op("Shape", cam), g.ints([0]), g.ints([2])), g.ints([height, width]), axis=0)
    return g.op("Resize", cam, "", "", sizes, mode="linear", coordinate_transformation_mode="half_pixel")


def normalise(g: GraphBuilder, heat: Value) -> Value:
    """(x - min) / (max - min) per image; a flat map becomes 1 if positive, else 0 (never NaN): core.maps.normalize."""
    low = _reduce(g, "ReduceMin", heat, [2, 3])
    high = _reduce(g, "ReduceMax", heat, [2, 3])
    spread = high - low
    varies = spread > 0.0
    scaled = (heat - low) / g.op("Where", varies, spread, g.const(1.0))
    flat = g.op("Cast", high > 0.0, to=onnx.TensorProto.FLOAT)
    return g.op("Where", varies, scaled, g.op("Expand", flat, g.op("Shape", heat)))
