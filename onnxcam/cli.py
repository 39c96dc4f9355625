"""The `onnxcam` command: export, inspect, explain, evaluate, bench, serve, demo. A thin layer over the API."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pkgutil
import sys
from pathlib import Path

import click

from . import __version__
from .core import COLORMAPS
from .core.detections import guess_detection_layout, yolo_layout
from .core.errors import ExplainError, ExportError, OnnxcamError
from .evaluation import evaluate_files
from .explainer import Explainer
from .exporters import export_onnx
from .exporters.graph_cams import GRAPH_CAMS
from .exporters.onnx_frontend import inspect_onnx
from .jobs import Listing, Outputs, collect_images, explain_files
from .methods import METHODS
from .runtimes import PROVIDER_CHOICES
from .speed import time_methods
from .targets import LAYOUTS as DETECTION_LAYOUTS
from .targets import from_options

EXPORT_TASKS = ("classify", "segment", "detect")
# the flag of each keyword argument that errors name (OnnxcamError.option)
FLAGS = {"save": "--save", "layers": "--layer", "layouts": "--layout", "mean": "--mean", "std": "--std",
         "attention_gradients": "--grad-rollout", "input_gradients": "--input-gradients", "output": "--scores",
         "input_size": "--input-size", "input": "--input", "input_layout": "--input-layout", "targets": "--task",
         "batch_size": "--batch-size", "legrad": "--legrad", "task": "--task",
         "web": "--web", "ort_web": "--ort-web"}


class Failed(click.ClickException):
    """One line on stderr and exit status 1, no traceback."""

    def show(self, file=None):
        click.echo(f"error: {self.message}", err=True)

    @classmethod
    def of(cls, error: OnnxcamError) -> Failed:
        """The error as the command line says it: the option that fixes it is named by its flag."""
        return cls(error.describe(lambda option: FLAGS.get(option, option)))


def _triple(text: str | None):
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a comma-separated list of numbers") from None


def _renamed(old: str, new: str, **attributes):
    """An option under its old spelling: hidden, still taken, with one line on stderr naming the new one."""
    def warn(ctx, param, value):
        if value not in (None, (), False):
            click.echo(f"onnxcam: {old} is now {new}; the old spelling will be removed", err=True)
        return value

    return click.option(old, hidden=True, callback=warn, **attributes)


def _options(*options):
    """Several options as one decorator, in the order they are listed."""
    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


provider_option = click.option("--provider", default="auto", show_default=True, type=click.Choice(PROVIDER_CHOICES),
                                help="Where the sessions run: cpu, cuda, auto (CUDA where it really loads), or "
                                "openvino (the OpenVINO runtime, on the CPU).")
method_option = click.option("--method", default="gradcam", show_default=True, type=click.Choice(list(METHODS)),
                             help="The method (see the method table in the documentation).")
image_input_options = _options(
    click.option("--input-size", "input_size", callback=lambda c, p, v: _size(v),
                 help="H x W (or one side) to explain at: fixes an ONNX file's dynamic sizes; PyTorch default 224."),
    click.option("--input", "image_input", help="ONNX: the image input, where there are several."),
    click.option("--input-layout", type=click.Choice(["nchw", "nhwc"]),
                 help="ONNX: the image input's layout (default: nhwc when its last dimension is 1 or 3)."),
)


@click.group()
@click.version_option(__version__, prog_name="onnxcam")
def main():
    """Grad-CAM and its family for ONNX models, with no PyTorch at explanation time."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("onnxcam").setLevel(logging.INFO)


@main.command()
@click.argument("model")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Explainable ONNX file to write.")
@click.option("--layer", "layers", multiple=True,
              help="The layer to explain (the target layer): module name (PyTorch) or tensor name (ONNX); repeatable.")
