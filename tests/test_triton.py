"""Triton: the repository `write_repository` writes is valid against Triton's own ModelConfig schema (the
protobuf tritonclient ships), and heatmaps computed from the outputs Triton would return equal Explainer's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import onnxcam
from onnxcam.core.contract import ExplainSpec
from onnxcam.triton import explanation_from_outputs, write_repository


def _model_config_class():
    """tritonclient's ModelConfig message, loaded from its generated module alone (tritonclient/grpc's package
    import pulls in the gRPC service protos, which clash with KServe's in one process)."""
    found = importlib.util.find_spec("tritonclient")
    if found is None:
        pytest.skip("tritonclient is not installed")
    path = Path(found.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    if not path.exists():
        pytest.skip("tritonclient without its gRPC protos (install tritonclient[grpc])")
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ModelConfig


def _parse(config_path: Path):
    from google.protobuf import text_format

    return text_format.Parse(config_path.read_text(), _model_config_class()())


def test_repository_config_follows_tritons_schema(small_onnx, tmp_path):
    folder = write_repository(small_onnx, tmp_path / "models", max_batch=16, instances=2)
    assert (folder / "1" / "model.onnx").read_bytes() == Path(small_onnx).read_bytes()
    config = _parse(folder / "config.pbtxt")
    spec = onnxcam.Explainer(small_onnx, provider="cpu").spec
    assert config.name == "small" and config.backend == "onnxruntime" and config.max_batch_size == 16
    inputs = {t.name: t for t in config.input}
    assert list(inputs["input"].dims) == [3, 32, 32]
    assert list(inputs[spec.class_input].dims) == [1] and list(inputs[spec.class_input].reshape.shape) == []
    outputs = {t.name: list(t.dims) for t in config.output}
    assert outputs == {"logits": [5], spec.selected: [1], spec.activations[0]: [16, 8, 8],
                       spec.gradients[0]: [16, 8, 8]}
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, 0)]  # KIND_AUTO
    assert ExplainSpec.from_json(config.parameters["onnxcam"].string_value) == spec
    assert not config.model_operations.op_library_filename


def test_bundle_repository_names_the_extensions_library(tmp_path, small_model):
    from onnxcam.exporters import export_torch

    bundle = tmp_path / "small.bundle.onnx"
    export_torch(small_model, bundle, input_shape=(3, 32, 32), layers=["features.8"], bundled=True)
    config = _parse(write_repository(bundle, tmp_path / "models") / "config.pbtxt")
    assert list(config.model_operations.op_library_filename) == ["/models/small/libortextensions.so"]
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert {t.name: t.data_type for t in config.input}["image_bytes"] == 2  # TYPE_UINT8


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "eigencam"])
def test_heatmaps_from_tritons_outputs_equal_the_explainers(small_onnx, tmp_path, method):
    """The outputs Triton returns are the repository model's outputs: run it with ONNX Runtime at batch 3."""
    folder = write_repository(small_onnx, tmp_path / "models")
    explainer = onnxcam.Explainer(small_onnx, provider="cpu")
    spec = explainer.spec
    batch = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    classes = np.array([0, -1, 4], np.int64)
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, {spec.input: batch, spec.class_input: classes}), strict=True))
    result = explanation_from_outputs(spec, method, outputs)
    expected = explainer.explain(batch, method, classes)
    np.testing.assert_allclose(result.heatmaps, expected.heatmaps, atol=1e-5)
    np.testing.assert_array_equal(result.classes, expected.classes)
    np.testing.assert_allclose(result.logits, expected.logits, rtol=1e-5)


def test_export_writes_the_repository_from_the_command_line(tmp_path):
    from conftest import run_cli

    result = run_cli("export", "conftest:small_net", "-o", tmp_path / "net.explain.onnx", "--input-size", 32,
                     "--layer", "features.8", "--triton-repo", tmp_path / "models",
                     cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr
    config = _parse(tmp_path / "models" / "net" / "config.pbtxt")
    assert config.name == "net" and config.max_batch_size == 8
    assert (tmp_path / "models" / "net" / "1" / "model.onnx").stat().st_size > 0


class _OnnxRuntimeAsTriton:
    """Answers as Triton's HTTP client would, from the repository's model run by ONNX Runtime: the class input
    arrives as N x 1 and is reshaped to N, as the config's `reshape` tells Triton to."""

    def __init__(self, folder: Path):
        self.config = {"parameters": {"onnxcam": {"string_value": _parse(folder / "config.pbtxt")
                                                  .parameters["onnxcam"].string_value}}}
        self.session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])

    def get_model_config(self, name):
        return self.config

    def infer(self, name, inputs, outputs):
        types = {"FP32": np.float32, "INT64": np.int64}
        feed = {i.name(): np.frombuffer(i._raw_data, types[i.datatype()]).reshape(i.shape()) for i in inputs}
        feed["onnxcam_class"] = feed["onnxcam_class"].reshape(-1)
        names = [o.name() for o in outputs]
        answer = dict(zip(names, self.session.run(names, feed), strict=True))
        return type("Result", (), {"as_numpy": staticmethod(answer.__getitem__)})


def test_triton_explainer_asks_for_the_outputs_its_method_needs(small_onnx, tmp_path):
    pytest.importorskip("tritonclient.http")
    from onnxcam.triton import TritonExplainer

    folder = write_repository(small_onnx, tmp_path / "models")
    explainer = TritonExplainer("unused:8000", "small", client=_OnnxRuntimeAsTriton(folder))
    batch = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    expected = onnxcam.Explainer(small_onnx, provider="cpu")
    for method, targets in [("hirescam", [1, 2, 3]), ("eigencam", None)]:
        result = explainer.explain(batch, method, targets)
        np.testing.assert_allclose(result.heatmaps, expected.explain(batch, method, targets).heatmaps, atol=1e-5)
