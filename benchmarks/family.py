"""The rest of the family against the libraries users run today, side by side in one run on ResNet-50 (random
weights: timing does not depend on them), CPU, the same threads, batch 1:

- Ablation-CAM on layer4: onnxcam (backbone once, then only the head on all 2048 ablated copies) vs
  pytorch-grad-cam's AblationCAM (the whole network per batch of 32 ablated copies) with
  ratio_channels_to_ablate=0.1, which ablates only 408 of the 2048 channels (all of them would take
  minutes per call here): the comparison favours pytorch-grad-cam;
- Score-CAM on layer1 (256 channels: each of the two runs 256 masked forward passes of the whole network),
  onnxcam vs torchcam's ScoreCAM, both in batches of 32;
- Integrated Gradients, 32 Gauss-Legendre steps, black baseline: onnxcam (one run of the 32 points) vs captum;
- Guided Grad-CAM (file exported with input gradients) and Grad-CAM vs plain ONNX Runtime inference (the floor),
  with torchcam's and pytorch-grad-cam's GradCAM as anchors.

    python benchmarks/family.py --anchor-python /work/venvs/family/bin/python

Each configuration runs in a worker process of its own (two thread pools in one process fight for the cores),
one after another; the anchors' worker runs under --anchor-python, an interpreter with grad-cam (and torchvision,
imported with its failing operator registrations tolerated), torchcam and captum installed. Writes
benchmarks/results/family.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SIZE = 224
# configuration -> (repeats, whether it is an anchor); heavy anchors run once (each call takes minutes)
CONFIGS = {
    "floor": (7, False), "onnxcam:gradcam": (7, False), "onnxcam:guided-gradcam": (7, False),
    "onnxcam:saliency": (7, False),
    "torchcam:gradcam": (5, True), "pytorch-grad-cam:gradcam": (5, True),
    "onnxcam:ablationcam": (3, False), "pytorch-grad-cam:ablationcam": (1, True),
    "onnxcam:scorecam": (1, False), "torchcam:scorecam": (1, True),
    "onnxcam:integrated-gradients": (2, False), "captum:integrated-gradients": (2, True),
}
COMPARISONS = [("Ablation-CAM", "onnxcam:ablationcam", "pytorch-grad-cam:ablationcam"),
               ("Score-CAM, layer1, 256 channels", "onnxcam:scorecam", "torchcam:scorecam"),
               ("Integrated Gradients, 32 steps", "onnxcam:integrated-gradients", "captum:integrated-gradients"),
               ("Grad-CAM", "onnxcam:gradcam", "torchcam:gradcam"),
               ("Grad-CAM", "onnxcam:gradcam", "pytorch-grad-cam:gradcam")]


def model_and_batch(threads: int):
    import torch

    sys.path.insert(0, str(HERE))
    from models import resnet50

    torch.set_num_threads(threads)
    batch = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    return resnet50(), torch.from_numpy(batch)


def onnxcam_call(config: str, files: dict, threads: int):
    """onnxcam on the file the method needs, as a user calls it."""
    import onnxcam
    from onnxcam.runtimes import create_session

    batch = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    if config == "floor":
        session = create_session(files["plain"], "cpu", threads)
        name = session.get_inputs()[0].name
        return lambda: session.run(None, {name: batch})
    method = config.split(":")[1]
    uses_gradients = method in ("guided-gradcam", "saliency", "integrated-gradients")
    path = files["gradients"] if uses_gradients else files["layer1"] if method == "scorecam" else files["explainable"]
    explainer = onnxcam.Explainer(path, provider="cpu", threads=threads)
    options = {"scorecam": {"batch_size": 32}, "integrated-gradients": {"steps": 32}}.get(method, {})
    return lambda: explainer.explain(batch, method=method, **options)


def anchor_call(config: str, threads: int):
    """The anchor library's own call, as its documentation shows it, on the same model and input."""
    import torch

    model, x = model_and_batch(threads)
    with torch.no_grad():
        top = int(model(x).argmax(1))
    library, method = config.split(":")
    if library == "pytorch-grad-cam":
        sys.path.insert(0, str(HERE.parent / "tests"))
        from support.torchvision_shim import import_torchvision

        import_torchvision()
        from pytorch_grad_cam import AblationCAM, GradCAM

        cam = (AblationCAM(model, [model.layer4], batch_size=32, ratio_channels_to_ablate=0.1)
               if method == "ablationcam" else GradCAM(model, [model.layer4]))
        return lambda: cam(x, targets=None)
    if library == "torchcam":
        from torchcam.methods import GradCAM, ScoreCAM

        extractor = ScoreCAM(model, "layer1", batch_size=32) if method == "scorecam" else GradCAM(model, "layer4")

        def run():
            if method == "scorecam":
                with torch.no_grad():
                    scores = model(x)
            else:
                scores = model(x)
            return extractor(int(scores.argmax(1)), scores)
        return run
    from captum.attr import IntegratedGradients

    black = (torch.zeros(1, 3, 1, 1) - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225])[:, None, None]
    integrated = IntegratedGradients(model)
    return lambda: integrated.attribute(x, baselines=black.expand_as(x), target=top, n_steps=32,
                                        method="gausslegendre")


