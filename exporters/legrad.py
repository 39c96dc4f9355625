"""The `legrad` export option: LeGrad's layer scores (Bousselham et al., "LeGrad: An Explainability Method for Vision
Transformers via Feature Formation Sensitivity", arXiv 2404.03214, Sec. 3).

LeGrad explains block l of a ViT by the gradient of a layer-specific class score s^l with respect to the block's
attention probabilities A^l, where s^l is the model's own readout (final norm, pooling, classifier) applied to the
block's output tokens z^l. This module finds each block's output in the graph and clones the readout, the nodes
from the last block's output to the score, onto it. The gradient of s^l then needs a backward walk through block l
and the readout only (autodiff.append_gradients visits the nodes between A^l and s^l, nothing else).
"""

from __future__ import annotations

from collections import Counter

import onnx

from ..core.errors import ExportError
from .head import slice_head

LAYER_SCORE_PREFIX = "onnxcam_legrad"


def layer_scores(model: onnx.ModelProto, shapes: dict[str, list | None], attentions: list[str],
                 score: str) -> list[str]:
    """Per attention block (in graph order), the name of its layer score s^l: the readout cloned onto the block's
    output, or `score` itself for the last block. The clones and their types are added to the model's graph.
    Refused where the attentions, the blocks' outputs or a readout that can be cloned are not found."""
    if not attentions:
        raise ExportError("LeGrad needs the attention probabilities of a Vision Transformer (B x heads x N x N over "
                          "the image's patches and a CLS token), and this model has none")
    outputs = block_outputs(model, shapes, attentions, score)
    readout, cuts = slice_head(model, [outputs[-1]], [score])
    if cuts:
        raise ExportError(f"LeGrad cannot copy the model's readout onto every block: besides the last block's output "
                          f"'{outputs[-1]}' it reads '{cuts[0]}'")
    types = {info.name: info for info in [*model.graph.value_info, *model.graph.output]}
    clones = [_clone(model, readout, outputs[-1], block_output, f"{LAYER_SCORE_PREFIX}_{index}", types)
              for index, block_output in enumerate(outputs[:-1])]
    return [clone[score] for clone in clones] + [score]


def block_outputs(model: onnx.ModelProto, shapes: dict[str, list | None], attentions: list[str],
                  score: str) -> list[str]:
    """Each attention block's output z^l, the residual stream after the block: the first Add over the attention's
    tokens (B x T x C) whose operands both depend on A^l (in a pre-norm block, the Add after the MLP; the one
    after the attention also reads the stream from before the block) and through which every path from A^l to
    the score passes. A block's output must not depend on the next block's attention, and must be read twice by
    the next block (by its normalisation and its residual Add): post-norm and parallel blocks are refused."""
    nodes = list(model.graph.node)
    reached = [_descendants(nodes, shapes, attention) for attention in attentions]
    found = []
    for attention, after in zip(attentions, reached, strict=True):
        tokens = (shapes.get(attention) or [None])[-1]
        output = next((node.output[0] for node in nodes
                       if node.op_type == "Add" and node.output[0] in after and all(i in after for i in node.input)
                       and _is_tokens(shapes.get(node.output[0]), tokens)
                       and score not in _descendants(nodes, shapes, attention, blocked=node.output[0])), None)
        if output is None:
            raise ExportError(f"LeGrad cannot find the output of the block of attention '{attention}': no residual "
                              f"Add after it that every path to the score passes through")
        found.append(output)
    readers = Counter(name for node in nodes for name in node.input)
    for output, attention, later in zip(found, attentions, reached[1:], strict=False):
        if output in later or readers[output] < 2:  # the stream feeds the next block and its residual Add
            raise ExportError(f"LeGrad cannot find the output of the block of attention '{attention}': the Add found "
                              f"is not a residual stream that the next block reads (LeGrad's blocks are pre-norm "
                              f"residual ones)")
    return found


def _is_tokens(shape: list | None, tokens: int | None) -> bool:
    return bool(shape) and len(shape) == 3 and tokens is not None and shape[1] == tokens


def _descendants(nodes: list[onnx.NodeProto], shapes: dict[str, list | None], source: str,
                 blocked: str | None = None) -> set[str]:
    """The float tensors (those in `shapes`) computed from `source`, itself included, not through `blocked`: the
    values the gradient flows through (shape computations are left out)."""
    reached = {source}
    for node in nodes:
        if any(name in reached and name != blocked for name in node.input):
            reached.update(name for name in node.output if name in shapes)
    return reached


def _clone(model: onnx.ModelProto, readout: list[onnx.NodeProto], source: str, block_output: str, prefix: str,
           types: dict[str, onnx.ValueInfoProto]) -> dict[str, str]:
    """Append to the graph a copy of the readout nodes reading `block_output` instead of `source`, each tensor they
    write renamed under `prefix` with its type copied; the renaming, from the original names."""
    renamed = {source: block_output}
    renamed.update({name: f"{prefix}/{name}" for node in readout for name in node.output if name})
    for node in readout:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        del copy.input[:], copy.output[:]
        copy.input.extend(renamed.get(name, name) for name in node.input)
        copy.output.extend(renamed.get(name, name) for name in node.output)
        copy.name = f"{prefix}/{node.name or node.output[0]}"
        model.graph.node.append(copy)
        for name in node.output:
            if name in types:
                info = onnx.ValueInfoProto()
                info.CopyFrom(types[name])
                info.name = renamed[name]
                model.graph.value_info.append(info)
    return renamed
