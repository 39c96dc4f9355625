"""Vector-Jacobian product rules, one small function per ONNX operator.

Each rule takes the builder `g`, the forward node `n` and `dy`, the gradient of the node's first
output, and returns one gradient tensor name (or None) per input of `n`. Rules may return
gradients nobody needs: the walk drops the nodes that feed no output. Operator semantics follow
the ONNX operator specification (onnx.ai/onnx/operators), opset 17 and later.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper

from .graph import INT64_MAX, ExportError, GraphBuilder


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _axis(g: GraphBuilder, tensor: str, axis: int) -> int:
    return axis % g.rank(tensor)


# windows: Conv, AveragePool ---------------------------------------------------------------------
def _explicit_pads(a: dict, spatial, kernel, strides, dilations) -> list[int]:
    """Begin pads then end pads, with auto_pad resolved as the Conv spec defines it."""
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return list(a.get("pads", [0] * (2 * len(kernel))))
    if auto == "VALID":
        return [0] * (2 * len(kernel))
    begin, end = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else large)
        end.append(large if auto == "SAME_UPPER" else small)
    return begin + end


def _window_transpose(g, dy, weight, n, a, kernel, group) -> str:
    """The adjoint of a strided window operator: ConvTranspose, sized back to the input exactly."""
    x, y = n.input[0], n.output[0]
    spatial, out_spatial = g.shape(x)[2:], g.shape(y)[2:]
    if None in spatial or None in out_spatial:
        raise ExportError(f"{n.op_type} node '{n.name}' needs static spatial sizes to be differentiated")
    rank = len(kernel)
    strides = list(a.get("strides", [1] * rank))
    dilations = list(a.get("dilations", [1] * rank))
    pads = _explicit_pads(a, spatial, kernel, strides, dilations)
    output_padding = []
    for i in range(rank):
        covered = strides[i] * (out_spatial[i] - 1) + (kernel[i] - 1) * dilations[i] + 1 - pads[i] - pads[rank + i]
        output_padding.append(max(spatial[i] - covered, 0))
        pads[rank + i] += max(covered - spatial[i], 0)  # ceil_mode windows overhang the input: crop them
    return g.op("ConvTranspose", dy, weight, group=group, strides=strides, dilations=dilations, pads=pads,
                output_padding=output_padding)


def _conv(g, n, dy):
    a = attrs(n)
    kernel = g.shape(n.input[1])[2:]
    return [_window_transpose(g, dy, n.input[1], n, a, kernel, a.get("group", 1))]


def _average_pool(g, n, dy):
    """Each output spreads its gradient evenly over the cells its divisor counted."""
    a = attrs(n)
    x, kernel = n.input[0], list(a["kernel_shape"])
    spatial, out_spatial = g.shape(x)[2:], g.shape(n.output[0])[2:]
    strides = list(a.get("strides", [1] * len(kernel)))
    pads = _explicit_pads(a, spatial, kernel, strides, [1] * len(kernel))
    include_pad = a.get("count_include_pad", 0)
    counts = np.ones([1, 1], dtype=np.float64)
    for i, (size, out, k, s) in enumerate(zip(spatial, out_spatial, kernel, strides)):
        lo, hi = (-pads[i], size + pads[len(kernel) + i]) if include_pad else (0, size)
        start = np.arange(out) * s - pads[i]
        per_axis = np.minimum(start + k, hi) - np.maximum(start, lo)
        counts = counts[..., None] * per_axis
    channels = g.shape(x)[1]
    weight = g.const(np.ones([channels, 1, *kernel]), like=x)
    scaled = g.op("Div", dy, g.const(counts, like=x))
    return [_window_transpose(g, scaled, weight, n, a, kernel, channels)]


def _max_pool(g, n, dy):
    """Routes each output's gradient to its argmax, read from the node's Indices output."""
    if len(n.output) < 2 or not n.output[1]:
        del n.output[1:]
        n.output.append(g.fresh("argmax"))
    x = n.input[0]
    flat = lambda t: g.op("Reshape", t, g.ints([-1]))  # noqa: E731
    summed = g.op("ScatterElements", flat(g.zeros_like(x)), flat(n.output[1]), flat(dy), axis=0, reduction="add")
    return [g.reshape_like(summed, x)]


# normalisations ---------------------------------------------------------------------------------
def _batch_norm(g, n, dy):
    x, scale, _, _, var = n.input[:5]
    factor = g.op("Div", scale, g.op("Sqrt", g.op("Add", var, g.const(attrs(n).get("epsilon", 1e-5), like=x))))
    per_channel = g.op("Reshape", factor, g.ints([-1] + [1] * (g.rank(x) - 2)))
    return [g.op("Mul", dy, per_channel)]


def _layer_norm(g, n, dy):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dy * scale."""
    a = attrs(n)
    x, scale = n.input[:2]
    axes = list(range(_axis(g, x, a.get("axis", -1)), g.rank(x)))
    mean = lambda t: g.reduce_mean(t, axes, like=x)  # noqa: E731
    centred = g.op("Sub", x, mean(x))
    variance = mean(g.op("Mul", centred, centred))
    rstd = g.op("Reciprocal", g.op("Sqrt", g.op("Add", variance, g.const(a.get("epsilon", 1e-5), like=x))))
    xhat = g.op("Mul", centred, rstd)
    dxhat = g.op("Mul", dy, scale)
    inner = g.op("Sub", g.op("Sub", dxhat, mean(dxhat)), g.op("Mul", xhat, mean(g.op("Mul", dxhat, xhat))))
    return [g.op("Mul", rstd, inner)]


