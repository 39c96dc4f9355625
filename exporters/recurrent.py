"""Recurrent operators (LSTM, GRU) unrolled over their static sequence length into the standard operators the
gradient rules know, so that a target before them (Sequencer2D's rows and columns, a CRNN's features) can be
explained. The equations are those of the ONNX operators (https://onnx.ai/onnx/operators/onnx__LSTM.html and
onnx__GRU.html; Hochreiter & Schmidhuber 1997, Cho et al. 2014), with the default activations only:

    LSTM: gates = X_t W^T + H_{t-1} R^T + Wb + Rb, split as i, o, f, c (peepholes P = [Pi, Po, Pf])
          i = sigma(gi + Pi . C_{t-1}), f = sigma(gf + Pf . C_{t-1}), C_t = f . C_{t-1} + i . tanh(gc),
          o = sigma(go + Po . C_t), H_t = o . tanh(C_t)
    GRU:  z = sigma(Xz + H Rz^T + Wbz + Rbz), r likewise, split as z, r, h;
          h~ = tanh(Xh + (r . H) Rh^T + Rbh + Wbh), or tanh(Xh + r . (H Rh^T + Rbh) + Wbh) with
          linear_before_reset; H_t = (1 - z) . h~ + z . H_{t-1}

Run once the image size is fixed and the sizes shape inference misses are measured (shapes.infer_shapes): a
node whose sequence length is still unknown is left as it is, and the walk names it if it must go through."""

from __future__ import annotations

import onnx
from onnx import helper, shape_inference

from ..core.errors import ExportError
from .autodiff import GraphBuilder, Node, Value
from .shapes import PROTOBUF_LIMIT

DEFAULT_ACTIVATIONS = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"]}
SEQUENCE_LENS, INITIAL_H, INITIAL_C, PEEPHOLES = 4, 5, 6, 7


