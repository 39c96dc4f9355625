"""bfloat16 models (issue 10). The explainable file computes the gradient in bfloat16 and takes and gives float32 at
its edges; ONNX Runtime's CPU provider, which has no bfloat16 arithmetic, runs it as its float32 twin and says so.

Checked three ways: the file's own bfloat16 arithmetic, run by ONNX's reference evaluator (numpy with ml_dtypes),
agrees with PyTorch autograd on the bfloat16 model to bfloat16's rounding; the CPU explainer's heatmaps equal
Grad-CAM written in PyTorch on the same weights in float32; and the bfloat16 files of the foreign corpus pass
test_foreign's finite-difference check.
"""

from __future__ import annotations

import cv2
import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops import op_one_hot
from test_foreign import FOREIGN
from test_methods import reference_cam
from torch import nn

import onnxcam
from onnxcam.core.layouts import to_grid
from onnxcam.core.methods import gradcam
from onnxcam.exporters import export_onnx
from onnxcam.runtimes import session

SIZE = 16
BATCH = 3  # the export's batch is 2
CLASSES = [-1, 2, -1]


class ResidualCNN(nn.Module):
    """Cast whole to bfloat16: bfloat16 in and out. No BatchNorm: the legacy exporter would fold it into the
    convolutions in bfloat16, so that the file's weights were no longer the module's (test_foreign has such a
    file)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(x + self.block(x)).mean((2, 3)))


class TinyViT(nn.Module):
    """float32 in and out, its own dtype inside (bfloat16 once cast, as a mixed-precision deployment runs)."""

    def __init__(self, dim: int = 16, heads: int = 2, patch: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 1 + (SIZE // patch) ** 2, dim))
        self.norm1, self.norm2, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head, self.heads = nn.Linear(dim, 5), heads

    def forward(self, x):
        x = self.patch(x.to(self.patch.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attention = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(b, t, c))
        x = x + self.mlp(self.norm2(x))
        return self.head(self.norm(x)[:, 0]).float()


# name -> (model, its input type, exported by dynamo?, target tensor (None: the default), the module writing it)
CASES = {"cnn": (ResidualCNN, torch.bfloat16, False, "/stem/stem.2/MaxPool_output_0", "stem.2"),
         "vit": (TinyViT, torch.float32, True, None, "norm1")}


class OneHot(op_one_hot.OneHot):
    """The reference evaluator's OneHot, taking its depth as a one-element vector too, as the standard allows."""

    def _run(self, indices, depth, values, axis=None):
        return super()._run(indices, np.asarray(depth).reshape(()), values, axis=axis)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(bfloat16 torch model, its input type, its explainable file, spec, target module)."""
    build, input_type, dynamo, target, module = CASES[request.param]
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    model = model.to(torch.bfloat16)
    folder = tmp_path_factory.mktemp(request.param)
    example = torch.randn(2, 3, SIZE, SIZE).to(input_type)
    if dynamo:
        torch.onnx.export(model, (example,), input_names=["image"], output_names=["logits"], dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False).save(
            str(folder / "model.onnx"))
    else:
        torch.onnx.export(model, (example,), str(folder / "model.onnx"), input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}}, dynamo=False)
    spec = export_onnx(folder / "model.onnx", folder / "explainable.onnx",
                       layers=[target] if target else None)
    return model, input_type, folder / "explainable.onnx", spec, module


def _images() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((BATCH, 3, SIZE, SIZE)).astype(np.float32)


def _torch_gradcam(model, module: str, x: torch.Tensor, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(Grad-CAM heatmaps, the target's gradient in the file's layout) by PyTorch autograd, in the model's dtype."""
    captured = {}

    def keep(_, args, output):
        output.retain_grad()
        captured["A"] = output

    handle = model.get_submodule(module).register_forward_hook(keep)
    try:
        logits = model(x)
    finally:
        handle.remove()
    classes = torch.where(torch.as_tensor(CLASSES) < 0, logits.float().argmax(1), torch.as_tensor(CLASSES))
    logits.gather(1, classes[:, None]).sum().backward()
    gradient = captured["A"].grad.float().numpy()
    grid = [torch.from_numpy(to_grid(t, layout)).double() for t in (captured["A"].detach().float().numpy(), gradient)]
    cam = F.interpolate(reference_cam("gradcam", *grid)[:, None], size=(SIZE, SIZE), mode="bilinear")[:, 0]
    low, high = cam.amin((1, 2), keepdim=True), cam.amax((1, 2), keepdim=True)
    return ((cam - low) / (high - low)).numpy(), gradient


