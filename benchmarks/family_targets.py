"""What Classes targets cost the family methods, side by side in one run: Classes(top=2) against the same maps
asked for by class index (each image repeated once per class). The difference is the run that reads the classes
from the scores before the method runs (the Explainer's path for methods that explain classes only).
EfficientNet-Lite0 (the demo model), 4 images at 224 x 224.

    python benchmarks/family_targets.py      # writes benchmarks/results/family-targets.md
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

import onnxcam
from onnxcam.core.timing import interleaved
from onnxcam.demo.efficientnet_lite import efficientnet_lite0_pretrained
from onnxcam.targets import Classes

RESULTS = Path(__file__).resolve().parent / "results"
CASES = [("gradcam", {"eigen_smooth": True}, 10), ("scorecam", {"batch_size": 64, "channels": 128}, 3)]  # repeats last


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--top", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lite0.onnx"
        onnxcam.exporters.export_torch(efficientnet_lite0_pretrained(), path, input_shape=(3, 224, 224))
        explainer = onnxcam.Explainer(path, provider="cpu")
        images = np.random.default_rng(0).standard_normal((args.images, 3, 224, 224)).astype(np.float32)
        rows = []
        for method, options, repeats in CASES:
            chosen = explainer.explain(images, method, targets=Classes(top=args.top), **options)
            repeated, classes = images[chosen.image_index], list(chosen.classes)
            times = interleaved({
                "classes": lambda m=method, o=options: explainer.explain(images, m, Classes(top=args.top), **o),
                "indices": lambda m=method, o=options, r=repeated, c=classes: explainer.explain(r, m, c, **o),
            }, repeats, budget=0)
            best = {name: min(values) for name, values in times.items()}
            rows.append(f"| {method} {options} | {best['classes'] * 1000:.0f} | {best['indices'] * 1000:.0f} | "
                        f"{best['classes'] / best['indices']:.2f} |")
    table = "\n".join([f"{args.images} images, Classes(top={args.top}): {args.images * args.top} maps; best of the "
                       f"interleaved rounds, one machine, one run.", "",
                       "| method | Classes(top) ms | class indices ms | ratio |", "|---|---|---|---|", *rows])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "family-targets.md").write_text(f"# Family methods: Classes targets against class indices\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
