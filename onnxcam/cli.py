"""The `onnxcam` command: export, inspect, explain, evaluate, bench, serve, demo. A thin layer over the API."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import click

from .core import COLORMAPS
from .batch import collect_images, explain_files
from .exporters import ExportError, export_onnx
from .explainer import ALL_METHODS, ExplainError, Explainer
from .images import ImageError
from .runtimes import ProviderError

USER_ERRORS = (ExportError, ExplainError, ImageError, ProviderError)


class Failed(click.ClickException):
    """One line on stderr and exit status 1, no traceback."""

    def show(self, file=None):
        click.echo(f"error: {self.message}", err=True)


def _triple(text: str | None):
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a comma-separated list of numbers") from None


@click.group()
def main():
    """Grad-CAM and its family for ONNX models, with no PyTorch at explanation time."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("onnxcam").setLevel(logging.INFO)


@main.command()
@click.argument("model")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Explainable ONNX file to write.")
@click.option("--target-layer", "targets", multiple=True, help="Module name (PyTorch) or tensor name (ONNX); repeatable.")
@click.option("--input-size", type=int, default=224, show_default=True, help="Square input side for PyTorch models.")
@click.option("--weights", type=click.Path(dir_okay=False), help="State dict to load into a PyTorch model.")
@click.option("--mean", help="Normalisation mean, R,G,B (recorded for `explain`).")
@click.option("--std", help="Normalisation std, R,G,B.")
@click.option("--labels", type=click.Path(dir_okay=False), help="Text file with one class name per line.")
@click.option("--score-output", help="ONNX output holding the class scores (default: the first).")
@click.option("--layout", "layouts", multiple=True, help="Per target: nchw, nhwc or tokens:P:HxW (default: guessed).")
@click.option("--grad-rollout", "attention_gradients", is_flag=True,
              help="Also export attention gradients, for method grad-rollout (a backward pass through every block).")
@click.option("--bundle", "bundled", is_flag=True,
              help="One file taking encoded image bytes, returning logits and the Grad-CAM heatmap (onnxruntime-extensions).")
def export(model, out, targets, input_size, weights, mean, std, labels, score_output, layouts, attention_gradients,
           bundled):
    """Make MODEL explainable: MODEL is package.module:callable returning a torch.nn.Module, or an .onnx file."""
    names = _read_labels(labels)
    options = dict(target_layers=list(targets) or None, mean=_triple(mean), std=_triple(std), labels=names,
                   layouts=list(layouts) or None, attention_gradients=attention_gradients, bundled=bundled)
    try:
        if model.endswith(".onnx"):
            spec = export_onnx(model, out, output=score_output, **options)
        else:
            from .exporters import export_torch

            spec = export_torch(_load_module(model, weights), out, input_shape=(3, input_size, input_size), **options)
    except USER_ERRORS as error:
        raise Failed(str(error)) from None
    click.echo(f"wrote {out}: targets {', '.join(spec.layers)}, {spec.num_classes} classes, "
               f"input {spec.input_size[0]}x{spec.input_size[1]}")


def _read_labels(path):
    if path is None:
        return None
    try:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as error:
        raise Failed(f"{path}: {error.strerror}") from None


def _load_module(spec: str, weights):
    """Import package.module:callable (from the current folder too), call it, load a state dict."""
    if ":" not in spec:
        raise ExportError(f"'{spec}' is neither an .onnx file nor package.module:callable")
    module_name, _, attribute = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise ExportError(f"cannot load {spec}: {error}") from None
    finally:
        sys.path.remove(os.getcwd())
    import torch

    model = target()
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as error:  # torch.load reports a bad file with many exception types
            raise ExportError(f"{weights}: cannot load as a state dict for {spec} ({str(error).splitlines()[0]})") from None
    return model


