"""The differentiation engine: reverse mode over ONNX graphs.

- `graph`: the builder, `Value` (tensor names with arithmetic) and `Node` (attributes with schema defaults);
- `rules`: the table of per-operator vector-Jacobian products;
- `quantized`: the rules of quantized operators (straight-through estimator) and the front end's hook;
- `walk`: the reverse walk from the score to the targets, which holds every rule to its contract.
"""

from .graph import GraphBuilder, Node, Value, needed_nodes
from .quantized import QUANTIZED_RULES, expose_dequantized
from .rules import NON_DIFFERENTIABLE, RULES
from .walk import append_gradients, prune

__all__ = ["NON_DIFFERENTIABLE", "QUANTIZED_RULES", "RULES", "GraphBuilder", "Node", "Value", "append_gradients",
           "expose_dequantized", "needed_nodes", "prune"]
