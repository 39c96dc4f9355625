"""Vector-Jacobian product rules, one per ONNX operator.

A rule is called as `rule(g, n, dys)`: the builder `g`, the forward `Node` `n`, and `dys`, the
gradients of every output of `n` (a `Value`, or None where nothing downstream needs it). It returns
exactly one entry per input of `n`: the gradient with respect to that input, or None. Rules are pure:
they emit new nodes and never edit the forward graph. They may return gradients nobody needs; the
walk drops the nodes that feed no output. Semantics follow the ONNX operator specification
(onnx.ai/onnx/operators), opset 17 and later. The table comes first; the longer rules follow it.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import INT64_MAX, GraphBuilder, Node, Value

Grads = list[Value | None]
Rule = Callable[[GraphBuilder, Node, Grads], Grads]


def unary(slope: Callable[[Value, Value, Value], Value]) -> Rule:
    """An element-wise operator y = f(x): the rule is dx = slope(x, y, dy), other inputs get none."""
    return lambda g, n, dys: [slope(n.inputs[0], n.outputs[0], dys[0])] + [None] * (len(n.inputs) - 1)


def reduction(slope: Callable[[Value, Value, list[int]], Value]) -> Rule:
    """A reduction y = reduce(x): dx = dy slope(x, y, axes), dy and y with their reduced axes kept. (A no-op
    reduction is the identity: its slope is 1 at y = x.)"""
    def rule(g: GraphBuilder, n: Node, dys: Grads) -> Grads:
        x, axes = n.inputs[0], reduced_axes(n)
        return [kept(n, dys[0], axes) * slope(x, kept(n, n.outputs[0], axes), axes), None][:len(n.inputs)]
    return rule


def share_of_extremum(x: Value, y: Value, axes) -> Value:
    """d max(x) / dx: 1 at the position of the maximum (or minimum); tied positions share it evenly."""
    attains = x.g.op("Cast", x.g.op("Equal", x, y), to=x.elem_type)
    return attains / reduce_sum(attains, axes) if axes else attains


RULES: dict[str, Rule] = {
    # element-wise
    "Identity": unary(lambda x, y, dy: dy),
    "Dropout": unary(lambda x, y, dy: dy),  # inference: the identity
    "Neg": unary(lambda x, y, dy: -dy),
    "Relu": unary(lambda x, y, dy: mask(dy, y > 0)),
    "LeakyRelu": lambda g, n, dys: [dys[0] * where(n.inputs[0] > 0, 1.0, n.attrs["alpha"], like=n.inputs[0])],
    "Clip": lambda g, n, dys: clip(n, dys[0]),
    "Sigmoid": unary(lambda x, y, dy: dy * y * (1 - y)),
    "HardSigmoid": lambda g, n, dys: [hard_sigmoid(n, dys[0])],
    "HardSwish": unary(lambda x, y, dy: mask(dy * where(x > 3, 1.0, x / 3 + 0.5, like=x), x > -3)),
    "Tanh": unary(lambda x, y, dy: dy * (1 - y * y)),
    "Exp": unary(lambda x, y, dy: dy * y),
    "Sqrt": unary(lambda x, y, dy: dy * 0.5 / y),
    "Reciprocal": unary(lambda x, y, dy: -dy * y * y),
    "Erf": unary(lambda x, y, dy: dy * (2 / math.sqrt(math.pi)) * x.g.op("Exp", -(x * x))),
    "Gelu": lambda g, n, dys: [gelu(n, dys[0])],
    "Pow": lambda g, n, dys: [power(n, dys[0]), None],
    "Cast": lambda g, n, dys: [g.op("Cast", dys[0], to=n.inputs[0].elem_type)],
    "CastLike": lambda g, n, dys: [g.op("Cast", dys[0], to=n.inputs[0].elem_type), None],
    "Abs": unary(lambda x, y, dy: dy * x.g.op("Sign", x)),
    "Log": unary(lambda x, y, dy: dy / x),
    "Softplus": unary(lambda x, y, dy: dy * x.g.op("Sigmoid", x)),
    "Softsign": unary(lambda x, y, dy: dy / (1 + x.g.op("Abs", x)) ** 2),
    "Mish": unary(lambda x, y, dy: dy * mish_slope(x)),
    # y = x above 0; below, Elu's y = alpha (e^x - 1), Selu's gamma alpha (e^x - 1), Celu's alpha (e^(x/alpha) - 1)
    "Elu": lambda g, n, dys: [dys[0] * below_zero(n, 1.0, n.outputs[0] + n.attrs["alpha"])],
    "Selu": lambda g, n, dys: [dys[0] * below_zero(n, n.attrs["gamma"],
                                                   n.outputs[0] + n.attrs["gamma"] * n.attrs["alpha"])],
    "Celu": lambda g, n, dys: [dys[0] * below_zero(n, 1.0, n.outputs[0] / n.attrs["alpha"] + 1)],
    "ThresholdedRelu": lambda g, n, dys: [mask(dys[0], n.inputs[0] > n.attrs["alpha"])],
    "PRelu": lambda g, n, dys: [dys[0] * where(n.inputs[0] < 0, n.inputs[1], 1.0, like=n.inputs[0]), None],
    # arithmetic, with numpy broadcasting
    "Add": lambda g, n, dys: [unbroadcast(dys[0], x, n.outputs[0]) for x in n.inputs],
    "Sub": lambda g, n, dys: [unbroadcast(dys[0], n.inputs[0], n.outputs[0]),
                              unbroadcast(-dys[0], n.inputs[1], n.outputs[0])],
    "Mul": lambda g, n, dys: [unbroadcast(dys[0] * n.inputs[1], n.inputs[0], n.outputs[0]),
                              unbroadcast(dys[0] * n.inputs[0], n.inputs[1], n.outputs[0])],
    "Div": lambda g, n, dys: [unbroadcast(dys[0] / n.inputs[1], n.inputs[0], n.outputs[0]),
                              unbroadcast(-dys[0] * n.outputs[0] / n.inputs[1], n.inputs[1], n.outputs[0])],
    "Where": lambda g, n, dys: [None, unbroadcast(mask(dys[0], n.inputs[0]), n.inputs[1], n.outputs[0]),
                                unbroadcast(mask(dys[0], ~n.inputs[0]), n.inputs[2], n.outputs[0])],
    "Expand": lambda g, n, dys: [unbroadcast(dys[0], n.inputs[0], n.outputs[0]), None],
    "Sum": lambda g, n, dys: [unbroadcast(dys[0], x, n.outputs[0]) for x in n.inputs],
    "Mean": lambda g, n, dys: [unbroadcast(dys[0] / len(n.inputs), x, n.outputs[0]) for x in n.inputs],
    "Max": lambda g, n, dys: extremum(n, dys[0]),
    "Min": lambda g, n, dys: extremum(n, dys[0]),
    # windows and linear algebra
    "Conv": lambda g, n, dys: [conv(g, n, dys[0])] + [None] * (len(n.inputs) - 1),
    "ConvTranspose": lambda g, n, dys: [conv_transpose(g, n, dys[0])] + [None] * (len(n.inputs) - 1),
    "MaxPool": lambda g, n, dys: [max_pool(g, n, dys[0])],
    "AveragePool": lambda g, n, dys: [average_pool(g, n, dys[0])],
    "GlobalAveragePool": lambda g, n, dys: [expand_like(dys[0], n.inputs[0]) / count_ratio(n.inputs[0], n.outputs[0])],
    "GlobalMaxPool": lambda g, n, dys: [dys[0] * share_of_extremum(n.inputs[0], n.outputs[0], spatial_axes(n))],
    "Resize": lambda g, n, dys: [resize(g, n, dys[0])] + [None] * (len(n.inputs) - 1),
    "Gemm": lambda g, n, dys: gemm(g, n, dys[0]),
    "MatMul": lambda g, n, dys: matmul(g, n, dys[0]),
    "Einsum": lambda g, n, dys: einsum(g, n, dys[0]),
    # normalisation
    "BatchNormalization": lambda g, n, dys: [batch_norm(g, n, dys[0])] + [None] * 4,
    "LayerNormalization": lambda g, n, dys: [layer_norm(n, dys[0])] + [None] * (len(n.inputs) - 1),
    "InstanceNormalization": lambda g, n, dys: [instance_norm(g, n, dys[0]), None, None],
    "GroupNormalization": lambda g, n, dys: [group_norm(g, n, dys[0]), None, None],
    "Softmax": lambda g, n, dys: [softmax(n, dys[0])],
    "LogSoftmax": lambda g, n, dys: [log_softmax(g, n, dys[0])],
    # reductions
    "ReduceMean": lambda g, n, dys: [reduce(g, n, dys[0], mean=True), None][:len(n.inputs)],
    "ReduceSum": lambda g, n, dys: [reduce(g, n, dys[0], mean=False), None][:len(n.inputs)],
    "ReduceMax": reduction(share_of_extremum),
    "ReduceMin": reduction(share_of_extremum),
    "ReduceL2": reduction(lambda x, y, axes: x / y),
    "ReduceLogSumExp": reduction(lambda x, y, axes: x.g.op("Exp", x - y)),
    "ReduceSumSquare": reduction(lambda x, y, axes: x * 2),
    "ReduceL1": reduction(lambda x, y, axes: x.g.op("Sign", x)),
    # moving data
    "Flatten": lambda g, n, dys: [reshape_like(dys[0], n.inputs[0])],
    "Reshape": lambda g, n, dys: [reshape_like(dys[0], n.inputs[0]), None],
    "Squeeze": lambda g, n, dys: [reshape_like(dys[0], n.inputs[0])] + [None] * (len(n.inputs) - 1),
    "Unsqueeze": lambda g, n, dys: [reshape_like(dys[0], n.inputs[0]), None],
    "Transpose": lambda g, n, dys: [g.op("Transpose", dys[0], perm=[int(i) for i in np.argsort(transpose_perm(n))])],
    "Concat": lambda g, n, dys: concat(g, n, dys[0]),
    "Split": lambda g, n, dys: split(g, n, dys),  # noqa: PLW0108 (split is defined after the table)
    "Slice": lambda g, n, dys: [slice_(g, n, dys[0])] + [None] * (len(n.inputs) - 1),
    "Gather": lambda g, n, dys: [gather(g, n, dys[0]), None],
    "GatherND": lambda g, n, dys: [gather_nd(g, n, dys[0]), None],
    "GatherElements": lambda g, n, dys: [gather_elements(g, n, dys[0]), None],
    "Pad": lambda g, n, dys: [pad(g, n, dys[0])] + [None] * (len(n.inputs) - 1),
    "Tile": lambda g, n, dys: [tile(g, n, dys[0]), None],
    "DepthToSpace": lambda g, n, dys: [depth_to_space(g, n, dys[0])],
    "SpaceToDepth": lambda g, n, dys: [g.op("DepthToSpace", dys[0], blocksize=n.attrs["blocksize"], mode="DCR")],
}

# Rules that differentiate every output; for the others the walk refuses a gradient on outputs past the first.
MULTI_OUTPUT = {"Split"}

# Operators whose outputs carry no gradient, whatever their inputs (shapes, indices, masks).
NON_DIFFERENTIABLE = {"Shape", "Size", "ArgMax", "ArgMin", "Equal", "Greater", "GreaterOrEqual", "Less",
                      "LessOrEqual", "Not", "And", "Or", "NonZero", "ConstantOfShape", "Range", "OneHot"}


# shared compositions --------------------------------------------------------------------------------
def where(condition: Value, a, b, like: Value) -> Value:
    """Where(condition, a, b) with Python numbers as constants of `like`'s type."""
    as_value = lambda v: v if isinstance(v, Value) else like.const(v)  # noqa: E731
    return condition.g.op("Where", condition, as_value(a), as_value(b))


