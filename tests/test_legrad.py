"""LeGrad on exported files against torchcam's LeGrad itself (Bousselham et al., arXiv 2404.03214), at batch 3.

The ViT's blocks hold `self_attention = nn.MultiheadAttention(batch_first=True)`, as torchcam requires (and as
torchvision's ViT has them); torchcam's `score_projection` is the model's own readout, head(norm(tokens)[:, 0]).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from support.zoo_transformers import deit
from torch import nn
from torchcam.methods import LeGrad

import onnxcam
from onnxcam.cli import Failed
from onnxcam.core import heatmaps
from onnxcam.core.rollout import legrad
from onnxcam.exporters import ExportError, export_onnx, export_torch

BATCH = 3  # the export traces at 2
SIZE = 32
CLASSES = np.array([1, 4, -1])  # -1: the top-1 class


class Block(nn.Module):
    """A pre-norm block as torchvision's EncoderBlock writes it."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        normed = self.norm1(x)
        x = x + self.self_attention(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patches of 8 x 8 (a 4 x 4 grid), a CLS token, three blocks, a final LayerNorm and a linear head."""

    def __init__(self, dim: int = 32, depth: int = 3, heads: int = 4, classes: int = 6):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (SIZE // 8) ** 2, dim) * 0.5)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def embed(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed

    def readout(self, tokens):
        return self.head(self.norm(tokens)[:, 0])

    def forward(self, x):
        return self.readout(self.blocks(self.embed(x)))


class SkippingReadout(ViT):
    """A readout that also reads the patch embedding: it cannot be copied onto the blocks' outputs."""

    def forward(self, x):
        embedded = self.embed(x)
        return self.readout(self.blocks(embedded) + embedded)


class PostNormBlock(Block):
    """The original Transformer's order, the norms after the residual Adds: the residual stream is no block's output."""

    def forward(self, x):
        x = self.norm1(x + self.self_attention(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.mlp(x))


class PostNormViT(ViT):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[PostNormBlock(32, 4) for _ in range(3)])


def _model(cls=ViT):
    torch.manual_seed(0)
    model = cls().eval()
    with torch.no_grad():  # every parameter random, the norms' scales and shifts too
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model):
    """The same model exported with LeGrad's gradients by both front ends, and without them."""
    folder = tmp_path_factory.mktemp("legrad")
    export_torch(model, folder / "torch.onnx", input_shape=(3, SIZE, SIZE), legrad=True)
    plain = torch.onnx.export(model, (torch.zeros(2, 3, SIZE, SIZE),), dynamo=True, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},)).model_proto
    export_onnx(plain, folder / "onnx.onnx", legrad=True)
    export_onnx(plain, folder / "without.onnx")
    return folder


def _inputs():
    return torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _torchcam(model, x, classes) -> np.ndarray:
    """torchcam's LeGrad over every block, unnormalised, with the model's own readout as the layer score."""
    with LeGrad(model, list(model.blocks), score_projection=model.readout) as extractor:
        model(x)
        return extractor([int(c) for c in classes], normalized=False)[0].numpy()


@pytest.mark.parametrize("front_end", ["torch", "onnx"])
def test_legrad_matches_torchcam(exported, model, front_end):
    path = exported / f"{front_end}.onnx"
    x = _inputs()
    explainer = onnxcam.Explainer(path, provider="cpu")
    result = explainer.explain(x.numpy(), method="legrad", targets=CLASSES)
    logits = model(x).detach().numpy()
    expected_classes = np.where(CLASSES < 0, logits.argmax(1), CLASSES)
    np.testing.assert_array_equal(result.classes, expected_classes)
    np.testing.assert_allclose(result.logits, logits, rtol=1e-4, atol=1e-5)
    reference = _torchcam(model, x, expected_classes)

    spec = explainer.spec
    assert len(spec.legrad_gradients) == len(spec.attentions) == 3
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gradients = session.run(spec.legrad_gradients, {spec.input: x.numpy(), spec.class_input: CLASSES})
    maps = legrad(gradients, 1, (4, 4))  # before upsampling
    assert maps.shape == (BATCH, 4, 4) and reference.max() > 0
    np.testing.assert_allclose(maps, reference, rtol=1e-4, atol=1e-6 * reference.max())
    np.testing.assert_allclose(result.heatmaps, heatmaps([reference], (SIZE, SIZE)), atol=1e-4)


def test_legrad_of_a_deit_matches_autograd(tmp_path):
    """timm's layout (attention found by its `attn_drop` modules) with two tokens before the patches, read out as
    their mean: the map against plain PyTorch, each block's score differentiated by autograd."""
    torch.manual_seed(0)
    model = deit().eval()
    spec = export_torch(model, tmp_path / "deit.onnx", input_shape=(3, SIZE, SIZE), layers=["blocks.2.norm1"],
                        legrad=True)
    assert spec.attention_layout == "tokens:2:4x4"
    x = _inputs()
    result = onnxcam.Explainer(tmp_path / "deit.onnx", provider="cpu").explain(x.numpy(), method="legrad",
                                                                                targets=CLASSES)
    attentions, outputs = [], []
    handles = [block.attn.attn_drop.register_forward_hook(lambda m, i, o: attentions.append(o))
               for block in model.blocks]
    handles += [block.register_forward_hook(lambda m, i, o: outputs.append(o)) for block in model.blocks]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    selected = torch.as_tensor(result.classes)[:, None]
    maps = []
    for attention, tokens in zip(attentions, outputs, strict=True):
        score = model.head(model.norm(tokens)[:, :2].mean(dim=1)).gather(1, selected).sum()
        gradient = torch.autograd.grad(score, attention, retain_graph=True)[0]
        maps.append(gradient.relu().mean(dim=(1, 2))[:, 2:].reshape(BATCH, 4, 4))
    reference = torch.stack(maps).mean(dim=0).detach().numpy()
    np.testing.assert_allclose(result.heatmaps, heatmaps([reference], (SIZE, SIZE)), atol=1e-4)


def test_legrad_is_refused_without_the_export_option(exported):
    explainer = onnxcam.Explainer(exported / "without.onnx", provider="cpu")
    assert explainer.spec.legrad_gradients == [] and explainer.spec.attentions  # opt-in
    with pytest.raises(onnxcam.ExplainError, match="exported on request") as caught:
        explainer.explain(_inputs().numpy(), method="legrad")
    assert caught.value.option == "legrad" and "\n" not in str(caught.value)
    assert "--legrad" in Failed.of(caught.value).message
    assert "LeGrad" in explainer.capabilities()["legrad"]
    assert onnxcam.Explainer(exported / "torch.onnx", provider="cpu").capabilities()["legrad"] is None


def test_models_legrad_cannot_explain_are_refused_in_one_line(tmp_path):
    with pytest.raises(ExportError, match="cannot copy the model's readout") as caught:
        export_torch(_model(SkippingReadout), tmp_path / "skip.onnx", input_shape=(3, SIZE, SIZE), legrad=True)
    assert "\n" not in str(caught.value)
    with pytest.raises(ExportError, match="LeGrad's blocks are pre-norm residual ones"):
        export_torch(_model(PostNormViT), tmp_path / "post.onnx", input_shape=(3, SIZE, SIZE), legrad=True)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with pytest.raises(ExportError, match="LeGrad needs the attention probabilities"):
        export_torch(cnn, tmp_path / "cnn.onnx", input_shape=(3, SIZE, SIZE), legrad=True)