@_renamed("--target-layer", "--layer", multiple=True)
@image_input_options
@click.option("--weights", type=click.Path(dir_okay=False), help="State dict to load into a PyTorch model.")
@click.option("--mean", help="Normalisation mean, R,G,B (recorded for `explain`).")
@click.option("--std", help="Normalisation std, R,G,B.")
@click.option("--labels", type=click.Path(dir_okay=False), help="Text file with one class name per line.")
@click.option("--scores", help="ONNX: the output holding the class scores the maps explain (default: the first).")
@_renamed("--score-output", "--scores")
@click.option("--layout", "layouts", multiple=True, help="Per layer: nchw, nhwc or tokens:P:HxW (default: guessed).")
@click.option("--task", type=click.Choice(EXPORT_TASKS),
              help="What the scores hold, for the default layers: class scores, K x h x w maps, or a detector's raw "
                   "head (default: detect where the output is a YOLOv5/v8/v11 head's for the input size, segment "
                   "where it is a map over the image, classify otherwise).")
@click.option("--grad-rollout", "attention_gradients", is_flag=True,
              help="Also export attention gradients, for method grad-rollout (a backward pass through every block).")
@click.option("--legrad", is_flag=True,
              help="Also export each block's gradient of its layer score (the readout applied to the block's "
                   "output), for method legrad (a short backward pass per block).")
@click.option("--input-gradients", "input_gradients", is_flag=True,
              help="Also export the gradient down to the image, for guided-backprop, guided-gradcam, saliency, "
                   "smoothgrad, integrated-gradients (a backward pass through the whole network).")
@click.option("--bundle", "bundled", is_flag=True,
              help="One file taking encoded image bytes, returning logits and the Grad-CAM heatmap "
                   "(onnxruntime-extensions).")
@click.option("--heatmaps", type=click.Choice(list(GRAPH_CAMS)),
              help="Also compute this CAM's heatmaps in the graph (output onnxcam_heatmaps, standard ONNX operators), "
                   "for runtimes with no Python beside them.")
@click.option("--explain-probabilities", is_flag=True,
              help="Where the scores are a softmax or sigmoid of logits, explain the probabilities themselves "
                   "(default: the logits, the class score before the squashing, as Grad-CAM defines it).")
@click.option("--web", type=click.Path(file_okay=False),
              help="Also write a static site here that explains in the browser with onnxruntime-web: the image never "
                   "leaves the device (heatmaps default to gradcam).")
@click.option("--ort-web", type=click.Path(file_okay=False),
              help="onnxruntime-web's dist folder (npm install onnxruntime-web), copied into the site; without it the "
                   "page loads the pinned version from a CDN, checked by subresource integrity.")
@click.option("--triton-repo", type=click.Path(file_okay=False),
              help="Also write a Triton model repository for the file here (model.onnx and config.pbtxt).")
def export(model, out, layers, target_layer, input_size, image_input, input_layout, weights, mean, std, labels, scores,
           score_output, layouts, task, attention_gradients, legrad, input_gradients, bundled, heatmaps,
           explain_probabilities, web, ort_web, triton_repo):
    """Make MODEL explainable: MODEL is package.module:callable returning a torch.nn.Module, or an .onnx file."""
    names = _read_labels(labels)
    layers, scores = list(layers + target_layer), scores or score_output
    options = dict(layers=layers or None, mean=_triple(mean), std=_triple(std), labels=names,
                   layouts=list(layouts) or None, attention_gradients=attention_gradients, bundled=bundled,
                   input_gradients=input_gradients, legrad=legrad, explain_probabilities=explain_probabilities,
                   heatmaps=heatmaps, task=task, web=web, ort_web=ort_web)
    try:
        if model.endswith(".onnx"):
            spec = export_onnx(model, out, input=image_input, input_layout=input_layout, input_size=input_size,
                               output=scores, **options)
        else:
            from .exporters import export_torch

            spec = export_torch(_load_module(model, weights), out, input_shape=(3, *(input_size or (224, 224))),
                                **options)
    except OnnxcamError as error:
        raise Failed.of(error) from None
    height, width = spec.input_size
    squashing = f" = {spec.squashing}('{spec.logits}'); explained before the {spec.squashing}" if spec.squashing else ""
    click.echo(f"wrote {out}: input '{spec.input}' {spec.input_layout} {height}x{width} {spec.input_type}, scores "
               f"'{spec.scores}' ({_holding(spec, task)}){squashing}, layers {', '.join(spec.layers)}")
    if web:
        click.echo(f"wrote {Path(web) / 'index.html'}: serve the folder and open it in a browser")
    if triton_repo:
        from .triton import write_repository

        click.echo(f"wrote {write_repository(out, triton_repo) / 'config.pbtxt'} and the model beside it")