def _softmax(g, n, dy):
    y = n.output[0]
    axis = _axis(g, y, attrs(n).get("axis", -1))
    return [g.op("Mul", y, g.op("Sub", dy, g.reduce_sum(g.op("Mul", dy, y), [axis])))]


def _log_softmax(g, n, dy):
    y = n.output[0]
    axis = _axis(g, y, attrs(n).get("axis", -1))
    return [g.op("Sub", dy, g.op("Mul", g.op("Exp", y), g.reduce_sum(dy, [axis])))]


# element-wise activations ------------------------------------------------------------------------
def _clip(g, n, dy):
    x = n.input[0]
    bounds = [g.op(op, x, n.input[i]) for i, op in ((1, "Greater"), (2, "Less")) if i < len(n.input) and n.input[i]]
    if not bounds:
        return [dy]
    inside = bounds[0] if len(bounds) == 1 else g.op("And", *bounds)
    return [g.mask(dy, inside, x)]


def _leaky_relu(g, n, dy):
    x = n.input[0]
    slope = g.op("Where", g.op("Greater", x, g.const(0.0, like=x)), g.const(1.0, like=x),
                 g.const(attrs(n).get("alpha", 0.01), like=x))
    return [g.op("Mul", dy, slope)]


def _hard_sigmoid(g, n, dy):
    a, x = attrs(n), n.input[0]
    alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
    z = g.op("Add", g.op("Mul", x, g.const(alpha, like=x)), g.const(beta, like=x))
    inside = g.op("And", g.op("Greater", z, g.const(0.0, like=x)), g.op("Less", z, g.const(1.0, like=x)))
    return [g.mask(g.op("Mul", dy, g.const(alpha, like=x)), inside, x)]


def _hard_swish(g, n, dy):
    """y = x * clip(x/6 + 1/2, 0, 1): slope 0 below -3, x/3 + 1/2 up to 3, 1 above."""
    x = n.input[0]
    slope = g.op("Add", g.op("Div", x, g.const(3.0, like=x)), g.const(0.5, like=x))
    slope = g.op("Where", g.op("Greater", x, g.const(3.0, like=x)), g.const(1.0, like=x), slope)
    return [g.mask(g.op("Mul", dy, slope), g.op("Greater", x, g.const(-3.0, like=x)), x)]


def _gelu(g, n, dy):
    """Exact GELU: d/dx x*Phi(x) = Phi(x) + x*phi(x). Tanh form (Hendrycks & Gimpel, eq. in sec. 2),
    y = x/2 (1 + t), t = tanh(c (x + a x^3)): dy/dx = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 a x^2)."""
    x = n.input[0]
    if attrs(n).get("approximate", b"none") in (b"tanh", "tanh"):
        c, a = math.sqrt(2 / math.pi), 0.044715
        cube = g.op("Mul", g.op("Mul", x, x), x)
        t = g.op("Tanh", g.op("Mul", g.op("Add", x, g.op("Mul", cube, g.const(a, like=x))), g.const(c, like=x)))
        one = g.const(1.0, like=x)
        inner = g.op("Mul", g.op("Add", one, g.op("Mul", g.op("Mul", x, x), g.const(3 * a, like=x))), g.const(c, like=x))
        slope = g.op("Add", g.op("Add", one, t), g.op("Mul", g.op("Mul", x, g.op("Sub", one, g.op("Mul", t, t))), inner))
        return [g.op("Mul", dy, g.op("Mul", slope, g.const(0.5, like=x)))]
    cdf = g.op("Mul", g.op("Add", g.op("Erf", g.op("Div", x, g.const(math.sqrt(2), like=x))), g.const(1.0, like=x)),
               g.const(0.5, like=x))
    pdf = g.op("Mul", g.op("Exp", g.op("Mul", g.op("Mul", x, x), g.const(-0.5, like=x))),
               g.const(1 / math.sqrt(2 * math.pi), like=x))
    return [g.op("Mul", dy, g.op("Add", cdf, g.op("Mul", x, pdf)))]


