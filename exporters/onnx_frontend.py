"""Make any ONNX classifier explainable: class selection, gradients and metadata in one graph."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, version_converter

from ..core.contract import CLASS_INPUT, LOGITS_OUTPUT, METADATA_KEY, SELECTED_OUTPUT, ExplainSpec
from ..core.detections import guess_detection_layout, yolo_layout
from ..core.errors import ExportError, renamed
from ..core.files import atomic_path
from ..core.layouts import attention_layout, check_layout, guess_layout
from .autodiff import (
    NON_DIFFERENTIABLE,
    QUANTIZED_RULES,
    RULES,
    GraphBuilder,
    Value,
    append_gradients,
    expose_dequantized,
    prune,
)
from .bundle import bundle
from .discovery import (
    ImageInput,
    attention_probabilities,
    attention_token_counts,
    default_target,
    detection_default,
    grid_candidates,
    image_input,
    is_attention_matrix,
    one_hot_seed,
)
from .functions import expand_functions
from .graph_cams import add_heatmaps
from .head import head_cuts
from .input_gradients import add_input_gradients
from .legrad import layer_scores
from .precision import float32_edges
from .recurrent import expand_recurrent
from .shapes import infer_shapes, tensor_shapes
from .site import check_destination, check_web, write_site

MIN_OPSET = 17
DIFFERENTIABLE = set(RULES) | set(QUANTIZED_RULES) | NON_DIFFERENTIABLE  # ops that are not expanded into functions
EXTERNAL_DATA_OVER = 2**31 - 2**26  # bytes of weights past which a model is saved with external data
TASKS = ("classify", "segment", "detect")  # what a score output holds (export_onnx's `task`)


def export_onnx(src, path, *, input=None, input_layout=None, input_size=None, layers=None, output=None, mean=None,
                std=None, labels=None, layer_names=None, layouts=None, attentions=None, attention_gradients=False,
                bundled=False, input_gradients=False, legrad=False, explain_probabilities=False, heatmaps=None,
                target_layers=None, task=None, web=None, ort_web=None) -> ExplainSpec:
    """Rewrite the classifier `src` (a path or ModelProto) into an explainable graph saved at `path`.

    `input` names the image input (default: the one 4-D float or uint8 input), `input_layout` says whether it is
    nchw or nhwc (default: nhwc when its last dimension is 1 or 3), `input_size` (H, W) fixes dynamic spatial
    sizes. `layers` are the tensors explained (the target layers, by tensor name); by default, the tensor a user
    would pick (discovery.default_target): the last map before global pooling, or in a transformer the
    normalised tokens its last attention reads; for a detector, the maps of each scale that every detection's
    score reaches at more than one cell, in its class branch where it has one (discovery.detection_default).
    `task` says what the score output holds: classify, segment (K x h x w maps) or detect (a detector's raw head,
    core.detections' layouts); by default detect where its shape is a YOLOv5/v8/v11 head's for the image size
    (core.detections.yolo_layout), segment where it is a map over the image, classify otherwise.
    A layer must lie on a grid over the image unless its layout is given (`layouts`: nchw, nhwc, tokens:P:HxW; see
    onnxcam.core.layouts). The new graph takes an extra int64 input `onnxcam_class` of shape [batch] (-1 selects
    the top-1 class) and also outputs the selected class and, per layer, its activation and the gradient of the
    selected score with respect to it, all from one session run.

    `attentions` names the per-block attention probabilities (B x heads x N x N) exposed for attention
    rollout; by default every such Softmax output is. `attention_gradients` adds their gradients, for
    gradient rollout: a backward pass through every block, so it is opt-in. `legrad` adds, per block, the gradient
    of the block's layer score (the model's readout copied onto the block's output) with respect to its attention,
    for LeGrad (exporters.legrad): a short backward pass per block, opt-in as well. `bundled` writes a single file
    that takes encoded image bytes and returns the logits and the Grad-CAM heatmap (exporters.bundle).
    `input_gradients` adds the gradient down to the image, with a switch for guided backpropagation
    (exporters.input_gradients): a backward pass through the whole network on every run, so it is opt-in.
    Where the scores output is a Softmax, LogSoftmax or Sigmoid of the logits (through reshapes only), the
    gradients start from the logits, the class score before the squashing as Grad-CAM defines it (Selvaraju et al.,
    arXiv 1610.02391, section 3: "y^c, the score for class c, before the softmax"): a confident probability rounds
    to 1.0 and has no gradient. `explain_probabilities` keeps the output's own values instead.
    `heatmaps` names a CAM whose heatmaps the graph then computes too, output `onnxcam_heatmaps` (B x H x W in
    [0, 1], standard operators only: exporters.graph_cams), so that any ONNX runtime gets the maps with no numpy.
    `web` names a folder for a static site that explains in the browser (exporters.site; heatmaps default to gradcam),
    with onnxruntime-web from `ort_web` (its dist folder, copied in) or a pinned CDN address with subresource
    integrity. `target_layers` is the old name of `layers`.
    """
    if web is not None or ort_web is not None:
        check_destination(web, ort_web)
        heatmaps = heatmaps or "gradcam"
    if target_layers is not None:
        layers = renamed("target_layers", "layers", target_layers)
    model = make_explainable(load_model(src), input=input, input_layout=input_layout, input_size=input_size,
                             layers=layers, output=output, mean=mean, std=std, labels=labels,
                             layer_names=layer_names, layouts=layouts, attentions=attentions,
                             attention_gradients=attention_gradients, legrad=legrad,
                             explain_probabilities=explain_probabilities, task=task)
    if input_gradients:
        model = add_input_gradients(model)
    if heatmaps:
        model = add_heatmaps(model, heatmaps)
    if bundled:
        model = bundle(model, read_spec(model))
    if web is not None:
        check_web(read_spec(model))
    save_model(model, path)
    if web is not None:
        write_site(path, web, ort_web)
    return read_spec(model)


def load_model(src) -> onnx.ModelProto:
    """A model from a path (with its external data, if it has any, read from beside it) or as given."""
    if isinstance(src, onnx.ModelProto):
        return src
    try:
        return onnx.load(str(src))
    except FileNotFoundError as error:
        missing = "" if str(error.filename) == str(src) else f" (its external data {error.filename} is missing)"
        raise ExportError(f"{src}: no such file{missing}") from None
    except Exception as error:  # onnx raises DecodeError and friends for anything that is not a model
        raise ExportError(f"{src}: not a readable ONNX model ({type(error).__name__})") from None


def save_model(model: onnx.ModelProto, path, limit: int = EXTERNAL_DATA_OVER) -> None:
    """Write the whole file or nothing. A model over `limit` bytes (protobuf cannot hold 2 GB) gets its
    weights in `<name>.data` beside it, written first, so that the model never names missing data."""
    path = Path(path)
    if sum(len(t.raw_data) for t in model.graph.initializer) < limit:
        with atomic_path(path) as tmp:
            onnx.save(model, tmp)
        return
    data = path.with_name(path.name + ".data")
    with atomic_path(path) as tmp_model, atomic_path(data) as tmp_data:
        onnx.save(model, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=tmp_data.name, size_threshold=1024)
        _relocate_external_data(tmp_model, tmp_data.name, data.name)


def _relocate_external_data(model_path: Path, written: str, final: str) -> None:
    """Point the saved model's external tensors from the temporary data file to its final name."""
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == written:
                entry.value = final
    onnx.save(model, str(model_path))


def read_spec(model: onnx.ModelProto) -> ExplainSpec | None:
    return ExplainSpec.from_metadata({p.key: p.value for p in model.metadata_props})


@dataclass
class Survey:
    """What `onnxcam inspect` shows of an ONNX file."""

    rows: list[tuple[str, list | None, str | None]]  # tensor, shape, layout when it lies on a grid over the image
    defaults: list[str]  # the default targets; none for a file that is already explainable
    spec: ExplainSpec | None  # the metadata of an explainable file


def inspect_onnx(src, *, input=None, input_layout=None, input_size=None, output=None, task=None) -> Survey:
    """Every float tensor of the model with its shape, the possible targets marked with their grid layout, and the
    default targets (for `task`, guessed as export_onnx guesses it)."""
    model = load_model(src)
    spec = read_spec(model)
    if spec is None:
        model = _prepared(model)
    image = image_input(model, input or (spec and spec.input), input_layout or (spec and spec.input_layout),
                        input_size)
    model = expand_recurrent(infer_shapes(model, image))  # sequence lengths are static once the size is fixed
    builder = GraphBuilder(model)
    if spec:
        score = spec.score_tensor
    else:
        score = _score_output(model, builder, output)[0]
        score = (before_squashing(model, score) or (score,))[0]
    shapes = tensor_shapes(model, builder)
    grids = {c.name: c.layout for c in grid_candidates(model, score, shapes, image)}
    defaults = [] if spec else _targets(model, score, shapes, image, None, None, None,
                                        task_of(task, builder.shape(score), image)[1])[0]
    return Survey([(name, shape, grids.get(name)) for name, shape in shapes.items()], defaults, spec)


def unknown_name_error(kind: str, name: str, known) -> ExportError:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    return ExportError(f"unknown {kind} '{name}'{hint}")


def make_explainable(model: onnx.ModelProto, *, input=None, input_layout=None, input_size=None, layers=None,
                     output=None, mean=None, std=None, labels=None, layer_names=None, layouts=None, attentions=None,
                     attention_gradients=False, legrad=False, explain_probabilities=False,
                     task=None) -> onnx.ModelProto:
    """The model with the explanation outputs and the onnxcam metadata added (see export_onnx)."""
    given = model
    model = _prepared(model)
    image = image_input(model, input, input_layout, input_size)
    model = expand_recurrent(infer_shapes(model, image))  # sequence lengths are static once the size is fixed
    builder = GraphBuilder(model)
    output, num_classes = _score_output(model, builder, output)
    squashing = None if explain_probabilities else before_squashing(model, output)
    score = squashing[0] if squashing else output  # the tensor whose elements are explained
    shapes = tensor_shapes(model, builder)
    _, detection = task_of(task, builder.shape(output), image)
    targets, layouts = _targets(model, score, shapes, image, layers, layouts, layer_names, detection)
    attentions, attention_layout = _attentions(model, shapes, image, attentions, layouts)
    scores_per_block = layer_scores(model, shapes, attentions, score) if legrad else []
    if scores_per_block:
        builder = GraphBuilder(model)  # with the types of the readout's copies
    names = _append_outputs(model, builder, image, score, num_classes, targets,
                            attentions, attention_gradients, scores_per_block)
    model = float32_edges(model)  # a bfloat16 model's file takes and gives float32; it computes in bfloat16
    spec = ExplainSpec(
        input=image.name, scores=output, num_classes=num_classes, score_shape=builder.shape(output)[1:],
        explained=LOGITS_OUTPUT if squashing else None, squashing=squashing[1] if squashing else None,
        logits=(before_squashing(given, output) or squashing)[0] if squashing else None,  # the name as given
        input_size=image.size,
        input_layout=image.layout, input_type=image.dtype, layers=list(layer_names or targets), layouts=layouts,
        attention_layout=attention_layout, mean=_triple(mean, "mean", image.channels),
        std=_triple(std, "std", image.channels), labels=_labels(labels, num_classes), **names,
    )
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, METADATA_KEY: spec.to_json()})
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]  # what inlined functions left unread
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"the explainable graph fails ONNX's checker, an onnxcam bug worth reporting: "
                          f"{str(error).splitlines()[0]}") from None
    return model


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as the engine reads it: at opset 17 or later, quantized activations given float twins, and
    operators with no rule but a function body in the standard (Attention at opset 23) expanded."""
    return expand_functions(expose_dequantized(_upgraded(model)), DIFFERENTIABLE)


def _upgraded(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model at opset 17 at least, where LayerNormalization and the Reduce ops' axes inputs exist."""
    if read_spec(model) is not None:
        raise ExportError("the model is already explainable (it carries onnxcam metadata)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= MIN_OPSET:
        return model
    try:
        return version_converter.convert_version(model, MIN_OPSET)
    except Exception as error:  # the converter fails with several exception types on what it cannot convert
        raise ExportError(f"the model's opset {opset} cannot be upgraded to {MIN_OPSET}: "
                          f"{str(error).splitlines()[0]}") from None


def _score_output(model: onnx.ModelProto, builder: GraphBuilder, output: str | None) -> tuple[str, int]:
    outputs = [o.name for o in model.graph.output]
    score = output or outputs[0]
    if score not in outputs:
        raise unknown_name_error("output", score, outputs)
    shape = builder.shape(score)
    if None in shape[1:]:
        raise ExportError(f"output '{score}' must have a static number of classes; its shape is {shape}",
                          option="output")
    return score, int(np.prod(shape[1:]))


SQUASHINGS = {"Softmax": "softmax", "LogSoftmax": "log_softmax", "Sigmoid": "sigmoid"}
REORDER_FREE = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}  # keep the elements in their order