def expand_recurrent(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every LSTM and GRU node of static sequence length replaced by its unrolled equations,
    its shapes inferred. A model with no such node (or past protobuf's 2 GB) comes back as it was."""
    if not any(_is_recurrent(node) for node in model.graph.node) or model.ByteSize() >= PROTOBUF_LIMIT:
        return model
    model = shape_inference.infer_shapes(model, data_prop=True)  # keeps the sizes measured before
    g = GraphBuilder(model, prefix="onnxcam_unrolled")
    nodes, unrolled = [], 0
    for proto in model.graph.node:
        steps = _static_steps(g, proto) if _is_recurrent(proto) else None
        if steps is None:
            nodes.append(proto)
            continue
        start = len(g.nodes)
        _unroll(g, Node(g, proto), steps)
        nodes.extend(g.nodes[start:])
        unrolled += 1
    if not unrolled:
        return model
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(g.initializers)
    return shape_inference.infer_shapes(model, data_prop=True)  # the shapes the walk reads


def _is_recurrent(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in DEFAULT_ACTIVATIONS


def _static_steps(g: GraphBuilder, proto: onnx.NodeProto) -> int | None:
    """The node's sequence length when shape inference knows it."""
    layout = next((a.i for a in proto.attribute if a.name == "layout"), 0)
    try:
        return g.shape(proto.input[0])[1 if layout else 0]
    except ExportError:  # an unknown shape leaves the node as it is
        return None


def _check(n: Node, steps: int) -> None:
    """Refuse, in one line naming the node, what the unrolled equations do not compute."""
    directions = 2 if n.attrs["direction"] == "bidirectional" else 1
    activations = [a.lower() for a in n.attrs["activations"] or []]
    if activations and activations != DEFAULT_ACTIVATIONS[n.op_type] * directions:
        raise n.fail(f"uses the activations {n.attrs['activations']}; only the default ones "
                     f"{DEFAULT_ACTIVATIONS[n.op_type]} can be unrolled for differentiation")
    if n.attrs["clip"] is not None:
        raise n.fail("clips its cell input (attribute clip); such a recurrent node cannot be differentiated")
    if n.op_type == "LSTM" and n.attrs["input_forget"]:
        raise n.fail("couples its input and forget gates (input_forget); such an LSTM cannot be differentiated")
    if _given(n, SEQUENCE_LENS):
        lengths = n.inputs[SEQUENCE_LENS].g.constant(n.inputs[SEQUENCE_LENS].name)
        if lengths is None or (lengths != steps).any():
            raise n.fail(f"is given sequence_lens shorter than its {steps} steps (or computed at run time); "
                         f"only full sequences can be unrolled for differentiation")


def _given(n: Node, index: int) -> bool:
    return index < len(n.inputs) and n.inputs[index] is not None


def _unroll(g: GraphBuilder, n: Node, steps: int) -> None:
    """Emit the unrolled node, each of its used outputs written under its own name."""
    _check(n, steps)
    layout, hidden = n.attrs["layout"], n.attrs["hidden_size"] or n.inputs[2].shape[-1]
    x = g.op("Transpose", n.inputs[0], perm=[1, 0, 2]) if layout else n.inputs[0]  # [T, B, I]
    reverse = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[n.attrs["direction"]]
    sequences, finals, cells = [], [], []
    for index, backwards in enumerate(reverse):
        initial = [_initial_state(g, n, i, index, layout) for i in (INITIAL_H, INITIAL_C)]
        order = range(steps - 1, -1, -1) if backwards else range(steps)
        step = _lstm_steps if n.op_type == "LSTM" else _gru_steps
        outputs, last_h, last_c = step(g, n, index, hidden, x, order, *initial)
        sequences.append(g.op("Concat", *[g.op("Unsqueeze", h, g.ints([0, 1])) for h in outputs], axis=0))
        finals.append(last_h)
        cells.append(last_c)
    results = [
        _stacked(g, sequences, 1, [2, 0, 1, 3] if layout else None),
        _stacked(g, [g.op("Unsqueeze", h, g.ints([0])) for h in finals], 0, [1, 0, 2] if layout else None),
    ]
    if n.op_type == "LSTM":
        results.append(_stacked(g, [g.op("Unsqueeze", c, g.ints([0])) for c in cells], 0,
                                [1, 0, 2] if layout else None))
    for name, result in zip(n.proto.output, results, strict=False):
        if name:
            g.nodes.append(helper.make_node("Identity", [result.name], [name], name=f"{name}/unrolled"))


def _stacked(g: GraphBuilder, parts: list[Value], axis: int, perm: list[int] | None) -> Value:
    stacked = parts[0] if len(parts) == 1 else g.op("Concat", *parts, axis=axis)
    return g.op("Transpose", stacked, perm=perm) if perm else stacked


def _initial_state(g: GraphBuilder, n: Node, input_index: int, direction: int, layout: int) -> Value | None:
    """Direction `direction`'s [B, H] slice of initial_h or initial_c; None where it is left out (zeros)."""
    if not _given(n, input_index) or (n.op_type == "GRU" and input_index == INITIAL_C):
        return None
    return g.op("Gather", n.inputs[input_index], g.ints(direction), axis=1 if layout else 0)


def _direction(g: GraphBuilder, n: Node, input_index: int, direction: int, transposed: bool = True) -> Value:
    """Input `input_index` (W, R, B or P) of one direction, weight matrices transposed for X W^T."""
    part = g.op("Gather", n.inputs[input_index], g.ints(direction), axis=0)
    return g.op("Transpose", part, perm=[1, 0]) if transposed else part


def _split(g: GraphBuilder, value: Value, sizes: list[int]) -> list[Value]:
    return g.op_multi("Split", value, g.ints(sizes), outputs=len(sizes), axis=-1)


def _biases(g: GraphBuilder, n: Node, direction: int, width: int) -> tuple[Value, Value] | tuple[None, None]:
    """(Wb, Rb) of one direction, each of `width` = gates x hidden; (None, None) without B."""
    if not _given(n, 3):
        return None, None
    wb, rb = _split(g, _direction(g, n, 3, direction, transposed=False), [width, width])
    return wb, rb


def _total(*terms: Value | None) -> Value | None:
    """The sum of the terms that are not None (a None term is zero)."""
    present = [t for t in terms if t is not None]
    if not present:
        return None
    total = present[0]
    for term in present[1:]:
        total = total + term
    return total


def _lstm_steps(g: GraphBuilder, n: Node, direction: int, hidden: int, x: Value, order,
                h: Value | None, c: Value | None) -> tuple[list[Value], Value, Value]:
    """One direction of the LSTM: its outputs H_t in time order and the last H and C."""
    wb, rb = _biases(g, n, direction, 4 * hidden)
    projected = _total(g.op("MatMul", x, _direction(g, n, 1, direction)), _total(wb, rb))  # [T, B, 4H]
    recurrence = _direction(g, n, 2, direction)
    peepholes = _split(g, _direction(g, n, PEEPHOLES, direction, False), [hidden] * 3) if _given(n, PEEPHOLES) \
        else [None] * 3
    outputs = {}
    for t in order:
        x_t = g.op("Gather", projected, g.ints(t), axis=0)
        gates = _total(x_t, _matmul(g, h, recurrence))
        gi, go, gf, gc = _split(g, gates, [hidden] * 4)
        i = g.op("Sigmoid", _total(gi, _product(peepholes[0], c)))
        candidate = i * g.op("Tanh", gc)
        c = candidate if c is None else g.op("Sigmoid", _total(gf, _product(peepholes[2], c))) * c + candidate
        o = g.op("Sigmoid", _total(go, _product(peepholes[1], c)))
        h = outputs[t] = o * g.op("Tanh", c)
    return [outputs[t] for t in sorted(outputs)], h, c


def _product(a: Value | None, b: Value | None) -> Value | None:
    return None if a is None or b is None else a * b


def _gru_steps(g: GraphBuilder, n: Node, direction: int, hidden: int, x: Value, order,
               h: Value | None, _: None) -> tuple[list[Value], Value, None]:
    """One direction of the GRU: its outputs H_t in time order and the last H."""
    wb, rb = _biases(g, n, direction, 3 * hidden)
    projected = _total(g.op("MatMul", x, _direction(g, n, 1, direction)), wb)  # [T, B, 3H]
    recurrence_zr, recurrence_h = _split(g, _direction(g, n, 2, direction), [2 * hidden, hidden])  # R^T's columns
    rb_zr, rb_h = _split(g, rb, [2 * hidden, hidden]) if rb is not None else (None, None)
    linear_before_reset = n.attrs["linear_before_reset"]
    outputs = {}
    for t in order:
        x_zr, x_h = _split(g, g.op("Gather", projected, g.ints(t), axis=0), [2 * hidden, hidden])
        zr = g.op("Sigmoid", _total(x_zr, _matmul(g, h, recurrence_zr), rb_zr))
        z, r = _split(g, zr, [hidden, hidden])
        if linear_before_reset:
            reset = _product(r, _total(_matmul(g, h, recurrence_h), rb_h))
        else:
            reset = _total(_matmul(g, _product(r, h), recurrence_h), rb_h)
        candidate = g.op("Tanh", _total(x_h, reset)) * (1 - z)
        h = outputs[t] = candidate if h is None else candidate + z * h
    return [outputs[t] for t in sorted(outputs)], h, None


def _matmul(g: GraphBuilder, a: Value | None, b: Value) -> Value | None:
    return None if a is None else g.op("MatMul", a, b)
