"""The `input_gradients` export option: the gradient of the selected class score down to the input image, for
guided backpropagation, Guided Grad-CAM, saliency, SmoothGrad and Integrated Gradients. It costs a backward pass
through the whole network on every run of the file, so it is opt-in. A boolean initializer, `onnxcam_guided`
(False), switches the ReLUs' rule to guided backpropagation's: ONNX Runtime folds it away, and a runtime that
wants guided gradients loads the file a second time with it set to True (onnxcam.strategies). The target-layer
gradients keep the plain rule either way (they come from the first walk), so one run serves Guided Grad-CAM.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..contract import METADATA_KEY, SELECTED_OUTPUT, ExplainSpec
from ..errors import ExportError
from .autodiff import GraphBuilder, append_gradients, prune
from .autodiff.guided import guided_rules

INPUT_GRADIENT_OUTPUT = "onnxcam_input_gradient"
GUIDED_INPUT = "onnxcam_guided"


def add_input_gradients(model: onnx.ModelProto) -> onnx.ModelProto:
    """The explainable `model` with the input gradient output and the guided switch added (in place)."""
    props = {p.key: p.value for p in model.metadata_props}
    spec = ExplainSpec.from_json(props[METADATA_KEY])
    if spec.input_type not in ("float32", "float16", "float64") or spec.input_layout != "nchw":
        raise ExportError(f"input gradients need an N x C x H x W float image input; this one is "
                          f"{spec.input_layout} {spec.input_type}", option="input_gradients")
    builder = GraphBuilder(model, prefix="onnxcam_input")
    score = builder.value(spec.scores)
    one_hot = builder.op("OneHot", builder.value(SELECTED_OUTPUT), builder.ints([spec.num_classes]),
                         builder.const(np.array([0.0, 1.0]), like=score), axis=-1)
    seed = builder.op("Reshape", one_hot, builder.op("Shape", score))
    switch = builder.value(GUIDED_INPUT)
    (gradient,) = append_gradients(model, [spec.input], spec.scores, seed, builder, overrides=guided_rules(switch))
    builder.nodes.append(helper.make_node("Identity", [gradient.name], [INPUT_GRADIENT_OUTPUT]))
    prune(builder, [INPUT_GRADIENT_OUTPUT])
    image = next(i for i in model.graph.input if i.name == spec.input)
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    model.graph.node.extend(builder.nodes)
    model.graph.initializer.extend([*builder.initializers, numpy_helper.from_array(np.array(False), GUIDED_INPUT)])
    model.graph.output.append(helper.make_tensor_value_info(INPUT_GRADIENT_OUTPUT, image.type.tensor_type.elem_type,
                                                            dims))
    spec.input_gradient, spec.guided_input = INPUT_GRADIENT_OUTPUT, GUIDED_INPUT
    helper.set_model_props(model, {**props, METADATA_KEY: spec.to_json()})
    onnx.checker.check_model(model, full_check=False)
    return model
