"""Reverse-mode differentiation of an ONNX graph between target tensors and a score output.

The walk visits, in reverse topological order, only the nodes that both depend on a target and
feed the score, and asks the rule table (gradients.RULES) for each node's vector-Jacobian product.
Everything upstream of the targets is left alone: the extra cost is a backward pass over the
head of the network only.
"""

from __future__ import annotations

from collections import defaultdict

import onnx

from .gradients import NON_DIFFERENTIABLE, RULES
from .graph import ExportError, GraphBuilder, UnsupportedOperator


def append_gradients(model: onnx.ModelProto, targets: list[str], score: str, seed: str,
                     builder: GraphBuilder) -> list[str]:
    """Emit into `builder` the gradient of sum(seed * score) with respect to each target.

    `model` must carry inferred shapes. Returns one gradient tensor name per target.
    """
    nodes = list(model.graph.node)
    active = set(targets)
    for node in nodes:
        if node.op_type not in NON_DIFFERENTIABLE and any(i in active for i in node.input):
            active.update(o for o in node.output if builder.is_float(o))
    for target in targets:
        if not _reaches(nodes, target, score):
            raise ExportError(f"output '{score}' does not depend on target '{target}'")

    feeds_score = {score}
    for node in reversed(nodes):
        if any(o in feeds_score for o in node.output):
            feeds_score.update(node.input)

    grads: dict[str, list[str]] = defaultdict(list)
    grads[score].append(seed)
    for node in reversed(nodes):
        if not any(o in active and o in feeds_score for o in node.output):
            continue
        output_grads = [_total(builder, grads.get(o)) for o in node.output]
        if all(d is None for d in output_grads):
            continue
        rule = RULES.get(node.op_type)
        if rule is None:
            raise UnsupportedOperator(node)
        builder.output_grads = output_grads
        for name, grad in zip(node.input, rule(builder, node, output_grads[0])):
            if grad is not None and name in active:
                grads[name].append(grad)
    return [_total(builder, grads[t]) for t in targets]


def _reaches(nodes, source: str, sink: str) -> bool:
    reached = {source}
    for node in nodes:
        if any(i in reached for i in node.input):
            reached.update(node.output)
    return sink in reached


def _total(builder: GraphBuilder, parts: list[str] | None) -> str | None:
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else builder.op("Sum", *parts)


def prune(builder: GraphBuilder, outputs: list[str]) -> None:
    """Drop the emitted nodes and constants that feed none of `outputs`."""
    live = set(outputs)
    kept = []
    for node in reversed(builder.nodes):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(node.input)
    builder.nodes = kept[::-1]
    builder.initializers = [t for t in builder.initializers if t.name in live]
