"""Dataset-scale explanations (issue 13), side by side in one run on the same files: images/s of the floor
(decode, preprocess and plain inference: the forward part of the explainable file, decoding in the
same thread pool ahead of the session), of `onnxcam explain` writing heatmaps and the table, and writing PNG
overlays as well; peak resident memory at 1,000 and 10,000 images; Ray Data on this machine with 1 and 2 actors
against the local job on the same files.

    python benchmarks/dataset.py                       # 2,000 images, 2 rounds, Ray on 400
    python benchmarks/dataset.py --images 500 --rounds 1 --ray-images 200 --memory 1000,3000

The model is the demo's EfficientNet-Lite0 (exported once, cached). The files are JPEGs (one in five a PNG)
cut from scikit-image's photos at sizes from 160 to 1280 pixels a side; the 10,000 of the memory run are hard
links to them under other names. Each measurement runs in a fresh process (its VmHWM is its peak memory); the
rounds take turns, so that the load of a shared machine falls on all alike. Writes benchmarks/results/dataset.md
and dataset.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "cat")


def tiny_model(folder: Path) -> Path:
    """A small CNN at 64 x 64, exported once: memory runs of 10,000 images in minutes on a loaded machine."""
    path = folder / "tiny.explain.onnx"
    if not path.exists():
        import torch
        from torch import nn

        from onnxcam.exporters import export_torch

        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                              nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
        export_torch(model, path, input_shape=(3, 64, 64), layers=["3"])
    return path


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` files cut from scikit-image's photos at mixed sizes (made once, then reused)."""
    import cv2
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(folder.glob("image*"))
    if len(existing) >= count:
        return existing[:count]
    photos = [getattr(skimage.data, name)() for name in PHOTOS if hasattr(skimage.data, name)]
    photos = [p if p.ndim == 3 else np.repeat(p[..., None], 3, axis=2) for p in photos]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)][..., :3]
        height, width = photo.shape[:2]
        top, left = rng.integers(0, height // 4), rng.integers(0, width // 4)
        crop = photo[top:top + height * 3 // 4, left:left + width * 3 // 4]
        side = int(rng.integers(160, 1281))
        size = (side, max(120, int(side * rng.uniform(0.6, 1.4))))
        picture = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)[..., ::-1]
        path = folder / (f"image{i:05d}.png" if i % 5 == 4 else f"image{i:05d}.jpg")
        cv2.imwrite(str(path), picture, [cv2.IMWRITE_JPEG_QUALITY, 90] if path.suffix == ".jpg" else [])
        paths.append(path)
    return paths


def linked_images(source: list[Path], folder: Path, count: int) -> Path:
    """`count` hard links to the files of `source`, in turn, under new names."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        link = folder / f"copy{i:05d}{source[i % len(source)].suffix}"
        if not link.exists():
            os.link(source[i % len(source)], link)
    return folder


def cv2_size(path: Path) -> tuple[int, int]:
    from onnxcam.core.files import probe

    return probe(path.read_bytes()[:65536])[1:]


def peak_memory_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> dict:
    """One measurement in this process: the floor, the local job with `args.save`, or the job on Ray."""
    from onnxcam import Explainer
    from onnxcam.batches import decode_ahead
    from onnxcam.jobs import Listing, Outputs, explain_files

    sources = Listing([args.folder])
    count = sum(1 for _ in sources)
    if args.kind == "ray":
        return ray_worker(args, sources, count)
    explainer = Explainer(args.model, provider="cpu")
    first = FirstBatch()
    plain = plain_session(explainer) if args.kind == "floor" else None
    start, cpu = time.perf_counter(), time.process_time()
    if args.kind == "floor":
        spec, batch, workers = explainer.spec, [], os.cpu_count() or 1
        ahead = args.batch * (workers + 2)
        for _, (tensor, _, _) in decode_ahead((s.path for s in sources), spec, workers, ahead, False):
            batch.append(tensor)
            if len(batch) == args.batch:
                plain.run([spec.scores], {spec.input: np.stack(batch)})
                batch = []
        if batch:
            plain.run([spec.scores], {spec.input: np.stack(batch)})
    else:
        explain_files(explainer, sources, Path(args.out), batch_size=args.batch, outputs=Outputs.parse(args.save),
                      progress=first.progress)
    seconds = time.perf_counter() - start
    return {"images": count, "seconds": seconds, "images_per_s": count / seconds, "peak_mb": peak_memory_mb(),
            "cpu_s": time.process_time() - cpu, "steady_per_s": first.steady(count)}


class FirstBatch:
    """A job's progress callback: when its first batch was committed, for the rate from there on (steady)."""

    def __init__(self):
        self.at, self.done = None, 0

    def progress(self, done: int, total) -> None:
        if self.at is None:
            self.at, self.done = time.perf_counter(), done

    def steady(self, count: int) -> float:
        return (count - self.done) / (time.perf_counter() - self.at) if self.at is not None else float("nan")


def plain_session(explainer):
    """Plain inference: the scores alone, from the explainable file's forward part (ONNX Runtime runs every node of
    a graph whatever is fetched, so the explainable file itself would pay its backward pass)."""
    return explainer.model.scores_runner


def ray_worker(args, sources, count: int) -> dict:
    import ray

    from onnxcam.jobs import Outputs
    from onnxcam.ray import explain_on_ray

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    started, first = time.perf_counter(), FirstBatch()
    explain_on_ray(args.model, sources, Path(args.out), actors=args.actors, batch_size=args.batch, provider="cpu",
                   outputs=Outputs.parse(args.save or "table"), progress=first.progress)
    seconds = time.perf_counter() - started
    steady = first.steady(count)
    ray.shutdown()
    return {"images": count, "seconds": seconds, "images_per_s": count / seconds, "ray_init_s": started - start,
            "peak_mb": peak_memory_mb(), "steady_per_s": steady}


def measure(model: Path, folder: Path, out: Path, kind: str, save: str = "", actors: int = 1, batch: int = 8) -> dict:
    """Run `worker` in a fresh process; its JSON line back."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, __file__, "--worker", kind, "--model", str(model), "--folder", str(folder),
               "--out", str(out), "--save", save, "--actors", str(actors), "--batch", str(batch)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} {save} failed:\n{result.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--memory", default="1000,10000", help="image counts of the memory runs (table only)")
    parser.add_argument("--ray-images", type=int, default=400)
    parser.add_argument("--tag", default="", help="suffix of the result files (dataset-TAG.md)")
    parser.add_argument("--small", action="store_true", help="memory runs on the files under 400 pixels a side")
    parser.add_argument("--memory-model", choices=("tiny", "demo"), default="tiny",
                        help="memory runs with a small CNN at 64 x 64 (default) or the demo's EfficientNet-Lite0")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "onnxcam-dataset")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    for hidden in ("--model", "--folder", "--out", "--save"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--actors", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    if args.worker:
        args.kind = args.worker
        print(json.dumps(worker(args)))
        return
    run(args)


def run(args) -> None:
    from onnxcam.demo import cache_dir, demo_model

    model = demo_model(cache_dir())
    files = make_images(args.data / "files", args.images)
    folder = linked_images(files, args.data / f"set-{args.images}", args.images)
    out = args.data / f"out-{args.tag or 'all'}"
    configurations = {"floor (decode, preprocess, inference)": ("floor", ""),
                      "explain: heatmaps + table": ("job", "heatmaps,table"),
                      "explain: table only": ("job", "table"),
                      "explain: PNG overlays + heatmaps + table": ("job", "overlays,heatmaps,table")}
    rows = {name: [] for name in configurations}
    for _ in range(args.rounds):
        for name, (kind, save) in configurations.items():
            rows[name].append(measure(model, folder, out, kind, save, batch=args.batch))
            print(name, rows[name][-1], flush=True)
    memory = {}
    small = [p for p in files if max(cv2_size(p)) < 400] if args.small else files
    for count in [int(n) for n in args.memory.split(",") if n]:
        folder = linked_images(small, args.data / f"set-{count}{'-small' if args.small else ''}", count)
        chosen = tiny_model(args.data) if args.memory_model == "tiny" else model
        memory[count] = measure(chosen, folder, out, "job", "table")
        print("memory", count, memory[count], flush=True)
    ray_rows = {}
    if args.ray_images:
        subset = linked_images(files, args.data / f"set-{args.ray_images}", args.ray_images)
        ray_rows["local job, table only"] = measure(model, subset, out, "job", "table")
        for actors in (1, 2):
            ray_rows[f"Ray Data, {actors} actor(s)"] = measure(model, subset, out, "ray", actors=actors)
            print("ray", actors, ray_rows[f"Ray Data, {actors} actor(s)"], flush=True)
    write_results(args, rows, memory, ray_rows)


def write_results(args, rows: dict, memory: dict, ray_rows: dict) -> None:
    best = {name: max(r["images_per_s"] for r in runs) for name, runs in rows.items() if runs}
    floor = best.get("floor (decode, preprocess, inference)", float("nan"))
    load = os.getloadavg()
    lines = ["# Dataset-scale explanations (benchmarks/dataset.py)", "",
             f"{platform.node()}: {os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
             f"at the end (a machine shared with other work). EfficientNet-Lite0 (224 x 224), CPU, batch {args.batch}, "
             f"{args.images} files (JPEG and PNG, 160-1280 px a side), {args.rounds} round(s): best of the rounds; "
             "and, since the machine drifts between rounds, each round against the floor of the same round.", "",
             "| configuration | images/s (each round) | best | x floor (best) | x floor (each round) |",
             "|---|---|---|---|---|"]
    floors = [r["images_per_s"] for r in rows.get("floor (decode, preprocess, inference)", [])]
    for name, runs in rows.items():
        if not runs:
            continue
        each = ", ".join(f"{r['images_per_s']:.1f}" for r in runs)
        paired = ", ".join(f"{r['images_per_s'] / f:.2f}" for r, f in zip(runs, floors, strict=False))
        lines.append(f"| {name} | {each} | {best[name]:.1f} | {best[name] / floor:.2f} | {paired} |")
    sizes = "files under 400 px a side" if args.small else "the same mix of files"
    net = "a small CNN at 64 x 64" if args.memory_model == "tiny" else "EfficientNet-Lite0"
    lines += ["", f"| images (table only, {sizes}, {net}) | peak resident memory (MB) | images/s |", "|---|---|---|"]
    lines += [f"| {count:,} | {m['peak_mb']:.0f} | {m['images_per_s']:.1f} |" for count, m in memory.items()]
    if len(memory) == 2:
        (small, low), (large, high) = sorted(memory.items())
        lines.append(f"\nPeak memory at {large:,} images is {high['peak_mb'] / low['peak_mb']:.3f}x that at {small:,}.")
    if ray_rows:
        local = ray_rows["local job, table only"]["images_per_s"]
        lines += ["", f"Ray on this machine, {args.ray_images} images, table only (ray.init not counted: given apart):",
                  "", "| configuration | images/s | x local job | ray.init s |", "|---|---|---|---|"]
        for name, r in ray_rows.items():
            lines.append(f"| {name} | {r['images_per_s']:.1f} | {r['images_per_s'] / local:.2f} | "
                         f"{r.get('ray_init_s', float('nan')):.1f} |")
    RESULTS.mkdir(exist_ok=True)
    name = f"dataset-{args.tag}" if args.tag else "dataset"
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps({"rows": rows, "memory": memory, "ray": ray_rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
