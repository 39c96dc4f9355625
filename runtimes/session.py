"""ONNX Runtime sessions and the choice of execution provider; provider 'openvino' gives an OpenVINO session behind
the same interface (runtimes.openvino)."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from functools import cache

import onnx
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph
from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as NoKernel

from ..core.errors import ProviderError
from ..exporters.precision import float32_edges, float32_twin, has_bfloat16
from .openvino import OpenVinoSession

log = logging.getLogger("onnxcam")

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDER_CHOICES = ("auto", *PROVIDERS, "openvino")  # what `provider` may be, everywhere it is asked
# ORT's pool threads spin between runs by default, burning the cores that decoding and drawing threads need: the
# dataset job (benchmarks/dataset.py, table only, a busy machine) ran 1.45x faster on 16% less CPU time without it
NO_SPINNING = ("session.intra_op.allow_spinning", "0")
_SAID_FLOAT32: set[str] = set()  # providers for which a bfloat16 model's float32 run was announced
_QUIET, _DEFAULT = 4, 2  # ORT logger severities: fatal only, and ORT's own default (warning)


def create_session(path, provider: str = "auto", threads: int | None = None,
                   extensions: bool = False) -> ort.InferenceSession | OpenVinoSession:
    """A session on `provider`: 'cpu', 'cuda', 'auto' (CUDA only where it really loads, else CPU), or 'openvino'
    (the OpenVINO runtime on the CPU, behind the same interface: runtimes.openvino).

    ORT falls back to CPU by itself when the CUDA libraries are missing, printing errors as it goes;
    the attempt here is made with its logger silenced, and the outcome is told in one log line.
    `extensions` registers onnxruntime-extensions' operators (needed by bundles).
    """
    if provider not in PROVIDER_CHOICES:
        raise ProviderError(f"unknown provider '{provider}'; choose {', '.join(PROVIDER_CHOICES)}")
    if provider == "openvino":
        if extensions:
            raise ProviderError("OpenVINO cannot run a bundle (its DecodeImage is onnxruntime-extensions' operator): "
                                "give it the explainable file")
        return OpenVinoSession(path, threads)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry(*NO_SPINNING)
    if extensions:  # custom operators of onnxruntime-extensions, e.g. DecodeImage in a bundle
        from onnxruntime_extensions import get_library_path

        options.register_custom_ops_library(get_library_path())
    path = str(path)
    if provider == "cpu":
        return _open(path, options, [PROVIDERS["cpu"]])
    reason = "onnxruntime was built without it"
    if PROVIDERS["cuda"] in ort.get_available_providers():
        _preload_cuda_libraries()
        ort.set_default_logger_severity(_QUIET)
        try:
            session = _open(path, options, [PROVIDERS["cuda"], PROVIDERS["cpu"]])
        finally:
            ort.set_default_logger_severity(_DEFAULT)
        if session.get_providers()[0] == PROVIDERS["cuda"]:
            log.info("onnxcam: running on CUDA")
            return session
        reason = "its libraries (CUDA, cuDNN) or a GPU are missing"
    else:
        session = None
    if provider == "cuda":
        raise ProviderError(f"the CUDA provider cannot run here: {reason}")
    log.info("onnxcam: running on CPU (CUDA unavailable: %s)", reason)
    return session or _open(path, options, [PROVIDERS["cpu"]])


def sibling_session(model: onnx.ModelProto,
                    like: ort.InferenceSession | OpenVinoSession) -> ort.InferenceSession | OpenVinoSession:
    """A session on an in-memory model derived from `like`'s file (a head, a forward part, a guided copy), on
    the same runtime and providers with the same threads."""
    if isinstance(like, OpenVinoSession):
        return like.sibling(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = like.get_session_options().intra_op_num_threads
    options.add_session_config_entry(*NO_SPINNING)
    return _open(model, options, like.get_providers())


def _open(source: str | onnx.ModelProto, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    """A session on a file or an in-memory model. A bfloat16 model meets Python in float32 (its inputs and outputs
    cast at the edges, exporters.precision.float32_edges) and, where the providers lack bfloat16 kernels (ONNX
    Runtime's CPU provider has none), runs as its float32 twin: the same weights, activations not rounded to
    bfloat16. That is said once. (Below opset 22 ONNX types most operators without bfloat16, so ONNX Runtime
    refuses such a file as invalid rather than unimplemented: it runs as its twin too.)"""
    if isinstance(source, onnx.ModelProto) and has_bfloat16(source):
        source = float32_edges(source)
    try:
        return ort.InferenceSession(_serialised(source), options, providers=providers)
    except (NoKernel, InvalidGraph) as error:
        model = source if isinstance(source, onnx.ModelProto) else onnx.load(source)
        if not has_bfloat16(model) or (isinstance(error, InvalidGraph) and "bfloat16" not in str(error)):
            raise
        _say_float32(providers[0], str(error).splitlines()[0])
        return ort.InferenceSession(float32_twin(model).SerializeToString(), options, providers=providers)


def _serialised(source: str | onnx.ModelProto) -> str | bytes:
    return source.SerializeToString() if isinstance(source, onnx.ModelProto) else source


def _say_float32(provider: str, reason: str) -> None:
    """The warning, once per provider and process."""
    name = {v: k for k, v in PROVIDERS.items()}.get(provider, provider)
    if name not in _SAID_FLOAT32:
        _SAID_FLOAT32.add(name)
        operator = re.search(r"operator \((\w+)\)|implementation for (\w+)\(", reason)
        why = f"no bfloat16 {operator.group(1) or operator.group(2)}" if operator else reason
        log.warning("onnxcam: this model computes in bfloat16, which ONNX Runtime's %s provider cannot run (%s); "
                    "it runs in float32 instead, on the same weights", name, why)


@cache
def _preload_cuda_libraries():
    """Loads CUDA and cuDNN from PyPI's nvidia packages (`pip install "onnxruntime-gpu[cuda,cudnn]"`) where they
    are installed, so that no system CUDA is needed; it prints what it cannot find, which is kept quiet here.
    Once per process: the libraries stay loaded."""
    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ort.preload_dlls()