def _holding(spec, task: str | None) -> str:
    """What the export line says the scores hold: the number of classes, or for a detector's head the task, its
    layout, classes and anchors, and whether the task was guessed (export_onnx's rule)."""
    layout = yolo_layout(spec.score_shape or [], spec.input_size)
    if task is None and layout is None:
        return f"{spec.num_classes} classes"
    if task not in (None, "detect") or len(spec.score_shape or []) != 2:
        return f"{spec.num_classes} classes, task {task}"
    rows, columns = spec.score_shape
    layout = layout or guess_detection_layout(tuple(spec.score_shape))
    head = {"yolov8": f"a YOLOv8/v11 head, {rows - 4} classes at {columns} anchors",
            "yolov5": f"a YOLOv5 head, {columns - 5} classes at {rows} anchors"}.get(layout, "detections after NMS")
    return f"{head}, task detect{' guessed from its shape' if task is None else ''}"


def _size(text: str | None) -> tuple[int, int] | None:
    """'HxW' or 'N' (a square side) as (H, W)."""
    if text is None:
        return None
    try:
        sides = [int(v) for v in text.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise click.BadParameter(f"'{text}' is not a size: give H x W such as 48x192, or one side")
    return (sides[0], sides[-1])


def _reporting() -> dict:
    """Where the jobs tell their progress: a line per image on stdout, a line per bad image on stderr."""
    return {"report": click.echo, "complain": lambda line: click.echo(f"error: {line}", err=True)}


def _read_labels(path):
    if path is None:
        return None
    try:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as error:
        raise Failed(f"{path}: {error.strerror}") from None


def _load_module(spec: str, weights):
    """Resolve package.module:callable (from the current folder too), call it, load a state dict."""
    if ":" not in spec:
        raise ExportError(f"'{spec}' is neither an .onnx file nor package.module:callable")
    sys.path.insert(0, os.getcwd())
    try:
        target = pkgutil.resolve_name(spec)
    except (ImportError, AttributeError, ValueError) as error:
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
            reason = str(error).splitlines()[0]
            raise ExportError(f"{weights}: cannot load as a state dict for {spec} ({reason})") from None
    return model


@main.command()
@click.argument("model")
@image_input_options
@click.option("--task", type=click.Choice(EXPORT_TASKS),
              help="ONNX: what the output holds, for the default layers (default: guessed, as export does).")
def inspect(model, input_size, image_input, input_layout, task):
    """List the layers (PyTorch) or tensors (ONNX) of MODEL with their shapes. Tensors that lie on a grid over the
    image, the layers that can be explained, show their layout; * marks the default layers."""
    try:
        if model.endswith(".onnx"):
            survey = inspect_onnx(model, input=image_input, input_layout=input_layout, input_size=input_size,
                                  task=task)
            rows, defaults = survey.rows, survey.defaults
            if survey.spec is not None:
                click.echo(f"explainable: layers {', '.join(survey.spec.layers)}, {survey.spec.num_classes} classes")
        else:
            from .exporters import default_layer, module_outputs

            module = _load_module(model, None)
            size = (3, *(input_size or (224, 224)))
            rows = [(name, shape, None) for name, shape in module_outputs(module, size)]
            defaults = [default_layer(module, size)]
    except OnnxcamError as error:
        raise Failed.of(error) from None
    width = max(len(name) for name, _, _ in rows)
    for name, shape, grid in rows:
        shape_text = "?" if shape is None else " x ".join("N" if d is None else str(d) for d in shape)
        star = "*" if name in defaults else " "
        click.echo(f"{star} {name:<{width}}  {shape_text}" + (f"  [{grid}]" if grid else ""))


def _target_options(command):
    """explain's options for targets beyond one class (onnxcam.targets)."""
    options = [
        click.option("--top", type=click.IntRange(min=1), help="Explain each image's K best classes."),
        click.option("--task", type=click.Choice(["classify", "segment", "detect", "embed"]), default="classify",
                     show_default=True, help="What the output holds: class scores, K x h x w maps, a detector's "
                     "raw head (YOLOv5/v8) or its detections after NMS, an embedding."),
        click.option("--score-threshold", type=click.FloatRange(0, 1), default=0.25, show_default=True,
                     help="--task detect: explain each detection scoring at least this."),
        click.option("--detection-layout", type=click.Choice(DETECTION_LAYOUTS),
                     help="--task detect: the head's layout (default: guessed for YOLO and NMS heads; detr and "
                          "rtdetr, for DETR-style class logits, read the boxes from another output)."),
        click.option("--boxes", help="--task detect with a detr or rtdetr layout: the output holding the boxes "
                                     "(default: the one other output of Q x 4)."),
        click.option("--concept", type=click.Path(dir_okay=False, exists=True),
                     help="--task embed: a .npy vector; the map explains the cosine similarity to it."),
        click.option("--explain-output", help="The model output the maps explain, by its name (default: the scores "
                     "the file was exported with)."),
        _renamed("--score-output", "--explain-output"),
    ]
    return _options(*options)(command)


def _target_of(classes: tuple[int, ...], top: int | None, task: str, score_threshold: float, concept: str | None,
               explain_output: str | None, score_output: str | None, detection_layout: str | None = None,
               boxes: str | None = None):
    """The `targets` for Explainer.explain that explain's options ask for: None (top-1), a class, or a Target."""
    if task == "embed" and concept is None:
        raise ExplainError("--task embed needs --concept FILE.npy, the vector to compare embeddings with")
    vector = None
    if concept is not None:
        import numpy as np

        vector = np.load(concept)
    return from_options(classes, top=top, task=task, score_threshold=score_threshold, concept=vector,
                        output=explain_output or score_output, layout=detection_layout, boxes=boxes)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("images", nargs=-1)
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Folder for the results.")
@click.option("-r", "--recursive", is_flag=True, help="Also the images in the folders inside the folders given.")
@click.option("--from-list", "list_file", type=click.Path(dir_okay=False),
              help="File with one image path or URI per line.")
@method_option
@click.option("--class", "classes", type=int, multiple=True,
              help="Class index to explain for every image; repeatable (default: each image's top-1).")
@_renamed("--target", "--class", type=int, multiple=True)
@_target_options
@provider_option
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--save", default="overlays", show_default=True,
              help="What to write, comma-separated: overlays, heatmaps, table (Parquet).")
