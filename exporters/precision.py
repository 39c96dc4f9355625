"""bfloat16 models: float32 at a graph's edges, and a float32 twin where a provider has no bfloat16 arithmetic.

ONNX Runtime's Python API cannot hand over bfloat16 arrays (numpy has no such type), so an explainable file
of a bfloat16 model takes and gives float32 (`float32_edges`): a Cast after each bfloat16 input and before each
bfloat16 output, both exact for the values that cross them, while everything between, the gradient included,
is computed in bfloat16. ONNX Runtime's CPU provider has no bfloat16 arithmetic at all (no MatMul, Add, Conv,
Relu): there, and for the export's own checks, the graph runs as its float32 twin (`float32_twin`), whose
weights are the same numbers, exactly, and whose activations are not rounded to bfloat16.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

BFLOAT16, FLOAT = TensorProto.BFLOAT16, TensorProto.FLOAT
TYPE_ATTRIBUTES = ("to", "dtype")  # Cast's target type; the output type of RandomNormal, EyeLike and the like


def has_bfloat16(model: onnx.ModelProto) -> bool:
    """Whether any tensor of the model (an input, an initializer, a recorded value, a Cast's target) is
    bfloat16."""
    graph = model.graph
    infos = [*graph.input, *graph.value_info, *graph.output]
    return (any(info.type.tensor_type.elem_type == BFLOAT16 for info in infos)
            or any(t.data_type == BFLOAT16 for t in graph.initializer)
            or any(a.name in TYPE_ATTRIBUTES and a.i == BFLOAT16 for node in graph.node for a in node.attribute))


def float32_edges(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with each bfloat16 graph input and output made float32 under its own name, with a Cast inside:
    an input `x` is cast to `x/bfloat16`, which its readers then read; an output written by an Identity (and read
    by no node) gets a Cast in that Identity's place, so that an exposed tensor stays one node from its source;
    any other output `y` is written as `y/bfloat16`, which its readers then read, and cast to `y`."""
    graph = model.graph
    producers = {o: node for node in graph.node for o in node.output}
    inputs = [i for i in graph.input if i.type.tensor_type.elem_type == BFLOAT16]
    outputs = [o for o in graph.output if o.type.tensor_type.elem_type == BFLOAT16 and o.name in producers]
    if not inputs and not outputs:
        return model
    renamed = {i.name: f"{i.name}/bfloat16" for i in inputs}
    read = {name for node in graph.node for name in node.input}
    casts_out, records = [], [_renamed(info, renamed[info.name]) for info in inputs]
    for output in outputs:
        node = producers[output.name]
        if node.op_type == "Identity" and output.name not in read:
            node.op_type = "Cast"
            node.attribute.append(helper.make_attribute("to", FLOAT))
        else:
            renamed[output.name] = f"{output.name}/bfloat16"
            casts_out.append(helper.make_node("Cast", [renamed[output.name]], [output.name], to=FLOAT,
                                              name=f"{output.name}/float32"))
            records.append(_renamed(output, renamed[output.name]))
        output.type.tensor_type.elem_type = FLOAT
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    for info in graph.value_info:
        info.name = renamed.get(info.name, info.name)
    graph.value_info.extend(records)
    casts_in = [helper.make_node("Cast", [i.name], [renamed[i.name]], to=BFLOAT16, name=f"{i.name}/bfloat16")
                for i in inputs]
    for info in inputs:
        info.type.tensor_type.elem_type = FLOAT
    nodes = [*casts_in, *graph.node, *casts_out]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _renamed(info: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(info)
    copy.name = name
    return copy


def float32_twin(model: onnx.ModelProto, narrow: tuple[int, ...] = (BFLOAT16,)) -> onnx.ModelProto:
    """A copy of the model with every tensor of a `narrow` type float32: initializers and constants widened
    (exactly), Casts to those types made Casts to float32, recorded types changed; sub-graphs too."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    _widen_graph(twin.graph, narrow)
    for function in twin.functions:
        _widen_nodes(function.node, narrow)
    return twin


def _widen_graph(graph: onnx.GraphProto, narrow: tuple[int, ...]) -> None:
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.tensor_type.elem_type in narrow:
            info.type.tensor_type.elem_type = FLOAT
    for tensor in graph.initializer:
        _widen_tensor(tensor, narrow)
    _widen_nodes(graph.node, narrow)


def _widen_nodes(nodes, narrow: tuple[int, ...]) -> None:
    for node in nodes:
        for attribute in node.attribute:
            if attribute.name in TYPE_ATTRIBUTES and attribute.type == onnx.AttributeProto.INT \
                    and attribute.i in narrow:
                attribute.i = FLOAT
            elif attribute.type == onnx.AttributeProto.TENSOR:
                _widen_tensor(attribute.t, narrow)
            elif attribute.type == onnx.AttributeProto.GRAPH:
                _widen_graph(attribute.g, narrow)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for graph in attribute.graphs:
                    _widen_graph(graph, narrow)


def _widen_tensor(tensor: onnx.TensorProto, narrow: tuple[int, ...]) -> None:
    if tensor.data_type in narrow:
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype("float32"), tensor.name))
