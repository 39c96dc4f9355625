"""The graph the gradient rules read and write: values with arithmetic, nodes with schema defaults.

`GraphBuilder` knows the static facts of a shape-inferred model (element types, shapes, constant
values) and emits new nodes with fresh names. `Value` wraps a tensor name so that a rule can be
written as its formula, `dy * y * (1 - y)`: each operator emits one ONNX node, and Python numbers
become constants of the other operand's element type. `Node` is the forward node a rule
differentiates, its attributes read with the defaults of the ONNX schema, as the reference
evaluator reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache

import numpy as np
import onnx
from onnx import defs, helper, numpy_helper

from ...core.errors import ExportError

INT64_MAX = np.iinfo(np.int64).max
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)

Dims = list[int | None]
_TYPE_FROM_INPUT = {"Where": 1, "OneHot": 2}  # the input whose element type the output takes, where not the first
_BOOLEAN_OPS = {"Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "And", "Or", "Not", "Xor", "IsNaN",
                "IsInf"}


def needed_nodes(nodes, outputs) -> tuple[list, set[str]]:
    """The nodes that feed `outputs` (in graph order) and every name they read or write: one backward sweep."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1], needed


class Value:
    """A tensor of the graph being built. Arithmetic with another Value or a Python number emits a node."""

    __slots__ = ("g", "name")

    def __init__(self, g: GraphBuilder, name: str):
        self.g, self.name = g, name

    def __repr__(self) -> str:
        return f"Value({self.name!r})"

    # facts
    @property
    def shape(self) -> Dims:
        return self.g.shape(self.name)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def elem_type(self) -> int:
        return self.g.elem_type(self.name)

    def const(self, value) -> Value:
        """A constant of this value's element type (for floats)."""
        return self.g.const(value, like=self)

    # arithmetic: one node each
    def _binary(self, op_type: str, other, reflected: bool = False) -> Value:
        other = other if isinstance(other, Value) else self.const(other)
        return self.g.op(op_type, other, self) if reflected else self.g.op(op_type, self, other)

    def __add__(self, other): return self._binary("Add", other)
    def __radd__(self, other): return self._binary("Add", other, reflected=True)
    def __sub__(self, other): return self._binary("Sub", other)
    def __rsub__(self, other): return self._binary("Sub", other, reflected=True)
    def __mul__(self, other): return self._binary("Mul", other)
    def __rmul__(self, other): return self._binary("Mul", other, reflected=True)
    def __truediv__(self, other): return self._binary("Div", other)
    def __rtruediv__(self, other): return self._binary("Div", other, reflected=True)
    def __pow__(self, other): return self._binary("Pow", other)
    def __neg__(self): return self.g.op("Neg", self)
    def __gt__(self, other): return self._binary("Greater", other)
    def __lt__(self, other): return self._binary("Less", other)
    def __and__(self, other): return self._binary("And", other)
    def __invert__(self): return self.g.op("Not", self)
    __hash__ = object.__hash__


class Attributes(Mapping):
    """A node's attributes, each defaulting to its value in the operator's schema (None where the schema
    gives none, as for per-axis lists whose default depends on the rank). Strings come back as str."""

    def __init__(self, node: onnx.NodeProto, opset: int):
        self._given = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        self._defaults = _schema_defaults(node.op_type, node.domain or "", opset)

    def __getitem__(self, name: str):
        value = self._given[name] if name in self._given else self._defaults.get(name)
        if isinstance(value, bytes):
            return value.decode()
        return value

    def __iter__(self):
        return iter({**self._defaults, **self._given})

    def __len__(self) -> int:
        return len({**self._defaults, **self._given})


@cache
def _schema_defaults(op_type: str, domain: str, opset: int) -> dict:
    try:
        schema = defs.get_schema(op_type, opset, domain)
    except defs.SchemaError:
        return {}
    return {name: helper.get_attribute_value(a.default_value) if a.default_value.type else None
            for name, a in schema.attributes.items()}


class Node:
    """A forward node as a rule sees it: its input and output values (None where an optional one is left
    out), its attributes with schema defaults, and its name for error messages."""

    def __init__(self, g: GraphBuilder, proto: onnx.NodeProto):
        self.proto, self.op_type = proto, proto.op_type
        self.name = proto.name or proto.output[0]
        self.inputs = [Value(g, name) if name else None for name in proto.input]
        self.outputs = [Value(g, name) if name else None for name in proto.output]
        self.attrs = Attributes(proto, g.opset)

    def constant(self, index: int) -> np.ndarray | None:
        """The value of input `index` when it is a constant, None when it is left out.

        A rule that needs it (axes, pads, starts) calls this; a computed one cannot be differentiated."""
        if index >= len(self.inputs) or self.inputs[index] is None:
            return None
        value = self.inputs[index].g.constant(self.inputs[index].name)
        if value is None:
            raise ExportError(f"{self.op_type} node '{self.name}' needs a constant input {index} to be differentiated")
        return value

    def fail(self, why: str) -> ExportError:
        return ExportError(f"{self.op_type} node '{self.name}' {why}")


