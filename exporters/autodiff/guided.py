"""Guided backpropagation's rule for ReLU, as a small override table for the walk (walk.append_gradients's
`overrides`): the other operators keep their rules."""

from __future__ import annotations

from .graph import GraphBuilder, Node, Value
from .rules import Grads, Rule, mask


def guided_rules(switch: Value) -> dict[str, Rule]:
    """Relu's guided rule (Springenberg et al., arXiv 1412.6806, sec. 3.4, eq. for R^l): the gradient passes only
    where the ReLU's input is positive AND the incoming gradient is positive. `switch`, a boolean scalar, turns it
    on at run time; off, the rule is the plain ReLU's."""

    def relu(g: GraphBuilder, n: Node, dys: Grads) -> Grads:
        plain = mask(dys[0], n.outputs[0] > 0)
        return [g.op("Where", switch, mask(plain, dys[0] > 0), plain)]

    return {"Relu": relu}
