"""One self-contained ONNX file: encoded image bytes in, logits and the Grad-CAM heatmap out.

Decoding uses onnxruntime-extensions' DecodeImage (domain com.microsoft.extensions); resizing,
normalisation and the Grad-CAM steps (channel weights, ReLU, bilinear upsampling, min-max scaling,
averaging over layers) are plain ONNX operators, so any ONNX Runtime binding with the extensions
library registered gets explanations without Python.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, version_converter

from ..core.contract import BYTES_INPUT, CLASS_INPUT, HEATMAP_OUTPUT, METADATA_KEY, ExplainSpec
from .autodiff import GraphBuilder
from .graph_cams import heatmap_nodes

EXTENSIONS_DOMAIN = "com.microsoft.extensions"


def bundle(model: onnx.ModelProto, spec: ExplainSpec) -> onnx.ModelProto:
    """Turn an explainable model into a bundle taking one encoded JPEG/PNG as uint8 bytes."""
    if _opset(model) < 18:  # Reduce* with axes as inputs, and Resize's antialias
        model = version_converter.convert_version(model, 18)
    graph = model.graph
    g = GraphBuilder(model, prefix="onnxcam_bundle")
    height, width = spec.input_size

    # bytes -> decoded BGR H x W x 3 -> RGB 1 x H x W x 3 at the model's size -> its layout, type and normalisation
    bgr = g.op("DecodeImage", BYTES_INPUT, domain=EXTENSIONS_DOMAIN)
    rgb = g.op("Unsqueeze", g.op("Cast", g.op("Gather", bgr, g.ints([2, 1, 0]), axis=2), to=onnx.TensorProto.FLOAT),
               g.ints([0]))
    resized = g.op("Resize", rgb, "", "", g.ints([1, height, width, 3]), mode="linear", antialias=1,
                   coordinate_transformation_mode="half_pixel")
    pixels = _normalised(g, resized, spec)
    if spec.input_layout == "nchw":
        pixels = g.op("Transpose", pixels, perm=[0, 3, 1, 2])
    preprocess = g.nodes
    preprocess.append(helper.make_node("Identity", [pixels.name], [spec.input]))

    # Grad-CAM (Selvaraju et al., eq. 1-2) per layer, upsampled and min-max scaled, then averaged (graph_cams)
    g.nodes = []
    heat = heatmap_nodes(g, spec, "gradcam")
    g.nodes.append(helper.make_node("Squeeze", [heat.name, g.ints([1]).name], [HEATMAP_OUTPUT]))
    postprocess = g.nodes

    image_input = next(i for i in graph.input if i.name == spec.input)
    graph.input.remove(image_input)
    graph.input.insert(0, helper.make_tensor_value_info(BYTES_INPUT, onnx.TensorProto.UINT8, ["bytes"]))
    class_input = next(i for i in graph.input if i.name == CLASS_INPUT)
    class_input.type.tensor_type.shape.dim[0].dim_value = 1  # one image per run: [-1] asks for the top-1 class
    nodes = [*preprocess, *graph.node, *postprocess]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(g.initializers)
    kept = [o for o in graph.output if o.name in (spec.scores, spec.selected)]
    del graph.output[:]
    heatmap = helper.make_tensor_value_info(HEATMAP_OUTPUT, onnx.TensorProto.FLOAT, [1, height, width])
    graph.output.extend([*kept, heatmap])
    model.opset_import.append(helper.make_opsetid(EXTENSIONS_DOMAIN, 1))
    spec.bundled = True
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, METADATA_KEY: spec.to_json()})
    return model


def _normalised(g: GraphBuilder, resized, spec: ExplainSpec):
    """Resized float pixels (0-255) as the model takes them: rounded uint8 for a model that normalises inside its
    graph, else scaled to [0, 1], then (x - mean) / std, in the model's float type."""
    if spec.input_type == "uint8":
        clipped = g.op("Clip", g.op("Round", resized), g.const(0.0), g.const(255.0))
        return g.op("Cast", clipped, to=onnx.TensorProto.UINT8)
    pixels = resized / g.const(255.0)
    if spec.mean:
        pixels = pixels - g.const(np.reshape(spec.mean, (1, 1, 1, -1)))
    if spec.std:
        pixels = pixels / g.const(np.reshape(spec.std, (1, 1, 1, -1)))
    element = helper.np_dtype_to_tensor_dtype(np.dtype(spec.input_type))
    return pixels if element == onnx.TensorProto.FLOAT else g.op("Cast", pixels, to=element)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
