"""What targets beyond one class cost, side by side in one run (issue 11): plain ONNX Runtime inference (the floor),
one Grad-CAM map per image (the exported class, one session run), five class maps per image (Classes(top=5):
one backbone run, then the head alone for the five maps), and the eager PyTorch way (a forward pass, five backward
passes), on ResNet-50 at batches 1 and 8; and every detection
of nudenet's YOLOv8n (320 x 320) on scikit-image's astronaut against its plain inference.

    python benchmarks/targets.py                    # writes benchmarks/results/targets.md
    python benchmarks/targets.py --repeats 10 --budget 10

Each configuration runs in a worker process of its own (two sessions' thread pools in one process fight for
the cores, see bench.py); the workers take turns, three rounds, so that drift falls on all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from onnxcam.core.timing import interleaved

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROUNDS = 3
YOLO_SIZE = (320, 320)
CASES = [("resnet50", 1), ("resnet50", 8), ("yolov8n", 1)]
CONFIGS = {"resnet50": ["floor", "top-1", "top-5", "head:top-5", "eager:top-5"],
           "yolov8n": ["floor", "top-1", "detections", "head:detections"]}


def prepare_yolo(folder: Path) -> tuple[Path, Path]:
    """nudenet's file as shipped (the floor; its input is dynamic) and its explainable export at 320 x 320."""
    from onnxcam.exporters import export_onnx
    sys.path.insert(0, str(HERE.parent / "tests"))  # the model builders shared with the tests
    from support.detectors import NUDENET_LAYERS, nudenet_file

    explainable = folder / "yolov8n-320.explain.onnx"
    if not explainable.exists():
        export_onnx(nudenet_file(), explainable, input_size=YOLO_SIZE, layers=NUDENET_LAYERS)
    return nudenet_file(), explainable


def batch_of(model: str, batch: int, explainer) -> np.ndarray:
    if model == "yolov8n":
        import skimage.data

        return explainer.prepare([skimage.data.astronaut()] * batch)
    return np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)


