"""How many timm architectures the ONNX front end explains with checked gradients (issue 10).

One architecture per timm module (the smallest registered model by parameter count, random weights,
10 classes; a classifier timm initialises to zero gets random weights too) is exported by torch.onnx
(dynamo at batch 2 with a dynamic batch; the legacy exporter where dynamo fails), made explainable by
`onnxcam.exporters.export_onnx` with no names given, and then:
  1. explained at batch 3 by `onnxcam.Explainer` (a random float batch);
  2. its target must be a grid over the image: more than one cell, the image's aspect ratio within one
     cell, no larger than the image;
  3. its gradient must match central finite differences of the ORIGINAL file, with the target tensor cut
     from its producer and fed from outside (residual paths that read it still count), along the
     gradient's own direction and two random ones; run in float64 by ONNX Runtime where it has kernels,
     else wholly in float64 by ONNX's reference evaluator, on the part of the file the score needs;
  4. its heatmaps must be H x W of the image.
Results: ok, wrong-target, wrong-gradient, wrong-heatmap (silently wrong), refused (an onnxcam error,
one line), crashed (any other exception), torch-export-failed (left out of the share). Each module runs
in its own subprocess with a timeout. Writes benchmarks/results/coverage.csv and coverage.md.

Needs timm and torchvision, which must not enter the project's venv; a side venv:
    python3.11 -m venv /work/venvs/timm && cd /work/venvs/timm
    bin/pip install torch==2.13.0                       # first: the CPU build pinned everywhere
    bin/pip install --no-deps torchvision==0.28.0      # the release built against torch 2.13.0
    bin/pip install --no-deps timm
    bin/pip install huggingface_hub safetensors pyyaml onnx onnxscript onnxruntime numpy pillow \
        opencv-python-headless click threadpoolctl onnxruntime-extensions
    bin/pip install --no-deps -e /work/main
    bin/python /work/main/benchmarks/coverage.py            # restartable; --only MODULE, --force
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PICKS = Path.home() / ".cache" / "onnxcam" / "timm-picks.json"
LOG = PICKS.with_name("coverage.log")  # the workers' stderr
KEPT = PICKS.with_name("coverage")
COLUMNS = ["module", "model", "params", "input", "exporter", "target", "target_op", "target_shape", "layout",
           "grid", "result", "message", "seconds"]
SILENTLY_WRONG = ("wrong-target", "wrong-gradient", "wrong-heatmap")
CLASSES = 10
EXPLAIN_BATCH = 3
FD_STEPS = (1e-3, 1e-2, 1e-1, 1e-4)  # relative to the target's RMS; the best agreement counts (ReLU kinks, float32)
FD_RTOL = 1e-2


def import_timm():
    """timm, after torchvision has been imported through the shim (tests/support/torchvision_shim.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support.torchvision_shim import import_torchvision

    import_torchvision()
    import timm
    return timm


# ---------------------------------------------------------------- picking one model per module

def smallest_model(module: str) -> tuple[str, int]:
    """The registered model of a timm module with the fewest parameters (counted on the meta device)."""
    import torch
    timm = import_timm()
    sizes = []
    for name in timm.list_models(module=module):
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, num_classes=CLASSES)
            sizes.append((sum(p.numel() for p in model.parameters()), name))
        except Exception:  # noqa: BLE001, S112 - a model that cannot be built on meta is not a candidate
            continue
    if not sizes:
        raise RuntimeError(f"no model of {module} can be built")
    params, name = min(sizes)
    return name, params


# ---------------------------------------------------------------- one module, in a subprocess

def export_plain(model, size, path: Path) -> str:
    """torch.onnx: dynamo at batch 2 with a dynamic batch, else the legacy exporter. Returns which ran."""
    import torch
    x = torch.randn(2, *size)
    try:
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
        return "dynamo"
    except Exception as dynamo_error:  # noqa: BLE001
        try:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            return "legacy"
        except Exception as legacy_error:  # noqa: BLE001
            raise ExportFailed(f"dynamo: {first_line(dynamo_error)} | legacy: {first_line(legacy_error)}") from None


class ExportFailed(Exception):
    """torch itself could not export the model (or its file does not run at another batch)."""