def before_squashing(model: onnx.ModelProto, output: str) -> tuple[str, str] | None:
    """(the logits, the squashing's name) where `output` is a Softmax, LogSoftmax or Sigmoid of the logits, through
    nodes that keep the elements in order (so that a seed on the output's elements applies to the logits' own);
    None otherwise."""
    producers = {name: node for node in model.graph.node for name in node.output}
    name = output
    while name in producers and producers[name].op_type in REORDER_FREE:
        name = producers[name].input[0]
    node = producers.get(name)
    if node is None or node.op_type not in SQUASHINGS:
        return None
    return node.input[0], SQUASHINGS[node.op_type]


def task_of(task: str | None, score_shape, image: ImageInput) -> tuple[str, str | None]:
    """The task (given, or guessed from the score output's shape) and, for detect, the head's layout (see
    core.detections). Guessed strictly: detect only where the shape is a YOLOv5/v8/v11 head's for this image size,
    segment where the output is a map of scores over the image, classify otherwise."""
    per_image = list(score_shape[1:])
    dense = len(score_shape) == 4 and guess_layout(score_shape, image.size) in ("nchw", "nhwc")
    if task is None:
        layout = yolo_layout(per_image, image.size)
        return ("detect", layout) if layout else ("segment" if dense else "classify", None)
    if task not in TASKS:
        raise ExportError(f"unknown task '{task}'; choose from {', '.join(TASKS)}", option="task")
    if task == "detect":
        if len(per_image) != 2:
            raise ExportError(f"task detect needs a detector's raw head, rows x columns per image; the output is "
                              f"{' x '.join(map(str, per_image))} per image", option="task")
        return task, yolo_layout(per_image, image.size) or guess_detection_layout(tuple(per_image))
    if task == "segment" and not dense:
        raise ExportError(f"task segment needs maps of class scores over the {image.size[0]}x{image.size[1]} image; "
                          f"the output is {' x '.join(map(str, per_image))} per image", option="task")
    return task, None


