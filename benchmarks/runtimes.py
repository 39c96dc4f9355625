"""Runtimes compared: the same explainable file (Grad-CAM's heatmaps computed in the graph, `export --heatmaps
gradcam`) on ONNX Runtime's CPU provider, OpenVINO's CPU plugin and onnxruntime-web (WebAssembly, in Node), each
against that runtime's own plain inference of the file it was derived from; with pytorch-grad-cam (eager PyTorch)
and, where `openvino-xai` imports, OpenVINO XAI's gradient-free maps as anchors on the same model.

    python benchmarks/runtimes.py                                  # ResNet-50 and EfficientNet-Lite0, batches 1 and 8
    python benchmarks/runtimes.py --models resnet50 --batches 8 --budget 10

Each runtime runs in a worker process of its own (two runtimes' thread pools in one process fight for the cores),
one after the other; inside a worker the plain and the explained run are timed in turn, round by round
(onnxcam.core.timing.interleaved), so that the ratio of the two is measured side by side. Every runtime gets the
machine's cores as threads. onnxruntime-web comes from tests/node's npm install (`npm ci` there). Writes
benchmarks/results/runtimes.md and runtimes.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from provenance import begin, describe, end, write  # noqa: E402

ORT_WEB = HERE.parent / "tests" / "node" / "node_modules" / "onnxruntime-web" / "dist" / "ort.node.min.mjs"
SIZE = 224
# float32 as the other runtimes compute (OpenVINO's CPU plugin may pick bfloat16), on every core
OPENVINO_CPU = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": os.cpu_count()}
LIMIT = 1.1  # the bound on Grad-CAM over plain inference, per runtime, at ResNet-50 batch 8


def batch_of(size: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((size, 3, SIZE, SIZE)).astype(np.float32)


# --- workers: each prints one JSON line of per-call seconds -------------------------------------------------------

def onnxruntime_worker(plain: str, explained: str, size: int, repeats: int, budget: float) -> dict:
    from onnxcam.core.contract import CLASS_INPUT, HEATMAPS_OUTPUT
    from onnxcam.core.timing import interleaved
    from onnxcam.runtimes import create_session

    batch = batch_of(size)
    plain_session, explained_session = create_session(plain, "cpu"), create_session(explained, "cpu")
    plain_feed = {plain_session.get_inputs()[0].name: batch}
    feed = {**plain_feed, CLASS_INPUT: np.full(size, -1, np.int64)}
    return interleaved({"plain": lambda: plain_session.run(None, plain_feed),
                        "gradcam": lambda: explained_session.run([HEATMAPS_OUTPUT], feed)}, repeats, budget)


def openvino_worker(plain: str, explained: str, size: int, repeats: int, budget: float) -> dict:
    import openvino as ov

    from onnxcam.core.contract import CLASS_INPUT, HEATMAPS_OUTPUT
    from onnxcam.core.timing import interleaved

    core = ov.Core()
    plain_model = core.compile_model(core.read_model(plain), "CPU", OPENVINO_CPU)
    explained_model = core.compile_model(core.read_model(explained), "CPU", OPENVINO_CPU)
    plain_request, explained_request = plain_model.create_infer_request(), explained_model.create_infer_request()
    batch = batch_of(size)
    image_input = plain_model.inputs[0].get_any_name()
    feed = {image_input: batch, CLASS_INPUT: np.full(size, -1, np.int64)}
    heatmaps = explained_model.output(HEATMAPS_OUTPUT)
    return interleaved({"plain": lambda: plain_request.infer({image_input: batch}),
                        "gradcam": lambda: explained_request.infer(feed)[heatmaps]}, repeats, budget)


def pytorch_grad_cam_worker(model_name: str, size: int, repeats: int, budget: float) -> dict:
    import torch

    sys.path.insert(0, str(HERE.parent / "tests"))
    from models import MODELS
    from support.torchvision_shim import import_torchvision

    import_torchvision()
    from pytorch_grad_cam import GradCAM

    from onnxcam.core.timing import interleaved

    torch.set_num_threads(os.cpu_count())
    build, layer = MODELS[model_name]
    model = build()
    cam = GradCAM(model, [model.get_submodule(layer)])
    batch = torch.from_numpy(batch_of(size))

    def plain():
        with torch.no_grad():
            model(batch)

    return interleaved({"plain": plain, "gradcam": lambda: cam(input_tensor=batch, targets=None)}, repeats, budget)


def openvino_xai_worker(plain: str, size: int, repeats: int, budget: float) -> dict:
    """OpenVINO XAI 1.1's gradient-free maps: ReciproCAM (white box, its inserted XAI branch) and the activation
    map, on the plain file; with the model's own inference, compiled as it compiles, as the floor."""
    import openvino as ov
    import openvino_xai as xai
    from openvino_xai.explainer.explainer import ExplainMode

    interleaved = timing_module().interleaved  # the side environment's numpy cannot import the whole of onnxcam
    batch = batch_of(size)
    core = ov.Core()
    # its explainers compile with OpenVINO's defaults (bfloat16 where the CPU has it, as this one does), which
    # cannot be overridden from outside: its floor is the plain file compiled the same way
    plain_request = core.compile_model(core.read_model(plain), "CPU").create_infer_request()
    image_input = plain_request.model_inputs[0].get_any_name()
    explainers = {method: xai.Explainer(model=core.read_model(plain), task=xai.Task.CLASSIFICATION,
                                        explain_mode=ExplainMode.WHITEBOX, explain_method=xai.Method(method))
                  for method in ("reciprocam", "activationmap")}

    def explain(explainer):
        for image in np.split(batch, len(batch)):  # its white-box maps take a batch of one
            explainer(image, targets=[0], colormap=False)  # one class's map, resized to the image, as Grad-CAM's

    return interleaved({"plain": lambda: plain_request.infer({image_input: batch}),
                        **{method: (lambda e=e: explain(e)) for method, e in explainers.items()}}, repeats, budget)


