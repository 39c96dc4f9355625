"""What an explanation costs, side by side in one run: plain ONNX Runtime inference (the floor),
onnxcam on ONNX Runtime for each method, and the eager PyTorch way (forward hook, tensor hook, full
backward pass), on the same model, batch, input and thread count: on CPU, and also on the GPU where
ONNX Runtime's CUDA provider runs (and torch's CUDA, for eager). Ratios compare a row with the floor
and the eager row of the same device.

    python benchmarks/bench.py                        # all models, batches 1 8 32
    python benchmarks/bench.py --models resnet50 --batches 1 --repeats 20

Each kind runs in a worker process of its own: plain ONNX Runtime, onnxcam (its methods share one
session and are timed call by call in turn), eager PyTorch. Two thread pools in one process fight
for the cores: a session that ran last keeps its threads spinning and slows the next one by up to
2x on a small machine, and spinning cannot be turned off without doubling batch-1 latency here.
The workers take turns, three rounds, so that drift falls on all alike. Peak memory is each
worker's resident high-water mark (VmHWM). Writes benchmarks/results/results.csv, table.md, plot.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from provenance import cpu_model

from onnxcam.core.timing import interleaved

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROUNDS = 3
METHODS_AT_BATCH_1 = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam"]


def peak_memory_mb() -> float:
    """This process's resident high-water mark (VmHWM: reset by exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def calls(args, configs: list[str]) -> dict:
    """A zero-argument call per configuration, on the same input batch (one session per file and provider)."""
    from functools import cache

    batch = np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)

    @cache
    def explainer(provider):
        import onnxcam

        return onnxcam.Explainer(args.explainable, provider=provider, threads=args.threads)

    functions = {}
    for config in configs:
        if config.startswith("floor"):
            from onnxcam.runtimes import create_session

            session = create_session(args.plain, provider_of(config), args.threads)
            functions[config] = lambda s=session, n=session.get_inputs()[0].name: s.run(None, {n: batch})
        elif config.startswith("onnxcam"):
            _, provider, method = config.split(":")
            functions[config] = lambda e=explainer(provider), m=method: e.explain(batch, method=m)
        elif config == "torchcam":
            functions[config] = torchcam_gradcam(args)
        elif config.startswith("eager"):
            import torch

            sys.path.insert(0, str(HERE))
            from models import MODELS

            torch.set_num_threads(args.threads)
            build, layer = MODELS[args.model]
            device = provider_of(config)
            model = build().to(device)
            inputs = torch.from_numpy(batch).to(device)
            functions[config] = lambda m=model, t=inputs: eager_gradcam(m, m.get_submodule(layer), t)
        else:
            raise SystemExit(f"unknown configuration {config}")
    return functions


def provider_of(config: str) -> str:
    """'cuda' for the configurations that run on the GPU (floor:cuda, onnxcam:cuda:..., eager:cuda), else 'cpu'."""
    return "cuda" if ":cuda" in config else "cpu"


def worker(args) -> dict:
    """Times the configurations given (call by call in turn, in this process) and reports peak memory."""
    configs = args.config.split(",")
    times = interleaved(calls(args, configs), args.repeats, args.budget)
    return {"times": times, "peak_mb": peak_memory_mb()}


def torchcam_gradcam(args):
    """torchcam's GradCAM, the second anchor: forward, then torch.autograd.grad from the scores down to the layer
    only (no full backward pass), on the CPU."""
    import torch
    from torchcam.methods import GradCAM

    sys.path.insert(0, str(HERE))
    from models import MODELS

    torch.set_num_threads(args.threads)
    build, layer = MODELS[args.model]
    model = build()
    extractor = GradCAM(model, layer)
    inputs = torch.from_numpy(np.random.default_rng(0).standard_normal((args.batch, 3, args.size, args.size))
                              .astype(np.float32))

    def run():
        scores = model(inputs)
        return extractor(scores.argmax(1).tolist(), scores)

    return run


def _torchcam_applies(model_name: str) -> bool:
    """torchcam installed, and a CNN target (its GradCAM expects N x C x H x W maps)."""
    import importlib.util

    return importlib.util.find_spec("torchcam") is not None and model_name != "vit-b16"


