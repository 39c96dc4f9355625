"""Heatmaps computed in the graph (exporters.graph_cams, issue 20): for each single-run CAM with an in-graph form,
the file's `onnxcam_heatmaps` output equals the numpy core's heatmaps (onnxcam.Explainer) of the same classes within
1e-5, on several target layers, channels-last maps and token grids; and onnxruntime-node, a runtime with no Python,
gives the same maps from the same file."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, small_net

import onnxcam
from onnxcam.core.contract import HEATMAPS_OUTPUT
from onnxcam.core.errors import ExportError
from onnxcam.exporters import export_onnx, export_torch
from onnxcam.exporters.graph_cams import GRAPH_CAMS
from onnxcam.methods import METHODS

BATCH = 3  # not the export's batch of 2
FOREIGN = Path(__file__).parent / "fixtures" / "foreign"
NODE = Path(__file__).parent / "node"
TOLERANCE = 1e-5


def _in_graph_and_numpy(path, images, method: str, classes=None, provider: str = "cpu"):
    """The file's in-graph heatmaps on `provider`, and the numpy core's of the same classes (on ONNX Runtime)."""
    explainer = onnxcam.Explainer(path, provider="cpu")
    batch = explainer.prepare(images)
    requested = np.full(len(batch), -1, np.int64) if classes is None else np.asarray(classes, np.int64)
    runner = (explainer if provider == "cpu" else onnxcam.Explainer(path, provider=provider)).model.runner
    heatmaps, selected = runner.run([HEATMAPS_OUTPUT, explainer.spec.selected],
                                    {explainer.spec.input: batch, explainer.spec.class_input: requested})
    reference = explainer.explain(batch, method, targets=[int(c) for c in selected])
    return heatmaps, reference.heatmaps, batch


def test_every_in_graph_cam_is_a_registered_method():
    assert set(GRAPH_CAMS) <= set(METHODS)


@pytest.mark.parametrize("provider", ["cpu", pytest.param("openvino", marks=pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="openvino is not installed"))])
@pytest.mark.parametrize("method", list(GRAPH_CAMS))
def test_in_graph_heatmaps_equal_the_numpy_core(method, provider, tmp_path):
    """Two target layers (a map at 32 x 32 and one at 8 x 8): each layer's map, upsampled, scaled, then averaged;
    the file run on ONNX Runtime and on OpenVINO (another runtime, no onnxcam code in the graph's run)."""
    path = tmp_path / "model.onnx"
    spec = export_torch(small_net(), path, input_shape=(3, 32, 32), layers=["features.2", "features.8"],
                        heatmaps=method)
    assert spec.heatmaps == method
    images = np.random.default_rng(0).standard_normal((BATCH, 3, 32, 32)).astype(np.float32)
    in_graph, numpy_maps, _ = _in_graph_and_numpy(path, images, method, classes=[-1, 0, 4], provider=provider)
    assert in_graph.shape == (BATCH, 32, 32) and np.ptp(numpy_maps, axis=(1, 2)).min() > 0
    np.testing.assert_allclose(in_graph, numpy_maps, atol=TOLERANCE)


@pytest.mark.parametrize(("name", "method"), [("keras_mobilenetv2.onnx", "gradcam"),  # nhwc, uint8-free float input
                                              ("hf_vit_dynamo.onnx", "layercam")])  # tokens:1:HxW
def test_in_graph_heatmaps_on_other_layouts(name, method, tmp_path):
    export_onnx(FOREIGN / name, tmp_path / "model.onnx", heatmaps=method)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40, 50, 3), dtype=np.uint8) for _ in range(BATCH)]
    in_graph, numpy_maps, _ = _in_graph_and_numpy(tmp_path / "model.onnx", images, method)
    np.testing.assert_allclose(in_graph, numpy_maps, atol=TOLERANCE)


def test_a_method_with_no_in_graph_form_is_refused_in_one_line(tmp_path):
    with pytest.raises(ExportError, match="method 'eigencam' has no in-graph form; these do: gradcam, ") as refused:
        export_torch(small_net(), tmp_path / "model.onnx", input_shape=(3, 32, 32), heatmaps="eigencam")
    assert "\n" not in str(refused.value) and not (tmp_path / "model.onnx").exists()
    done = run_cli("export", FOREIGN / "keras_mobilenetv2.onnx", "-o", tmp_path / "cli.onnx", "--heatmaps", "hirescam")
    assert done.returncode == 0, done.stderr
    assert onnxcam.Explainer(tmp_path / "cli.onnx").spec.heatmaps == "hirescam"


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_onnxruntime_node_gives_the_same_heatmaps(tmp_path):
    """The in-graph file on onnxruntime-node (npm, tests/node; .ci/run installs it): the maps and classes equal
    Python's. `cd tests/node && npm ci --ignore-scripts` installs it by hand."""
    assert (NODE / "node_modules" / "onnxruntime-node").is_dir(), "run `npm ci --ignore-scripts` in tests/node"
    path = tmp_path / "model.onnx"
    export_torch(small_net(), path, input_shape=(3, 32, 32), layers=["features.8"], heatmaps="gradcam++")
    images = np.random.default_rng(2).standard_normal((BATCH, 3, 32, 32)).astype(np.float32)
    in_graph, numpy_maps, batch = _in_graph_and_numpy(path, images, "gradcam++")
    (tmp_path / "images.f32").write_bytes(np.ascontiguousarray(batch, dtype="<f4").tobytes())
    done = subprocess.run(["node", str(NODE / "heatmaps.mjs"), str(path), str(tmp_path / "images.f32"),
                           ",".join(map(str, batch.shape)), str(tmp_path / "heatmaps.f32")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    told = json.loads(done.stdout.strip().splitlines()[-1])
    from_node = np.frombuffer((tmp_path / "heatmaps.f32").read_bytes(), dtype="<f4").reshape(told["dims"])
    assert told["dims"] == [BATCH, 32, 32]
    np.testing.assert_allclose(from_node, in_graph, atol=1e-6)
    np.testing.assert_allclose(from_node, numpy_maps, atol=TOLERANCE)