def mask(grad: Value, condition: Value) -> Value:
    """grad where condition holds, zero elsewhere."""
    return where(condition, grad, 0.0, like=grad)


def reduce_sum(x: Value, axes, keepdims: int = 1) -> Value:
    return x.g.op("ReduceSum", x, x.g.ints(list(axes)), keepdims=keepdims)


def reduce_mean(x: Value, axes) -> Value:
    """Mean over `axes`, keeping them; the count is read at run time so symbolic dims work."""
    total = reduce_sum(x, axes)
    return total / count_ratio(x, total)


def count_ratio(big: Value, small: Value) -> Value:
    """size(big) / size(small), the number of elements averaged, as a scalar of `big`'s float type."""
    g, to = big.g, big.elem_type
    return g.op("Cast", g.op("Size", big), to=to) / g.op("Cast", g.op("Size", small), to=to)


def expand_like(grad: Value, x: Value) -> Value:
    return grad.g.op("Expand", grad, grad.g.op("Shape", x))


def reshape_like(grad: Value, x: Value) -> Value:
    return grad.g.op("Reshape", grad, grad.g.op("Shape", x))


def zeros_like(x: Value) -> Value:
    zero = numpy_helper.from_array(np.zeros(1, helper.tensor_dtype_to_np_dtype(x.elem_type)), "value")
    return x.g.op("ConstantOfShape", x.g.op("Shape", x), value=zero)