def test_the_file_computes_the_gradient_in_bfloat16_and_takes_and_gives_float32(case):
    model, input_type, path, spec, module = case
    explainable = onnx.load(str(path))
    edges = [v.type.tensor_type.elem_type for v in [*explainable.graph.input, *explainable.graph.output]]
    assert set(edges) == {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64} and spec.input_type == "float32"
    source = next(n.input[0] for n in explainable.graph.node if n.output[0] == spec.gradients[0])
    explainable.graph.output.append(onnx.ValueInfoProto(name=source))
    run = dict(zip([o.name for o in explainable.graph.output],
                   ReferenceEvaluator(explainable, new_ops=[OneHot]).run(
                       None, {spec.input: _images(), spec.class_input: np.array(CLASSES)}), strict=True))
    assert run[source].dtype == ml_dtypes.bfloat16  # computed in the model's precision

    expected, gradient = _torch_gradcam(model, module, torch.from_numpy(_images()).to(input_type), spec.layouts[0])
    activation = run[spec.activations[0]]
    cam = gradcam(to_grid(activation, spec.layouts[0]), to_grid(run[spec.gradients[0]], spec.layouts[0]))
    heatmaps = onnxcam.core.heatmaps([cam], (SIZE, SIZE))
    # two bfloat16 computations whose roundings differ (ONNX's numpy vs PyTorch's kernels)
    assert np.linalg.norm(run[spec.gradients[0]] - gradient) <= 0.05 * np.linalg.norm(gradient)
    assert np.abs(heatmaps - expected).max() < 0.05


def test_the_cpu_provider_runs_the_float32_twin_and_says_so_once(case, caplog, monkeypatch):
    model, _, path, spec, module = case
    monkeypatch.setattr(session, "_SAID_FLOAT32", set())  # said once per process: this test's process, here
    explainer = onnxcam.Explainer(path, provider="cpu")
    with caplog.at_level("WARNING", logger="onnxcam"):
        first = explainer.explain(_images(), targets=CLASSES)
        onnxcam.Explainer(path, provider="cpu").explain(_images()[:1])
    wide = type(model)().eval()
    wide.load_state_dict({name: value.float() for name, value in model.state_dict().items()})
    expected, _ = _torch_gradcam(wide, module, torch.from_numpy(_images()), spec.layouts[0])
    assert first.heatmaps.dtype == np.float32 and first.heatmaps.shape == (BATCH, SIZE, SIZE)
    np.testing.assert_allclose(first.heatmaps, expected, atol=5e-4)  # float32 kernels of ORT and PyTorch
    said = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()]
    assert len(said) == 1 and "runs in float32 instead, on the same weights" in said[0]


def test_a_pytorch_model_cast_to_bfloat16_goes_through_the_torch_front_end(tmp_path):
    """export_torch traces with images of the model's own type; the default target is the torch default."""
    torch.manual_seed(0)
    model = TinyViT().eval().to(torch.bfloat16)
    spec = onnxcam.exporters.export_torch(model, tmp_path / "vit.onnx", input_shape=(3, SIZE, SIZE))
    assert spec.layers == ["norm1"] and spec.layouts == ["tokens:1:4x4"] and spec.input_type == "float32"
    result = onnxcam.Explainer(tmp_path / "vit.onnx", provider="cpu").explain(_images(), targets=CLASSES)
    wide = TinyViT().eval()
    wide.load_state_dict({name: value.float() for name, value in model.state_dict().items()})
    expected, _ = _torch_gradcam(wide, "norm1", torch.from_numpy(_images()), "tokens:1:4x4")
    np.testing.assert_allclose(result.heatmaps, expected, atol=5e-4)


def test_command_line_explains_a_bfloat16_file(tmp_path):
    """The foreign corpus's CNN cast to bfloat16 (bfloat16 in and out): exported and explained by the commands,
    with the float32 run said in one line and no traceback."""
    exported = run_cli("export", FOREIGN / "cnn_bf16_legacy.onnx", "-o", tmp_path / "cnn.onnx")
    assert exported.returncode == 0, exported.stderr
    assert "input 'x' nchw 32x32 float32" in exported.stdout  # the file takes float32
    photo = tmp_path / "photo.png"
    cv2.imwrite(str(photo), np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    explained = run_cli("explain", tmp_path / "cnn.onnx", photo, "-o", tmp_path / "out", "--provider", "cpu")
    assert explained.returncode == 0, explained.stderr
    assert "Traceback" not in explained.stderr
    assert [line for line in explained.stderr.splitlines() if "bfloat16" in line] == [
        "onnxcam: this model computes in bfloat16, which ONNX Runtime's cpu provider cannot run (no bfloat16 "
        "Conv); it runs in float32 instead, on the same weights"]
    assert cv2.imread(str(tmp_path / "out" / "photo.png")).shape == (40, 30, 3)
