"""NVIDIA Triton Inference Server: a model repository for an explainable file, and heatmaps from Triton's
answers with the numpy core (tritonclient on the client side, no PyTorch anywhere).

    write_repository("model.explain.onnx", "models")     # models/model/1/model.onnx + config.pbtxt
    explainer = TritonExplainer("localhost:8000", "model")
    result = explainer.explain(batch, method="gradcam++")

The explainable file runs whole on Triton's onnxruntime backend with dynamic batching; Triton returns the
scores, the explained classes and the target layers' activations and gradients, and the client turns them
into heatmaps exactly as `Explainer` does. A bundle (`export --bundle`) needs onnxruntime-extensions'
custom-op library on the server: its config names it under `model_operations`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx

from .core import heatmaps
from .core.contract import METADATA_KEY, ExplainSpec
from .core.errors import ExplainError, ExportError
from .core.layouts import to_grid
from .explanation import Explanation
from .methods import METHODS, Method

TRITON_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64",
                onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.FLOAT16: "TYPE_FP16",
                onnx.TensorProto.INT32: "TYPE_INT32"}
EXTENSIONS_LIBRARY = "libortextensions.so"  # onnxruntime-extensions' custom-op library, built for C/C++ hosts


def _quoted(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tensors(values, batched: bool) -> list[tuple[str, str, list[int]]]:
    """(name, Triton type, dims) per graph input or output; the batch axis is left out when Triton batches."""
    rows = []
    for value in values:
        tensor = value.type.tensor_type
        if tensor.elem_type not in TRITON_TYPES:
            raise ExportError(f"tensor '{value.name}' has a type Triton's config cannot name here")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        rows.append((value.name, TRITON_TYPES[tensor.elem_type], dims[1:] if batched else dims))
    return rows


def _tensor_block(kind: str, rows: list[tuple[str, str, list[int]]]) -> str:
    entries = []
    for name, data_type, dims in rows:
        # a batched 1-D tensor (the class input, the selected classes) has no dims left: Triton wants [1] reshaped
        shape = f"dims: [ {', '.join(map(str, dims or [1]))} ]" + ("" if dims else " reshape: { shape: [ ] }")
        entries.append(f"  {{ name: {_quoted(name)} data_type: {data_type} {shape} }}")
    return f"{kind} [\n" + ",\n".join(entries) + "\n]\n"


def config_text(model: onnx.ModelProto, name: str, spec: ExplainSpec, *, max_batch: int = 8, instances: int = 1,
                max_queue_delay_us: int = 5000, ops_library: str | None = None) -> str:
    """config.pbtxt for an explainable file (batched, dynamic batching) or a bundle (one image per request)."""
    batched = not spec.bundled
    lines = [f"name: {_quoted(name)}", 'backend: "onnxruntime"', f"max_batch_size: {max_batch if batched else 0}"]
    text = "\n".join(lines) + "\n"
    text += _tensor_block("input", _tensors(model.graph.input, batched))
    text += _tensor_block("output", _tensors(model.graph.output, batched))
    if batched:
        text += f"dynamic_batching {{ max_queue_delay_microseconds: {max_queue_delay_us} }}\n"
    text += f"instance_group [ {{ count: {instances} kind: KIND_AUTO }} ]\n"
    text += f"parameters {{ key: {_quoted(METADATA_KEY)} value: {{ string_value: {_quoted(spec.to_json())} }} }}\n"
    if spec.bundled:
        text += f"model_operations {{ op_library_filename: [ {_quoted(ops_library or EXTENSIONS_LIBRARY)} ] }}\n"
    return text


def write_repository(model_path, repository, *, name: str | None = None, max_batch: int = 8, instances: int = 1,
                     mount: str = "/models") -> Path:
    """Write `repository/NAME/1/model.onnx` and `repository/NAME/config.pbtxt`; returns the model folder.

    For a bundle, the config names the extensions library at `mount/NAME/libortextensions.so` (the repository
    mounted at `mount` in Triton's container): copy onnxruntime-extensions' shared library there.
    """
    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    spec = ExplainSpec.from_metadata(metadata)
    if spec is None:
        raise ExportError(f"{model_path} is not explainable: export it first")
    name = name or model_path.name.split(".")[0]
    folder = Path(repository) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, folder / "1" / "model.onnx")
    library = f"{mount.rstrip('/')}/{name}/{EXTENSIONS_LIBRARY}"
    config = config_text(model, name, spec, max_batch=max_batch, instances=instances, ops_library=library)
    (folder / "config.pbtxt").write_text(config)
    return folder


def served(method: str) -> Method:
    """A method Triton's outputs serve: one whose maps come from the target layers' tensors of one run."""
    choices = [name for name, declared in METHODS.items() if declared.formula is not None]
    if method not in choices:
        raise ExplainError(f"method '{method}' is not available through Triton; choose from {', '.join(choices)}")
    return METHODS[method]


def explanation_from_outputs(spec: ExplainSpec, method: str, outputs: dict[str, np.ndarray]) -> Explanation:
    """Heatmaps from the outputs of an explainable file's run (Triton's answer), as `Explainer` computes them."""
    compute = served(method)
    gradients = spec.gradients if compute.gradients else [None] * len(spec.activations)
    maps = [compute.formula(to_grid(outputs[a], layout), None if g is None else to_grid(outputs[g], layout))
            for a, g, layout in zip(spec.activations, gradients, spec.layouts, strict=True)]
    scores = outputs[spec.scores]
    return Explanation(heatmaps(maps, spec.input_size), scores.reshape(len(scores), -1),
                       outputs[spec.selected].reshape(-1).astype(np.int64), method)


class TritonExplainer:
    """Explains batches with a model served by Triton (HTTP), from the repository `write_repository` wrote."""

    def __init__(self, url: str, model_name: str, client=None):
        import tritonclient.http as triton_http

        self.http, self.name = triton_http, model_name
        self.client = client or triton_http.InferenceServerClient(url)
        config = self.client.get_model_config(model_name)
        self.spec = ExplainSpec.from_json(config["parameters"][METADATA_KEY]["string_value"])

    def explain(self, batch: np.ndarray, method: str = "gradcam", targets=None) -> Explanation:
        """Heatmaps for a preprocessed float32 N x C x H x W batch; targets as in `Explainer.explain`."""
        spec, count = self.spec, len(batch)
        classes = np.full(count, -1, np.int64) if targets is None else np.broadcast_to(
            np.asarray(targets, np.int64).reshape(-1), (count,)).copy()
        compute = served(method)
        inputs = [self.http.InferInput(spec.input, list(batch.shape), "FP32"),
                  self.http.InferInput(spec.class_input, [count, 1], "INT64")]
        inputs[0].set_data_from_numpy(np.ascontiguousarray(batch, np.float32))
        inputs[1].set_data_from_numpy(classes.reshape(count, 1))
        names = [spec.scores, spec.selected, *spec.activations, *(spec.gradients if compute.gradients else [])]
        result = self.client.infer(self.name, inputs, outputs=[self.http.InferRequestedOutput(n) for n in names])
        return explanation_from_outputs(spec, method, {n: result.as_numpy(n) for n in names})

