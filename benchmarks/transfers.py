"""What fetching costs: one explainable file, one batch, the session run done four ways side by side,
each followed by the same numpy Grad-CAM, timed in turn in one process:

  run, all outputs      session.run(None): every output comes back, the attention or gradient tensors
                        the method does not use included (what a wrapper unaware of the method does)
  run, needed outputs   session.run(names): the scores, the class and the tensors the method needs
  bound                 onnxcam's I/O binding: the same names, written straight into numpy arrays
  bound, batch on GPU   (CUDA only) the batch staged on the GPU once as an OrtValue, bound in place

    python benchmarks/transfers.py MODEL.explain.onnx --batch 8 --provider cpu
    python benchmarks/transfers.py vit-b16 --batch 8 --record     # a model of benchmarks/models.py

Prints, per way, the median time, its ratio to `bound`, the MiB fetched from the session per batch, and
the MiB uploaded to the GPU. MODEL is an explainable file or a name of benchmarks/models.py (resnet50,
efficientnet-lite0, vit-b16: exported once, at 224 x 224, to benchmarks/results/models/). --record adds the run
to benchmarks/results/transfers.md and transfers.json (one section per model, batch, method and device, a
rerun replacing its own), with the command, the machine and its load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from bench import explainable_file
from models import MODELS
from provenance import RESULTS, begin, describe, end, write
from threadpoolctl import threadpool_limits

import onnxcam
from onnxcam.core.layouts import to_grid
from onnxcam.core.timing import interleaved
from onnxcam.methods import METHODS


def ways(explainer: onnxcam.Explainer, batch: np.ndarray, method: str) -> dict:
    spec, session, runner = explainer.spec, explainer.session, explainer.model.runner
    compute, needs_gradients = METHODS[method].formula, METHODS[method].gradients
    needed = [spec.scores, spec.selected, spec.activations[0], *(spec.gradients[:1] if needs_gradients else [])]
    everything = [o.name for o in session.get_outputs()]
    classes = np.full(len(batch), -1, np.int64)

    def explain(outputs: dict):
        gradient = outputs.get(spec.gradients[0]) if needs_gradients else None
        layout = spec.layouts[0]
        with threadpool_limits(1, "blas"):  # as the Explainer runs the core
            return compute(to_grid(outputs[spec.activations[0]], layout),
                           None if gradient is None else to_grid(gradient, layout))

    def fetch(run, names):
        return lambda: explain(dict(zip(names, run(names))))

    feeds = {spec.input: batch, spec.class_input: classes}
    result = {
        "run, all outputs": (fetch(lambda names: session.run(names, feeds), everything), everything),
        "run, needed outputs": (fetch(lambda names: session.run(names, feeds), needed), needed),
        "bound": (fetch(lambda names: runner.run(names, feeds), needed), needed),
    }
    if runner.device == "cuda":
        on_device = {spec.input: ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0), spec.class_input: classes}
        result["bound, batch on GPU"] = (fetch(lambda names: runner.run(names, on_device), needed), needed)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help=f"An explainable file, or one of {', '.join(MODELS)}.")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--method", default="gradcam",
                        choices=[name for name, m in METHODS.items() if m.formula is not None])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget", type=float, default=30.0)
    parser.add_argument("--record", action="store_true", help="Add the run to benchmarks/results/transfers.md.")
    args = parser.parse_args()
    run = begin()
    path = explainable_file(args.model, 224, RESULTS / "models") if args.model in MODELS else Path(args.model)

    explainer = onnxcam.Explainer(path, provider=args.provider)
    height, width = explainer.spec.input_size
    batch = np.random.default_rng(0).standard_normal((args.batch, 3, height, width)).astype(np.float32)
    compared = ways(explainer, batch, args.method)
    times = interleaved({name: call for name, (call, _) in compared.items()}, args.repeats, args.budget)
    everything = [o.name for o in explainer.session.get_outputs()]
    feeds = {explainer.spec.input: batch, explainer.spec.class_input: np.full(args.batch, -1, np.int64)}
    sizes = {name: array.nbytes for name, array in zip(everything, explainer.session.run(everything, feeds))}
    reference = np.median(times["bound"])
    device = explainer.model.runner.device
    print(f"{args.model}, batch {args.batch}, {args.method}, on {device}; "
          f"median of {len(times['bound'])} runs; MiB fetched from the session, and uploaded to the GPU")
    rows = []
    for name, (_, names) in compared.items():
        uploaded = 0 if device == "cpu" or "on GPU" in name else batch.nbytes
        rows.append({"way": name, "median ms": round(float(np.median(times[name])) * 1000, 1),
                     "x bound": round(float(np.median(times[name]) / reference), 3),
                     "MiB fetched": round(sum(sizes[n] for n in names) / 2**20, 2),
                     "MiB uploaded": round(uploaded / 2**20, 2), "outputs": len(names)})
        print(f"  {name:<22} {rows[-1]['median ms']:9.1f} ms  x{rows[-1]['x bound']:5.2f}"
              f"  {rows[-1]['MiB fetched']:8.2f} fetched  {rows[-1]['MiB uploaded']:6.2f} uploaded")
    if args.record:
        record({"model": args.model, "file": path.name, "input": f"{height} x {width}", "batch": args.batch,
                "method": args.method, "device": device, "runs per way": len(times["bound"]), "ways": rows,
                "run": end(run)})


def record(entry: dict) -> None:
    """Add (or replace) this model, batch, method and device's section of results/transfers.md and .json."""
    def key(e: dict) -> tuple:
        return e["model"], e["batch"], e["method"], e["device"]

    saved = RESULTS / "transfers.json"
    entries = json.loads(saved.read_text())["entries"] if saved.exists() else []
    entries = [e for e in entries if key(e) != key(entry)] + [entry]
    lines = ["# What fetching costs (benchmarks/transfers.py)", "",
             "One explainable file, one batch, the session run done each way in turn in one process, each followed by "
             "the same numpy map: every output fetched (`run, all outputs`), only the method's (`run, needed "
             "outputs`), through onnxcam's I/O binding (`bound`), and on CUDA with the batch staged on the GPU. "
             "Median ms per batch, its ratio to `bound`, and the MiB fetched from the session per batch."]
    for e in entries:
        lines += ["", f"## {e['model']}, batch {e['batch']}, {e['method']}, on {e['device']}", "", *describe(e["run"]),
                  "", f"File {e['file']}, input {e['input']}; median of {e['runs per way']} runs of each way.", "",
                  "| way | median ms | x bound | outputs | MiB fetched | MiB uploaded |", "|---|---|---|---|---|---|"]
        lines += [f"| {w['way']} | {w['median ms']:.1f} | {w['x bound']:.2f} | {w['outputs']} | "
                  f"{w['MiB fetched']:.2f} | {w['MiB uploaded']:.2f} |" for w in e["ways"]]
    write("transfers", "\n".join(lines), {"entries": entries})


if __name__ == "__main__":
    main()