def _targets(model, score, shapes, image: ImageInput, given, layouts, names,
             detection: str | None = None) -> tuple[list[str], list[str]]:
    """The target tensors and their layouts: as given (each checked to lie on a grid over the image unless its
    layout is given), or the default targets: of a detector whose raw head is laid out as `detection`, those
    found by discovery.detection_default; otherwise the one found by discovery.default_target."""
    if not given:
        if layouts:
            raise ExportError("layouts were given without target layers", option="layers")
        if detection is not None:
            chosen = detection_default(model, score, shapes, image, detection)
            return [c.name for c in chosen], [c.layout for c in chosen]
        target = default_target(model, score, shapes, image)
        return [target.name], [target.layout]
    given, names = list(given), list(names or given)
    layouts = list(layouts) if layouts else [None] * len(given)
    if len(layouts) != len(given):
        raise ExportError(f"{len(layouts)} layouts given for {len(given)} targets", option="layouts")
    checked, known = [], {**shapes, image.name: image.shape}
    token_counts = attention_token_counts(model, shapes)
    for target, layout, name in zip(given, layouts, names, strict=True):
        shape = known.get(target, False)
        if shape is False:
            raise unknown_name_error("target tensor", target, shapes)
        if not shape or None in shape[1:]:
            raise ExportError(f"target '{name}' has unknown sizes {shape}: the gradient needs static ones")
        if layout is None and is_attention_matrix(shape, token_counts):
            raise ExportError(f"target '{name}' of shape {shape} is attention between tokens, not a grid over the "
                              f"image; give its layout if it is one", option="layouts")
        checked.append(_checked_layout(name, shape, layout, image))
    return given, checked


