"""A Vision Transformer explained: trains a small ViT (timm layout) on the shapes localisation set,
exports it with onnxcam, and draws Grad-CAM, attention rollout and gradient rollout side by side,
with each method's pointing-game accuracy on held-out images (chance is about 22%).

    python benchmarks/transformer_demo.py -o vit-shapes.png
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

import onnxcam
from onnxcam.core.metrics import pointing_game
from onnxcam.exporters import export_torch
from onnxcam.testing import shapes
from onnxcam.testing.zoo_transformers import VisionTransformer

METHODS = ["gradcam", "rollout", "grad-rollout"]


def train(steps: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = VisionTransformer(image=32, patch=4, dim=48, depth=3, heads=4, classes=3)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    images, labels, _ = shapes.make(steps * 32, seed + 1)
    inputs, targets = shapes.to_tensor(images), torch.from_numpy(labels)
    for step in range(steps):
        part = slice(step * 32, (step + 1) * 32)
        loss = torch.nn.functional.cross_entropy(model(inputs[part]), targets[part])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", type=Path, default=Path("vit-shapes.png"))
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()

    model = train(args.steps)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vit.onnx"
        spec = export_torch(model, path, input_shape=(3, 32, 32), mean=[0.5] * 3, std=[0.5] * 3,
                            attention_gradients=True,
                            labels=["plus", "ring", "cross"])
        explainer = onnxcam.Explainer(path, provider="cpu")
        images, labels, boxes = shapes.make(200, seed=7)
        accuracy = (explainer.explain(list(images)).targets == labels).mean()
        print(f"ViT accuracy {accuracy:.1%}; target {spec.layers[0]} ({spec.layouts[0]}), "
              f"{len(spec.attentions)} attention maps")
        rows = [np.hstack([cv2.resize(image, (128, 128), interpolation=cv2.INTER_NEAREST) for image in images[:5]])]
        for method in METHODS:
            result = explainer.explain(list(images), method=method)
            hits = pointing_game(result.heatmaps, boxes, tolerance=4).mean()
            print(f"{method:>13}: pointing game {hits:.1%} (tolerance 4 px of 32)")
            rows.append(np.hstack([onnxcam.overlay(cv2.resize(image, (128, 128), interpolation=cv2.INTER_NEAREST),
                                                   heat, alpha=0.5)
                                         for image, heat in zip(images[:5], result.heatmaps)]))
    picture = np.vstack(rows)
    cv2.imwrite(str(args.output), picture[..., ::-1])
    print(f"wrote {args.output}: rows are the input, then {', '.join(METHODS)}")


if __name__ == "__main__":
    main()
