"""Override tables for the walk (walk.append_gradients's `overrides`) of the input-gradient export: guided
backpropagation's rule for ReLU, and a faster Conv rule; the other operators keep their rules."""

from __future__ import annotations

import numpy as np

from .graph import GraphBuilder, Node, Value
from .rules import RULES, Grads, Rule, explicit_pads, mask


def guided_rules(switch: Value) -> dict[str, Rule]:
    """Relu's guided rule (Springenberg et al., arXiv 1412.6806, sec. 3.4, eq. for R^l): the gradient passes only
    where the ReLU's input is positive AND the incoming gradient is positive. `switch`, a boolean scalar, turns it
    on at run time; off, the rule is the plain ReLU's."""

    def relu(g: GraphBuilder, n: Node, dys: Grads) -> Grads:
        plain = mask(dys[0], n.outputs[0] > 0)
        return [g.op("Where", switch, mask(plain, dys[0] > 0), plain)]

    return {"Relu": relu, "Conv": stride_one_conv}


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
