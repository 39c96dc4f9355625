"""Reading the head of an explainable file for the methods that need it whole: CAM's linear-layer weights, the
forward head (target activations to scores) that Ablation-CAM runs on its ablated copies, and the forward part
(image to scores) that the perturbation methods run. Each takes the file's model, read once (runtimes.explainable)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from ..core.contract import ExplainSpec
from ..core.errors import ExplainError
from ..exporters.autodiff import needed_nodes
from ..exporters.head import exposed_sources, slice_head
from .session import sibling_session

PASS_THROUGH = ("Identity", "Dropout", "Flatten", "Reshape", "Squeeze")


def _constant(model: onnx.ModelProto, name: str, producers: dict) -> np.ndarray | None:
    """The value of `name` when it is an initializer, a Constant, or the Transpose of either; else None."""
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    node = producers.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute:
        return numpy_helper.to_array(node.attribute[0].t)
    if node is not None and node.op_type == "Transpose":
        value = _constant(model, node.input[0], producers)
        perm = [a.ints for a in node.attribute if a.name == "perm"]
        return None if value is None else value.transpose(*(perm[0] if perm else ()))
    return None


def _linear_weights(model: onnx.ModelProto, node: onnx.NodeProto, producers: dict):
    """(classes x K weights, the linear layer's data input) of a Gemm, MatMul, or MatMul + bias node."""
    if node.op_type == "Add":
        linear = [producers.get(name) for name in node.input if _constant(model, name, producers) is None]
        if len(linear) != 1 or linear[0] is None or linear[0].op_type != "MatMul":
            return None, None
        node = linear[0]
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weights = _constant(model, node.input[1], producers)
        if weights is None or attrs.get("transA", 0):
            return None, None
        weights = weights * attrs.get("alpha", 1.0)
        return (weights if attrs.get("transB", 0) else weights.T), node.input[0]
    if node.op_type == "MatMul":
        weights = _constant(model, node.input[1], producers)
        return (None, None) if weights is None or weights.ndim != 2 else (weights.T, node.input[0])
    return None, None


def _is_global_average(model: onnx.ModelProto, node: onnx.NodeProto, producers: dict) -> bool:
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean":
        return False
    axes = [a.ints for a in node.attribute if a.name == "axes"]
    axes = list(axes[0]) if axes else list(_constant(model, node.input[1], producers) if len(node.input) > 1 else [])
    return sorted(a % 4 for a in axes) == [2, 3]


def read_linear_head(model: onnx.ModelProto, spec: ExplainSpec) -> np.ndarray:
    """num_classes x K: the rows of the linear layer after global average pooling of the target layer.

    The nodes between the target and the scores must be global average pooling (GlobalAveragePool or ReduceMean
    over H and W), reshapes, identities or dropout, then one linear layer (Gemm, MatMul with or without a bias).
    """
    if len(spec.activations) != 1 or spec.layouts[0] != "nchw":
        raise ExplainError("cam needs one N x C x H x W target layer followed by global average pooling")
    producers = {output: node for node in model.graph.node for output in node.output}
    target = exposed_sources(model, spec.activations)[0]
    name = spec.score_tensor
    while name in producers and producers[name].op_type in ("Identity", "Dropout"):
        name = producers[name].input[0]
    weights, name = _linear_weights(model, producers[name], producers) if name in producers else (None, None)
    while name in producers and producers[name].op_type in PASS_THROUGH:
        name = producers[name].input[0]
    pool = producers.get(name)
    if weights is None or pool is None or not _is_global_average(model, pool, producers) or pool.input[0] != target:
        raise ExplainError("cam needs global average pooling of the target layer followed by one linear layer "
                           "that gives the scores; this model's head is not of that shape")
    return weights.astype(np.float32)


def forward_head_session(model: onnx.ModelProto, spec: ExplainSpec, session: ort.InferenceSession) -> HeadScores:
    """A session computing the scores from the target activation and the cuts it reads: the nodes between them
    (exporters.head.slice_head), forward only."""
    targets = exposed_sources(model, spec.activations)
    exposed = {**dict(zip(targets, spec.activations, strict=True)),
               **dict(zip(exposed_sources(model, spec.cuts), spec.cuts, strict=True))}
    nodes, cuts = slice_head(model, targets, [spec.score_tensor])
    missing = [name for name in cuts if name not in exposed]
    if missing:
        raise ExplainError(f"cannot run the head alone: it reads '{missing[0]}', which this file does not expose "
                           f"(export the model again)")
    types = {info.name: info for info in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    used = {name for node in nodes for name in node.input}
    graph = helper.make_graph(nodes, "onnxcam_forward_head", [_maps_first(types[n]) for n in [*targets, *cuts]],
                              [_maps_first(types[spec.score_tensor])],
                              [t for t in model.graph.initializer if t.name in used])
    head = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    head.functions.extend(model.functions)
    return HeadScores(sibling_session(head, session), {name: exposed[name] for name in [*targets, *cuts]})


def _maps_first(info: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """A copy of `info` whose first dimension is the symbolic number of ablated copies."""
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(info)
    copy.type.tensor_type.shape.dim[0].Clear()
    copy.type.tensor_type.shape.dim[0].dim_param = "copies"
    return copy


class HeadScores:
    """Runs the forward head on tensors named as the explainable file exposes them (`inputs`: head input name ->
    exposed name)."""

    def __init__(self, session: ort.InferenceSession, inputs: dict[str, str]):
        self.session, self.inputs = session, inputs

    def scores(self, output: str, exposed: dict[str, np.ndarray]) -> np.ndarray:
        """`output` for the exposed tensors given (all with the same number of rows)."""
        return self.session.run([output], {name: exposed[source] for name, source in self.inputs.items()})[0]


def forward_model(model: onnx.ModelProto, spec: ExplainSpec, outputs: list[str] | None = None) -> onnx.ModelProto:
    """The explainable file cut down to the nodes that compute `outputs` (outputs of the file) from the image: no
    class selection, no gradients. By default the scores explained, the logits where the output squashes them
    (ExplainSpec.score_tensor): the perturbation methods' many runs need the scores only."""
    outputs = outputs or [spec.score_tensor]
    kept, needed = needed_nodes(model.graph.node, outputs)
    graph = model.graph
    infos = {info.name: info for info in [*graph.value_info, *graph.output]}
    inputs = [info for info in graph.input if info.name in needed and info.name not in
              {t.name for t in graph.initializer}]
    forward = helper.make_graph(kept, "onnxcam_forward", inputs, [infos[name] for name in outputs],
                                [t for t in graph.initializer if t.name in needed])
    result = helper.make_model(forward, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    result.functions.extend(model.functions)
    return result
