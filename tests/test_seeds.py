"""The seeds' worked numbers, reproduced through the exporter (see shared/SEEDS.md)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from onnxcam.exporters import export_onnx, export_torch


class TinyConvLinear(nn.Module):
    """Seed 1: a 2x2 convolution without bias, then a linear layer without bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 2, bias=False)
        self.fc = nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[[[1.0, 0.0], [1.0, 2.0]]]]))
            self.fc.weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0]]))

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


SEED_INPUT = np.array([[1, 2, 3], [1, 1, 2], [2, 1, 2]], dtype=np.float32)


def _run(path, x, classes):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": x, "onnxcam_class": np.asarray(classes, np.int64)})))


def test_seed_conv_linear_gradient_at_conv_output(tmp_path):
    path = tmp_path / "seed.onnx"
    export_torch(TinyConvLinear().eval(), path, input_shape=(1, 3, 3), layers=["conv"])
    x = np.stack([SEED_INPUT, SEED_INPUT * 0 + 1, SEED_INPUT])[:, None]  # batch 3: not the export's 2
    out = _run(path, x, [0, 0, -1])
    np.testing.assert_array_equal(out["onnxcam_activation_0"][0, 0], [[4, 7], [5, 6]])
    np.testing.assert_array_equal(out["logits"][0], [13, 15])
    assert out["onnxcam_selected"][2] == 1  # 15 > 13: the top-1 class of the seed input
    np.testing.assert_array_equal(out["onnxcam_gradient_0"][0, 0], [[0, 1], [0, 1]])
    np.testing.assert_array_equal(out["onnxcam_gradient_0"][2, 0], [[1, 0], [1, 1]])


def test_seed_conv_linear_gradient_at_input(tmp_path):
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(TinyConvLinear().eval(), (torch.zeros(2, 1, 3, 3),), plain, input_names=["input"],
                      output_names=["logits"], dynamo=False, dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    path = tmp_path / "seed_input.onnx"
    export_onnx(plain, path, layers=["input"])
    out = _run(path, SEED_INPUT[None, None], [0])
    np.testing.assert_array_equal(out["onnxcam_gradient_0"][0, 0], [[0, 1, 0], [0, 2, 2], [0, 1, 2]])


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_any_onnx_classifier_file_becomes_explainable(exporter, tmp_path, small_model):
    """export_onnx works on files from either torch exporter (and so on files from other frameworks)."""
    plain = tmp_path / "plain.onnx"
    x = torch.randn(3, 3, 32, 32)
    if exporter == "dynamo":
        torch.onnx.export(small_model, (x[:2],), plain, input_names=["input"], output_names=["logits"], dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        torch.onnx.export(small_model, (x[:2],), plain, input_names=["input"], output_names=["logits"], dynamo=False,
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    spec = export_onnx(plain, tmp_path / "explain.onnx")
    out = _run(tmp_path / "explain.onnx", x.numpy(), [-1, 1, 2])
    grads = {}

    def keep(module, args, output):
        grads["A"] = output
        output.register_hook(lambda g: grads.setdefault("G", g))

    layer = small_model.features[8]  # the last ReLU, the default target: last 4-D map before pooling
    handle = layer.register_forward_hook(keep)
    logits = small_model(x)
    handle.remove()
    selected = torch.tensor([int(logits[0].argmax()), 1, 2])
    logits.gather(1, selected[:, None]).sum().backward()
    assert len(spec.layers) == 1
    np.testing.assert_allclose(out["onnxcam_activation_0"], grads["A"].detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["onnxcam_gradient_0"], grads["G"].numpy(), rtol=1e-4,
                               atol=1e-4 * grads["G"].abs().max().item())