def scatter_add(op_type: str, zeros: Value, indices: Value, updates: Value, **attrs) -> Value:
    """ScatterND or ScatterElements with reduction="add", in float32 for 16-bit floats (ONNX Runtime's CPU
    kernels cannot add them) and cast back."""
    g, elem_type = zeros.g, zeros.elem_type
    if elem_type not in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        return g.op(op_type, zeros, indices, updates, reduction="add", **attrs)
    wide = [g.op("Cast", t, to=onnx.TensorProto.FLOAT) for t in (zeros, updates)]
    return g.op("Cast", g.op(op_type, wide[0], indices, wide[1], reduction="add", **attrs), to=elem_type)


def unbroadcast(grad: Value, x: Value, y: Value) -> Value:
    """Sum `grad` (shaped like y) over the axes numpy broadcasting stretched x along."""
    return sum_to(grad, x.shape, y.shape)


def sum_to(grad: Value, x_shape, y_shape) -> Value:
    """Sum `grad` (shaped y_shape) down to x_shape: over the axes broadcasting added or stretched."""
    lead = len(y_shape) - len(x_shape)
    stretched = [lead + i for i, d in enumerate(x_shape) if d == 1 and y_shape[lead + i] != 1]
    if stretched:
        grad = reduce_sum(grad, stretched)
    return reduce_sum(grad, range(lead), keepdims=0) if lead else grad


def axis_of(n: Node, tensor: Value, name: str = "axis") -> int:
    return int(n.attrs[name]) % tensor.rank


def spatial_axes(n: Node) -> range:
    return range(2, n.inputs[0].rank)


def along_axis(t: Value, rank: int, axis: int, matrix: np.ndarray, like: Value) -> Value:
    """t with its axis `axis` multiplied by `matrix`: out[..., j, ...] = sum_i t[..., i, ...] matrix[i, j]. On the
    last two axes a MatMul (t M, or M^T t): ONNX Runtime's Einsum contracting the rows of a map is 7x slower."""
    if rank >= 2 and axis == rank - 1:
        return t.g.op("MatMul", t, like.const(matrix))
    if rank >= 2 and axis == rank - 2:
        return t.g.op("MatMul", like.const(np.ascontiguousarray(matrix.T)), t)
    letters = string.ascii_lowercase[:rank]
    equation = f"{letters},{letters[axis]}z->{letters.replace(letters[axis], 'z')}"
    return t.g.op("Einsum", t, like.const(matrix), equation=equation)


def nonnegative(indices: Value, data: Value, axis: int) -> Value:
    """Indices with the negative ones (counting from the end, as Gather allows) made positive."""
    g = indices.g
    size = g.op("Gather", g.op("Shape", data), g.ints(axis))
    return g.op("Where", indices < 0, indices + size, indices)


# element-wise ----------------------------------------------------------------------------------------
def clip(n: Node, dy: Value) -> Grads:
    """The gradient passes strictly inside the bounds."""
    x = n.inputs[0]
    lower, upper = [*n.inputs[1:], None, None][:2]
    bounds = ([x > lower] if lower is not None else []) + ([x < upper] if upper is not None else [])
    inside = bounds[0] & bounds[1] if len(bounds) == 2 else bounds[0] if bounds else None
    return [dy if inside is None else mask(dy, inside)] + [None] * (len(n.inputs) - 1)


def hard_sigmoid(n: Node, dy: Value) -> Value:
    """y = max(0, min(1, alpha x + beta)): slope alpha where 0 < alpha x + beta < 1."""
    x, alpha = n.inputs[0], n.attrs["alpha"]
    z = x * alpha + n.attrs["beta"]
    return mask(dy * alpha, (z > 0.0) & (z < 1.0))


def gelu(n: Node, dy: Value) -> Value:
    """Exact: d/dx x Phi(x) = Phi(x) + x phi(x). Tanh form (Hendrycks & Gimpel, sec. 2), y = x/2 (1 + t),
    t = tanh(c (x + a x^3)): dy/dx = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 a x^2)."""
    x = n.inputs[0]
    g = x.g
    if n.attrs["approximate"] == "tanh":
        c, a = math.sqrt(2 / math.pi), 0.044715
        t = g.op("Tanh", (x + x * x * x * a) * c)
        return dy * ((1 + t) + x * (1 - t * t) * ((1 + x * x * (3 * a)) * c)) * 0.5
    cdf = (g.op("Erf", x / math.sqrt(2)) + 1) * 0.5
    pdf = g.op("Exp", x * x * -0.5) * (1 / math.sqrt(2 * math.pi))
    return dy * (cdf + x * pdf)


def mish_slope(x: Value) -> Value:
    """Mish (Misra 2019), y = x tanh(softplus(x)): dy/dx = t + x sigmoid(x) (1 - t^2), t = tanh(softplus(x)).
    Softplus is written log(1 + e^x): ONNX Runtime has no float64 Softplus, and e^x = inf still gives t = 1."""
    g = x.g
    t = g.op("Tanh", g.op("Log", 1 + g.op("Exp", x)))
    return t + x * g.op("Sigmoid", x) * (1 - t * t)


def below_zero(n: Node, slope_above, slope_below: Value) -> Value:
    """The slope of a unit that is linear above zero: `slope_above` where x > 0, `slope_below` elsewhere."""
    return where(n.inputs[0] > 0, slope_above, slope_below, like=n.inputs[0])