def _checked_layout(name: str, shape, layout: str | None, image: ImageInput) -> str:
    if layout is None:
        layout = guess_layout(shape, image.size)
        if layout is None:
            raise ExportError(f"target '{name}' of shape {shape} does not lie on a grid over the {image.size[0]}x"
                              f"{image.size[1]} image (one cell, another aspect ratio, or larger than the image); "
                              f"give its layout if it does", option="layouts")
    try:
        return check_layout(layout, shape)
    except ValueError as error:
        raise ExportError(f"target '{name}': {error}") from None


def _attentions(model, shapes, image: ImageInput, given, layouts) -> tuple[list[str], str | None]:
    """Attention probabilities for rollout and their token layout: found by discovery, or as given (checked)."""
    if given is None:
        return attention_probabilities(model, shapes, image, layouts)
    found = set()
    for name in given:
        shape = shapes.get(name)
        layout = None if not shape or len(shape) != 4 or shape[2] != shape[3] else attention_layout(shape[3], layouts)
        if layout is None:
            raise ExportError(f"attention '{name}' of shape {shape} is not B x heads x N x N over one token grid "
                              f"with a CLS token")
        found.add(layout)
    if len(found) > 1:
        raise ExportError(f"the attention tensors lie on different token grids: {sorted(found)}")
    return list(given), found.pop() if found else None


