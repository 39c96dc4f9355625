"""The input-gradient walk's override table (walk.append_gradients's `overrides`): ReLU's plain rule with its
masks marked, so that a runtime can rewrite them into guided backpropagation's (guided()), and a faster Conv rule;
the other operators keep their rules."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from .graph import GraphBuilder, Node
from .rules import RULES, Grads, Rule, explicit_pads, mask

GUIDED_MARK = "onnxcam_guided_relu/"  # names the Where node of each ReLU's mask in the input-gradient walk


def input_gradient_rules() -> dict[str, Rule]:
    """Relu's plain rule with its Where node named GUIDED_MARK + k, so that guided() can find it, and the faster
    Conv rule."""
    count = [0]

    def relu(g: GraphBuilder, n: Node, dys: Grads) -> Grads:
        grad = mask(dys[0], n.outputs[0] > 0)
        g.nodes[-1].name = f"{GUIDED_MARK}{count[0]}"
        count[0] += 1
        return [grad]

    return {"Relu": relu, "Conv": stride_one_conv}


def guided(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with guided backpropagation's ReLU rule (Springenberg et al., arXiv 1412.6806, sec. 3.4): each
    marked mask Where(y > 0, dy, 0) becomes Where(y > 0 and dy > 0, dy, 0), passing only positive gradients at
    positive inputs. The forward pass and every other gradient are unchanged (in place)."""
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Where" and node.name.startswith(GUIDED_MARK):
            positive, both = f"{node.name}/dy_positive", f"{node.name}/guided"
            zero = f"{node.name}/zero"
            nodes.append(helper.make_node("Sub", [node.input[1], node.input[1]], [zero], name=zero))
            nodes.append(helper.make_node("Greater", [node.input[1], zero], [positive], name=positive))
            nodes.append(helper.make_node("And", [node.input[0], positive], [both], name=both))
            node.input[0] = both
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def stride_one_conv(g: GraphBuilder, n: Node, dys: Grads) -> Grads:
    """Conv's input gradient for stride 1, one group and constant weights, as a Conv with the kernel flipped and its
    channel axes swapped, padded by d (k - 1) minus the forward pads: the same values as the ConvTranspose of the
    general rule, which ONNX Runtime runs 1.1-2.9x slower on CPU (measured on ResNet-50's shapes). Other convolutions
    take the general rule."""
    weight = g.constant(n.inputs[1].name)
    kernel = list(weight.shape[2:]) if weight is not None else []
    strides = list(n.attrs["strides"] or [1] * len(kernel))
    dilations = list(n.attrs["dilations"] or [1] * len(kernel))
    spatial = n.inputs[0].shape[2:] if weight is not None else []
    if weight is None or n.attrs["group"] != 1 or any(s != 1 for s in strides) or None in spatial:
        return RULES["Conv"](g, n, dys)
    pads = explicit_pads(n, spatial, kernel, strides, dilations)
    rank = len(kernel)
    reach = [d * (k - 1) for d, k in zip(dilations, kernel, strict=True)]
    new_pads = [reach[i % rank] - pad for i, pad in enumerate(pads)]
    if min(new_pads) < 0:
        return RULES["Conv"](g, n, dys)
    flipped = np.flip(weight, axis=tuple(range(2, 2 + rank))).swapaxes(0, 1)
    grad = g.op("Conv", dys[0], g.const(np.ascontiguousarray(flipped), like=n.inputs[1]), dilations=dilations,
                pads=new_pads)
    return [grad] + [None] * (len(n.inputs) - 1)