class Wrong(Exception):
    """onnxcam gave an answer, and it is wrong."""

    def __init__(self, result: str, message: str):
        super().__init__(message)
        self.result = result


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def session(model_or_path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def check_plain(path: Path, model, batch) -> None:
    """The exported file must run at a batch other than the export's and agree with torch."""
    import numpy as np
    import torch
    try:
        plain = session(path)
        got = plain.run(None, {plain.get_inputs()[0].name: batch})[0]
    except Exception as error:  # noqa: BLE001
        raise ExportFailed(f"the exported file does not run at batch {len(batch)}: {first_line(error)}") from None
    with torch.no_grad():
        want = model(torch.from_numpy(batch)).numpy()
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max()):
        raise ExportFailed(f"the exported file disagrees with torch at batch {len(batch)}")


def grid_of(layout: str, shape) -> tuple[int, int]:
    """(rows, columns) of the target's grid, read independently of onnxcam's code."""
    if layout == "nchw":
        return shape[2], shape[3]
    if layout == "nhwc":
        return shape[1], shape[2]
    kind, prefix, grid = layout.split(":")
    rows, columns = (int(v) for v in grid.split("x"))
    if kind != "tokens" or len(shape) != 3 or shape[1] != int(prefix) + rows * columns:
        raise Wrong("wrong-target", f"layout {layout} does not fit shape {list(shape)}")
    return rows, columns


def check_grid(layout: str, shape, image: tuple[int, int]) -> str:
    rows, columns = grid_of(layout, shape)
    height, width = image
    fits = (rows * columns > 1 and rows <= height and columns <= width
            and abs(columns - width * rows / height) <= 1 and abs(rows - height * columns / width) <= 1)
    if not fits:
        raise Wrong("wrong-target", f"grid {rows}x{columns} is not a grid over the {height}x{width} image")
    return f"{rows}x{columns}"


def cut_at(model, target: str, shape):
    """A copy of the model that takes `target` as a graph input instead of computing it."""
    import onnx
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    for node in cut.graph.node:
        for i, name in enumerate(node.output):
            if name == target:
                node.output[i] = f"{target}__cut"
    kept = [v for v in cut.graph.value_info if v.name != target]
    del cut.graph.value_info[:]
    cut.graph.value_info.extend(kept)
    cut.graph.input.append(onnx.helper.make_tensor_value_info(target, onnx.TensorProto.FLOAT,
                                                              ["batch", *shape[1:]]))
    return cut


# ops that ONNX Runtime's CPU provider runs in float64; the others run in float32 between casts
DOUBLE_OPS = {"Add", "Sub", "Mul", "Div", "Neg", "Abs", "Exp", "Log", "Sqrt", "Pow", "Reciprocal", "Sin", "Cos",
              "Relu", "Sigmoid", "Tanh", "Clip", "Softmax", "LayerNormalization", "GroupNormalization", "MatMul",
              "Einsum", "Gemm", "ReduceMean", "ReduceMax", "ReduceSum", "MaxPool", "Max", "Min", "Reshape", "Transpose",
              "Concat", "Slice", "Split", "Gather", "Squeeze", "Unsqueeze", "Expand", "Flatten", "Identity", "Shape",
              "Tile", "Equal", "Less", "Greater", "Not", "And", "Or", "ArgMax", "Range", "Floor", "Ceil", "Size"}