def _erf(g, n, dy):
    x = n.input[0]
    slope = g.op("Mul", g.op("Exp", g.op("Neg", g.op("Mul", x, x))), g.const(2 / math.sqrt(math.pi), like=x))
    return [g.op("Mul", dy, slope)]


def _pow(g, n, dy):
    x, p = n.input
    exponent = g.op("Cast", p, to=g.elem_type(x))
    return [g.op("Mul", dy, g.op("Mul", exponent, g.op("Pow", x, g.op("Sub", exponent, g.const(1.0, like=x))))), None]


# arithmetic with broadcasting --------------------------------------------------------------------
def _mul(g, n, dy):
    a, b = n.input
    y = n.output[0]
    return [g.unbroadcast(g.op("Mul", dy, b), a, y), g.unbroadcast(g.op("Mul", dy, a), b, y)]


def _div(g, n, dy):
    a, b = n.input
    y = n.output[0]
    return [g.unbroadcast(g.op("Div", dy, b), a, y), g.unbroadcast(g.op("Neg", g.op("Div", g.op("Mul", dy, y), b)), b, y)]


def _where(g, n, dy):
    condition, a, b = n.input
    y = n.output[0]
    return [None, g.unbroadcast(g.mask(dy, condition, y), a, y),
            g.unbroadcast(g.mask(dy, g.op("Not", condition), y), b, y)]


# linear algebra -----------------------------------------------------------------------------------
def _gemm(g, n, dy):
    """Y = alpha * A' B' + beta * C, where A' is A or A^T by transA (B' likewise)."""
    a = attrs(n)
    alpha, ta, tb = a.get("alpha", 1.0), a.get("transA", 0), a.get("transB", 0)
    A, B = n.input[:2]
    dA = g.op("Gemm", dy, B, alpha=alpha, transB=1 - tb) if not ta else g.op("Gemm", B, dy, alpha=alpha, transA=tb, transB=1)
    dB = g.op("Gemm", A, dy, alpha=alpha, transA=1 - ta) if not tb else g.op("Gemm", dy, A, alpha=alpha, transA=1, transB=ta)
    dC = None
    if len(n.input) > 2 and n.input[2]:
        dC = g.unbroadcast(g.op("Mul", dy, g.const(a.get("beta", 1.0), like=A)), n.input[2], n.output[0])
    return [dA, dB, dC]


def _matmul(g, n, dy):
    A, B = n.input
    y = n.output[0]
    if min(g.rank(A), g.rank(B)) < 2:
        raise ExportError(f"MatMul node '{n.name}' with a 1-D operand has no gradient rule")
    swap = lambda t: g.op("Transpose", t, perm=[*range(g.rank(t) - 2), g.rank(t) - 1, g.rank(t) - 2])  # noqa: E731
    return [g.unbroadcast(g.op("MatMul", dy, swap(B)), A, y), g.unbroadcast(g.op("MatMul", swap(A), dy), B, y)]


# reductions ---------------------------------------------------------------------------------------
def _reduce(g, n, dy, mean: bool):
    a, x = attrs(n), n.input[0]
    axes = g.required_constant(n, 1) if len(n.input) > 1 else a.get("axes")
    if axes is None or len(axes) == 0:
        if a.get("noop_with_empty_axes", 0):
            return [dy, None]
        axes = range(g.rank(x))
    axes = sorted(int(i) % g.rank(x) for i in axes)
    if not a.get("keepdims", 1):
        dy = g.op("Unsqueeze", dy, g.ints(axes))
    grad = g.expand_like(dy, x)
    if mean:
        grad = g.op("Div", grad, g.count_ratio(x, n.output[0], like=x))
    return [grad, None]


def _global_average_pool(g, n, dy):
    x = n.input[0]
    return [g.op("Div", g.expand_like(dy, x), g.count_ratio(x, n.output[0], like=x))]


# moving data ---------------------------------------------------------------------------------------
def _transpose(g, n, dy):
    perm = attrs(n).get("perm") or list(reversed(range(g.rank(n.input[0]))))
    return [g.op("Transpose", dy, perm=list(np.argsort(perm)))]