@click.option("--format", "image_format", default="png", show_default=True, type=click.Choice(["png", "jpeg"]),
              help="Overlay file format.")
@click.option("--heatmap-format", default="png", show_default=True, type=click.Choice(["png", "npy"]),
              help="Heatmap files: 8-bit PNG or float16 .npy, at the model's resolution.")
@click.option("--alpha", default=0.4, show_default=True, type=click.FloatRange(0, 1), help="Heatmap opacity.")
@click.option("--colormap", default="jet", show_default=True, type=click.Choice(list(COLORMAPS)))
@click.option("--workers", type=click.IntRange(min=1), help="Threads decoding, and threads writing (default: cores).")
@click.option("--rows-per-part", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="Table rows per Parquet file.")
@click.option("--resume", is_flag=True, help="Skip the images the record in the output folder holds.")
@click.option("-v", "--verbose", is_flag=True, help="A line per image instead of the progress bar.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None,
              help="Run on a Ray cluster: its ADDRESS, or alone for RAY_ADDRESS's or a new local one.")
@click.option("--actors", default=1, show_default=True, type=click.IntRange(min=1),
              help="With --ray: actors, each holding one session (one GPU each where the cluster has GPUs) "
                   "and --workers cores (default: the cluster's shared out).")
def explain(model, images, outdir, recursive, list_file, method, classes, target, provider, batch_size, save,
            image_format, heatmap_format, alpha, colormap, workers, rows_per_part, resume, verbose, ray_address, actors,
            **targeting):
    """Explain images (files, folders, a list): overlays, heatmaps and/or a Parquet table in OUTPUT, with a
    record of finished images (record.jsonl) that --resume continues from, and predictions.json."""
    if not images and not list_file:
        raise Failed("no images given: name files or folders, or --from-list FILE")
    sources = Listing(images, recursive, list_file)
    try:
        outputs = Outputs.parse(save, image_format=image_format, heatmap_format=heatmap_format, alpha=alpha,
                                colormap=colormap, rows_per_part=rows_per_part)
    except OnnxcamError as error:
        raise Failed.of(error) from None
    try:
        target = _target_of(classes + target, **targeting)
    except OnnxcamError as error:
        raise Failed.of(error) from None
    if ray_address is not None:
        return _explain_on_ray(model, sources, Path(outdir), outputs, ray_address, actors, resume, verbose, workers,
                               method=method, target=target, batch_size=batch_size, provider=provider)
    try:
        explainer = Explainer(model, provider=provider)
        if isinstance(target, int):
            explainer.class_indices(target, 1)
    except OnnxcamError as error:
        raise Failed.of(error) from None
    except Exception as error:  # noqa: BLE001 - onnxruntime refuses non-models with its own exception types
        raise Failed(f"{model}: cannot be loaded by ONNX Runtime ({str(error).splitlines()[0]})") from None
    with _progress(verbose) as reporting:
        try:
            summary = explain_files(explainer, sources, Path(outdir), method=method, target=target,
                                    batch_size=explainer.fixed_batch or batch_size, outputs=outputs, resume=resume,
                                    workers=workers,
                                    **reporting)
        except OnnxcamError as error:
            raise Failed.of(error) from None
    _summarise(summary.explained, summary.failed, summary.skipped, outdir)