def extremum(n: Node, dy: Value) -> Grads:
    """Element-wise Max/Min: each output element's gradient goes to the input that attains it; on a tie, to the
    first input that does (a subgradient; torch.maximum splits ties evenly instead)."""
    y, taken, grads = n.outputs[0], None, []
    for x in n.inputs:
        attains = y.g.op("Equal", x, y)
        chosen = attains if taken is None else attains & ~taken
        taken = attains if taken is None else y.g.op("Or", taken, attains)
        grads.append(unbroadcast(mask(dy, chosen), x, y))
    return grads


def power(n: Node, dy: Value) -> Value:
    """d/dx x^p = p x^(p - 1), the exponent cast to x's type."""
    x, p = n.inputs
    exponent = x.g.op("Cast", p, to=x.elem_type)
    return dy * exponent * x.g.op("Pow", x, exponent - 1)


# windows: Conv, pools -------------------------------------------------------------------------------
def explicit_pads(n: Node, spatial, kernel, strides, dilations) -> list[int]:
    """Begin pads then end pads, with auto_pad resolved as the Conv spec defines it."""
    auto = n.attrs["auto_pad"]
    if auto in ("NOTSET", ""):
        return list(n.attrs["pads"] or [0] * (2 * len(kernel)))
    if auto == "VALID":
        return [0] * (2 * len(kernel))
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return begin + end


def window_transpose(g: GraphBuilder, n: Node, dy: Value, weight: Value, kernel, group: int,
                     dilations=None) -> Value:
    """The adjoint of a strided window operator: ConvTranspose, sized back to the input exactly."""
    x, y = n.inputs[0], n.outputs[0]
    spatial, out_spatial = x.shape[2:], y.shape[2:]
    if None in spatial or None in out_spatial:
        raise n.fail("needs static spatial sizes to be differentiated")
    rank = len(kernel)
    strides = list(n.attrs["strides"] or [1] * rank)
    dilations = list(dilations or [1] * rank)
    pads = explicit_pads(n, spatial, kernel, strides, dilations)
    output_padding = []
    for i in range(rank):
        covered = strides[i] * (out_spatial[i] - 1) + (kernel[i] - 1) * dilations[i] + 1 - pads[i] - pads[rank + i]
        output_padding.append(max(spatial[i] - covered, 0))
        pads[rank + i] += max(covered - spatial[i], 0)  # ceil_mode windows overhang the input: crop them
    return g.op("ConvTranspose", dy, weight, group=group, strides=strides, dilations=dilations, pads=pads,
                output_padding=output_padding)


def conv(g: GraphBuilder, n: Node, dy: Value) -> Value:
    weight = n.inputs[1]
    return window_transpose(g, n, dy, weight, weight.shape[2:], n.attrs["group"], n.attrs["dilations"])


def conv_transpose(g: GraphBuilder, n: Node, dy: Value) -> Value:
    """ConvTranspose is the adjoint of a Conv, so its own adjoint is that Conv: y[j] = sum x[i] W[k] over
    s i + d k = j + begin (begin: the cells cropped off the start), hence dx[i] = sum_k dy[s i + d k - begin] W[k],
    a Conv of dy with the same weight (C_in x C_out/group x kernel is Conv's M x C/group x kernel), strides,
    dilations and groups, padded by `begin` at the start and at the end by what the last window reaches past dy
    (cropped where it reaches less: output_padding's cells, which no input touches)."""
    x, weight, y = n.inputs[0], n.inputs[1], n.outputs[0]
    spatial, out_spatial = x.shape[2:], y.shape[2:]
    if None in spatial or None in out_spatial:
        raise n.fail("needs static spatial sizes to be differentiated")
    rank, found = len(spatial), weight.shape[2:]
    kernel = list(n.attrs["kernel_shape"] or found)
    if None in kernel:
        raise n.fail("needs a static kernel size to be differentiated")
    if len(found) != len(kernel) or any(f is not None and f != k for f, k in zip(found, kernel, strict=True)):
        raise n.fail(f"declares kernel_shape {kernel} for a weight of kernel size {found}")
    strides = list(n.attrs["strides"] or [1] * rank)
    dilations = list(n.attrs["dilations"] or [1] * rank)
    begin = transpose_crops(n, spatial, out_spatial, kernel, strides, dilations)
    end = [s * (size - 1) + d * (k - 1) + 1 - b - out
           for size, out, k, s, d, b in zip(spatial, out_spatial, kernel, strides, dilations, begin, strict=True)]
    dy = pad_or_crop(g, dy, [0, 0] + [min(v, 0) for v in begin], [0, 0] + [min(v, 0) for v in end])
    return g.op("Conv", dy, weight, group=n.attrs["group"], strides=strides, dilations=dilations,
                pads=[max(v, 0) for v in begin + end])


def transpose_crops(n: Node, spatial, out_spatial, kernel, strides, dilations) -> list[int]:
    """The cells a ConvTranspose crops off the start of its full output along each axis, as the ONNX spec derives
    them from pads, auto_pad, output_padding and output_shape (ONNX Runtime agrees). The forms runtimes disagree on
    are refused, and so is an output size the spec's formula does not give: shape inference disagreeing with it."""
    rank, auto, output_shape = len(spatial), n.attrs["auto_pad"], n.attrs["output_shape"]
    pads = list(n.attrs["pads"] or [0] * (2 * rank))
    full = [s * (size - 1) + op + d * (k - 1) + 1 for size, k, s, d, op in
            zip(spatial, kernel, strides, dilations, n.attrs["output_padding"] or [0] * rank, strict=True)]
    if output_shape or auto in ("SAME_UPPER", "SAME_LOWER"):
        if output_shape and len(output_shape) != rank:
            raise n.fail(f"sets output_shape {list(output_shape)}, not one size per spatial axis")
        if output_shape and any(pads):
            raise n.fail("sets both output_shape and pads, which runtimes read differently (ONNX Runtime ignores "
                         "the pads, ONNX's reference evaluator applies them)")
        sizes = list(output_shape) if output_shape else [size * s for size, s in zip(spatial, strides, strict=True)]
        totals = [f - size for f, size in zip(full, sizes, strict=True)]
        if min(totals) < 0:
            raise n.fail(f"asks for an output larger than its full output ({sizes} > {full}), which runtimes fill "
                         "differently")
        # the odd cell goes to the end for SAME_UPPER, to the start otherwise (output_shape's own rule)
        begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in totals]
    else:
        pads = [0] * (2 * rank) if auto == "VALID" else pads
        begin = pads[:rank]
        sizes = [f - pads[i] - pads[rank + i] for i, f in enumerate(full)]
    if sizes != list(out_spatial):
        raise n.fail(f"has an output of spatial size {list(out_spatial)} after shape inference, where its attributes "
                     f"give {sizes}")
    return begin