def worker(args) -> dict:
    repeats, anchor = CONFIGS[args.worker]
    call = anchor_call(args.worker, args.threads) if anchor else onnxcam_call(args.worker, json.loads(args.files),
                                                                              args.threads)
    if repeats > 1:
        call()  # warm-up: sessions, the guided session, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - start))
    return {"times": times}


def prepare(folder: Path) -> dict:
    """ResNet-50's plain ONNX file, its explainable export (layer4) and one with input gradients."""
    import torch

    from onnxcam.exporters import export_torch

    model, _ = model_and_batch(2)
    files = {"plain": folder / "resnet50.onnx", "explainable": folder / "resnet50.explain.onnx",
             "gradients": folder / "resnet50.input-gradients.onnx", "layer1": folder / "resnet50.layer1.onnx"}
    if not files["plain"].exists():
        torch.onnx.export(model, (torch.zeros(2, 3, SIZE, SIZE),), files["plain"], dynamo=True,
                          input_names=["input"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    kwargs = {"input_shape": (3, SIZE, SIZE), "layers": ["layer4"], "mean": [0.485, 0.456, 0.406],
              "std": [0.229, 0.224, 0.225]}
    if not files["explainable"].exists():
        export_torch(model, files["explainable"], **kwargs)
    if not files["gradients"].exists():
        export_torch(model, files["gradients"], input_gradients=True, **kwargs)
    if not files["layer1"].exists():
        export_torch(model, files["layer1"], **{**kwargs, "layers": ["layer1"]})
    return {name: str(path) for name, path in files.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchor-python", default=sys.executable, help="Interpreter with the anchor libraries.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="Configurations to run (default: all).")
    parser.add_argument("--models", default=str(RESULTS / "models"), help="Folder for the exported files.")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    folder = Path(args.models)
    folder.mkdir(parents=True, exist_ok=True)
    files = json.dumps(prepare(folder))
    results, load = {}, [os.getloadavg()[0]]
    for config in args.only or CONFIGS:
        python = args.anchor_python if CONFIGS[config][1] else sys.executable
        done = subprocess.run([python, __file__, "--worker", config, "--files", files, "--threads",
                               str(args.threads)], capture_output=True, text=True, check=True)
        results[config] = json.loads(done.stdout.strip().splitlines()[-1])["times"]
        load.append(os.getloadavg()[0])
        print(f"{config}: median {statistics.median(results[config]):.1f} ms over {len(results[config])}",
              flush=True)
    write_table(results, load, args.threads)


def write_table(results: dict, load: list[float], threads: int) -> None:
    median = {config: statistics.median(times) for config, times in results.items()}
    lines = [f"ResNet-50, batch 1, 224 x 224, CPU, {threads} threads; {platform.processor() or platform.machine()}; "
             f"1-minute load average during the run {min(load):.1f}-{max(load):.1f}.", "",
             "| configuration | median ms | runs | x floor |", "|---|---|---|---|"]
    for config, value in median.items():
        floor = f"{value / median['floor']:.2f}" if "floor" in median else ""
        lines.append(f"| {config} | {value:.1f} | {len(results[config])} | {floor} |")
    lines += ["", "| comparison | onnxcam ms | anchor ms | speed-up |", "|---|---|---|---|"]
    for title, ours, theirs in COMPARISONS:
        if ours in median and theirs in median:
            lines.append(f"| {title}: {theirs.split(':')[0]} | {median[ours]:.1f} | {median[theirs]:.1f} | "
                         f"{median[theirs] / median[ours]:.1f}x |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "family.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
