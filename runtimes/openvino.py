"""The OpenVINO runtime behind ONNX Runtime's session interface (provider 'openvino').

OpenVINO reads the ONNX file itself; what the rest of onnxcam asks a session (its inputs and outputs with their
ONNX names, types and symbolic sizes, the file's metadata) is read from the ONNX graph, so it is what ONNX Runtime
would answer. The model is compiled once, with dynamic shapes, in float32 (OpenVINO's CPU plugin would otherwise
compute in bfloat16 where the CPU has it); each run takes its own infer request from a pool, so a server's
threads share one compiled model. It runs host arrays (binding.HostRunner brings tensors to the host).
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import onnx

from ..core.errors import ProviderError

INSTALL = 'pip install "onnxcam[openvino]"'
# operators that round activations to integers: OpenVINO's integer arithmetic rounds them otherwise than ONNX
# Runtime's (a QDQ int8 classifier's Grad-CAM maps moved by 0.1, a dynamic one's by 0.03; a uint16 one's scores by 450)
QUANTIZING = ("QuantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "QLinear", "QGemm")


@dataclass(frozen=True)
class TensorInfo:
    """An input or output as ONNX Runtime's NodeArg describes it: its name, sizes (ints, or names for symbolic
    sizes) and type ('tensor(float)')."""

    name: str
    shape: list
    type: str


@dataclass(frozen=True)
class ModelMeta:
    custom_metadata_map: dict[str, str]


def _info(value: onnx.ValueInfoProto) -> TensorInfo:
    tensor = value.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in tensor.shape.dim]
    kind = onnx.helper.tensor_dtype_to_string(tensor.elem_type).removeprefix("TensorProto.").lower()
    return TensorInfo(value.name, shape, f"tensor({kind})")


@cache
def _core():
    """OpenVINO's module and its Core, one per process (it loads the CPU plugin once; it compiles from any thread)."""
    try:
        import openvino
    except ImportError:
        raise ProviderError(f"the openvino provider needs the OpenVINO runtime: {INSTALL}") from None
    return openvino, openvino.Core()


class OpenVinoSession:
    """An ONNX file or in-memory model compiled by OpenVINO for its CPU, `threads` threads (None: its default)."""

    def __init__(self, source: str | Path | onnx.ModelProto, threads: int | None = None):
        ov, core = _core()
        graph = source if isinstance(source, onnx.ModelProto) else onnx.load(str(source), load_external_data=False)
        _refuse_quantized(graph, source)
        self.threads = threads
        initialisers = {t.name for t in graph.graph.initializer}
        self._inputs = [_info(i) for i in graph.graph.input if i.name not in initialisers]
        self._outputs = [_info(o) for o in graph.graph.output]
        self._meta = ModelMeta({p.key: p.value for p in graph.metadata_props})
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            model = core.read_model(source.SerializeToString() if isinstance(source, onnx.ModelProto) else str(source))
            self._compiled = core.compile_model(_unshared_constants(model, ov), "CPU", config)
            self._ports = {o.name: self._compiled.output(o.name) for o in self._outputs}  # by ONNX name
        except RuntimeError as error:
            what = "a part of the file derived for this method (a head, the forward part, the guided copy)" \
                if isinstance(source, onnx.ModelProto) else str(source)
            raise ProviderError(f"OpenVINO cannot run {what}: {_reason(error)}") from None
        self._requests: queue.SimpleQueue = queue.SimpleQueue()

    def get_inputs(self) -> list[TensorInfo]:
        return self._inputs

    def get_outputs(self) -> list[TensorInfo]:
        return self._outputs

    def get_modelmeta(self) -> ModelMeta:
        return self._meta

    def sibling(self, model: onnx.ModelProto) -> OpenVinoSession:
        """A session on a model derived from this one's (runtimes.session.sibling_session), with the same threads."""
        return OpenVinoSession(model, self.threads)

    def run(self, names: list[str] | None, feeds: dict) -> list[np.ndarray]:
        """The outputs `names` (None: all) as numpy arrays, for numpy inputs (ONNX Runtime's `run`)."""
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            results = request.infer(feeds, share_inputs=True)  # outputs are copied out of the request
        except RuntimeError as error:
            raise ProviderError(f"OpenVINO failed to run: {_reason(error)}") from None
        finally:
            self._requests.put(request)
        return [results[self._ports[name]] for name in names or self._ports]


def _refuse_quantized(model: onnx.ModelProto, source) -> None:
    operator = next((node.op_type for node in model.graph.node if node.op_type.startswith(QUANTIZING)), None)
    if operator is not None:
        raise ProviderError(f"OpenVINO computes quantized models otherwise than ONNX Runtime, so their maps would "
                            f"differ: {source if isinstance(source, (str, Path)) else 'this model'} has {operator}; "
                            f"explain it with provider cpu or cuda")


def _unshared_constants(model, ov):
    """`model` with each reader of a constant beyond its first reading a copy of its own. OpenVINO 2026.4's CPU
    plugin computes wrong values (off by up to 100%) where a constant is the weights of a forward layer and, as in a
    gradient graph, also of its backward pass: a Conv's weights read by a ConvTranspose, a MatMul's by the
    Transpose before a MatMul (openvinotoolkit/openvino#33397 reports the first). A copy costs the weights' memory
    once more per extra reader."""
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":
            for reader in list(op.output(0).get_target_inputs())[1:]:
                reader.replace_source_output(ov.opset13.constant(op.get_data().copy()).output(0))
    return model


def _reason(error: RuntimeError) -> str:
    """The line of OpenVINO's many that says what failed: the operators it cannot convert, where it names them."""
    lines = [line.strip(" -") for line in str(error).splitlines()
             if line.strip() and not line.startswith(("Exception from", "Check ", "To facilitate"))]
    return next((line for line in lines if "operation" in line.lower()), lines[-1] if lines else "no reason given")
