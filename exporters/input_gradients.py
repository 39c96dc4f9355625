"""The `input_gradients` export option: the gradient of the selected class score down to the input image, for
guided backpropagation, Guided Grad-CAM, saliency, SmoothGrad and Integrated Gradients. It costs a backward pass
through the whole network on every run of the file, so it is opt-in. The ReLUs' masks of that backward pass are
marked (autodiff.guided): a runtime that wants guided backpropagation loads the file a second time with them
rewritten (runtimes.explainable.guided_runner), and the file's own runs pay nothing for it. The target-layer
gradients keep the plain rule either way (they come from the first walk), so one run serves Guided Grad-CAM.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..core.contract import METADATA_KEY, SELECTED_OUTPUT, ExplainSpec
from ..core.errors import ExportError
from .autodiff import GraphBuilder, append_gradients, prune
from .autodiff.guided import GUIDED_MARK, input_gradient_rules

INPUT_GRADIENT_OUTPUT = "onnxcam_input_gradient"


def bias_layers(model: onnx.ModelProto, builder: GraphBuilder) -> list[tuple[str, np.ndarray]]:
    """(output, per-channel bias) of every Conv with a constant bias and every BatchNormalization (bias
    B - mean scale / sqrt(var + eps)): the layers FullGrad reads, as pytorch-grad-cam picks Conv2d and
    BatchNorm2d. Exporters that fold BatchNorm into the preceding Conv leave the folded bias on the Conv."""
    found = []
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 2 and builder.constant(node.input[2]) is not None:
            found.append((node.output[0], builder.constant(node.input[2])))
        elif node.op_type == "BatchNormalization":
            scale, bias, mean, var = (builder.constant(name) for name in node.input[1:5])
            if any(value is None for value in (scale, bias, mean, var)):
                continue
            epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            found.append((node.output[0], bias - mean * scale / np.sqrt(var + epsilon)))
    return found


def add_input_gradients(model: onnx.ModelProto) -> onnx.ModelProto:
    """The explainable `model` with the input gradient (and FullGrad's bias gradients) added (in place)."""
    props = {p.key: p.value for p in model.metadata_props}
    spec = ExplainSpec.from_json(props[METADATA_KEY])
    if spec.input_type not in ("float32", "float16", "float64") or spec.input_layout != "nchw":
        raise ExportError(f"input gradients need an N x C x H x W float image input; this one is "
                          f"{spec.input_layout} {spec.input_type}", option="input_gradients")
    builder = GraphBuilder(model, prefix="onnxcam_input")
    score = builder.value(spec.score_tensor)
    one_hot = builder.op("OneHot", builder.value(SELECTED_OUTPUT), builder.ints([spec.num_classes]),
                         builder.const(np.array([0.0, 1.0]), like=score), axis=-1)
    seed = builder.op("Reshape", one_hot, builder.op("Shape", score))
    layers = bias_layers(model, builder)
    gradient, *bias_gradients = append_gradients(model, [spec.input, *(name for name, _ in layers)], spec.score_tensor,
                                                 seed, builder, overrides=input_gradient_rules())
    builder.nodes.append(helper.make_node("Identity", [gradient.name], [INPUT_GRADIENT_OUTPUT]))
    outputs = [helper.make_tensor_value_info(INPUT_GRADIENT_OUTPUT, builder.elem_type(spec.input),
                                             _dims(model, spec.input))]
    for index, ((name, bias), grad) in enumerate(zip(layers, bias_gradients, strict=True)):
        builder.nodes.append(helper.make_node("Identity", [grad.name], [f"onnxcam_bias_gradient_{index}"]))
        outputs.append(helper.make_tensor_value_info(f"onnxcam_bias_gradient_{index}", builder.elem_type(name),
                                                     _dims(model, name)))
        builder.nodes.append(helper.make_node("Identity", [builder.const(bias.astype(np.float32)).name],
                                              [f"onnxcam_bias_{index}"]))
        outputs.append(helper.make_tensor_value_info(f"onnxcam_bias_{index}", onnx.TensorProto.FLOAT, [len(bias)]))
    prune(builder, [o.name for o in outputs])
    model.graph.node.extend(builder.nodes)
    model.graph.initializer.extend(builder.initializers)
    model.graph.output.extend(outputs)
    spec.input_gradient, spec.guided_input = INPUT_GRADIENT_OUTPUT, GUIDED_MARK
    spec.bias_gradients = [f"onnxcam_bias_gradient_{i}" for i in range(len(layers))]
    spec.biases = [f"onnxcam_bias_{i}" for i in range(len(layers))]
    helper.set_model_props(model, {**props, METADATA_KEY: spec.to_json()})
    onnx.checker.check_model(model, full_check=False)
    return model


def _dims(model: onnx.ModelProto, name: str) -> list:
    """The declared dimensions of a graph input or inferred tensor (symbolic ones by name, unknown as None)."""
    for info in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if info.name == name:
            return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
                    for d in info.type.tensor_type.shape.dim]
    return []