def eager_gradcam(model, layer, inputs):
    """The hook-based PyTorch way: forward hook keeps A, tensor hook keeps dy/dA, full backward pass."""
    import torch
    import torch.nn.functional as F

    kept = {}

    def hook(module, args, output):
        kept["A"] = output
        output.register_hook(lambda grad: kept.__setitem__("G", grad))

    handle = layer.register_forward_hook(hook)
    try:
        model.zero_grad(set_to_none=True)
        scores = model(inputs)
        scores.gather(1, scores.argmax(1, keepdim=True)).sum().backward()
    finally:
        handle.remove()
    A, G = kept["A"].detach(), kept["G"]
    if A.dim() == 3:  # ViT tokens: drop CLS, back to the grid
        side = int((A.shape[1] - 1) ** 0.5)
        A, G = (t[:, 1:].reshape(len(t), side, side, -1).permute(0, 3, 1, 2) for t in (A, G))
    cam = torch.relu((G.mean(dim=(2, 3), keepdim=True) * A).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=inputs.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    low, high = cam.amin(dim=(1, 2), keepdim=True), cam.amax(dim=(1, 2), keepdim=True)
    return ((cam - low) / (high - low).clamp(min=1e-12)).cpu().numpy()


def prepare(model_name: str, size: int, folder: Path) -> tuple[Path, Path]:
    """The plain ONNX export (the floor) and the explainable one of the same module."""
    import torch

    sys.path.insert(0, str(HERE))
    from models import MODELS

    plain = folder / f"{model_name}.onnx"
    if not plain.exists():
        torch.onnx.export(MODELS[model_name][0](), (torch.zeros(2, 3, size, size),), plain, dynamo=True,
                          input_names=["input"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    return plain, explainable_file(model_name, size, folder)


def explainable_file(model_name: str, size: int, folder: Path) -> Path:
    """The explainable export of a model of models.py (its builders are seeded: the same weights as the floor's),
    made once."""
    sys.path.insert(0, str(HERE))
    from models import MODELS

    from onnxcam.exporters import export_torch

    build, layer = MODELS[model_name]
    explainable = folder / f"{model_name}.explain.onnx"
    if not explainable.exists():
        export_torch(build(), explainable, input_shape=(3, size, size), layers=[layer])
    return explainable


def worker_groups(batch: int, cuda: bool, torch_cuda: bool) -> list[list[str]]:
    """Configurations timed together in one worker: those sharing a session (onnxcam's methods)."""
    methods = METHODS_AT_BATCH_1 if batch == 1 else ["gradcam"]
    groups = [["floor"], [f"onnxcam:cpu:{m}" for m in methods], ["eager"]]
    if cuda:
        groups += [["floor:cuda"], [f"onnxcam:cuda:{m}" for m in methods]]
    return groups + ([["eager:cuda"]] if torch_cuda else [])


def run_worker(args, model_name, batch, plain, explainable, configs, repeats, budget) -> dict:
    command = [sys.executable, __file__, "--worker", "--config", ",".join(configs), "--model", model_name,
               "--batch", str(batch), "--plain", str(plain), "--explainable", str(explainable),
               "--threads", str(args.threads), "--repeats", str(repeats), "--budget", str(budget),
               "--size", str(args.size)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{model_name} b{batch} {configs}: failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet-lite0", "vit-b16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--budget", type=float, default=20.0, help="Seconds of timed calls per configuration.")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--work", type=Path, default=RESULTS / "models")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--plain", help=argparse.SUPPRESS)
    parser.add_argument("--explainable", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for model_name in args.models:
        plain, explainable = prepare(model_name, args.size, args.work)
        cuda = _cuda_works(explainable)
        for batch in args.batches:
            groups = worker_groups(batch, cuda, _torch_cuda_works())
            groups += [["torchcam"]] if _torchcam_applies(model_name) else []
            times, peaks = {}, {}
            for _ in range(ROUNDS):  # workers take turns, so that drift falls on all alike
                for group in groups:
                    repeats = max(3, args.repeats // ROUNDS)
                    done = run_worker(args, model_name, batch, plain, explainable, group, repeats,
                                      args.budget / ROUNDS)
                    for config, values in done["times"].items():
                        times.setdefault(config, []).extend(values)
                        peaks[config] = max(peaks.get(config, 0), done["peak_mb"])
            for config in [c for group in groups for c in group]:
                ms = np.array(times[config]) * 1000
                row = {"model": model_name, "batch": batch, "config": config, "median_ms": np.median(ms),
                       "p10_ms": np.percentile(ms, 10), "p90_ms": np.percentile(ms, 90), "runs": len(ms),
                       "images_per_s": batch / np.median(ms) * 1000, "peak_mb": peaks[config]}
                rows.append(row)
                print(f"{model_name:>18} b{batch:<3} {config:<24} {row['median_ms']:9.1f} ms  "
                      f"[{row['p10_ms']:.1f}, {row['p90_ms']:.1f}]  {row['peak_mb']:.0f} MB", flush=True)
    add_ratios(rows)
    write(rows, args)


def _cuda_works(path) -> bool:
    from onnxcam.runtimes import ProviderError, create_session

    try:
        create_session(path, "cuda")
    except ProviderError:
        return False
    return True


def _torch_cuda_works() -> bool:
    import torch

    return torch.cuda.is_available()


def add_ratios(rows):
    """x floor and speed-up vs eager, each against the configuration on the same device (CPU or GPU)."""
    for row in rows:
        same = [r for r in rows if r["model"] == row["model"] and r["batch"] == row["batch"]
                and provider_of(r["config"]) == provider_of(row["config"])]
        floor = next((r["median_ms"] for r in same if r["config"].startswith("floor")), np.nan)
        eager = next((r["median_ms"] for r in same if r["config"].startswith("eager")), np.nan)
        row["x_floor"] = row["median_ms"] / floor
        row["speedup_vs_eager"] = eager / row["median_ms"]


def write(rows, args):
    RESULTS.mkdir(exist_ok=True)
    columns = ["model", "batch", "config", "median_ms", "p10_ms", "p90_ms", "runs", "images_per_s", "peak_mb",
               "x_floor", "speedup_vs_eager"]
    with open(RESULTS / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads"
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {cpu_model()} ({machine}); input {args.size}x{args.size}; "
             f"median of up to {args.repeats} runs, [p10, p90].", "",
             "| model | batch | configuration | median ms | [p10, p90] | images/s | peak MB | x floor "
             "| speed-up vs eager |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['config']} | {r['median_ms']:.1f} | "
                     f"[{r['p10_ms']:.1f}, {r['p90_ms']:.1f}] | {r['images_per_s']:.1f} | {r['peak_mb']:.0f} | "
                     f"{r['x_floor']:.2f} | {r['speedup_vs_eager']:.2f} |")
    (RESULTS / "table.md").write_text("\n".join(lines) + "\n")
    plot(rows)


def plot(rows):
    """Latency relative to the floor on the same device per model and batch (bars): onnxcam Grad-CAM and eager
    PyTorch, on CPU and, where present, on the GPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["batch"]) for r in rows}, key=lambda g: (g[0], g[1]))
    configs = ["floor", "onnxcam:cpu:gradcam", "eager", "onnxcam:cuda:gradcam", "eager:cuda"]
    configs = [c for c in configs if any(r["config"] == c for r in rows)]
    figure, axis = plt.subplots(figsize=(max(6, 1.3 * len(groups)), 4))
    width = 0.8 / len(configs)
    for i, config in enumerate(configs):
        values = [next((r["x_floor"] for r in rows if (r["model"], r["batch"]) == g and r["config"] == config), 0)
                  for g in groups]
        axis.bar(np.arange(len(groups)) + i * width, values, width, label=config)
    axis.set_xticks(np.arange(len(groups)) + width * (len(configs) - 1) / 2)
    axis.set_xticklabels([f"{m}\nbatch {b}" for m, b in groups], fontsize=8)
    axis.set_ylabel("latency / plain ONNX Runtime inference")
    axis.axhline(1.0, color="black", linewidth=0.5)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(RESULTS / "plot.png", dpi=120)


if __name__ == "__main__":
    main()