def _summarise(explained: int, failed: int, skipped: int, outdir) -> None:
    """The one line that ends a run, and exit status 1 when images failed."""
    before = f" ({skipped:,} done before)" if skipped else ""
    click.echo(f"explained {explained:,} image(s), {failed:,} failed{before}; results in {outdir}")
    if failed:
        raise Failed(f"{failed} image(s) could not be explained")


@contextlib.contextmanager
def _progress(verbose: bool):
    """Callbacks for a job: a progress bar on a terminal (tqdm, images/s and time left), or a line per image
    with --verbose; errors on stderr, one line each."""
    bar = None
    if not verbose and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            bar = tqdm(unit="img", file=sys.stderr, dynamic_ncols=True, smoothing=0.05)
        except ImportError:
            pass

    def advance(done: int, total: int | None) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    def complain(line: str) -> None:
        (bar.write if bar is not None else click.echo)(f"error: {line}", file=sys.stderr)

    try:
        yield {"report": click.echo if verbose else None, "complain": complain, "progress": advance}
    finally:
        if bar is not None:
            bar.close()


def _explain_on_ray(model, sources, outdir: Path, outputs, address: str, actors: int, resume: bool, verbose: bool,
                    workers: int | None, **options):
    """`explain --ray`: the same job on a Ray cluster (onnxcam.ray), `workers` the cores of each actor."""
    try:
        from .ray import explain_on_ray
    except ImportError as error:
        raise Failed(f"--ray needs its extra: pip install 'onnxcam[ray]' ({error})") from None
    if not verbose:  # Ray's own logs
        logging.getLogger("ray").setLevel(logging.ERROR)
    with _progress(verbose) as reporting:
        try:
            summary = explain_on_ray(model, sources, outdir, address=address or None, actors=actors, cpus=workers,
                                     outputs=outputs, resume=resume, **options, **reporting)
        except OnnxcamError as error:
            raise Failed.of(error) from None
    _summarise(summary.explained, summary.failed, summary.skipped, outdir)