def worker(args) -> dict:
    """Times one configuration in this process; prints its times as JSON."""
    import onnxruntime as ort

    import onnxcam
    from onnxcam.targets import Classes, Detection

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    explainer = onnxcam.Explainer(args.explainable, provider="cpu", threads=args.threads)
    batch = batch_of(args.model, args.batch, explainer)
    targets = {"top-1": None, "top-5": Classes(top=5), "detections": Detection()}
    if args.config == "floor":
        session = ort.InferenceSession(args.plain, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        call = lambda: session.run(None, {name: batch})  # noqa: E731
    elif args.config.startswith("head:"):
        call = head_call(explainer, batch, targets[args.config[5:]])
    elif args.config == "eager:top-5":
        call = eager_top5(batch, args.threads)
    else:
        call = lambda: explainer.explain(batch, targets=targets[args.config])  # noqa: E731
    kind = args.config.removeprefix("head:").removeprefix("eager:")
    maps = 0 if args.config == "floor" else len(explainer.explain(batch, targets=targets.get(kind)).targets)
    times = interleaved({args.config: call}, args.repeats, args.budget)[args.config]
    return {"times": times, "maps": maps}


def head_call(explainer, batch: np.ndarray, target):
    """The head run alone, for every map of `target` on `batch` (the backbone's outputs computed once before)."""
    spec = explainer.spec
    fetched = explainer.model.runner.run([spec.scores, *spec.activations, *spec.cuts],
                                   {spec.input: batch, spec.class_input: np.full(len(batch), -1, dtype=np.int64)})
    activations, cuts = fetched[1:1 + len(spec.activations)], fetched[1 + len(spec.activations):]
    picks = [(image, pick) for image in range(len(batch)) for pick in target.picks(fetched[0][image])]
    index = np.array([image for image, _ in picks], dtype=np.int64)
    seeds = np.stack([pick.seed for _, pick in picks])
    return lambda: explainer.model.head.gradients(spec.scores, activations, cuts, index, seeds)


def eager_top5(batch: np.ndarray, threads: int):
    """The eager PyTorch way, as generous as it gets: one forward pass with a hook on layer4, then one backward
    pass (from the scores down) per class of the five, Grad-CAM weights from each gradient, maps upsampled."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(HERE))
    from models import MODELS

    torch.set_num_threads(threads)
    build, layer = MODELS["resnet50"]
    model, inputs, captured = build(), torch.from_numpy(batch), {}
    model.get_submodule(layer).register_forward_hook(lambda m, i, o: captured.__setitem__("A", o))

    def run():
        scores = model(inputs)
        maps = []
        for rank in range(5):
            chosen = scores.topk(5, dim=1).indices[:, rank]
            (gradient,) = torch.autograd.grad(scores.gather(1, chosen[:, None]).sum(), captured["A"], retain_graph=True)
            cam = torch.relu((gradient.mean(dim=(2, 3), keepdim=True) * captured["A"]).sum(1, keepdim=True))
            maps.append(F.interpolate(cam.detach(), size=inputs.shape[2:], mode="bilinear", align_corners=False))
        return maps

    return run


def run_worker(args, model, batch, plain, explainable, config) -> dict:
    command = [sys.executable, __file__, "--worker", "--config", config, "--model", model, "--batch", str(batch),
               "--plain", str(plain), "--explainable", str(explainable), "--threads", str(args.threads),
               "--repeats", str(max(3, args.repeats // ROUNDS)), "--budget", str(args.budget / ROUNDS)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{model} b{batch} {config}: failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args, files: dict) -> list[dict]:
    rows = []
    for model, batch in CASES:
        plain, explainable = files[model]
        times, maps = {}, {}
        for _ in range(ROUNDS):
            for config in CONFIGS[model]:
                done = run_worker(args, model, batch, plain, explainable, config)
                times.setdefault(config, []).extend(done["times"])
                maps[config] = done["maps"]
        floor = np.median(times["floor"])
        for config in CONFIGS[model]:
            ms = np.array(times[config]) * 1000
            row = {"model": model, "batch": batch, "config": config, "maps": maps[config],
                   "median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
                   "p90_ms": float(np.percentile(ms, 90)), "x_floor": float(np.median(ms) / 1000 / floor),
                   "x_floor_p10": float(np.percentile(ms, 10) / np.percentile(times["floor"], 10) / 1000)}
            rows.append(row)
            print(f"{model:>9} b{batch:<2} {config:<11} maps {row['maps']:>3}  {row['median_ms']:8.1f} ms "
                  f"[{row['p10_ms']:.1f}, {row['p90_ms']:.1f}]  x floor {row['x_floor']:.2f} "
                  f"(p10s {row['x_floor_p10']:.2f})", flush=True)
    return rows


def write(rows: list[dict], path: Path) -> None:
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores (CPU; load average at the end {load}: "
             f"other jobs shared the cores); median of the timed runs, "
             f"[p10, p90]; x floor = latency / plain ONNX Runtime inference of the same model and batch (medians; "
             f"then p10s, less sensitive to a busy machine); head: the head run alone, for all the maps.", "",
             "| model | batch | configuration | maps | median ms | [p10, p90] | x floor | x floor (p10) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['config']} | {r['maps']} | {r['median_ms']:.1f} | "
              f"[{r['p10_ms']:.1f}, {r['p90_ms']:.1f}] | {r['x_floor']:.2f} | {r['x_floor_p10']:.2f} |" for r in rows]
    path.write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--budget", type=float, default=15.0, help="Seconds of timed calls per configuration.")
    parser.add_argument("--work", type=Path, default=RESULTS / "models")
    for hidden in ("--config", "--model", "--plain", "--explainable"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    sys.path.insert(0, str(HERE))
    from bench import prepare

    args.work.mkdir(parents=True, exist_ok=True)
    files = {"resnet50": prepare("resnet50", 224, args.work), "yolov8n": prepare_yolo(args.work)}
    write(measure(args, files), RESULTS / "targets.md")


if __name__ == "__main__":
    main()