def average_pool(g: GraphBuilder, n: Node, dy: Value) -> Value:
    """Each output spreads its gradient evenly over the cells its divisor counted."""
    x, kernel = n.inputs[0], list(n.attrs["kernel_shape"])
    if any(d != 1 for d in n.attrs.get("dilations") or []):
        raise n.fail("has dilations, which have no gradient rule")
    spatial, out_spatial = x.shape[2:], n.outputs[0].shape[2:]
    strides = list(n.attrs["strides"] or [1] * len(kernel))
    pads = explicit_pads(n, spatial, kernel, strides, [1] * len(kernel))
    counts = np.ones([1, 1], dtype=np.float64)
    for i, (size, out, k, s) in enumerate(zip(spatial, out_spatial, kernel, strides, strict=True)):
        lo, hi = (-pads[i], size + pads[len(kernel) + i]) if n.attrs["count_include_pad"] else (0, size)
        start = np.arange(out) * s - pads[i]
        counts = counts[..., None] * (np.minimum(start + k, hi) - np.maximum(start, lo))
    weight = x.const(np.ones([x.shape[1], 1, *kernel]))
    return window_transpose(g, n, dy / x.const(counts), weight, kernel, x.shape[1])


def max_pool(g: GraphBuilder, n: Node, dy: Value) -> Value:
    """Routes each output's gradient to its argmax. The indices are the node's own Indices output when it has
    one, else those of a twin MaxPool on the same input that also returns them (the forward node is left as it is)."""
    x = n.inputs[0]
    indices = n.outputs[1] if len(n.outputs) > 1 and n.outputs[1] is not None else \
        g.op_multi("MaxPool", x, outputs=2, **{a.name: helper.get_attribute_value(a) for a in n.proto.attribute})[1]
    flat = lambda t: g.op("Reshape", t, g.ints([-1]))  # noqa: E731
    summed = scatter_add("ScatterElements", flat(zeros_like(x)), flat(indices), flat(dy), axis=0)
    return reshape_like(summed, x)


# normalisation ----------------------------------------------------------------------------------------
def batch_norm(g: GraphBuilder, n: Node, dy: Value) -> Value:
    """Inference form: y = scale (x - mean) / sqrt(var + eps) + bias, so dx = dy scale / sqrt(var + eps)."""
    x, scale, _, _, var = n.inputs[:5]
    factor = scale / g.op("Sqrt", var + n.attrs["epsilon"])
    return dy * g.op("Reshape", factor, g.ints([-1] + [1] * (x.rank - 2)))


def standardised(x: Value, dxhat: Value, axes, epsilon: float) -> Value:
    """The gradient through xhat = (x - mean) / sqrt(var + eps) over `axes`, given dxhat:
    dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))."""
    centred = x - reduce_mean(x, axes)
    rstd = 1 / x.g.op("Sqrt", reduce_mean(centred * centred, axes) + epsilon)
    xhat = centred * rstd
    return rstd * (dxhat - reduce_mean(dxhat, axes) - xhat * reduce_mean(dxhat * xhat, axes))


def layer_norm(n: Node, dy: Value) -> Value:
    """y = scale xhat + bias over the axes from `axis` on."""
    x, scale = n.inputs[:2]
    return standardised(x, dy * scale, list(range(axis_of(n, x), x.rank)), n.attrs["epsilon"])


def per_channel(g: GraphBuilder, values: Value, rank: int) -> Value:
    """A vector of one value per channel, shaped to broadcast over N x C x ... tensors."""
    return g.op("Reshape", values, g.ints([-1] + [1] * (rank - 2)))


def instance_norm(g: GraphBuilder, n: Node, dy: Value) -> Value:
    """y = scale[c] xhat + bias[c], standardised over the spatial axes of each image and channel."""
    x, scale = n.inputs[:2]
    return standardised(x, dy * per_channel(g, scale, x.rank), list(spatial_axes(n)), n.attrs["epsilon"])


def group_norm(g: GraphBuilder, n: Node, dy: Value) -> Value:
    """Standardised over each group of channels (all their positions), then scaled per channel (opset 21; the
    deprecated opset-18 form scales per group, onnx.ai/onnx/operators/onnx__GroupNormalization.html)."""
    if g.opset < 21:
        raise n.fail("is the deprecated opset-18 form (one scale per group): convert the model to opset 21")
    x, scale = n.inputs[:2]
    grouped = lambda t: g.op("Reshape", t, g.ints([0, n.attrs["num_groups"], -1]))  # noqa: E731
    dxhat = grouped(dy * per_channel(g, scale, x.rank))
    return reshape_like(standardised(grouped(x), dxhat, [2], n.attrs["epsilon"]), x)


def softmax(n: Node, dy: Value) -> Value:
    """dx = y (dy - sum(dy y))."""
    y = n.outputs[0]
    return y * (dy - reduce_sum(dy * y, [axis_of(n, y)]))


def log_softmax(g: GraphBuilder, n: Node, dy: Value) -> Value:
    """dx = dy - exp(y) sum(dy)."""
    y = n.outputs[0]
    return dy - g.op("Exp", y) * reduce_sum(dy, [axis_of(n, y)])


# linear algebra ---------------------------------------------------------------------------------------
def gemm(g: GraphBuilder, n: Node, dy: Value) -> Grads:
    """Y = alpha A' B' + beta C, where A' is A or A^T by transA (B' likewise)."""
    alpha, ta, tb = n.attrs["alpha"], n.attrs["transA"], n.attrs["transB"]
    A, B = n.inputs[:2]
    if ta:
        dA = g.op("Gemm", B, dy, alpha=alpha, transA=tb, transB=1)
    else:
        dA = g.op("Gemm", dy, B, alpha=alpha, transB=1 - tb)
    if tb:
        dB = g.op("Gemm", dy, A, alpha=alpha, transA=1, transB=ta)
    else:
        dB = g.op("Gemm", A, dy, alpha=alpha, transA=1 - ta)
    C = n.inputs[2] if len(n.inputs) > 2 else None
    dC = None if C is None else unbroadcast(dy * n.attrs["beta"], C, n.outputs[0])
    return [dA, dB, dC][:len(n.inputs)]


