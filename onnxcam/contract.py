"""The contract between an explainable ONNX file and the runtime: what `onnxcam export` records."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

METADATA_KEY = "onnxcam"
CLASS_INPUT = "onnxcam_class"
SELECTED_OUTPUT = "onnxcam_selected"


@dataclass
class ExplainSpec:
    """Names and facts `explain` needs, stored as JSON under the metadata key `onnxcam`."""

    input: str
    scores: str
    num_classes: int
    input_size: tuple[int, int]
    layers: list[str]
    activations: list[str]
    gradients: list[str]
    layouts: list[str]  # per layer: nchw, nhwc or tokens:P:HxW (see onnxcam.core.layouts)
    class_input: str = CLASS_INPUT
    selected: str = SELECTED_OUTPUT
    mean: list[float] | None = None
    std: list[float] | None = None
    labels: list[str] | None = None
    attentions: list[str] = field(default_factory=list)  # per block: attention probabilities, B x heads x N x N
    attention_gradients: list[str] = field(default_factory=list)
    attention_layout: str | None = None  # tokens:P:HxW of the attention's N tokens
    bundled: bool = False  # input is encoded image bytes, output a Grad-CAM heatmap (exporters.bundle)
    version: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ExplainSpec":
        data = json.loads(text)
        data["input_size"] = tuple(data["input_size"])
        return cls(**data)