def timing_module():
    """onnxcam.core.timing, which needs nothing but the standard library, imported from its file alone."""
    spec = importlib.util.spec_from_file_location("timing", HERE.parent / "onnxcam" / "core" / "timing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WORKERS = {"onnxruntime": onnxruntime_worker, "openvino": openvino_worker,
           "pytorch-grad-cam": pytorch_grad_cam_worker, "openvino-xai": openvino_xai_worker}


# --- the driver -----------------------------------------------------------------------------------------------------

def export(model_name: str, folder: Path) -> tuple[Path, Path, list[str]]:
    """The plain file as a PyTorch user writes it, and the explainable file with Grad-CAM's heatmaps in the graph
    derived from it, its target layer found with no names given."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from models import MODELS
    from support.torch_export import legacy_export

    from onnxcam.exporters import export_onnx

    build, _ = MODELS[model_name]
    plain = legacy_export(build(), folder / f"{model_name}.onnx", (3, SIZE, SIZE))
    explained = folder / f"{model_name}.gradcam.onnx"
    spec = export_onnx(plain, explained, heatmaps="gradcam")
    return plain, explained, list(spec.layers)


def in_worker(args: list[str]) -> dict | str:
    """One worker's per-call seconds, or the reason it did not run (its last line of error)."""
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        return (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet-lite0"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per worker, about")
    parser.add_argument("--ort-web", type=Path, default=ORT_WEB, help="onnxruntime-web's Node module")
    parser.add_argument("--xai-python", default=sys.executable,
                        help="a Python with openvino-xai 1.1 (it needs OpenVINO 2024.4 and numpy 1, not beside "
                             "onnxcam's pins: a side environment)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        timed = WORKERS[args.worker](*args.files, args.batches[0], args.repeats, args.budget)
        print(json.dumps(timed))
        return
    run = begin()
    cases = []
    with tempfile.TemporaryDirectory() as folder:
        for model_name in args.models:
            plain, explained, layers = export(model_name, Path(folder))
            for size in args.batches:
                common = ["--batches", str(size), "--repeats", str(args.repeats), "--budget", str(args.budget)]
                script = [sys.executable, __file__, *common, "--worker"]
                times = {"onnxruntime": in_worker([*script, "onnxruntime", "--files", str(plain), str(explained)]),
                         "openvino": in_worker([*script, "openvino", "--files", str(plain), str(explained)]),
                         "onnxruntime-web": node_worker(plain, explained, size, args),
                         "pytorch-grad-cam": in_worker([*script, "pytorch-grad-cam", "--files", model_name]),
                         "openvino-xai": in_worker([args.xai_python, *script[1:], "openvino-xai", "--files",
                                                    str(plain)])}
                cases.append({"model": model_name, "batch": size, "layers": layers, "times": times})
    end(run)
    write("runtimes", report(run, cases), {"run": run, "cases": cases})


def node_worker(plain: Path, explained: Path, size: int, args) -> dict | str:
    """onnxruntime-web's WebAssembly build in Node, timed by benchmarks/runtimes.mjs."""
    if not args.ort_web.exists():
        return "onnxruntime-web is not installed (cd tests/node && npm ci)"
    with tempfile.NamedTemporaryFile(suffix=".f32") as images:
        images.write(batch_of(size).tobytes())
        images.flush()
        return in_worker(["node", str(HERE / "runtimes.mjs"), str(args.ort_web), str(plain), str(explained),
                          images.name, f"{size},3,{SIZE},{SIZE}", str(args.repeats), str(args.budget),
                          str(os.cpu_count())])


def report(run: dict, cases: list[dict]) -> str:
    """The markdown: per runtime, Grad-CAM over its own plain run; and each runtime's Grad-CAM against the fastest."""
    rows = []
    for case in cases:
        medians = {runtime: {kind: 1000 * float(np.median(seconds)) for kind, seconds in timed.items()}
                   for runtime, timed in case["times"].items() if isinstance(timed, dict)}
        runtimes = [r for r in ("onnxruntime", "openvino", "onnxruntime-web") if r in medians]
        fastest = min(medians[r]["gradcam"] for r in runtimes) if runtimes else None
        for runtime, timed in case["times"].items():
            head = f"| {case['model']} | {case['batch']} | {runtime} |"
            if not isinstance(timed, dict):
                rows.append(f"{head} not run: {timed} | | | | |")
                continue
            plain = medians[runtime]["plain"]
            for kind, ms in medians[runtime].items():
                if kind == "plain":
                    continue
                versus = f"{ms / fastest:.2f}x" if runtime in runtimes else "-"
                within = "" if runtime not in runtimes or case["model"] != "resnet50" or case["batch"] != 8 else (
                    " (within)" if ms / plain <= LIMIT else " (OVER)")
                rows.append(f"{head} {kind} | {plain:.1f} | {ms:.1f} | {ms / plain:.2f}x{within} | {versus} |")
    return "\n".join([
        "# Runtimes: Grad-CAM in the graph on ONNX Runtime, OpenVINO and onnxruntime-web", "", *describe(run), "",
        "Random images at 224 x 224; each runtime in its own worker process, plain and explained timed in turn; "
        "medians. `ratio` is the explained run over that runtime's own plain inference (the issue's bound: "
        f"<= {LIMIT}x at ResNet-50 batch 8); `vs fastest` compares the runtimes' Grad-CAM times at that model and "
        "batch. pytorch-grad-cam (eager PyTorch, gradients by autograd) and OpenVINO XAI (gradient-free: "
        "ReciproCAM and the activation map, one image per call) are anchors on the same model. OpenVINO XAI compiles "
        "with OpenVINO's default precision, bfloat16 on this CPU, and takes no option to change it: its rows (plain "
        "run included) are bfloat16, the others float32.", "",
        "| model | batch | runtime | method | plain ms | explained ms | ratio | vs fastest |",
        "|---|---|---|---|---|---|---|---|", *rows])


if __name__ == "__main__":
    main()
