"""The contract between an explainable ONNX file and the runtimes: the names `onnxcam export` adds to the
graph and the facts it records as JSON under the metadata key `onnxcam`. Exporters write it, runtimes
read it. It sits in the bottom layer, beside the numpy core: every other layer may read it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from .errors import ContractError

METADATA_KEY = "onnxcam"
VERSION = 1  # raised when a field changes meaning; new fields with defaults keep it

# names in the explainable graph
CLASS_INPUT = "onnxcam_class"
SELECTED_OUTPUT = "onnxcam_selected"
LOGITS_OUTPUT = "onnxcam_logits"  # the logits, exposed where the scores output squashes them (ExplainSpec.explained)
# names in a bundle (exporters.bundle, runtimes.Bundle)
BYTES_INPUT = "image_bytes"
HEATMAP_OUTPUT = "heatmap"
HEATMAPS_OUTPUT = "onnxcam_heatmaps"  # B x H x W heatmaps computed in the graph (export option heatmaps)


@dataclass
class ExplainSpec:
    """Names and facts `explain` needs."""

    input: str
    scores: str
    num_classes: int
    input_size: tuple[int, int]  # H x W
    layers: list[str]
    activations: list[str]
    gradients: list[str]
    layouts: list[str]  # per layer: nchw, nhwc or tokens:P:HxW (see onnxcam.core.layouts)
    score_shape: list[int] | None = None  # the score output's shape per image (K for a classifier)
    input_layout: str = "nchw"  # the image input's layout: nchw or nhwc
    input_type: str = "float32"  # its numpy element type: float32, float16, float64 or uint8 (normalised inside)
    class_input: str = CLASS_INPUT
    selected: str = SELECTED_OUTPUT
    mean: list[float] | None = None
    std: list[float] | None = None
    labels: list[str] | None = None
    attentions: list[str] = field(default_factory=list)  # per block: attention probabilities, B x heads x N x N
    attention_gradients: list[str] = field(default_factory=list)
    attention_layout: str | None = None  # tokens:P:HxW of the attention's N tokens
    # per block (export option legrad): the gradient of the block's layer score, the model's readout applied to the
    # block's output tokens, with respect to its attention probabilities (LeGrad; exporters.legrad)
    legrad_gradients: list[str] = field(default_factory=list)
    # float tensors the head (the nodes between the targets and the outputs) reads besides the targets,
    # exposed so that it can run alone on them (exporters.head)
    cuts: list[str] = field(default_factory=list)
    # the gradient of the score w.r.t. the input image (export option input_gradients), and the name prefix of
    # its ReLU masks' Where nodes, which a runtime rewrites for guided backpropagation (exporters.autodiff.guided)
    input_gradient: str | None = None
    guided_input: str | None = None
    # FullGrad's layers with a bias (with input_gradients): the gradient w.r.t. each output, and its bias
    bias_gradients: list[str] = field(default_factory=list)
    biases: list[str] = field(default_factory=list)
    bundled: bool = False  # input is encoded image bytes, output a Grad-CAM heatmap (exporters.bundle)
    heatmaps: str | None = None  # the method whose heatmaps the graph computes (exporters.graph_cams), if any
    # where the scores output is a Softmax, LogSoftmax or Sigmoid of a tensor (through reshapes only): the output
    # exposing that tensor, the logits, whose elements the gradients start from (the class score before the
    # squashing, as Grad-CAM defines it), and the squashing's name; None where the output itself is explained
    explained: str | None = None
    squashing: str | None = None
    logits: str | None = None  # the logits' own name in the model, for people
    version: int = VERSION

    @property
    def score_tensor(self) -> str:
        """The tensor whose class scores the maps explain: the logits before the output's squashing, or the output
        (the same elements in the same order either way)."""
        return self.explained or self.scores

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ExplainSpec:
        """The spec a file records; a file of another contract version gets one line saying what to do."""
        try:
            data = json.loads(text)
            version = int(data.get("version", 0))
        except (ValueError, TypeError, AttributeError):
            raise ContractError("the onnxcam metadata of this file is not valid JSON") from None
        if version > VERSION:
            raise ContractError(f"this file was written by a newer onnxcam (contract version {version}; this one "
                                f"reads {VERSION}): upgrade onnxcam")
        if version < VERSION:
            raise ContractError(f"this file was written by an older onnxcam (contract version {version}; this one "
                                f"reads {VERSION}): export the model again")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ContractError(f"this file records fields this onnxcam does not know ({', '.join(unknown)}): "
                                f"upgrade onnxcam")
        try:
            spec = cls(**data)
        except TypeError as error:
            raise ContractError(f"the onnxcam metadata of this file is incomplete ({error})") from None
        spec.input_size = tuple(spec.input_size)
        return spec

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> ExplainSpec | None:
        """The spec in a model's metadata map, or None for a file that is not explainable."""
        return cls.from_json(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None