def matmul(g: GraphBuilder, n: Node, dy: Value) -> Grads:
    """dA = dy B^T, dB = A^T dy, summed over broadcast batch axes. A 1-D operand is promoted as numpy does (A to
    a row, B to a column), and dy gets the axis the product then drops."""
    A, B = n.inputs
    a_shape = [1, *A.shape] if A.rank == 1 else A.shape
    b_shape = [*B.shape, 1] if B.rank == 1 else B.shape
    y_shape = list(n.outputs[0].shape) + [1] * (B.rank == 1)
    if A.rank == 1:
        y_shape.insert(len(y_shape) - 1, 1)
    dropped = [len(y_shape) - 2] * (A.rank == 1) + [len(y_shape) - 1] * (B.rank == 1)
    dy = g.op("Unsqueeze", dy, g.ints(dropped)) if dropped else dy
    a = g.op("Unsqueeze", A, g.ints([0])) if A.rank == 1 else A
    b = g.op("Unsqueeze", B, g.ints([1])) if B.rank == 1 else B
    swap = lambda t, rank: g.op("Transpose", t, perm=[*range(rank - 2), rank - 1, rank - 2])  # noqa: E731
    dA = sum_to(g.op("MatMul", dy, swap(b, len(b_shape))), a_shape, y_shape)
    dB = sum_to(g.op("MatMul", swap(a, len(a_shape)), dy), b_shape, y_shape)
    return [dA if A.rank > 1 else reshape_like(dA, A), dB if B.rank > 1 else reshape_like(dB, B)]


def einsum(g: GraphBuilder, n: Node, dy: Value) -> Grads:
    """Each operand's gradient is the einsum of dy with all the other operands, written to that operand's
    subscripts; letters only that operand sums over are broadcast back (Unsqueeze, Expand)."""
    terms, output = einsum_subscripts(n)
    grads = []
    for i, (term, x) in enumerate(zip(terms, n.inputs, strict=True)):
        if len(set(term)) < len(term):
            raise n.fail(f"takes a diagonal ('{term}'), which has no gradient rule")
        others = [t for j, t in enumerate(terms) if j != i]
        known = set(output).union(*others)
        reached = "".join(c for c in term if c in known)
        grad = g.op("Einsum", dy, *[v for j, v in enumerate(n.inputs) if j != i],
                    equation=f"{','.join([output, *others])}->{reached}")
        if reached != term:
            grad = expand_like(g.op("Unsqueeze", grad, g.ints([k for k, c in enumerate(term) if c not in known])), x)
        grads.append(grad)
    return grads


def einsum_subscripts(n: Node) -> tuple[list[str], str]:
    """The operands' and the output's subscripts, with "..." spelt out in letters the equation leaves unused,
    and an implicit output made explicit (the ellipsis, then the letters used once in alphabetical order)."""
    equation = n.attrs["equation"].replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    terms = inputs.split(",")
    if not arrow:
        letters = inputs.replace("...", "").replace(",", "")
        output = "..." * ("..." in inputs) + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    widths = [x.rank - len(t) + 3 if "..." in t else 0 for t, x in zip(terms, n.inputs, strict=True)]
    ellipsis = "".join(c for c in string.ascii_letters if c not in equation)[:max(widths)]
    terms = [t.replace("...", ellipsis[len(ellipsis) - k:] if k else "") for t, k in zip(terms, widths, strict=True)]
    sizes: dict[str, set] = {}
    for term, x in zip(terms, n.inputs, strict=True):
        for letter, size in zip(term, x.shape, strict=True):
            sizes.setdefault(letter, set()).add(size)
    if any(1 in found and len(found - {None}) > 1 for found in sizes.values()):
        raise n.fail("broadcasts a dimension of size 1 against a larger one, which has no gradient rule")
    return terms, output.replace("...", ellipsis)


# reductions -------------------------------------------------------------------------------------------
def reduced_axes(n: Node) -> list[int]:
    """The axes a Reduce* node reduces (none when it is a no-op), from its input (opset 18) or attribute."""
    rank = n.inputs[0].rank
    axes = n.constant(1) if len(n.inputs) > 1 else n.attrs.get("axes")
    if axes is None or len(axes) == 0:
        return [] if n.attrs["noop_with_empty_axes"] else list(range(rank))
    return sorted(int(i) % rank for i in axes)


def kept(n: Node, t: Value, axes: list[int]) -> Value:
    """A reduced tensor with its reduced axes back as size 1 (it has them already when keepdims is set)."""
    return t if n.attrs["keepdims"] or not axes else t.g.op("Unsqueeze", t, t.g.ints(axes))


def reduce(g: GraphBuilder, n: Node, dy: Value, mean: bool) -> Value:
    x, axes = n.inputs[0], reduced_axes(n)
    if not axes:
        return dy
    grad = expand_like(kept(n, dy, axes), x)
    return grad / count_ratio(x, n.outputs[0]) if mean else grad


# moving data ------------------------------------------------------------------------------------------
def transpose_perm(n: Node) -> list[int]:
    return list(n.attrs["perm"] or reversed(range(n.inputs[0].rank)))


def concat(g: GraphBuilder, n: Node, dy: Value) -> Grads:
    axis = axis_of(n, n.outputs[0])
    sizes = [x.shape[axis] for x in n.inputs]
    if None in sizes:
        raise n.fail("joins along a dimension of unknown size")
    return g.op_multi("Split", dy, g.ints(sizes), axis=axis, outputs=len(sizes))


def split(g: GraphBuilder, n: Node, dys: Grads) -> Grads:
    """The pieces' gradients joined back, zeros for pieces nothing downstream uses."""
    parts = [dy if dy is not None else zeros_like(y) for dy, y in zip(dys, n.outputs, strict=True)]
    return [g.op("Concat", *parts, axis=axis_of(n, n.inputs[0]))] + [None] * (len(n.inputs) - 1)


