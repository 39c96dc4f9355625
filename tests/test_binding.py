"""I/O binding: the runner returns what a plain session run returns, writes outputs into arrays it owns,
fetches only what it is asked for, and takes batches that live outside numpy (OrtValues, DLPack tensors)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from onnxcam.exporters import export_onnx
from onnxcam.runtimes import create_session
from onnxcam.runtimes.binding import BoundRunner


def _feeds(session, batch, seed=0):
    x = np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    return {session.get_inputs()[0].name: x, "onnxcam_class": np.array([-1, 2, 4][:batch], np.int64)}


def test_bound_outputs_equal_a_plain_run_at_another_batch(small_onnx):
    session = create_session(small_onnx, "cpu")
    names = [o.name for o in session.get_outputs()]
    feeds = _feeds(session, 3)  # exported at batch 2
    bound = BoundRunner(session).run(names, feeds)
    plain = session.run(names, feeds)
    assert [a.shape for a in bound] == [p.shape for p in plain]
    for a, p in zip(bound, plain):
        assert a.dtype == p.dtype and a.flags.owndata and a.flags.writeable
        np.testing.assert_array_equal(a, p)


def test_only_the_outputs_asked_for_are_fetched(small_onnx):
    session = create_session(small_onnx, "cpu")
    bound, make_binding = [], session.io_binding

    def spying_binding():
        binding = make_binding()
        bind_output = binding.bind_output
        binding.bind_output = lambda name, *args: (bound.append(name), bind_output(name, *args))[1]
        return binding

    session.io_binding = spying_binding
    feeds = _feeds(session, 2, seed=1)
    (activation,) = BoundRunner(session).run(["onnxcam_activation_0"], feeds)
    assert bound == ["onnxcam_activation_0"]
    np.testing.assert_array_equal(activation, session.run(["onnxcam_activation_0"], feeds)[0])


def test_sizes_shape_inference_cannot_tell_are_measured(tmp_path):
    """Resize by scales computed at run time: the target's size is unknown to shape inference, so the export
    runs the model at two batch sizes to measure it. The batch keeps the input's own name for it ('N')."""
    rng = np.random.default_rng(3)
    weights = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "fc"),
               numpy_helper.from_array(np.array([1, 1, 0.5, 0.5], np.float32), "scales_source")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Abs", ["scales_source"], ["scales"]),
             helper.make_node("Resize", ["conv", "", "scales"], ["down"], mode="nearest"),
             helper.make_node("Relu", ["down"], ["target"]),
             helper.make_node("GlobalAveragePool", ["target"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]), helper.make_node("MatMul", ["flat", "fc"], ["scores"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 5])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    assert "target" not in inferred or not inferred["target"].type.tensor_type.shape.dim[2].dim_value
    spec = export_onnx(model, tmp_path / "resize.onnx", layers=["target"])
    explainer = onnxcam.Explainer(tmp_path / "resize.onnx", provider="cpu")
    declared = {o.name: o.shape for o in explainer.session.get_outputs()}
    assert declared[spec.selected] == ["N"] and declared[spec.gradients[0]] == ["N", 4, 4, 4]
    for batch in (3, 16):
        x = rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)
        feeds = {"x": x, "onnxcam_class": np.full(batch, -1, np.int64)}
        names = [spec.scores, *spec.activations, *spec.gradients]
        for got, expected in zip(explainer.model.runner.run(names, feeds), explainer.session.run(names, feeds)):
            np.testing.assert_array_equal(got, expected)
        assert explainer.explain(x).heatmaps.shape == (batch, 8, 8)


def test_outputs_of_open_shape_are_copied_out_once():
    """An output whose size no input names (here 'rows') cannot be allocated ahead; ORT allocates it."""
    nodes = [helper.make_node("Relu", ["x"], ["known"]), helper.make_node("NonZero", ["x"], ["open"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("known", TensorProto.FLOAT, ["batch", 4]),
                               helper.make_tensor_value_info("open", TensorProto.INT64, [2, "rows"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([[1, -2, 0, 3], [0, 0, 5, -1], [2, 2, 2, 2]], np.float32)
    known, nonzero = BoundRunner(session).run(["known", "open"], {"x": x})
    np.testing.assert_array_equal(known, np.maximum(x, 0))
    np.testing.assert_array_equal(nonzero, np.stack(np.nonzero(x)))


@pytest.mark.parametrize("wrap", [
    pytest.param(ort.OrtValue.ortvalue_from_numpy, id="ortvalue"),
    pytest.param(torch.from_numpy, id="dlpack-torch"),
])
def test_explainer_takes_batches_outside_numpy(small_onnx, wrap):
    explainer = onnxcam.Explainer(small_onnx, provider="cpu")
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    expected = explainer.explain(x, "gradcam++", targets=[0, 1, 2])
    got = explainer.explain(wrap(x), "gradcam++", targets=[0, 1, 2])
    np.testing.assert_array_equal(got.heatmaps, expected.heatmaps)
    np.testing.assert_array_equal(got.logits, expected.logits)


def test_tensors_of_the_wrong_kind_are_refused_clearly(small_onnx):
    explainer = onnxcam.Explainer(small_onnx, provider="cpu")
    with pytest.raises(onnxcam.ExplainError, match=r"float32 batch N x C x 32 x 32, got tensor\(double\)"):
        explainer.explain(torch.zeros(2, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(onnxcam.ExplainError, match=r"got tensor\(float\) of shape \(2, 3, 16, 16\)"):
        explainer.explain(ort.OrtValue.ortvalue_from_numpy(np.zeros((2, 3, 16, 16), np.float32)))
    with pytest.raises(onnxcam.ExplainError, match="got str"):
        explainer.explain("cat.jpg")
    with pytest.raises(onnxcam.ExplainError, match=r"contiguous tensors only.*tensor.contiguous\(\)"):
        explainer.explain(torch.zeros(2, 32, 32, 3).permute(0, 3, 1, 2))
    with pytest.raises(onnxcam.ExplainError, match="detach"):
        explainer.explain(torch.zeros(2, 3, 32, 32, requires_grad=True))