def _concat(g, n, dy):
    axis = _axis(g, n.output[0], attrs(n)["axis"])
    sizes = [g.shape(i)[axis] for i in n.input]
    if None in sizes:
        raise ExportError(f"Concat node '{n.name}' joins along a dimension of unknown size")
    parts = g.op("Split", dy, g.ints(sizes), axis=axis, outputs=len(sizes))
    return parts if len(sizes) > 1 else [parts]


def _split(g, n, dy):
    axis = _axis(g, n.input[0], attrs(n).get("axis", 0))
    parts = [d if d is not None else g.zeros_like(y) for d, y in zip(g.output_grads, n.output)]
    return [g.op("Concat", *parts, axis=axis), None]


def _slice(g, n, dy):
    """The adjoint of Slice: strided axes are re-spread with zeros between, then zero-padded to size."""
    x = n.input[0]
    shape = g.shape(x)
    starts, ends = g.required_constant(n, 1), g.required_constant(n, 2)
    axes = g.required_constant(n, 3)
    steps = g.required_constant(n, 4)
    axes = range(len(starts)) if axes is None else axes
    steps = np.ones(len(starts), np.int64) if steps is None else steps
    begin, end = [0] * len(shape), [0] * len(shape)
    for start, stop, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % len(shape)
        size = shape[axis]
        if step < 1:
            raise ExportError(f"Slice node '{n.name}' steps backwards, which has no gradient rule")
        if size is None:
            if start == 0 and stop >= INT64_MAX // 2 and step == 1:
                continue
            raise ExportError(f"Slice node '{n.name}' cuts a dimension of unknown size")
        start = min(max(start + size if start < 0 else start, 0), size)
        stop = min(max(stop + size if stop < 0 else stop, start), size)
        count = len(range(start, stop, step))
        if step > 1:
            dy = _spread(g, dy, g.shape(n.output[0]), axis, int(step))
        begin[axis], end[axis] = int(start), int(size - start - count * step)
    return [_pad_or_crop(g, dy, begin, end)] + [None] * (len(n.input) - 1)


def _spread(g, dy, dy_shape, axis, step):
    """Insert step - 1 zeros after each element along `axis`: [a, b] -> [a, 0, b, 0] for step 2."""
    rank = len(dy_shape)
    widened = g.op("Pad", g.op("Unsqueeze", dy, g.ints([axis + 1])),
                   g.ints([0] * (rank + 1) + [0] * (axis + 1) + [step - 1] + [0] * (rank - axis - 1)))
    merged = [0] * axis + [dy_shape[axis] * step] + [d if d is not None else -1 for d in dy_shape[axis + 1:]]
    return g.op("Reshape", widened, g.ints(merged))


def _pad_or_crop(g, t, begin, end):
    """Pad t by non-negative amounts, crop it by negative ones (begin and end per axis)."""
    rank = len(begin)
    if any(v > 0 for v in begin + end):
        t = g.op("Pad", t, g.ints([max(v, 0) for v in begin + end]))
    if any(v < 0 for v in begin + end):
        t = g.op("Slice", t, g.ints([max(-v, 0) for v in begin]), g.ints([v if v < 0 else INT64_MAX for v in end]),
                 g.ints(range(rank)))
    return t


def _gather(g, n, dy):
    """Scatter-add the gathered slices back: ScatterND along `axis`, moved to the front, with the
    index dimensions flattened into one."""
    data, indices = n.input
    rank, axis = g.rank(data), _axis(g, data, attrs(n).get("axis", 0))
    index_rank = g.rank(indices)
    if index_rank == 0:
        dy, index_rank = g.op("Unsqueeze", dy, g.ints([axis])), 1
    rest = [i for i in range(rank + index_rank - 1) if not axis <= i < axis + index_rank]
    updates = g.op("Transpose", dy, perm=[*range(axis, axis + index_rank), *rest])
    flat_shape = g.op("Concat", g.ints([-1]), g.op("Slice", g.op("Shape", updates), g.ints([index_rank]),
                                                   g.ints([INT64_MAX])), axis=0)
    size = g.op("Gather", g.op("Shape", data), g.ints(axis))
    positive = g.op("Where", g.op("Less", indices, g.ints(0)), g.op("Add", indices, size), indices)
    front = [axis, *[i for i in range(rank) if i != axis]]
    scattered = g.op("ScatterND", g.op("Transpose", g.zeros_like(data), perm=front),
                     g.op("Reshape", positive, g.ints([-1, 1])), g.op("Reshape", updates, flat_shape), reduction="add")
    return [g.op("Transpose", scattered, perm=list(np.argsort(front))), None]


def _gather_nd(g, n, dy):
    if attrs(n).get("batch_dims", 0):
        raise ExportError(f"GatherND node '{n.name}' with batch_dims has no gradient rule")
    return [g.op("ScatterND", g.zeros_like(n.input[0]), n.input[1], dy, reduction="add"), None]