def slice_(g: GraphBuilder, n: Node, dy: Value) -> Value:
    """The adjoint of Slice: strided axes are re-spread with zeros between, then zero-padded to size."""
    x = n.inputs[0]
    shape = x.shape
    starts, ends, axes, steps = n.constant(1), n.constant(2), n.constant(3), n.constant(4)
    axes = range(len(starts)) if axes is None else axes
    steps = np.ones(len(starts), np.int64) if steps is None else steps
    begin, end = [0] * len(shape), [0] * len(shape)
    for start, stop, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = int(axis) % len(shape)
        size = shape[axis]
        if step < 1:
            raise n.fail("steps backwards, which has no gradient rule")
        if size is None:
            if start == 0 and stop >= INT64_MAX // 2 and step == 1:
                continue
            raise n.fail("cuts a dimension of unknown size")
        start = min(max(start + size if start < 0 else start, 0), size)
        stop = min(max(stop + size if stop < 0 else stop, start), size)
        count = len(range(start, stop, step))
        if step > 1:
            dy = spread(g, dy, n.outputs[0].shape, axis, int(step))
        begin[axis], end[axis] = int(start), int(size - start - count * step)
    return pad_or_crop(g, dy, begin, end)


def spread(g: GraphBuilder, dy: Value, dy_shape, axis: int, step: int) -> Value:
    """Insert step - 1 zeros after each element along `axis`: [a, b] -> [a, 0, b, 0] for step 2."""
    rank = len(dy_shape)
    widened = g.op("Pad", g.op("Unsqueeze", dy, g.ints([axis + 1])),
                   g.ints([0] * (rank + 1) + [0] * (axis + 1) + [step - 1] + [0] * (rank - axis - 1)))
    merged = [0] * axis + [dy_shape[axis] * step] + [d if d is not None else -1 for d in dy_shape[axis + 1:]]
    return g.op("Reshape", widened, g.ints(merged))


def pad_or_crop(g: GraphBuilder, t: Value, begin, end) -> Value:
    """Pad t by non-negative amounts, crop it by negative ones (begin and end per axis)."""
    rank = len(begin)
    if any(v > 0 for v in begin + end):
        t = g.op("Pad", t, g.ints([max(v, 0) for v in begin + end]))
    if any(v < 0 for v in begin + end):
        t = g.op("Slice", t, g.ints([max(-v, 0) for v in begin]), g.ints([v if v < 0 else INT64_MAX for v in end]),
                 g.ints(range(rank)))
    return t


NUMPY_PAD_MODES = {"reflect": "reflect", "edge": "edge", "wrap": "wrap"}


def pad_amounts(n: Node) -> tuple[list[int], list[int]]:
    """Pad's begin and end amounts per axis (negative ones crop), with its optional axes input resolved."""
    rank = n.inputs[0].rank
    pads = n.constant(1).astype(np.int64)
    axes = n.constant(3)
    axes = range(rank) if axes is None else [int(i) % rank for i in axes]
    begin, end = [0] * rank, [0] * rank
    for j, axis in enumerate(axes):
        begin[axis], end[axis] = int(pads[j]), int(pads[len(axes) + j])
    return begin, end


def pad(g: GraphBuilder, n: Node, dy: Value) -> Value:
    """The adjoint of Pad. Constant mode crops the padding off (and pads back what a negative pad cropped).
    Reflect, edge and wrap copy cells into the border, so each padded axis folds its border back onto the
    cells it copied: dy times the transposed 0/1 matrix of where each output cell came from (numpy.pad's
    modes of the same names, as the ONNX spec defines them)."""
    x, (begin, end) = n.inputs[0], pad_amounts(n)
    mode = n.attrs["mode"]
    if mode == "constant":
        return pad_or_crop(g, dy, [-v for v in begin], [-v for v in end])
    if mode not in NUMPY_PAD_MODES:
        raise n.fail(f"in mode {mode} has no gradient rule")
    for axis, (before, after) in enumerate(zip(begin, end, strict=True)):
        if before or after:
            size = x.shape[axis]
            if size is None:
                raise n.fail("pads a dimension of unknown size")
            source = np.pad(np.arange(size), (max(before, 0), max(after, 0)), mode=NUMPY_PAD_MODES[mode])
            source = source[max(-before, 0):len(source) - max(-after, 0)]
            dy = along_axis(dy, x.rank, axis, np.eye(size)[source], like=x)
    return dy


def tile(g: GraphBuilder, n: Node, dy: Value) -> Value:
    """Each cell receives the sum over its copies: dy viewed as (repeats_0, size_0, repeats_1, size_1, ...) and
    summed over the repeat axes."""
    x, repeats = n.inputs
    column = lambda t: g.op("Unsqueeze", t, g.ints([1]))  # noqa: E731
    view = g.op("Concat", column(repeats), column(g.op("Shape", x)), axis=1)
    return reduce_sum(g.op("Reshape", dy, g.op("Reshape", view, g.ints([-1]))), range(0, 2 * x.rank, 2), keepdims=0)


