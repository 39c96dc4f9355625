"""Operators the ONNX standard defines as functions of other operators (Attention at opset 23, and others)
are differentiated through their definition: each node with no gradient rule whose schema has a function body
is replaced by that body, inlined with fresh names, before the walk."""

from __future__ import annotations

import onnx
from onnx import defs, helper, inliner, shape_inference

from ..core.errors import ExportError

LOCAL_DOMAIN = "onnxcam.expanded"


def expand_functions(model: onnx.ModelProto, differentiable: set[str]) -> onnx.ModelProto:
    """The model with every default-domain node whose op is not in `differentiable` but has a function body in
    its schema replaced by that body. A model with no such node comes back as it was."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    types = None
    functions = []
    for index, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type in differentiable:
            continue
        try:
            schema = defs.get_schema(node.op_type, opset)
        except defs.SchemaError:
            continue
        if not (schema.has_function or schema.has_context_dependent_function):
            continue
        if types is None:
            types = _value_types(model)
        body = _body(schema, node, opset, types)
        if body is None:
            continue
        body.name, body.domain = f"{node.op_type}_{index}", LOCAL_DOMAIN
        functions.append(body)
        node.op_type, node.domain = body.name, LOCAL_DOMAIN
    if not functions:
        return model
    model.functions.extend(functions)
    model.opset_import.append(helper.make_opsetid(LOCAL_DOMAIN, 1))
    expanded = inliner.inline_local_functions(model)
    del expanded.opset_import[:]
    expanded.opset_import.extend(o for o in model.opset_import if o.domain != LOCAL_DOMAIN)
    return expanded


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    inferred = shape_inference.infer_shapes(model)
    graph = inferred.graph
    return {v.name: v.type for v in [*graph.input, *graph.value_info, *graph.output]}


def _body(schema, node: onnx.NodeProto, opset: int, types: dict) -> onnx.FunctionProto | None:
    """The function body of one node: the schema's own, or the one made for its attributes and input types."""
    if schema.has_function:
        body = onnx.FunctionProto()
        body.CopyFrom(schema.get_function_with_opset_version(opset) or schema.function_body)
        return body
    missing = [name for name in node.input if name and name not in types]
    if missing:
        raise ExportError(f"{node.op_type} node '{node.name}' cannot be expanded: the types of {missing} are unknown")
    serialized = schema.get_context_dependent_function_with_opset_version(
        opset, node.SerializeToString(), [types[name].SerializeToString() for name in node.input if name])
    if not serialized:
        return None
    body = onnx.FunctionProto()
    body.ParseFromString(serialized)
    return body