@main.command()
@click.option("-o", "--output", "outdir", default="onnxcam-demo", show_default=True, type=click.Path(file_okay=False))
@method_option
@provider_option
def demo(outdir, method, provider):
    """Explain bundled photos with a pretrained EfficientNet-Lite0 (exported once, then cached)."""
    try:
        from .demo import run_demo
    except ImportError as error:
        raise Failed(f"the demo needs its extra: pip install 'onnxcam[demo]' ({error})") from None
    try:
        run_demo(Path(outdir), method=method, provider=provider, **_reporting())
    except OnnxcamError as error:
        raise Failed.of(error) from None


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--name", help="Model name in the /v2 routes (default: the file's stem).")
@provider_option
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1), help="Images per session run.")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="How long the first request of a batch waits for others.")
@click.option("--queue-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--max-body", default=32 * 2 ** 20, show_default=True, type=click.IntRange(min=1), help="Bytes.")
@click.option("--api-key", envvar="ONNXCAM_API_KEY", help="Bearer token every route but health and metrics needs "
              "(also read from ONNXCAM_API_KEY).")
@click.option("--request-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds within which each request is answered (408/504 otherwise).")
@click.option("--drain-delay", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="On SIGTERM: seconds to keep serving with readiness false before closing (Kubernetes rollouts).")
def serve(model, host, port, name, provider, max_batch, max_wait_ms, queue_size, max_body, api_key, request_timeout,
          drain_delay):
    """Serve MODEL over HTTP: Open Inference and KServe V1 routes, POST /explain, a web page at /, /metrics."""
    try:
        from .serving import create_app, run
    except ImportError as error:
        raise Failed(f"serving needs its extra: pip install 'onnxcam[serve]' ({error})") from None
    try:
        app = create_app(model, name=name, provider=provider, max_batch=max_batch, max_wait_ms=max_wait_ms,
                         queue_size=queue_size, max_body=max_body, api_key=api_key, request_timeout=request_timeout)
    except OnnxcamError as error:
        raise Failed.of(error) from None
    run(app, host=host, port=port, drain_delay=drain_delay, api_key=bool(api_key))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("images", nargs=-1, required=True)
@method_option
@click.option("--boxes", type=click.Path(dir_okay=False),
              help="JSON: image file name -> [x0, y0, x1, y1] of the object, in image pixels (adds the pointing game).")
@click.option("--steps", default=32, show_default=True, type=click.IntRange(min=2), help="Deletion/insertion steps.")
@click.option("--tolerance", default=15, show_default=True, type=click.IntRange(min=0),
              help="Pointing game tolerance, in the model's input pixels.")
@provider_option
@click.option("--road", "with_road", is_flag=True, help="Also ROAD (MoRF and LeRF; seconds per image).")
def evaluate(model, images, method, boxes, steps, tolerance, provider, with_road):
    """Faithfulness of METHOD's maps: Average Drop, Increase in Confidence, deletion and insertion AUC,
    pointing game. Prints a JSON report."""
    try:
        explainer = Explainer(model, provider=provider)
        paths = collect_images(images)
        report = evaluate_files(explainer, paths, boxes, method=method, steps=steps, tolerance=tolerance,
                                with_road=with_road)
    except OnnxcamError as error:
        raise Failed.of(error) from None
    except (OSError, ValueError) as error:
        raise Failed(str(error)) from None
    click.echo(json.dumps({"model": model, "method": method, "images": len(paths), **vars(report)}, indent=2))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--batch-size", "batches", multiple=True, type=click.IntRange(min=1), default=(1, 8), show_default=True)
@click.option("--method", "methods", multiple=True, type=click.Choice(list(METHODS)), default=("gradcam",),
              show_default=True, help="A method to time; repeatable.")
@provider_option
@click.option("--threads", type=click.IntRange(min=1), help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=3))
def bench(model, batches, methods, provider, threads, repeats):
    """Time explanations against inference on one session: the floor is the same session asked for
    the scores only; each method is a whole explain() call (session run and numpy core)."""
    try:
        explainer = Explainer(model, provider=provider, threads=threads)
    except OnnxcamError as error:
        raise Failed.of(error) from None
    click.echo(f"{'batch':>5}  {'configuration':<24}{'median ms':>10}{'images/s':>10}{'x floor':>9}")
    for row in time_methods(explainer, batches, methods, repeats):
        click.echo(f"{row.batch:>5}  {row.name:<24}{row.median_ms:>10.1f}{row.images_per_s:>10.1f}"
                   f"{row.times_floor:>9.2f}")