class GraphBuilder:
    """Static facts of a shape-inferred graph plus an emitter of new nodes with fresh names.

    Shapes come from ONNX shape inference: a dimension is an int when known, None when symbolic
    (the batch). Rules use static shapes only where ONNX has no dynamic operator for the job.
    """

    def __init__(self, model: onnx.ModelProto, prefix: str = "onnxcam_grad"):
        self.model = model
        self.prefix = prefix
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        graph = model.graph
        self._types: dict[str, tuple[int, Dims | None]] = {}
        self._dim_params: dict[str, list[str | None]] = {}
        for info in [*graph.input, *graph.value_info, *graph.output]:
            tensor_type = info.type.tensor_type
            dims = None
            if tensor_type.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None  # Paddle writes -1
                        for d in tensor_type.shape.dim]
                self._dim_params[info.name] = [d.dim_param or None for d in tensor_type.shape.dim]
            self._types[info.name] = (tensor_type.elem_type, dims)
        self._constants = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self._constants[node.output[0]] = node.attribute[0].t
        for t in graph.initializer:
            self._types.setdefault(t.name, (t.data_type, list(t.dims)))

    # facts -------------------------------------------------------------------------------------
    def elem_type(self, name: str) -> int:
        return self._types.get(name, (onnx.TensorProto.UNDEFINED, None))[0]

    def is_float(self, name: str) -> bool:
        return self.elem_type(name) in FLOAT_TYPES

    def shape(self, name: str) -> Dims:
        dims = self._types.get(name, (0, None))[1]
        if dims is None:
            raise ExportError(f"the shape of tensor '{name}' is unknown after shape inference")
        return dims

    def dim_param(self, name: str, axis: int) -> str | None:
        """The name of a tensor's symbolic dimension `axis`, None where it has none."""
        params = self._dim_params.get(name, [])
        return params[axis] if axis < len(params) else None

    def same_size(self, a: str, b: str, axis: int) -> bool:
        """Whether two tensors are known to have the same size along `axis`: equal static sizes, or the same
        symbolic dimension (ONNX gives equal names to equal sizes, such as the batch)."""
        size_a, size_b = self.shape(a)[axis], self.shape(b)[axis]
        if size_a is not None or size_b is not None:
            return size_a == size_b
        param = self.dim_param(a, axis)
        return param is not None and param == self.dim_param(b, axis)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output, or None when it is computed at run time."""
        tensor = self._constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def value(self, name: str) -> Value:
        return Value(self, name)

    # emitters ----------------------------------------------------------------------------------
    def fresh(self, hint: str = "t") -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def op(self, op_type: str, *inputs: Value | str | None, **attrs) -> Value:
        """Emit a node with one output."""
        return self.op_multi(op_type, *inputs, outputs=1, **attrs)[0]

    def op_multi(self, op_type: str, *inputs: Value | str | None, outputs: int, domain: str = "",
                 **attrs) -> list[Value]:
        """Emit a node with `outputs` outputs. Inputs are values, names, or None for a left-out optional one."""
        names = [self.fresh(op_type) for _ in range(outputs)]
        inputs = ["" if i is None else i.name if isinstance(i, Value) else i for i in inputs]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=names[0], domain=domain or None, **attrs))
        elem_type = self._emitted_type(op_type, inputs, attrs)
        for name in names:
            self._types[name] = (elem_type, None)  # shapes are static facts of the forward graph only
        return [Value(self, name) for name in names]

    def _emitted_type(self, op_type: str, inputs: list[str], attrs: dict) -> int:
        """The element type of a new node's outputs, so that constants combined with them match it."""
        if op_type in _BOOLEAN_OPS:
            return onnx.TensorProto.BOOL
        if op_type in ("Shape", "Size", "ArgMax", "ArgMin", "NonZero"):
            return onnx.TensorProto.INT64
        if op_type == "Cast":
            return attrs["to"]
        if op_type == "ConstantOfShape":
            return attrs["value"].data_type
        source = _TYPE_FROM_INPUT.get(op_type, 0)
        return self.elem_type(inputs[source]) if source < len(inputs) else onnx.TensorProto.UNDEFINED

    def const(self, value, like: Value | str | None = None) -> Value:
        """An initializer of the element type of `like`; without it, floats become float32."""
        array = np.asarray(value)
        elem_type = self.elem_type(getattr(like, "name", like)) if like is not None else onnx.TensorProto.UNDEFINED
        if elem_type != onnx.TensorProto.UNDEFINED:
            array = array.astype(helper.tensor_dtype_to_np_dtype(elem_type))
        elif array.dtype.kind == "f":
            array = array.astype(np.float32)
        name = self.fresh("const")
        tensor = numpy_helper.from_array(array, name)
        self.initializers.append(tensor)
        self._types[name] = (tensor.data_type, list(array.shape))
        return Value(self, name)

    def ints(self, values) -> Value:
        return self.const(np.asarray(values, dtype=np.int64))