def depth_to_space(g: GraphBuilder, n: Node, dy: Value) -> Value:
    """A permutation of the elements, so its adjoint is its inverse: SpaceToDepth in DCR mode; in CRD mode, the
    spec's reshape-transpose-reshape run backwards."""
    x, block = n.inputs[0], n.attrs["blocksize"]
    if n.attrs["mode"] == "DCR":
        return g.op("SpaceToDepth", dy, blocksize=block)
    _, channels, height, width = x.shape
    if None in (channels, height, width):
        raise n.fail("needs static channels, height and width to be differentiated")
    blocks = g.op("Reshape", dy, g.ints([0, channels // block ** 2, height, block, width, block]))
    return reshape_like(g.op("Transpose", blocks, perm=[0, 1, 3, 5, 2, 4]), x)


# Resize ------------------------------------------------------------------------------------------------
def resize(g: GraphBuilder, n: Node, dy: Value) -> Value:
    """Resize is linear in X and separable: along each resized axis the output is an interpolation matrix times
    the input, so the adjoint multiplies dy by each transposed matrix. The matrices are read from ONNX Runtime
    itself (interpolation_matrix): every mode, coordinate transformation, antialias and rounding as it runs.
    Sizes computed at run time (F.interpolate(size=x.shape[-2:]) exports Shape -> Slice -> Concat) are read from
    the output's shape, static once the image size is fixed; the batch is left alone where the output's is the
    input's own symbolic batch."""
    x, y = n.inputs[0], n.outputs[0]
    if n.attrs["keep_aspect_ratio_policy"] not in (None, "stretch"):
        raise n.fail(f"keeps the aspect ratio ({n.attrs['keep_aspect_ratio_policy']}), which has no gradient rule")
    cropped = n.attrs["coordinate_transformation_mode"] == "tf_crop_and_resize"
    roi, scales = n.constant(1) if cropped else None, n.constant(2)
    scales = None if scales is None or scales.size == 0 else scales
    sizes = None if scales is not None else resize_sizes(n)
    axes = [int(a) % x.rank for a in n.attrs["axes"] or range(x.rank)]
    for position, axis in enumerate(axes):
        scale = None if scales is None else float(scales[position])
        size_in, size_out = x.shape[axis], y.shape[axis]
        window = (float(roi[position]), float(roi[len(axes) + position])) if cropped else None
        identity = scale == 1.0 if scale is not None else \
            sizes[position] == size_in if sizes is not None else g.same_size(x.name, y.name, axis)
        if identity and window in (None, (0.0, 1.0)):
            continue
        if size_in is None or size_out is None:
            raise n.fail("resizes a dimension of unknown size")
        weights = interpolation_matrix(g, n, size_in, size_out if scale is None else None, scale, window)
        dy = along_axis(dy, x.rank, axis, weights.T, like=x)
    return dy


def resize_sizes(n: Node) -> np.ndarray | None:
    """A Resize's constant `sizes`, or None where they are computed at run time (the output's shape then
    tells them)."""
    sizes = n.inputs[3] if len(n.inputs) > 3 else None
    return None if sizes is None else sizes.g.constant(sizes.name)


def interpolation_matrix(g: GraphBuilder, n: Node, size_in: int, size_out: int | None, scale: float | None,
                         window: tuple[float, float] | None) -> np.ndarray:
    """R[i, o], the weight of input cell i in output cell o along one axis, as ONNX Runtime computes it: the
    node's own attributes resize an identity basis (rows: basis vectors, left alone with scale 1) and a zero
    row, whose result (tf_crop_and_resize's extrapolation value, else zero) is the constant part taken off."""
    import onnxruntime  # noqa: PLC0415 (a runtime session at export time, for this operator only)

    attributes = {a.name: helper.get_attribute_value(a) for a in n.proto.attribute
                  if a.name not in ("axes", "keep_aspect_ratio_policy")}
    constants = {"roi": None if window is None else np.array([0, window[0], 1, window[1]], np.float32),
                 "scales": None if scale is None else np.array([1, scale], np.float32),
                 "sizes": None if size_out is None else np.array([size_in + 1, size_out], np.int64)}
    names = [name if value is not None else "" for name, value in constants.items()]
    while names[-1] == "":
        names.pop()
    float32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("Resize", ["basis", *names], ["resized"], **attributes)],
                              "interpolation_matrix", [helper.make_tensor_value_info("basis", float32, None)],
                              [helper.make_tensor_value_info("resized", float32, None)],
                              [numpy_helper.from_array(v, k) for k, v in constants.items() if v is not None])
    opsets = [helper.make_opsetid("", g.opset)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    basis = np.vstack([np.eye(size_in), np.zeros((1, size_in))]).astype(np.float32)
    resized = session.run(None, {"basis": basis})[0].astype(np.float64)
    return resized[:-1] - resized[-1]


def gather(g: GraphBuilder, n: Node, dy: Value) -> Value:
    """Scatter-add the gathered slices back: ScatterND along `axis`, moved to the front, with the index
    dimensions flattened into one."""
    data, indices = n.inputs
    rank, axis = data.rank, axis_of(n, data)
    index_rank = indices.rank
    if index_rank == 0:
        dy, index_rank = g.op("Unsqueeze", dy, g.ints([axis])), 1
    rest = [i for i in range(rank + index_rank - 1) if not axis <= i < axis + index_rank]
    updates = g.op("Transpose", dy, perm=[*range(axis, axis + index_rank), *rest])
    flat_shape = g.op("Concat", g.ints([-1]), g.op("Slice", g.op("Shape", updates), g.ints([index_rank]),
                                                   g.ints([INT64_MAX])), axis=0)
    positive = nonnegative(indices, data, axis)
    front = [axis, *[i for i in range(rank) if i != axis]]
    scattered = scatter_add("ScatterND", g.op("Transpose", zeros_like(data), perm=front),
                            g.op("Reshape", positive, g.ints([-1, 1])), g.op("Reshape", updates, flat_shape))
    return g.op("Transpose", scattered, perm=[int(i) for i in np.argsort(front)])


def gather_elements(g: GraphBuilder, n: Node, dy: Value) -> Value:
    """Scatter-add dy back to where each element was read."""
    data, indices = n.inputs
    axis = axis_of(n, data)
    return scatter_add("ScatterElements", zeros_like(data), nonnegative(indices, data, axis), dy, axis=axis)


def gather_nd(g: GraphBuilder, n: Node, dy: Value) -> Value:
    """ScatterND-add dy back. ScatterND has no batch dimensions, so with batch_dims b the first b dimensions are
    flattened into one and each index is prefixed with its position along it."""
    data, indices = n.inputs
    batch, depth = n.attrs["batch_dims"], indices.shape[-1]
    dims = lambda t, start, end: g.op("Slice", g.op("Shape", t), g.ints([start]), g.ints([end]))  # noqa: E731
    indices = g.op("Where", indices < 0, indices + dims(data, batch, batch + depth), indices)
    if not batch:
        return scatter_add("ScatterND", zeros_like(data), indices, dy)
    positions = g.op("Range", g.ints(0), g.op("ReduceProd", dims(data, 0, batch), keepdims=0), g.ints(1))
    positions = g.op("Reshape", positions, g.op("Concat", dims(indices, 0, batch),
                                                g.ints([1] * (n.inputs[1].rank - batch)), axis=0))
    prefixed = g.op("Concat", g.op("Expand", positions, g.op("Concat", dims(indices, 0, -1), g.ints([1]), axis=0)),
                    indices, axis=-1)
    flat = g.op("Reshape", zeros_like(data), g.op("Concat", g.ints([-1]), dims(data, batch, INT64_MAX), axis=0))
    return reshape_like(scatter_add("ScatterND", flat, prefixed, dy), data)
