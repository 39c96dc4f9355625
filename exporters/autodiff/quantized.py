"""Gradient rules for quantized graphs: the straight-through estimator (STE) of quantization-aware training.

A tensor of integer codes q is differentiated as if q were real: its gradient is d score / d q, in the
float type of its scale. The rules follow from the dequantized value x = (q - zero_point) * scale:

- DequantizeLinear: dq = dy * scale;
- QuantizeLinear: dx = dq / scale where round(x / scale) + zero_point lies in the range of the code type,
  zero outside (Bengio et al. 2013, "Estimating or propagating gradients through stochastic neurons";
  Jacob et al. 2018, "Quantization and training of neural networks for efficient integer-arithmetic-only
  inference", sec. 3), so that a QuantizeLinear -> DequantizeLinear pair passes dy inside the range;
- DynamicQuantizeLinear: the same, its scale held constant for the run (its range covers every value);
- integer operators (ConvInteger, MatMulInteger) and the QOperator ones (QLinearConv, QGemm, ...) are
  differentiated as their float operator on dequantized operands (the float rule of rules.RULES), the
  output's requantization passing the gradient where its code is strictly inside the range (a code at an
  end of the range is taken as saturated: that is how a fused Relu is written);
- the quantization of the class scores themselves passes the gradient everywhere (see is_score).

Constant operands (weights) are dequantized at export time with numpy; activations in the graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, shape_inference

from .graph import GraphBuilder, Node, Value
from .rules import RULES, Grads, mask

CODE_RANGES = {TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127), TensorProto.UINT16: (0, 65535),
               TensorProto.INT16: (-32768, 32767), TensorProto.UINT4: (0, 15), TensorProto.INT4: (-8, 7),
               TensorProto.INT32: (-2 ** 31, 2 ** 31 - 1)}

# Outputs held constant by the STE: the walk sends no gradient into them.
CONSTANT_OUTPUTS = {"DynamicQuantizeLinear": {1, 2}}


class Operand:
    """Where a quantized operand sits among a node's inputs: its codes, scale and zero point (None: absent),
    and the axis of a constant's per-channel scale ("trans" picks Gemm's B axis by the transB attribute)."""

    def __init__(self, codes: int, scale: int | None, zero_point: int | None, axis: int | str = 0):
        self.codes, self.scale, self.zero_point, self.axis = codes, scale, zero_point, axis


class QOperator:
    """A QOperator-format operator: its float twin, its operands, and its output's scale and zero point
    (None: the output is float)."""

    def __init__(self, twin: str, operands: list[Operand], output: tuple[int, int] | None):
        self.twin, self.operands, self.output = twin, operands, output


def _binary(twin: str) -> QOperator:
    return QOperator(twin, [Operand(0, 1, 2), Operand(3, 4, 5, axis=-1)], (6, 7))


def _unary(twin: str) -> QOperator:
    return QOperator(twin, [Operand(0, 1, 2)], (3, 4))


QOPERATORS = {
    "QLinearConv": QOperator("Conv", [Operand(0, 1, 2), Operand(3, 4, 5, axis=0)], (6, 7)),
    "QLinearMatMul": _binary("MatMul"),
    "QGemm": QOperator("Gemm", [Operand(0, 1, 2), Operand(3, 4, 5, axis="trans")], (7, 8)),
    "QLinearAdd": _binary("Add"),
    "QLinearMul": _binary("Mul"),
    "QLinearSigmoid": _unary("Sigmoid"),
    "QLinearLeakyRelu": _unary("LeakyRelu"),
    "QLinearSoftmax": _unary("Softmax"),
    "QLinearGlobalAveragePool": _unary("GlobalAveragePool"),
    "QLinearAveragePool": _unary("AveragePool"),
}
INTEGER_OPERATORS = {
    "ConvInteger": QOperator("Conv", [Operand(0, None, 2), Operand(1, None, 3, axis=0)], None),
    "MatMulInteger": QOperator("MatMul", [Operand(0, None, 2), Operand(1, None, 3, axis=-1)], None),
}


# the rules ---------------------------------------------------------------------------------------------
def dequantize_linear(g: GraphBuilder, n: Node, dys: Grads) -> Grads:
    """y = (q - zero_point) scale: dq = dy scale."""
    return [dys[0] * along(n, n.inputs[1], n.inputs[0])] + [None] * (len(n.inputs) - 1)


def quantize_linear(g: GraphBuilder, n: Node, dys: Grads) -> Grads:
    """q = saturate(round(x / scale) + zero_point): dx = dq / scale inside the code range, 0 outside."""
    x, q = n.inputs[0], n.outputs[0]
    if n.attrs.get("block_size"):
        raise n.fail("quantizes by blocks, which has no gradient rule")
    scale = along(n, n.inputs[1], x)
    code = g.op("Round", x / scale)
    if len(n.inputs) > 2 and n.inputs[2] is not None:
        code = code + g.op("Cast", along(n, n.inputs[2], x), to=x.elem_type)
    low, high = code_range(n, q, n.inputs[2] if len(n.inputs) > 2 else None)
    dx = dys[0] / scale if is_score(g, q) else mask(dys[0] / scale, (code > low - 0.5) & (code < high + 0.5))
    return [dx] + [None] * (len(n.inputs) - 1)


def dynamic_quantize_linear(g: GraphBuilder, n: Node, dys: Grads) -> Grads:
    """uint8 codes over the range [min(x, 0), max(x, 0)], which holds every x: dx = dq / scale."""
    return [dys[0] / n.outputs[1]]


def cast(g: GraphBuilder, n: Node, dys: Grads) -> Grads:
    """The gradient of integer codes stays in its float type; between floats, as rules.RULES casts it."""
    return [dys[0]] if not g.is_float(n.inputs[0].name) else RULES["Cast"](g, n, dys)


def max_pool(g: GraphBuilder, n: Node, dys: Grads) -> Grads:
    """MaxPool over codes routes the gradient as over their float values (codes keep the order). Over codes
    and 16-bit floats the routing runs in float32 (ONNX Runtime's CPU ScatterElements cannot add float16),
    the gradient cast back to its own type."""
    if n.inputs[0].elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE):
        return RULES["MaxPool"](g, n, dys)
    x, dy = (g.op("Cast", v, to=TensorProto.FLOAT) for v in (n.inputs[0], dys[0]))
    declare(g, x, TensorProto.FLOAT, n.inputs[0])
    twin = Node(g, helper.make_node("MaxPool", [x.name], [n.outputs[0].name], name=n.name,
                                    **{a.name: helper.get_attribute_value(a) for a in n.proto.attribute}))
    return [g.op("Cast", RULES["MaxPool"](g, twin, [dy])[0], to=dys[0].elem_type)]


def qoperator(spec: QOperator):
    """The rule of a QOperator or integer operator: its float twin's rule on dequantized operands."""
    return lambda g, n, dys: _through_twin(g, n, spec, dys[0])


def qlinear_concat(g: GraphBuilder, n: Node, dys: Grads) -> Grads:
    """QLinearConcat(y_scale, y_zero_point, x1, x1_scale, x1_zero_point, ...)."""
    operands = [Operand(i, i + 1, i + 2) for i in range(2, len(n.inputs), 3)]
    return _through_twin(g, n, QOperator("Concat", operands, (0, 1)), dys[0])


QUANTIZED_RULES = {
    "QuantizeLinear": quantize_linear,
    "DequantizeLinear": dequantize_linear,
    "DynamicQuantizeLinear": dynamic_quantize_linear,
    "QLinearConcat": qlinear_concat,
    "Cast": cast,
    "MaxPool": max_pool,
    **{op: qoperator(spec) for op, spec in {**QOPERATORS, **INTEGER_OPERATORS}.items()},
}
# The operators whose integer outputs are codes with a gradient (the walk's active tensors).
CODE_PRODUCERS = set(QUANTIZED_RULES) - {"Cast", "MaxPool", "DequantizeLinear"}


# helpers -----------------------------------------------------------------------------------------------
def code_range(n: Node, codes: Value, zero_point: Value | None) -> tuple[int, int]:
    """The smallest and largest code, by the zero point's type (shape inference may not know the operator)."""
    elem_type = zero_point.elem_type if zero_point is not None else codes.elem_type or TensorProto.UINT8
    if elem_type not in CODE_RANGES:
        raise n.fail(f"writes codes of type {helper.tensor_dtype_to_string(elem_type)}, which have no gradient rule")
    return CODE_RANGES[elem_type]


def is_score(g: GraphBuilder, codes: Value) -> bool:
    """Whether codes are the quantized class scores, dequantized straight into a graph output. Their
    quantization passes the gradient everywhere: a score above the calibrated range still has its gradient
    (masked, an image scored more confidently than every calibration image would get an empty map)."""
    outputs = {o.name for o in g.model.graph.output}
    return any(node.op_type == "DequantizeLinear" and node.input[0] == codes.name and node.output[0] in outputs
               for node in g.model.graph.node)


def along(n: Node, parameter: Value, x: Value) -> Value:
    """A per-tensor scale or zero point as it is, a per-axis one reshaped to broadcast along the node's axis."""
    if parameter.rank == 0:
        return parameter
    axis = int(n.attrs["axis"]) % x.rank
    return parameter.g.op("Reshape", parameter, parameter.g.ints([-1] + [1] * (x.rank - axis - 1)))


def declare(g: GraphBuilder, value: Value, elem_type: int, like: Value) -> None:
    """Record that an emitted tensor has the shape of `like` (a forward tensor), so that a float rule can read it."""
    g._types[value.name] = (elem_type, g._types.get(like.name, (0, None))[1])  # the builder's own record


def _through_twin(g: GraphBuilder, n: Node, spec: QOperator, dy: Value) -> Grads:
    """Dequantize the operands, differentiate the float twin, and scale its gradients back onto the codes."""
    if n.attrs.get("channels_last"):
        raise n.fail("works channels-last, which has no gradient rule")
    float_type = dy.elem_type or TensorProto.FLOAT
    scale, zero_point = (_input(n, i) for i in spec.output) if spec.output else (None, None)
    if scale is not None:  # quantized output (QGemm may write floats)
        codes = n.outputs[0]
        low, high = code_range(n, codes, zero_point)
        if not is_score(g, codes):
            as_float = g.op("Cast", codes, to=float_type)  # the codes' type may be unknown to shape inference
            dy = mask(dy, (as_float > low) & (as_float < high))
        dy = dy / scale
        output = _real(g, n, Operand(0, None, None), scale, zero_point, codes, float_type)
    else:
        output = n.outputs[0]
    reals = [_real(g, n, o, _input(n, o.scale), _input(n, o.zero_point), n.inputs[o.codes], float_type)
             for o in spec.operands]
    twin_attributes = onnx.defs.get_schema(spec.twin, g.opset).attributes
    attributes = {a.name: helper.get_attribute_value(a) for a in n.proto.attribute if a.name in twin_attributes}
    twin = Node(g, helper.make_node(spec.twin, [r.name for r in reals], [output.name], name=n.name, **attributes))
    twin_grads = RULES[spec.twin](g, twin, [dy])
    grads: Grads = [None] * len(n.inputs)
    for operand, grad in zip(spec.operands, twin_grads, strict=True):
        if grad is not None and g.constant(n.inputs[operand.codes].name) is None:
            operand_scale = _input(n, operand.scale)
            grads[operand.codes] = grad if operand_scale is None else grad * operand_scale
    return grads


def _input(n: Node, index: int | None) -> Value | None:
    return n.inputs[index] if index is not None and index < len(n.inputs) else None


def _real(g: GraphBuilder, n: Node, operand: Operand, scale: Value | None, zero_point: Value | None,
          codes: Value, float_type: int) -> Value:
    """(codes - zero_point) * scale: folded with numpy for a constant, computed in the graph otherwise."""
    dtype = helper.tensor_dtype_to_np_dtype(float_type)
    constant = g.constant(codes.name)
    if constant is not None:
        axis = operand.axis if operand.axis != "trans" else (0 if n.attrs["transB"] else 1)
        real = constant.astype(dtype)
        for parameter, combine in ((zero_point, np.subtract), (scale, np.multiply)):
            if parameter is not None:
                value = n.constant(n.inputs.index(parameter)).astype(dtype)
                if value.ndim and real.ndim:  # per-axis parameters line up with their axis
                    shape = [1] * real.ndim
                    shape[axis % real.ndim] = -1
                    value = value.reshape(shape)
                real = combine(real, value)
        return g.const(real)
    real = g.op("Cast", codes, to=float_type)
    if zero_point is not None:
        real = real - g.op("Cast", zero_point, to=float_type)
    if scale is not None:
        real = real * scale
    declare(g, real, float_type, codes)
    return real


# the front end's hook ----------------------------------------------------------------------------------
def expose_dequantized(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every activation of codes of rank 3 or more that a QOperator node writes a float twin that a target
    can name: codes -> DequantizeLinear -> `<codes>/dequantized` -> QuantizeLinear -> the codes its readers
    read, a round trip that gives every code back exactly. A Grad-CAM target there gets the gradient with
    respect to the dequantized activation. A model without such nodes comes back as it was (not inferred:
    it may be too large for a ModelProto's in-memory shape inference)."""
    if not any(qoperator_spec(node) for node in model.graph.node):
        return model
    model = with_contrib_shapes(model)  # a copy: the caller's model is left as it is
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in model.graph.value_info
             if i.type.tensor_type.HasField("shape")}
    nodes, renamed = [], {}
    for node in model.graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        nodes.append(node)
        spec, codes = qoperator_spec(node), node.output[0]
        if spec is None or spec.output is None or len(node.input) <= spec.output[0] or ranks.get(codes, 0) < 3:
            continue
        scale, zero_point = (node.input[i] for i in spec.output)
        real, renamed[codes] = f"{codes}/dequantized", f"{codes}/requantized"
        nodes += [helper.make_node("DequantizeLinear", [codes, scale, zero_point], [real], name=real),
                  helper.make_node("QuantizeLinear", [real, scale, zero_point], [renamed[codes]],
                                   name=renamed[codes])]
    if renamed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return model


def qoperator_spec(node: onnx.NodeProto) -> QOperator | None:
    """How a QOperator node's inputs are laid out (None for any other node)."""
    if node.op_type == "QLinearConcat":
        return QOperator("Concat", [Operand(i, i + 1, i + 2) for i in range(2, len(node.input), 3)], (0, 1))
    return QOPERATORS.get(node.op_type)


def with_contrib_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with inferred shapes, those of the com.microsoft QOperators included: ONNX shape inference does
    not know them, so a stand-in model, each of them replaced by its float twin on cast operands, is inferred
    once and the shapes of their outputs are kept."""
    model = shape_inference.infer_shapes(model)
    contrib = {node.output[0] for node in model.graph.node if node.domain == "com.microsoft" and qoperator_spec(node)}
    if not contrib:
        return model
    code_types = {t.name: t.data_type for t in model.graph.initializer}
    stand_in = onnx.ModelProto()
    stand_in.CopyFrom(model)
    nodes = []
    for node in stand_in.graph.node:
        spec = qoperator_spec(node) if node.output[0] in contrib else None
        if spec is None:
            nodes.append(node)
            continue
        out = node.output[0]
        casts = [helper.make_node("Cast", [node.input[o.codes]], [f"{out}/stand_in_{i}"], to=TensorProto.FLOAT)
                 for i, o in enumerate(spec.operands)]
        twin_attributes = onnx.defs.get_schema(spec.twin, 21).attributes
        twin = helper.make_node(spec.twin, [c.output[0] for c in casts], [f"{out}/stand_in"],
                                **{a.name: helper.get_attribute_value(a) for a in node.attribute
                                   if a.name in twin_attributes})
        zero_point = node.input[spec.output[1]] if spec.output and spec.output[1] < len(node.input) else ""
        nodes += [*casts, twin, helper.make_node("Cast", [twin.output[0]], [out],
                                                 to=code_types.get(zero_point, TensorProto.FLOAT))]
    del stand_in.graph.node[:]
    stand_in.graph.node.extend(nodes)
    inferred = shape_inference.infer_shapes(stand_in, data_prop=True).graph.value_info
    model.graph.value_info.extend(info for info in inferred if info.name in contrib)
    return shape_inference.infer_shapes(model)