def in_double(model):
    """The model computed in float64 where ONNX Runtime can, so that finite differences resolve targets whose
    effect reaches the score scaled down (layer scale 1e-5 on a residual branch is lost in float32)."""
    import onnx
    from onnx import TensorProto, helper
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {v.name for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
              if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    floats |= {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    double = in_float64(model)
    nodes = []
    for node in double.graph.node:
        if node.op_type in DOUBLE_OPS or node.op_type in ("Cast", "CastLike", "Constant", "ConstantOfShape"):
            nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if name in floats:
                nodes.append(helper.make_node("Cast", [name], [f"{name}__f32_{len(nodes)}"], to=TensorProto.FLOAT))
                node.input[i] = nodes[-1].output[0]
        casts = []
        for i, name in enumerate(node.output):
            if name in floats:
                node.output[i] = f"{name}__f32"
                casts.append(helper.make_node("Cast", [node.output[i]], [name], to=TensorProto.DOUBLE))
        nodes += [node, *casts]
    del double.graph.node[:]
    double.graph.node.extend(nodes)
    return double


def check_gradient(plain_path: Path, explainable: Path, spec, batch) -> str:
    """Directional derivatives of the selected scores' sum: onnxcam's gradient vs central differences of the
    original file with the target fed from outside; along the gradient itself and two random directions.
    ONNX Runtime runs the cut file in float64 where it has kernels; if that disagrees, the part of the cut
    file between the target and the score is run again wholly in float64 by ONNX's reference evaluator, so
    that float32 kernels (Conv) cannot pass for a wrong rule, nor hide a right one."""
    import numpy as np
    import onnx
    rng = np.random.default_rng(1)
    classes = rng.integers(0, spec.num_classes, size=len(batch)).astype(np.int64)
    scores, activation, gradient = session(explainable).run(
        [spec.scores, spec.activations[0], spec.gradients[0]], {spec.input: batch, spec.class_input: classes})
    cut_model = cut_at(onnx.load(str(plain_path)), spec.layers[0], activation.shape)
    here = selected_sum(scores, classes)
    directions = [gradient, rng.standard_normal(activation.shape), rng.standard_normal(activation.shape)]
    worst, precision = np.inf, ""
    for objective, kind, steps in cut_objectives(cut_model, spec, batch, classes, activation):
        precision = kind
        if abs(objective(activation) - here) > 1e-3 * (1 + abs(here)):
            raise Wrong("wrong-gradient", "the cut file fed the exported activation does not give the same scores")
        worst = directional_error(objective, activation, gradient, directions, steps)
        if worst <= FD_RTOL:
            break
    if worst > FD_RTOL:
        raise Wrong("wrong-gradient", f"directional derivative off by {worst:.2g} (relative) from finite differences")
    return f"gradient within {worst:.1g} of finite differences ({precision})"


def selected_sum(scores, classes) -> float:
    """The sum over the batch of each image's selected class score, in float64."""
    import numpy as np
    return float(scores.reshape(len(classes), -1)[np.arange(len(classes)), classes].astype(np.float64).sum())


def cut_objectives(cut_model, spec, batch, classes, activation):
    """(objective, precision, finite-difference steps) triples, most practical first: the selected scores' sum
    as a function of the target's value, by ONNX Runtime (float64 between casts, else float32), then by the
    reference evaluator. Both run only the part of the cut file that the score needs (for a late target, the
    head)."""
    import numpy as np
    import onnx
    from onnx.reference import ReferenceEvaluator

    head = onnx.utils.Extractor(cut_model).extract_model([spec.input, spec.layers[0]], [spec.scores])
    reads_image = spec.input in {v.name for v in head.graph.input}

    def objective(run, precision):
        def value_of(target) -> float:
            feeds = {spec.layers[0]: target.astype(precision)}
            if reads_image:
                feeds[spec.input] = batch.astype(precision)
            return selected_sum(run([spec.scores], feeds)[0], classes)
        return value_of

    try:
        run, precision = session(in_double(head)).run, np.float64
        objective(run, precision)(activation)
    except Exception:  # noqa: BLE001 - an op ONNX Runtime cannot run in float64 between the casts
        run, precision = session(head).run, np.float32
    yield objective(run, precision), "float64" if precision == np.float64 else "float32", FD_STEPS
    # wholly float64: steps small enough to stay between the kinks of ReLUs on wide layers (VGG's 4096-unit head)
    yield (objective(ReferenceEvaluator(in_float64(head)).run, np.float64), "float64, reference evaluator",
           (*FD_STEPS, 1e-5, 1e-6, 1e-7))


def in_float64(model):
    """The model with every float32 initializer, input, output and Cast in float64 (for the reference
    evaluator, which has float64 kernels for every operator)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float64), tensor.name))
    for info in [*graph.input, *graph.output]:
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            info.type.tensor_type.elem_type = TensorProto.DOUBLE
    del graph.value_info[:]
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name == "to" and node.op_type == "Cast" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.DOUBLE
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float64)))
    return model


def directional_error(objective, activation, gradient, directions, steps) -> float:
    """The worst relative error of central differences against <gradient, direction>, over the directions,
    each taking the best of `steps` (ReLU kinks favour small steps, float32 favours large ones)."""
    import numpy as np
    scale = float(np.sqrt(np.mean(activation.astype(np.float64) ** 2))) or 1.0
    worst = 0.0
    for direction in directions:
        direction = direction.astype(np.float64)
        direction *= scale / (np.sqrt(np.mean(direction ** 2)) or 1.0)
        analytic = float(np.sum(gradient.astype(np.float64) * direction))
        bound = float(np.linalg.norm(gradient) * np.linalg.norm(direction))
        best = float("inf")
        for step in steps:
            numeric = (objective(activation + step * direction) - objective(activation - step * direction)) / (2 * step)
            best = min(best, abs(analytic - numeric) / (max(abs(analytic), abs(numeric)) + 1e-5 * bound + 1e-12))
            if best <= FD_RTOL:
                break
        worst = max(worst, best)
    return worst


def target_op(plain_path: Path, target: str) -> str:
    import onnx
    model = onnx.load(str(plain_path), load_external_data=False)
    return next((n.op_type for n in model.graph.node if target in n.output), "?")


def run_module(module: str, model_name: str, params: int) -> dict:
    """Export, make explainable, explain and check one model; every outcome is a row."""
    import torch
    torch.set_num_threads(1)
    row = dict.fromkeys(COLUMNS, "")
    row.update(module=module, model=model_name, params=params)
    folder = KEPT / module  # the files of a model that is not ok are kept there, to look into
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        explain_and_check(row, model_name, folder)
        row["result"] = "ok"
        shutil.rmtree(folder)
    except ExportFailed as error:
        row.update(result="torch-export-failed", message=str(error))
    except Wrong as error:
        row.update(result=error.result, message=str(error))
    except Exception as error:  # noqa: BLE001 - the sweep records every failure
        from onnxcam.core.errors import OnnxcamError
        refused = isinstance(error, OnnxcamError)
        row.update(result="refused" if refused else "crashed", message=str(error) if refused else first_line(error))
    return row


def explain_and_check(row: dict, model_name: str, folder: Path) -> None:
    import numpy as np
    import torch

    import onnxcam
    import onnxcam.exporters
    timm = import_timm()
    model = with_live_head(timm.create_model(model_name, pretrained=False, num_classes=CLASSES).eval())
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    row["input"] = "x".join(str(v) for v in size)
    plain, explainable = folder / "plain.onnx", folder / "explainable.onnx"
    row["exporter"] = export_plain(model, size, plain)
    batch = np.random.default_rng(0).standard_normal((EXPLAIN_BATCH, *size)).astype(np.float32)
    check_plain(plain, model, batch)
    del model
    torch.set_grad_enabled(False)

    spec = onnxcam.exporters.export_onnx(plain, explainable)
    shape = onnxcam_shape(explainable, spec, batch)
    row.update(target=spec.layers[0], target_op=target_op(plain, spec.layers[0]), layout=spec.layouts[0],
               target_shape="x".join(str(v) for v in shape))
    result = onnxcam.Explainer(explainable, provider="cpu", threads=1).explain(batch, method="gradcam")
    row["grid"] = check_grid(spec.layouts[0], shape, size[1:])
    if result.heatmaps.shape != (EXPLAIN_BATCH, *size[1:]):
        raise Wrong("wrong-heatmap", f"heatmaps {result.heatmaps.shape}, expected {(EXPLAIN_BATCH, *size[1:])}")
    if not np.isfinite(result.heatmaps).all():
        raise Wrong("wrong-heatmap", "heatmaps are not finite")
    row["message"] = check_gradient(plain, explainable, spec, batch)


def with_live_head(model):
    """The model, with its classifier's weights drawn at random where timm initialises them to zero (MLP-Mixer,
    gMLP, Hiera): a score that depends on nothing is rightly refused, and no trained model has such a head."""
    import torch
    with torch.no_grad():
        for weight in model.get_classifier().parameters():  # a Linear, or a head holding one (Sequencer)
            if weight.ndim > 1 and not weight.abs().max() > 0:
                torch.nn.init.trunc_normal_(weight, std=0.02)
    return model


def onnxcam_shape(explainable: Path, spec, batch) -> list:
    """The target's shape at the explained batch (from one run, so symbolic sizes are resolved)."""
    import numpy as np
    classes = np.full(len(batch), -1, np.int64)
    activation = session(explainable).run([spec.activations[0]], {spec.input: batch, spec.class_input: classes})[0]
    return list(activation.shape)


# ---------------------------------------------------------------- the sweep

def read_rows(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    with path.open(newline="") as file:
        return {row["module"]: row for row in csv.DictReader(file)}


def write_tables(rows: dict[str, dict], csv_path: Path, md_path: Path) -> str:
    ordered = [rows[m] for m in sorted(rows)]
    with csv_path.open("w", newline="") as file:
        writer = csv.DictWriter(file, COLUMNS)
        writer.writeheader()
        writer.writerows(ordered)
    summary = summarise(ordered)
    lines = [f"# timm coverage of the ONNX front end\n\n{summary}\n",
             "| module | model | exporter | target | op | target shape | layout | grid | result | message |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in ordered:
        cells = [row[c] for c in ("module", "model", "exporter", "target", "target_op", "target_shape", "layout",
                                  "grid", "result", "message")]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return summary


def summarise(rows: list[dict]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["result"]] = counts.get(row["result"], 0) + 1
    exportable = len(rows) - counts.get("torch-export-failed", 0)
    ok = counts.get("ok", 0)
    share = 100 * ok / exportable if exportable else 0.0
    left_out = ", ".join(r["module"] for r in rows if r["result"] == "torch-export-failed") or "none"
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    return (f"Explained with checked gradients: {ok} of {exportable} architectures torch could export "
            f"({share:.1f}%; goal >= 95%). Results: {detail}. Left out (torch could not export): {left_out}.")


def load_picks() -> dict:
    return json.loads(PICKS.read_text()) if PICKS.exists() else {}


def pick(module: str, timeout: float) -> tuple[str, int]:
    picks = load_picks()
    if module not in picks:
        out = subprocess.run([sys.executable, __file__, "--pick", module], capture_output=True, text=True,
                             timeout=timeout, env=worker_env(), check=True)
        picks = load_picks()
        picks[module] = json.loads(out.stdout.strip().splitlines()[-1])
        PICKS.parent.mkdir(parents=True, exist_ok=True)
        PICKS.write_text(json.dumps(picks, indent=1))
    return tuple(picks[module])


def worker_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def sweep_one(module: str, timeout: float, log) -> dict:
    start = time.perf_counter()
    try:
        name, params = pick(module, timeout)
    except Exception as error:  # noqa: BLE001
        return {**dict.fromkeys(COLUMNS, ""), "module": module, "result": "torch-export-failed",
                "message": f"no model could be built: {first_line(error)}"}
    try:
        out = subprocess.run([sys.executable, __file__, "--worker", module, name, str(params)], capture_output=True,
                             text=True, timeout=timeout, env=worker_env(), check=False)
        log.write(f"===== {module} {name}\n{out.stderr[-4000:]}\n")
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if lines else {
            **dict.fromkeys(COLUMNS, ""), "module": module, "model": name, "params": params, "result": "crashed",
            "message": f"worker died (exit {out.returncode}): {(out.stderr.strip().splitlines() or [''])[-1][:300]}"}
    except subprocess.TimeoutExpired:
        row = {**dict.fromkeys(COLUMNS, ""), "module": module, "model": name, "params": params, "result": "crashed",
               "message": f"timed out after {timeout:.0f} s"}
    row["seconds"] = f"{time.perf_counter() - start:.0f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="modules to (re)run; repeatable")
    parser.add_argument("--force", action="store_true", help="rerun modules already in the CSV")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per module")
    parser.add_argument("--worker", nargs=3, metavar=("MODULE", "MODEL", "PARAMS"), help=argparse.SUPPRESS)
    parser.add_argument("--pick", metavar="MODULE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pick:
        print(json.dumps(smallest_model(args.pick)))
        return
    if args.worker:
        module, name, params = args.worker
        print(json.dumps(run_module(module, name, int(params))))
        return
    csv_path, md_path = RESULTS / "coverage.csv", RESULTS / "coverage.md"
    rows = read_rows(csv_path)
    modules = args.only or import_timm().list_modules()
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with LOG.open("a") as log:
        for module in modules:
            if module in rows and not (args.force or args.only):
                continue
            rows[module] = sweep_one(module, args.timeout, log)
            log.flush()
            print(f"{module:28s} {rows[module]['model']:36s} {rows[module]['result']:20s} "
                  f"{rows[module]['message'][:100]}", flush=True)
            write_tables(rows, csv_path, md_path)
    print(write_tables(rows, csv_path, md_path))


if __name__ == "__main__":
    main()