def _append_outputs(model, builder: GraphBuilder, image: ImageInput, score: str, num_classes: int,
                    targets: list[str], attentions: list[str], attention_gradients: bool,
                    scores_per_block: list[str]) -> dict[str, list[str]]:
    """Add the class input and the explanation outputs to the graph; their names, as ExplainSpec fields.
    `scores_per_block`: LeGrad's layer score of each attention block (exporters.legrad), or none."""
    graph = model.graph
    selected, seed = _select_class(builder, score, num_classes)
    cuts = head_cuts(model, targets, [o.name for o in graph.output if builder.is_float(o.name)])
    gradients = append_gradients(model, targets + (attentions if attention_gradients else []), score, seed, builder)
    legrad_gradients = _layer_score_gradients(model, builder, attentions, scores_per_block, score, seed, selected)
    builder.nodes.append(helper.make_node("Identity", [selected.name], [SELECTED_OUTPUT]))
    # the batch keeps the image input's name for it, so that a runtime can size outputs from the input
    new_outputs = [helper.make_tensor_value_info(SELECTED_OUTPUT, onnx.TensorProto.INT64, [image.batch])]

    def expose(kind: str, sources: list, like: list[str]) -> list[str]:
        names = [f"onnxcam_{kind}_{i}" for i in range(len(sources))]
        for name, source, tensor in zip(names, sources, like, strict=True):
            builder.nodes.append(helper.make_node("Identity", [getattr(source, "name", source)], [name]))
            dims = builder.shape(tensor)  # batch first; other sizes that shape inference cannot tell stay unnamed
            new_outputs.append(helper.make_tensor_value_info(name, builder.elem_type(tensor),
                                                             [dims[0] or image.batch, *dims[1:]]))
        return names

    names = {"activations": expose("activation", targets, targets),
             "gradients": expose("gradient", gradients[:len(targets)], targets),
             "attentions": expose("attention", attentions, attentions),
             "attention_gradients": expose("attention_gradient", gradients[len(targets):],
                                           attentions if attention_gradients else []),
             "legrad_gradients": expose("legrad_gradient", legrad_gradients,
                                        attentions if scores_per_block else []),
             "cuts": expose("cut", cuts, cuts)}
    exposed = [SELECTED_OUTPUT, *(n for group in names.values() for n in group)]
    if score not in {o.name for o in graph.output}:  # the logits under the output's squashing
        builder.nodes.append(helper.make_node("Identity", [score], [LOGITS_OUTPUT]))
        dims = builder.shape(score)
        new_outputs.append(helper.make_tensor_value_info(LOGITS_OUTPUT, builder.elem_type(score),
                                                         [dims[0] or image.batch, *dims[1:]]))
        exposed.append(LOGITS_OUTPUT)
    prune(builder, exposed)
    graph.input.append(helper.make_tensor_value_info(CLASS_INPUT, onnx.TensorProto.INT64, [image.batch]))
    graph.node.extend(builder.nodes)
    graph.initializer.extend(builder.initializers)
    graph.output.extend(new_outputs)
    return names


def _layer_score_gradients(model, builder: GraphBuilder, attentions: list[str], scores_per_block: list[str],
                           score: str, seed: Value, selected: Value) -> list[Value]:
    """LeGrad's per-block gradients: of the selected class's layer score s^l w.r.t. the block's attention A^l, each
    a walk through block l and the readout only (none where the file is exported without them)."""
    if not scores_per_block:
        return []
    return [append_gradients(model, [attention], layer_score,
                             seed if layer_score == score else one_hot_seed(builder, layer_score, selected), builder)[0]
            for attention, layer_score in zip(attentions, scores_per_block, strict=True)]


def _select_class(builder: GraphBuilder, score: str, num_classes: int) -> tuple[Value, Value]:
    """The selected class per image and the one-hot seed (shaped like the score) that picks its score."""
    top = builder.op("ArgMax", builder.op("Flatten", score, axis=1), axis=1, keepdims=0)
    requested = builder.value(CLASS_INPUT)
    selected = builder.op("Where", requested < builder.ints(0), top, requested)
    return selected, one_hot_seed(builder, score, selected)


def _triple(values, what: str, channels: int):
    if values is None:
        return None
    values = [float(v) for v in values]
    if len(values) != channels:
        raise ExportError(f"{what} needs {channels} values, one per input channel; got {len(values)}", option=what)
    return values


def _labels(labels, num_classes: int):
    if labels is None:
        return None
    labels = [str(label) for label in labels]
    if len(labels) != num_classes:
        raise ExportError(f"{len(labels)} class names given for a model with {num_classes} classes")
    return labels
