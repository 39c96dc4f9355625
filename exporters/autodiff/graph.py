"""What the gradient rules need to know about a graph, and a builder for the nodes they emit."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

INT64_MAX = np.iinfo(np.int64).max


class ExportError(Exception):
    """A model that cannot be made explainable, said in one line a user can act on."""


class UnsupportedOperator(ExportError):
    def __init__(self, node: onnx.NodeProto):
        super().__init__(
            f"operator {node.op_type} (node '{node.name or node.output[0]}') lies between the target "
            f"and the output and has no gradient rule"
        )
        self.node = node


class GraphBuilder:
    """Static facts of a shape-inferred graph plus an emitter of new nodes with fresh names.

    Shapes come from ONNX shape inference: a dimension is an int when known, None when symbolic
    (the batch). Rules use static shapes only where ONNX has no dynamic operator for the job.
    """

    def __init__(self, model: onnx.ModelProto, prefix: str = "onnxcam_grad"):
        self.model = model
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.output_grads: list[str | None] = []  # gradients of the current node's outputs, for Split
        self._count = 0
        graph = model.graph
        self._types: dict[str, tuple[int, list[int | None] | None]] = {}
        for info in [*graph.input, *graph.value_info, *graph.output]:
            tensor_type = info.type.tensor_type
            dims = None
            if tensor_type.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
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
        return self.elem_type(name) in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                                        onnx.TensorProto.BFLOAT16)

    def shape(self, name: str) -> list[int | None]:
        dims = self._types.get(name, (0, None))[1]
        if dims is None:
            raise ExportError(f"the shape of tensor '{name}' is unknown after shape inference")
        return dims

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output, or None when it is computed at run time."""
        tensor = self._constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def required_constant(self, node: onnx.NodeProto, index: int) -> np.ndarray | None:
        if index >= len(node.input) or not node.input[index]:
            return None
        value = self.constant(node.input[index])
        if value is None:
            raise ExportError(f"{node.op_type} node '{node.name}' needs a constant input {index} to be differentiated")
        return value

    # emitters ----------------------------------------------------------------------------------
    def fresh(self, hint: str = "t") -> str:
        self._count += 1
        return f"{self.prefix}/{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        names = [self.fresh(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=names[0], **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, like: str | None = None) -> str:
        """An initializer; floats take the element type of tensor `like` (float32 without it)."""
        array = np.asarray(value)
        if like is not None and array.dtype.kind == "f":
            array = array.astype(helper.tensor_dtype_to_np_dtype(self.elem_type(like)))
        elif array.dtype.kind == "f":
            array = array.astype(np.float32)
        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64))

    # small compositions the rules share --------------------------------------------------------
    def reduce_sum(self, x: str, axes, keepdims: int = 1) -> str:
        return self.op("ReduceSum", x, self.ints(list(axes)), keepdims=keepdims)

    def reduce_mean(self, x: str, axes, like: str) -> str:
        """Mean over `axes`, keeping them; the count is read at run time so symbolic dims work."""
        total = self.reduce_sum(x, axes)
        return self.op("Div", total, self.count_ratio(x, total, like))

    def count_ratio(self, big: str, small: str, like: str) -> str:
        """size(big) / size(small), the number of elements averaged, as a scalar of `like`'s float type."""
        to = self.elem_type(like)
        return self.op("Div", self.op("Cast", self.op("Size", big), to=to), self.op("Cast", self.op("Size", small), to=to))

    def expand_like(self, grad: str, x: str) -> str:
        return self.op("Expand", grad, self.op("Shape", x))

    def reshape_like(self, grad: str, x: str) -> str:
        return self.op("Reshape", grad, self.op("Shape", x))

    def mask(self, grad: str, condition: str, like: str) -> str:
        """grad where condition holds, zero elsewhere (`like` gives the float type)."""
        return self.op("Where", condition, grad, self.const(0.0, like=like))

    def unbroadcast(self, grad: str, x: str, y: str) -> str:
        """Sum `grad` (shaped like y) over the axes numpy broadcasting stretched x along."""
        x_shape, y_shape = self.shape(x), self.shape(y)
        lead = len(y_shape) - len(x_shape)
        axes = list(range(lead)) + [lead + i for i, d in enumerate(x_shape) if d == 1 and y_shape[lead + i] != 1]
        if axes:
            grad = self.reduce_sum(grad, axes)
        return self.reshape_like(grad, x) if lead else grad

    def zeros_like(self, x: str) -> str:
        value = numpy_helper.from_array(np.zeros(1, helper.tensor_dtype_to_np_dtype(self.elem_type(x))), "value")
        return self.op("ConstantOfShape", self.op("Shape", x), value=value)