@main.command()
@click.argument("model")
@click.option("--input-size", type=int, default=224, show_default=True)
def inspect(model, input_size):
    """List the layers (PyTorch) or tensors (ONNX) of MODEL with their shapes; * marks the default target."""
    try:
        if model.endswith(".onnx"):
            rows, default = _onnx_rows(model)
        else:
            from .exporters import default_layer, module_outputs

            module = _load_module(model, None)
            rows = module_outputs(module, (3, input_size, input_size))
            default = default_layer(module, (3, input_size, input_size))
    except USER_ERRORS as error:
        raise Failed(str(error)) from None
    width = max(len(name) for name, _ in rows)
    for name, shape in rows:
        shape_text = "?" if shape is None else " x ".join("N" if d is None else str(d) for d in shape)
        click.echo(f"{'*' if name == default else ' '} {name:<{width}}  {shape_text}")


def _onnx_rows(path):
    from onnx import shape_inference

    from .exporters.graph import GraphBuilder
    from .exporters.onnx_frontend import default_target, load_model, read_spec, tensor_shapes

    model = load_model(path)
    spec = read_spec(model)
    if spec is not None:
        click.echo(f"explainable: targets {', '.join(spec.layers)}, {spec.num_classes} classes")
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = tensor_shapes(model, GraphBuilder(model))
    return list(shapes.items()), default_target(model, model.graph.output[0].name, shapes) if spec is None else None


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("images", nargs=-1, required=True)
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False), help="Folder for the overlays.")
@click.option("--method", default="gradcam", show_default=True, type=click.Choice(ALL_METHODS))
@click.option("--target", type=int, help="Class index to explain for every image (default: each image's top-1).")
@click.option("--provider", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--save-npy", is_flag=True, help="Also write each heatmap as a float32 .npy at the model's resolution.")
@click.option("--alpha", default=0.4, show_default=True, type=click.FloatRange(0, 1), help="Heatmap opacity.")
@click.option("--colormap", default="jet", show_default=True, type=click.Choice(list(COLORMAPS)))
def explain(model, images, outdir, method, target, provider, batch_size, save_npy, alpha, colormap):
    """Write an overlay PNG per image (files or folders) and predictions.json with the top-5 classes."""
    try:
        explainer = Explainer(model, provider=provider)
        explainer.class_indices(target, 1)
    except USER_ERRORS as error:
        raise Failed(str(error)) from None
    except Exception as error:  # onnxruntime refuses files that are not models with its own exception types
        raise Failed(f"{model}: cannot be loaded by ONNX Runtime ({str(error).splitlines()[0]})") from None
    failures = explain_files(explainer, collect_images(images), Path(outdir), method=method, target=target,
                              batch_size=batch_size, save_npy=save_npy, alpha=alpha, colormap=colormap)
    if failures:
        raise Failed(f"{failures} image(s) could not be explained")


@main.command()
@click.option("-o", "--output", "outdir", default="onnxcam-demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--method", default="gradcam", show_default=True, type=click.Choice(ALL_METHODS))
@click.option("--provider", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
def demo(outdir, method, provider):
    """Explain bundled photos with a pretrained EfficientNet-Lite0 (exported once, then cached)."""
    try:
        from .demo import run_demo
    except ImportError as error:
        raise Failed(f"the demo needs its extra: pip install 'onnxcam[demo]' ({error})") from None
    try:
        run_demo(Path(outdir), method=method, provider=provider)
    except USER_ERRORS as error:
        raise Failed(str(error)) from None


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--name", help="Model name in the /v2 routes (default: the file's stem).")
@click.option("--provider", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1), help="Images per session run.")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="How long the first request of a batch waits for others.")
@click.option("--queue-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--max-body", default=32 * 2 ** 20, show_default=True, type=click.IntRange(min=1), help="Bytes.")
def serve(model, host, port, name, provider, max_batch, max_wait_ms, queue_size, max_body):
    """Serve MODEL over HTTP: Open Inference Protocol routes, POST /explain, a web page at /, /metrics."""
    try:
        import uvicorn

        from .server import create_app
    except ImportError as error:
        raise Failed(f"serving needs its extra: pip install 'onnxcam[serve]' ({error})") from None
    try:
        app = create_app(model, name=name, provider=provider, max_batch=max_batch, max_wait_ms=max_wait_ms,
                         queue_size=queue_size, max_body=max_body)
    except USER_ERRORS as error:
        raise Failed(str(error)) from None
    uvicorn.run(app, host=host, port=port, log_level="warning")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("images", nargs=-1, required=True)
@click.option("--method", default="gradcam", show_default=True, type=click.Choice(ALL_METHODS))
@click.option("--boxes", type=click.Path(dir_okay=False),
              help="JSON: image file name -> [x0, y0, x1, y1] of the object, in image pixels (adds the pointing game).")
@click.option("--steps", default=32, show_default=True, type=click.IntRange(min=2), help="Deletion/insertion steps.")
@click.option("--tolerance", default=15, show_default=True, type=click.IntRange(min=0),
              help="Pointing game tolerance, in the model's input pixels.")
@click.option("--provider", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
def evaluate(model, images, method, boxes, steps, tolerance, provider):
    """Faithfulness of METHOD's maps: Average Drop, Increase in Confidence, deletion and insertion AUC,
    pointing game. Prints a JSON report."""
    import json

    from .evaluation import evaluate as run_evaluation
    from .images import read_image

    try:
        explainer = Explainer(model, provider=provider)
        paths = collect_images(images)
        pictures = [read_image(p) for p in paths]
        scaled = None
        if boxes:
            given = json.loads(Path(boxes).read_text())
            height, width = explainer.spec.input_size
            scaled = []
            for path, picture in zip(paths, pictures):
                if path.name not in given:
                    raise ExplainError(f"{boxes} has no box for {path.name}")
                x0, y0, x1, y1 = given[path.name]
                sy, sx = height / picture.shape[0], width / picture.shape[1]
                scaled.append((x0 * sx, y0 * sy, x1 * sx, y1 * sy))
        report = run_evaluation(explainer, pictures, method=method, boxes=scaled, steps=steps, tolerance=tolerance)
    except (*USER_ERRORS, OSError, ValueError) as error:
        raise Failed(str(error)) from None
    click.echo(json.dumps({"model": model, "method": method, "images": len(pictures), **vars(report)}, indent=2))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--batch-size", "batches", multiple=True, type=click.IntRange(min=1), default=(1, 8), show_default=True)
@click.option("--method", "methods", multiple=True, type=click.Choice(ALL_METHODS), default=("gradcam",),
              show_default=True)
@click.option("--provider", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=3))
def bench(model, batches, methods, provider, threads, repeats):
    """Time explanations against inference on one session: the floor is the same session asked for
    the scores only; each method is a whole explain() call (session run and numpy core)."""
    import numpy as np

    from .timing import interleaved

    try:
        explainer = Explainer(model, provider=provider, threads=threads)
    except USER_ERRORS as error:
        raise Failed(str(error)) from None
    spec = explainer.spec
    height, width = spec.input_size
    channels = len(spec.mean) if spec.mean else 3
    click.echo(f"{'batch':>5}  {'configuration':<24}{'median ms':>10}{'images/s':>10}{'x floor':>9}")
    for batch_size in batches:
        batch = np.random.default_rng(0).standard_normal((batch_size, channels, height, width)).astype(np.float32)
        classes = np.full(batch_size, -1, np.int64)
        calls = {"inference (scores only)": lambda: explainer.session.run(
            [spec.scores], {spec.input: batch, spec.class_input: classes})}
        calls.update({method: (lambda m=method: explainer.explain(batch, method=m)) for method in methods})
        medians = {name: float(np.median(t)) * 1000 for name, t in interleaved(calls, repeats, 30.0).items()}
        floor = medians["inference (scores only)"]
        for name, ms in medians.items():
            click.echo(f"{batch_size:>5}  {name:<24}{ms:>10.1f}{batch_size / ms * 1000:>10.1f}{ms / floor:>9.2f}")
