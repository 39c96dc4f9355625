"""The head of an explainable graph: the nodes between the target layers and an output, with their backward pass.

Targets known only after the outputs are seen (the top-k classes, detections after NMS, labels above a
threshold, contrast classes) are explained without running the backbone again: the head alone runs on the
target activations, repeated once per map, with the seed of each map (the gradient of its score with respect
to the output) as an input. The head may read tensors that do not depend on the targets (a ViT's residual
stream, the other scales of a detector): these "cut" tensors are exposed by the explainable file at export
time (`ExplainSpec.cuts`) and fed to the head beside the targets.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..core.errors import ExportError
from .autodiff import GraphBuilder, append_gradients, needed_nodes, prune

SEED_INPUT = "onnxcam_seed"
HEAD_GRADIENT = "onnxcam_head_gradient_{}"
MAPS_DIM = "maps"


def _const_outputs(nodes: list[onnx.NodeProto], initializers: set[str]) -> set[str]:
    """Tensors computed from constants alone (initializers, Constant nodes and what they feed)."""
    known = set(initializers)
    for node in nodes:
        if all(not name or name in known for name in node.input):
            known.update(node.output)
    return known


def slice_head(model: onnx.ModelProto, sources: list[str],
               outputs: list[str]) -> tuple[list[onnx.NodeProto], list[str]]:
    """The nodes that compute `outputs` from `sources`, in graph order, and the cut tensors they also read.

    A node belongs to the head when it feeds an output and reads, through any operator, a source. Its other
    inputs are constants (their producers join the head), integer tensors such as shapes (their producers join
    the head, so that they follow the head's batch of maps), or float tensors: the cuts.
    """
    nodes = list(model.graph.node)
    builder = GraphBuilder(model)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    _, feeds = needed_nodes(nodes, outputs)
    reached, chosen = set(sources), set()
    for i, node in enumerate(nodes):
        if any(name in reached for name in node.input) and any(o in feeds for o in node.output):
            chosen.add(i)
            reached.update(node.output)
    constants = _const_outputs(nodes, {t.name for t in model.graph.initializer})
    cuts: list[str] = []
    pending = [name for i in sorted(chosen) for name in nodes[i].input]
    while pending:
        name = pending.pop(0)
        if not name or name in reached or name in cuts or name in sources or name not in producer and name in constants:
            continue
        if name in producer and (name in constants or not builder.is_float(name)):
            index = producer[name]
            if index not in chosen:
                chosen.add(index)
                reached.update(nodes[index].output)
                pending.extend(nodes[index].input)
            continue
        cuts.append(name)
    return [nodes[i] for i in sorted(chosen)], cuts


def head_cuts(model: onnx.ModelProto, targets: list[str], outputs: list[str]) -> list[str]:
    """The cut tensors that the heads from `targets` to every output in `outputs` read (export time)."""
    cuts: list[str] = []
    for output in outputs:
        for name in slice_head(model, targets, [output])[1]:
            if name not in cuts:
                cuts.append(name)
    return cuts


def exposed_sources(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """The tensors that the explainable file's outputs `names` expose: each an Identity of its source, or a Cast
    to float32 where the source is bfloat16 (exporters.precision.float32_edges)."""
    source = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type in ("Identity", "Cast")}
    return [source[name] for name in names]


def build_head(model: onnx.ModelProto, targets: list[str], cuts: list[str], score: str) -> onnx.ModelProto:
    """A model taking the targets (those it does not compute from another), the cuts and a seed shaped like `score`
    (one row per map), returning the gradient of sum(seed * score) with respect to each target (exporters.autodiff
    on the sliced nodes)."""
    nodes, needed = slice_head(model, targets, [score])
    missing = [name for name in needed if name not in cuts]
    if missing:
        raise ExportError(f"the head from the targets to '{score}' reads '{missing[0]}', which this file does not "
                          f"expose: export the model again")
    forward = _forward_types(model)
    used = {name for node in nodes for name in node.input}
    initializers = [t for t in model.graph.initializer if t.name in used]
    produced = {name for node in nodes for name in node.output}
    # a target that the head computes from another (a detector's scales, where a coarser one is read from a finer
    # one) is not an input: computed inside, its path counts in the other target's gradient, as in the file's own
    fed = [name for name in targets if name not in produced]
    inputs = [_with_maps_dim(forward[name]) for name in [*fed, *needed]]
    seed = _with_maps_dim(forward[score], SEED_INPUT)
    graph = helper.make_graph(nodes, "onnxcam_head", [*inputs, seed], [], initializers,
                              value_info=[v for n, v in forward.items() if n in used or n == score])
    head = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    head.functions.extend(model.functions)
    builder = GraphBuilder(head, prefix="onnxcam_head")
    gradients = append_gradients(head, targets, score, builder.value(SEED_INPUT), builder)
    names = [HEAD_GRADIENT.format(i) for i in range(len(targets))]
    for name, gradient, target in zip(names, gradients, targets, strict=True):
        builder.nodes.append(helper.make_node("Identity", [gradient.name], [name]))
        head.graph.output.append(_with_maps_dim(forward[target], name))
    prune(builder, names)
    _keep_live(head, [*head.graph.node, *builder.nodes], [*head.graph.initializer, *builder.initializers], names)
    return head


def _keep_live(model: onnx.ModelProto, nodes: list, initializers: list, outputs: list[str]) -> None:
    """Set the graph's nodes and initializers to those the outputs need: forward nodes whose values no gradient
    rule reads (a Gemm's product, when only its weights carry the gradient) are dropped."""
    kept, live = needed_nodes(nodes, outputs)
    model.graph.ClearField("node")
    model.graph.node.extend(kept)
    kept_initializers = [t for t in initializers if t.name in live]
    model.graph.ClearField("initializer")
    model.graph.initializer.extend(kept_initializers)


def _forward_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    graph = model.graph
    return {info.name: info for info in [*graph.input, *graph.value_info, *graph.output]}


def _with_maps_dim(info: onnx.ValueInfoProto, name: str | None = None) -> onnx.ValueInfoProto:
    """`info` renamed, its first (batch) dimension made the symbolic number of maps."""
    tensor_type = info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
    return helper.make_tensor_value_info(name or info.name, tensor_type.elem_type, [MAPS_DIM, *dims[1:]])
