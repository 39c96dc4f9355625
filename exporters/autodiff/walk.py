"""Reverse-mode differentiation of an ONNX graph between target tensors and a score output.

The walk visits, in reverse topological order, only the nodes that both depend on a target and
feed the score, and asks the rule table (rules.RULES) for each node's vector-Jacobian product,
checking that the rule answers once per input. Everything upstream of the targets is left alone:
the extra cost is a backward pass over the head of the network only.
"""

from __future__ import annotations

from collections import defaultdict

import onnx

from ...core.errors import ExportError, UnsupportedOperator
from .graph import GraphBuilder, Node, Value, needed_nodes
from .quantized import CODE_PRODUCERS, CONSTANT_OUTPUTS, QUANTIZED_RULES
from .rules import MULTI_OUTPUT, NON_DIFFERENTIABLE, RULES

ALL_RULES = RULES | QUANTIZED_RULES


def append_gradients(model: onnx.ModelProto, targets: list[str], score: str, seed: Value,
                     builder: GraphBuilder, overrides: dict | None = None) -> list[Value]:
    """Emit into `builder` the gradient of sum(seed * score) with respect to each target.

    `model` must carry inferred shapes. Returns one gradient per target. `overrides` replaces the rules of some
    operators (e.g. guided.guided_rules).
    """
    nodes = list(model.graph.node)
    active = _depends_on(nodes, targets, builder)
    for target in targets:
        if score not in _depends_on(nodes, [target], builder):
            raise ExportError(f"output '{score}' does not depend on target '{target}'")
    _, feeds_score = needed_nodes(nodes, [score])

    grads: dict[str, list[Value]] = defaultdict(list)
    grads[score].append(seed)
    for proto in reversed(nodes):
        if not any(o in active and o in feeds_score for o in proto.output):
            continue
        output_grads = [_total(builder, grads.get(o)) for o in proto.output]
        if all(d is None for d in output_grads):
            continue
        for name, grad in zip(proto.input, _differentiate(builder, proto, output_grads, overrides), strict=True):
            if grad is not None and name in active:
                grads[name].append(grad)
    return [_total(builder, grads[t]) for t in targets]


def _differentiate(builder: GraphBuilder, proto: onnx.NodeProto, output_grads: list[Value | None],
                   overrides: dict | None = None) -> list:
    """The rule's answer for one node, held to the contract: one entry per input."""
    node = Node(builder, proto)
    rule = (overrides or {}).get(proto.op_type) or ALL_RULES.get(proto.op_type)
    if rule is None:
        raise UnsupportedOperator(proto.op_type, node.name)
    if proto.op_type not in MULTI_OUTPUT and any(d is not None for d in output_grads[1:]):
        raise node.fail("passes a gradient through an output other than its first, which its rule does not "
                        "differentiate")
    grads = rule(builder, node, output_grads)
    if len(grads) != len(proto.input):
        raise ExportError(f"the gradient rule of {proto.op_type} returned {len(grads)} gradients for node "
                          f"'{node.name}', which has {len(proto.input)} inputs")
    return grads


def _depends_on(nodes, sources: list[str], builder: GraphBuilder) -> set[str]:
    """The tensors computed from `sources` through differentiable operators, the sources included: float ones,
    and integer codes written by quantized operators or computed from codes (a MaxPool over them)."""
    reached = set(sources)
    for node in nodes:
        if node.op_type in NON_DIFFERENTIABLE or not any(i in reached for i in node.input):
            continue
        codes = node.op_type in CODE_PRODUCERS or any(i in reached and not builder.is_float(i) for i in node.input)
        constant = CONSTANT_OUTPUTS.get(node.op_type, set())
        reached.update(o for k, o in enumerate(node.output) if k not in constant and (codes or builder.is_float(o)))
    return reached


def _total(builder: GraphBuilder, parts: list[Value] | None) -> Value | None:
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else builder.op("Sum", *parts)


def prune(builder: GraphBuilder, outputs: list[str]) -> None:
    """Drop the emitted nodes and constants that feed none of `outputs`."""
    builder.nodes, live = needed_nodes(builder.nodes, outputs)
    builder.initializers = [t for t in builder.initializers if t.name in live]
