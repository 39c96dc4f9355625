"""The attention methods of Vision Transformers, from the attention probabilities of every block (core.rollout)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.errors import ExplainError
from ..core.layouts import parse_tokens
from ..core.maps import heatmaps
from ..core.rollout import HEAD_FUSIONS, grad_rollout, legrad, rollout
from .registry import Call, Method, Result, declare


@dataclass(frozen=True)
class RolloutOptions:
    head_fusion: str = "mean"  # how the heads of a block are fused: mean, max or min
    discard_ratio: float = 0.9  # the share of the lowest fused attentions dropped (never the class token's)


@dataclass(frozen=True)
class GradRolloutOptions:
    discard_ratio: float = 0.9


def _check(options) -> None:
    if getattr(options, "head_fusion", "mean") not in HEAD_FUSIONS:
        raise ExplainError(f"unknown head fusion '{options.head_fusion}'; choose from {', '.join(HEAD_FUSIONS)}")
    if not 0 <= options.discard_ratio < 1:
        raise ExplainError(f"discard_ratio must lie in [0, 1), got {options.discard_ratio}")


def _grid(call: Call):
    prefix, height, width = parse_tokens(call.model.spec.attention_layout)
    return prefix, (height, width)


def attention_rollout(call: Call) -> Result:
    """Attention rollout (Abnar & Zuidema, arXiv 2005.00928), as jacobgil's vit-explain: class-agnostic."""
    _check(call.options)
    spec = call.model.spec
    scores, selected, *attentions = call.model.run(call.batch, call.classes, spec.attentions)
    prefix, grid = _grid(call)
    maps = rollout(attentions, prefix, grid, call.options.head_fusion, call.options.discard_ratio)
    return Result(heatmaps([maps], spec.input_size), scores, selected)


def _gradient_rollout(call: Call) -> Result:
    """Gradient-weighted rollout (vit-explain's grad_rollout): each attention times ReLU of its gradient."""
    _check(call.options)
    spec = call.model.spec
    scores, selected, *tensors = call.model.run(call.batch, call.classes,
                                                spec.attentions + spec.attention_gradients)
    count = len(spec.attentions)
    prefix, grid = _grid(call)
    maps = grad_rollout(tensors[:count], tensors[count:], prefix, grid, call.options.discard_ratio)
    return Result(heatmaps([maps], spec.input_size), scores, selected)


def _legrad(call: Call) -> Result:
    """LeGrad (core.rollout.legrad) from the per-block gradients of the layer scores, in one session run."""
    spec = call.model.spec
    scores, selected, *gradients = call.model.run(call.batch, call.classes, spec.legrad_gradients)
    prefix, grid = _grid(call)
    return Result(heatmaps([legrad(gradients, prefix, grid)], spec.input_size), scores, selected)


declare(Method("rollout", attention_rollout, "attention rollout (Abnar & Zuidema, arXiv 2005.00928)",
               needs=("attentions",), options=RolloutOptions, gradients=False, objects=True))
declare(Method("grad-rollout", _gradient_rollout, "gradient-weighted attention rollout (jacobgil's vit-explain)",
               needs=("attentions", "attention_gradients"), options=GradRolloutOptions))
declare(Method("legrad", _legrad, "LeGrad (Bousselham et al., arXiv 2404.03214)",
               needs=("attentions", "legrad_gradients")))