def _pad(g, n, dy):
    """The adjoint of a constant Pad crops the padding off (and pads back what a negative pad cropped)."""
    mode = attrs(n).get("mode", b"constant")
    if mode not in (b"constant", "constant"):
        raise ExportError(f"Pad node '{n.name}' in mode {mode!r} has no gradient rule")
    rank = g.rank(n.input[0])
    pads = g.required_constant(n, 1).astype(np.int64)
    axes = g.required_constant(n, 3)
    axes = range(rank) if axes is None else [int(i) % rank for i in axes]
    begin, end = [0] * rank, [0] * rank
    for j, axis in enumerate(axes):
        begin[axis], end[axis] = -int(pads[j]), -int(pads[len(axes) + j])
    return [_pad_or_crop(g, dy, begin, end)] + [None] * (len(n.input) - 1)


def _reshape_back(g, n, dy):
    return [g.reshape_like(dy, n.input[0])] + [None] * (len(n.input) - 1)


def _pass(g, n, dy):
    return [dy] + [None] * (len(n.input) - 1)


def _unary(slope):
    """A rule dy * slope(g, x, y) for an element-wise operator."""
    return lambda g, n, dy: [g.op("Mul", dy, slope(g, n.input[0], n.output[0]))]


RULES = {
    # element-wise
    "Identity": _pass,
    "Dropout": _pass,
    "Relu": lambda g, n, dy: [g.mask(dy, g.op("Greater", n.output[0], g.const(0.0, like=n.output[0])), n.output[0])],
    "LeakyRelu": _leaky_relu,
    "Clip": _clip,
    "Sigmoid": _unary(lambda g, x, y: g.op("Mul", y, g.op("Sub", g.const(1.0, like=y), y))),
    "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish,
    "Tanh": _unary(lambda g, x, y: g.op("Sub", g.const(1.0, like=y), g.op("Mul", y, y))),
    "Exp": _unary(lambda g, x, y: y),
    "Sqrt": _unary(lambda g, x, y: g.op("Div", g.const(0.5, like=y), y)),
    "Reciprocal": _unary(lambda g, x, y: g.op("Neg", g.op("Mul", y, y))),
    "Erf": _erf,
    "Gelu": _gelu,
    "Pow": _pow,
    "Neg": lambda g, n, dy: [g.op("Neg", dy)],
    "Cast": lambda g, n, dy: [g.op("Cast", dy, to=g.elem_type(n.input[0]))],
    # arithmetic
    "Add": lambda g, n, dy: [g.unbroadcast(dy, x, n.output[0]) for x in n.input],
    "Sub": lambda g, n, dy: [g.unbroadcast(dy, n.input[0], n.output[0]),
                             g.unbroadcast(g.op("Neg", dy), n.input[1], n.output[0])],
    "Mul": _mul,
    "Div": _div,
    "Where": _where,
    "Expand": lambda g, n, dy: [g.unbroadcast(dy, n.input[0], n.output[0]), None],
    # windows and linear algebra
    "Conv": lambda g, n, dy: _conv(g, n, dy) + [None] * (len(n.input) - 1),
    "MaxPool": _max_pool,
    "AveragePool": _average_pool,
    "GlobalAveragePool": _global_average_pool,
    "Gemm": _gemm,
    "MatMul": _matmul,
    # normalisation
    "BatchNormalization": lambda g, n, dy: _batch_norm(g, n, dy) + [None] * 4,
    "LayerNormalization": lambda g, n, dy: _layer_norm(g, n, dy) + [None] * (len(n.input) - 1),
    "Softmax": _softmax,
    "LogSoftmax": _log_softmax,
    # reductions
    "ReduceMean": lambda g, n, dy: _reduce(g, n, dy, mean=True),
    "ReduceSum": lambda g, n, dy: _reduce(g, n, dy, mean=False),
    # data movement
    "Flatten": _reshape_back,
    "Reshape": _reshape_back,
    "Squeeze": _reshape_back,
    "Unsqueeze": _reshape_back,
    "Transpose": _transpose,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "GatherND": _gather_nd,
    "Pad": _pad,
}

# Operators whose outputs carry no gradient, whatever their inputs (shapes, indices, masks).
NON_DIFFERENTIABLE = {"Shape", "Size", "ArgMax", "ArgMin", "Equal", "Greater", "GreaterOrEqual", "Less",
                      "LessOrEqual", "Not", "And", "Or", "NonZero", "ConstantOfShape", "Range", "OneHot"}
