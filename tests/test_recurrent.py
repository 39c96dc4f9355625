"""LSTM and GRU nodes unrolled for differentiation (exporters/recurrent.py): the unrolled graph computes what
ONNX Runtime's (or, for layout 1, which ONNX Runtime lacks, the ONNX reference evaluator's) operator computes,
and a Grad-CAM target before a bidirectional LSTM gets the gradient that finite differences of the original
file give."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from support.finite_differences import directional_check

import onnxcam
from onnxcam.exporters import export_onnx
from onnxcam.exporters.recurrent import expand_recurrent

EXPORT_BATCH, BATCH, STEPS = 2, 3, 5


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _torch_file(module: torch.nn.Module, x: torch.Tensor, dynamo: bool, path) -> onnx.ModelProto:
    if dynamo:
        torch.onnx.export(module, (x,), str(path), dynamo=True, verbose=False,
                          dynamic_shapes=({0 if module.batch_first else 1: torch.export.Dim("batch")},))
    else:
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0 if module.batch_first else 1: "batch"}})
    return onnx.load(str(path))


@pytest.mark.parametrize(("kind", "bidirectional", "batch_first", "dynamo"), [
    ("LSTM", False, False, False), ("LSTM", True, True, False), ("LSTM", True, False, False),
    ("LSTM", True, True, True), ("GRU", True, True, False), ("GRU", False, False, True),
])
def test_torch_recurrent_layers_unroll_to_the_same_values(kind, bidirectional, batch_first, dynamo, tmp_path):
    torch.manual_seed(0)
    module = getattr(torch.nn, kind)(4, 6, num_layers=2, bidirectional=bidirectional, batch_first=batch_first)
    shape = (EXPORT_BATCH, STEPS, 4) if batch_first else (STEPS, EXPORT_BATCH, 4)
    original = _torch_file(module.eval(), torch.randn(shape), dynamo, tmp_path / "rnn.onnx")
    assert [n.op_type for n in original.graph.node].count(kind) == 2
    unrolled = expand_recurrent(original)
    assert kind not in {n.op_type for n in unrolled.graph.node}
    x = np.random.default_rng(1).standard_normal((BATCH, STEPS, 4) if batch_first else (STEPS, BATCH, 4))
    feeds = {original.graph.input[0].name: x.astype(np.float32)}
    expected, got = _run(original, feeds), _run(unrolled, feeds)
    assert len(expected) == len(got) == len(original.graph.output)
    for a, b in zip(expected, got, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


def _recurrent_file(kind: str, direction: str, layout: int, peepholes: bool, **attributes) -> tuple:
    """One LSTM or GRU node with random weights, initial states fed, all outputs; and feeds for it."""
    rng = np.random.default_rng(2)
    directions, gates, size, hidden = 2 if direction == "bidirectional" else 1, 4 if kind == "LSTM" else 3, 4, 6
    weights = {"W": [directions, gates * hidden, size], "R": [directions, gates * hidden, hidden],
               "B": [directions, 2 * gates * hidden], **({"P": [directions, 3 * hidden]} if peepholes else {})}
    initializers = [helper.make_tensor(name, TensorProto.FLOAT, dims, rng.standard_normal(dims).ravel().tolist())
                    for name, dims in weights.items()]
    state = [BATCH, directions, hidden] if layout else [directions, BATCH, hidden]
    feeds = {"X": rng.standard_normal([BATCH, STEPS, size] if layout else [STEPS, BATCH, size]),
             "h0": rng.standard_normal(state), **({"c0": rng.standard_normal(state)} if kind == "LSTM" else {})}
    feeds = {name: value.astype(np.float32) for name, value in feeds.items()}
    inputs = ["X", "W", "R", "B", "", "h0", *(["c0", "P" if peepholes else ""] if kind == "LSTM" else [])]
    outputs = ["Y", "Y_h", "Y_c"][:3 if kind == "LSTM" else 2]
    node = helper.make_node(kind, inputs, outputs, name="recurrent", hidden_size=hidden, direction=direction,
                            layout=layout, **attributes)
    graph = helper.make_graph([node], "recurrent", [helper.make_tensor_value_info(n, TensorProto.FLOAT, v.shape)
                                                    for n, v in feeds.items()],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
                              initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), feeds


@pytest.mark.parametrize(("kind", "direction", "layout", "peepholes", "attributes"), [
    ("LSTM", "reverse", 0, True, {}), ("LSTM", "bidirectional", 1, True, {}), ("LSTM", "forward", 1, False, {}),
    ("GRU", "reverse", 1, False, {"linear_before_reset": 0}), ("GRU", "bidirectional", 0, False, {}),
])
def test_what_torch_does_not_emit_unrolls_to_the_same_values(kind, direction, layout, peepholes, attributes):
    """Reverse direction, peepholes, batch-major layout, GRU without linear_before_reset, given initial states."""
    original, feeds = _recurrent_file(kind, direction, layout, peepholes, **attributes)
    expected = ReferenceEvaluator(original).run(None, feeds) if layout else _run(original, feeds)
    got = _run(expand_recurrent(original), feeds)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("attributes", "inputs", "why"), [
    ({"activations": ["Relu", "Tanh", "Tanh"]}, {}, "activations"),
    ({"clip": 3.0}, {}, "clip"),
    ({"input_forget": 1}, {}, "input_forget"),
    ({}, {"sequence_lens": np.array([STEPS, STEPS - 1, STEPS], np.int32)}, "sequence_lens"),
])
def test_what_cannot_be_unrolled_is_refused_in_one_line(attributes, inputs, why):
    model, _ = _recurrent_file("LSTM", "forward", 0, False, **attributes)
    for name, value in inputs.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
        model.graph.node[0].input[4] = name
    with pytest.raises(onnxcam.ExportError, match=f"LSTM node 'recurrent' .*{why}") as refusal:
        expand_recurrent(model)
    assert "\n" not in str(refusal.value)


def test_full_sequence_lens_are_unrolled():
    model, feeds = _recurrent_file("LSTM", "bidirectional", 0, False)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.full(BATCH, STEPS, np.int32), "lengths"))
    model.graph.node[0].input[4] = "lengths"
    for a, b in zip(_run(model, feeds), _run(expand_recurrent(model), feeds), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


class RowSequencer(torch.nn.Module):
    """A tiny Sequencer2D-like classifier (Tatsunami & Taki 2022): conv stem, a bidirectional LSTM over each row
    of tokens, a linear mix, mean pooling, a linear head."""

    def __init__(self, channels: int = 8, hidden: int = 5, classes: int = 7):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, channels, 4, stride=4)
        self.rows = torch.nn.LSTM(channels, hidden, bidirectional=True, batch_first=True)
        self.mix = torch.nn.Linear(2 * hidden, channels)
        self.head = torch.nn.Linear(channels, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(image).permute(0, 2, 3, 1)  # B, H, W, C
        batch, height, width, channels = tokens.shape
        rows, _ = self.rows(tokens.reshape(batch * height, width, channels))
        mixed = torch.tanh(self.mix(rows.reshape(batch, height, width, -1))) + tokens
        return self.head(mixed.mean(dim=(1, 2)))


class LineReader(torch.nn.Module):
    """A tiny CRNN-like text-line classifier (Shi et al. 2016): conv features, height pooled away, a
    bidirectional LSTM along the width (the sequence length follows the line's width), mean, a linear head."""

    def __init__(self, channels: int = 8, hidden: int = 5, classes: int = 7):
        super().__init__()
        self.features = torch.nn.Conv2d(3, channels, 4, stride=4)
        self.columns = torch.nn.LSTM(channels, hidden, bidirectional=True, batch_first=True)
        self.head = torch.nn.Linear(2 * hidden, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        columns = torch.relu(self.features(image)).mean(dim=2).permute(0, 2, 1)  # B, W, C
        return self.head(self.columns(columns)[0].mean(dim=1))


@pytest.mark.parametrize(("module", "size", "dynamic"), [
    (RowSequencer, (32, 32), {0: "batch"}), (LineReader, (16, 48), {0: "batch", 2: "height", 3: "width"}),
])
def test_a_target_before_a_bidirectional_lstm_gets_the_finite_difference_gradient(module, size, dynamic, tmp_path):
    """The target (the conv stem) before the LSTM; for the text line, a file of dynamic sizes explained at one."""
    torch.manual_seed(0)
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(module().eval(), (torch.randn(EXPORT_BATCH, 3, *size),), str(plain), dynamo=False,
                      opset_version=17, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": dynamic, "logits": {0: "batch"}})
    original = onnx.load(str(plain))
    assert "LSTM" in {n.op_type for n in original.graph.node}
    target = next(n.output[0] for n in original.graph.node if n.op_type == "Conv")
    spec = export_onnx(plain, tmp_path / "explainable.onnx", layers=[target],
                       input_size=size if len(dynamic) > 1 else None)
    explainer = onnxcam.Explainer(tmp_path / "explainable.onnx", provider="cpu")
    images = np.random.default_rng(3).standard_normal((BATCH, 3, *size)).astype(np.float32)
    _, selected, activation, gradient = explainer.model.runner.run(
        [spec.scores, spec.selected, spec.activations[0], spec.gradients[0]],
        {spec.input: images, spec.class_input: np.full(BATCH, -1, np.int64)})
    assert activation.shape == (BATCH, 8, size[0] // 4, size[1] // 4) and np.abs(gradient).max() > 0
    exported, differences = directional_check(original, target, {spec.input: images}, activation, gradient,
                                              selected, spec.scores)
    assert np.linalg.norm(exported - differences) <= 0.01 * np.linalg.norm(differences), (exported, differences)
