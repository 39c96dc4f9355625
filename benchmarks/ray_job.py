"""The job on Ray against the local job, side by side in one run on the same files and cores (issue 22): images/s of
each for the table only, heatmaps + table, and overlays + heatmaps + table; Ray with one actor holding every core
(what a node runs), `ray.init` apart. Each measurement runs in a fresh process (benchmarks/dataset.py's worker);
the rounds take turns, so that the load of a shared machine falls on both alike. Rates are given whole and from
the first batch committed on (steady: without loading the model, starting the actor, filling the pipeline).

    python benchmarks/ray_job.py                      # 400 images, 2 rounds
    python benchmarks/ray_job.py --images 200 --rounds 1

Writes benchmarks/results/ray-job.md and ray-job.json, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from dataset import RESULTS, linked_images, make_images, measure

SAVES = ("table", "heatmaps,table", "overlays,heatmaps,table")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "onnxcam-dataset")
    args = parser.parse_args()
    from onnxcam.demo import cache_dir, demo_model

    model = demo_model(cache_dir())
    folder = linked_images(make_images(args.data / "files", args.images), args.data / f"set-{args.images}",
                           args.images)
    out = args.data / "out-ray-job"
    runs = {(save, kind): [] for save in SAVES for kind in ("job", "ray")}
    loads = []
    for _ in range(args.rounds):
        for (save, kind), taken in runs.items():
            taken.append(measure(model, folder, out, kind, save, batch=args.batch))
            loads.append(os.getloadavg()[0])
            print(save, kind, taken[-1], flush=True)
    lines = ["# The job on Ray against the local job (benchmarks/ray_job.py)", "",
             f"{platform.node()}: {os.cpu_count()} cores, load average (1 min) {min(loads):.1f}-{max(loads):.1f} over "
             f"the runs. EfficientNet-Lite0, CPU, batch {args.batch}, {args.images} files, {args.rounds} round(s): "
             "best of the rounds; Ray: one actor with every core, ray.init apart.", "",
             "| save | local images/s (steady) | Ray images/s (steady) | Ray x local | Ray x local, steady |",
             "|---|---|---|---|---|"]
    for save in SAVES:
        local, ray = (max(runs[save, kind], key=lambda r: r["images_per_s"]) for kind in ("job", "ray"))
        lines.append(f"| {save} | {local['images_per_s']:.1f} ({local['steady_per_s']:.1f}) | "
                     f"{ray['images_per_s']:.1f} ({ray['steady_per_s']:.1f}) | "
                     f"{ray['images_per_s'] / local['images_per_s']:.2f} | "
                     f"{ray['steady_per_s'] / local['steady_per_s']:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray-job.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "ray-job.json").write_text(json.dumps({f"{save} {kind}": r for (save, kind), r in runs.items()},
                                                     indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
