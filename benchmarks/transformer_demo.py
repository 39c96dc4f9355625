"""A Vision Transformer explained: trains a small ViT (timm layout) on the shapes localisation set,
exports it with onnxcam, and draws Grad-CAM, attention rollout and gradient rollout side by side,
with each method's pointing-game accuracy on held-out images (chance is about 22%).

    python benchmarks/transformer_demo.py -o vit-shapes.png

--record writes the figures (accuracy, pointing game, training time) to benchmarks/results/transformer-demo.md
and transformer-demo.json, with the command, the machine and its load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from provenance import begin, describe, end, write

import onnxcam
from onnxcam.core.metrics import pointing_game
from onnxcam.exporters import export_torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the model builders shared with the tests
from support import shapes  # noqa: E402
from support.zoo_transformers import VisionTransformer  # noqa: E402

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
    parser.add_argument("--record", action="store_true", help="Write benchmarks/results/transformer-demo.md.")
    args = parser.parse_args()
    run = begin()
    start = time.perf_counter()
    model = train(args.steps)
    figures = {"training steps": args.steps, "training s": round(time.perf_counter() - start, 1)}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vit.onnx"
        spec = export_torch(model, path, input_shape=(3, 32, 32), mean=[0.5] * 3, std=[0.5] * 3,
                            attention_gradients=True,
                            labels=["plus", "ring", "cross"])
        explainer = onnxcam.Explainer(path, provider="cpu")
        images, labels, boxes = shapes.make(200, seed=7)
        accuracy = (explainer.explain(list(images)).targets == labels).mean()
        figures |= {"held-out images": len(images), "accuracy %": round(100 * float(accuracy), 1),
                    "pointing game %": {}}
        print(f"ViT accuracy {accuracy:.1%}; target {spec.layers[0]} ({spec.layouts[0]}), "
              f"{len(spec.attentions)} attention maps")
        rows = [np.hstack([cv2.resize(image, (128, 128), interpolation=cv2.INTER_NEAREST) for image in images[:5]])]
        for method in METHODS:
            result = explainer.explain(list(images), method=method)
            hits = pointing_game(result.heatmaps, boxes, tolerance=4).mean()
            print(f"{method:>13}: pointing game {hits:.1%} (tolerance 4 px of 32)")
            figures["pointing game %"][method] = round(100 * float(hits), 1)
            rows.append(np.hstack([onnxcam.overlay(cv2.resize(image, (128, 128), interpolation=cv2.INTER_NEAREST),
                                                   heat, alpha=0.5)
                                         for image, heat in zip(images[:5], result.heatmaps)]))
    picture = np.vstack(rows)
    cv2.imwrite(str(args.output), picture[..., ::-1])
    print(f"wrote {args.output}: rows are the input, then {', '.join(METHODS)}")
    if args.record:
        record(end(run), figures, f"{spec.layers[0]} ({spec.layouts[0]})")


def record(run: dict, figures: dict, layer: str) -> None:
    lines = ["# A small ViT explained (benchmarks/transformer_demo.py)", "", *describe(run), "",
             "A ViT of 3 blocks (32 x 32 images, 4 x 4 patches: an 8 x 8 grid) trained for "
             f"{figures['training steps']} steps of 32 images ({figures['training s']} s on the CPU), exported with "
             "attention gradients; "
             f"{figures['held-out images']} held-out images (seed 7), one shape each. Accuracy "
             f"{figures['accuracy %']}%. Pointing game: how often each map's peak lands within 4 px of the shape "
             f"(chance about 22%); Grad-CAM on {layer}.", "",
             "| method | pointing game |", "|---|---|"]
    lines += [f"| {method} | {value}% |" for method, value in figures["pointing game %"].items()]
    write("transformer-demo", "\n".join(lines), {"run": run, "layer": layer, **figures})


if __name__ == "__main__":
    main()
