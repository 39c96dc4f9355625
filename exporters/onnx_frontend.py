"""Make any ONNX classifier explainable: class selection, gradients and metadata in one graph."""

from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, shape_inference, version_converter

from ..core.layouts import attention_layout, check_layout, guess_layout
from ..runtimes.metadata import CLASS_INPUT, METADATA_KEY, SELECTED_OUTPUT, ExplainSpec
from .autodiff import append_gradients, prune
from .bundle import bundle
from .graph import ExportError, GraphBuilder

MIN_OPSET = 17


def export_onnx(src, path, *, target_layers=None, output=None, mean=None, std=None, labels=None,
                layer_names=None, layouts=None, attentions=None, attention_gradients=False,
                bundled=False) -> ExplainSpec:
    """Rewrite the classifier `src` (a path or ModelProto) into an explainable graph saved at `path`.

    Targets are tensor names (default: the last 4-D activation before global pooling; in a ViT, the
    LayerNorm output its last attention reads). The new graph
    takes an extra int64 input `onnxcam_class` of shape [batch] (-1 selects the top-1 class) and also
    outputs the selected class and, per target, its activation and the gradient of the selected
    score with respect to it, all from one session run.

    `layouts` overrides the guessed layout of each target (nchw, nhwc, tokens:P:HxW; see
    onnxcam.core.layouts). `attentions` names the per-block attention probabilities (B x heads x N x N)
    exposed for attention rollout; by default every such Softmax output is. `attention_gradients` adds
    their gradients, for gradient rollout: a backward pass through every block, so it is opt-in.
    `bundled` writes a single
    file that takes encoded image bytes and returns the logits and the Grad-CAM heatmap (exporters.bundle).
    """
    model = make_explainable(load_model(src), target_layers=target_layers, output=output, mean=mean, std=std,
                             labels=labels, layer_names=layer_names, layouts=layouts, attentions=attentions,
                             attention_gradients=attention_gradients)
    if bundled:
        model = bundle(model, read_spec(model))
    save_model(model, path)
    return read_spec(model)


def load_model(src) -> onnx.ModelProto:
    if isinstance(src, onnx.ModelProto):
        return src
    try:
        return onnx.load(str(src))
    except FileNotFoundError:
        raise ExportError(f"{src}: no such file") from None
    except Exception as error:  # onnx raises DecodeError and friends for anything that is not a model
        raise ExportError(f"{src}: not a readable ONNX model ({type(error).__name__})") from None


def save_model(model: onnx.ModelProto, path) -> None:
    """Write the whole file or nothing: a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_spec(model: onnx.ModelProto) -> ExplainSpec | None:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return ExplainSpec.from_json(prop.value)
    return None


def tensor_shapes(model: onnx.ModelProto, builder: GraphBuilder) -> dict[str, list]:
    """Every float tensor the graph computes, in node order, with its inferred shape (None: symbolic)."""
    shapes = {}
    for node in model.graph.node:
        for name in node.output:
            if builder.is_float(name):
                try:
                    shapes[name] = builder.shape(name)
                except ExportError:
                    shapes[name] = None
    return shapes


def default_target(model: onnx.ModelProto, score: str, shapes: dict[str, list]) -> str:
    """The last 4-D activation with a spatial extent (H*W > 1) that feeds the score (attention excepted);
    in a transformer with attention over a token grid, the normalised tokens that the last attention reads."""
    attention = attention_tensors(model, shapes)
    if attention:
        return _norm_before(model, attention[-1], shapes)
    feeds = {score}
    for node in reversed(model.graph.node):
        if any(o in feeds for o in node.output):
            feeds.update(node.input)
    candidates = [name for name, shape in shapes.items()
                  if name in feeds and shape and len(shape) == 4 and None not in shape[2:]
                  and shape[2] * shape[3] > 1]
    if not candidates:
        raise ExportError("no 4-D activation with a spatial grid feeds the output: name a target layer")
    return candidates[-1]


def _norm_before(model: onnx.ModelProto, attention: str, shapes: dict[str, list]) -> str:
    """The nearest LayerNormalization upstream of an attention tensor whose output is a token sequence: in a
    pre-norm ViT block, the first LayerNorm of the block (the torch front end's default too)."""
    producers = {output: node for node in model.graph.node for output in node.output}
    queue, seen = [attention], {attention}
    while queue:
        node = producers.get(queue.pop(0))
        if node is None:
            continue
        shape = shapes.get(node.output[0])
        if node.op_type == "LayerNormalization" and shape and len(shape) == 3 and None not in shape[1:] \
                and guess_layout(shape):
            return node.output[0]
        for name in node.input:
            if name and name not in seen:
                seen.add(name)
                queue.append(name)
    raise ExportError(f"no LayerNormalization of tokens precedes attention '{attention}' (exports below opset 17 "
                      f"split it into several operators): name a target layer")


def attention_tensors(model: onnx.ModelProto, shapes: dict[str, list], layouts=()) -> list[str]:
    """Softmax outputs shaped B x heads x N x N over a token grid with a CLS token: attention probabilities."""
    return [node.output[0] for node in model.graph.node if node.op_type == "Softmax"
            and _attention_layout(shapes.get(node.output[0]), layouts) is not None]


def _attention_layout(shape, layouts) -> str | None:
    if not shape or len(shape) != 4 or None in shape[1:] or shape[2] != shape[3]:
        return None
    return attention_layout(shape[2], layouts)


def unknown_name_error(kind: str, name: str, known) -> ExportError:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    return ExportError(f"unknown {kind} '{name}'{hint}")


def make_explainable(model: onnx.ModelProto, *, target_layers=None, output=None, mean=None, std=None,
                     labels=None, layer_names=None, layouts=None, attentions=None,
                     attention_gradients=False) -> onnx.ModelProto:
    if read_spec(model) is not None:
        raise ExportError("the model is already explainable (it carries onnxcam metadata)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        model = version_converter.convert_version(model, MIN_OPSET)
    model = shape_inference.infer_shapes(model, data_prop=True)
    graph = model.graph

    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ExportError(f"expected one image input, found {len(inputs)}: {[i.name for i in inputs]}")
    image = inputs[0]
    builder = GraphBuilder(model)
    image_shape = builder.shape(image.name)
    if len(image_shape) != 4 or None in image_shape[1:]:
        raise ExportError(f"input '{image.name}' must be N x C x H x W with static C, H, W; it is {image_shape}")

    outputs = [o.name for o in graph.output]
    score = output or outputs[0]
    if score not in outputs:
        raise unknown_name_error("output", score, outputs)
    score_shape = builder.shape(score)
    if None in score_shape[1:]:
        raise ExportError(f"output '{score}' must have a static number of classes; its shape is {score_shape}")
    num_classes = int(np.prod(score_shape[1:]))

    known = tensor_shapes(model, builder)
    targets = list(target_layers) if target_layers else [default_target(model, score, known)]
    for target in targets:
        if target not in known and target != image.name:
            raise unknown_name_error("target tensor", target, known)
    layouts = _layouts(builder, targets, layouts, layer_names or targets)
    attentions = attention_tensors(model, known, layouts) if attentions is None else list(attentions)
    attention_layouts = {_attention_layout(builder.shape(a), layouts) for a in attentions}
    if None in attention_layouts or len(attention_layouts) > 1:
        raise ExportError("attention tensors must all be B x heads x N x N over one token grid with a CLS token")

    # The class whose score is explained, chosen in the graph: -1 means the top-1 class.
    selected, seed = _select_class(builder, score, num_classes)
    differentiated = targets + (attentions if attention_gradients else [])
    gradients = append_gradients(model, differentiated, score, seed, builder)

    builder.nodes.append(helper.make_node("Identity", [selected], [SELECTED_OUTPUT]))
    # the batch keeps the image input's name for it, so that a runtime can size outputs from the input
    batch = image_shape[0] or image.type.tensor_type.shape.dim[0].dim_param or "batch"
    new_outputs = [helper.make_tensor_value_info(SELECTED_OUTPUT, onnx.TensorProto.INT64, [batch])]

    def expose(kind: str, sources: list[str], like: list[str]) -> list[str]:
        names = [f"onnxcam_{kind}_{i}" for i in range(len(sources))]
        for name, source, tensor in zip(names, sources, like):
            builder.nodes.append(helper.make_node("Identity", [source], [name]))
            dims = builder.shape(tensor)  # batch first; other sizes that shape inference cannot tell stay unnamed
            dims = [dims[0] or batch, *dims[1:]] if dims else dims
            new_outputs.append(helper.make_tensor_value_info(name, builder.elem_type(tensor), dims))
        return names

    activations = expose("activation", targets, targets)
    gradient_names = expose("gradient", gradients[:len(targets)], targets)
    attention_names = expose("attention", attentions, attentions)
    attention_gradient_names = expose("attention_gradient", gradients[len(targets):], attentions)
    prune(builder, [SELECTED_OUTPUT, *activations, *gradient_names, *attention_names, *attention_gradient_names])

    graph.input.append(helper.make_tensor_value_info(CLASS_INPUT, onnx.TensorProto.INT64, [batch]))
    graph.node.extend(builder.nodes)
    graph.initializer.extend(builder.initializers)
    graph.output.extend(new_outputs)

    spec = ExplainSpec(
        input=image.name, scores=score, num_classes=num_classes, input_size=(image_shape[2], image_shape[3]),
        layers=list(layer_names or targets), activations=activations, gradients=gradient_names, layouts=layouts,
        attentions=attention_names, attention_gradients=attention_gradient_names,
        attention_layout=attention_layouts.pop() if attentions else None,
        mean=_triple(mean, "mean", image_shape[1]), std=_triple(std, "std", image_shape[1]),
        labels=_labels(labels, num_classes),
    )
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, METADATA_KEY: spec.to_json()})
    onnx.checker.check_model(model)
    return model


def _select_class(builder: GraphBuilder, score: str, num_classes: int) -> tuple[str, str]:
    """The selected class per image and the one-hot seed (shaped like the score) that picks its score."""
    flat = builder.op("Flatten", score, axis=1)
    top = builder.op("ArgMax", flat, axis=1, keepdims=0)
    selected = builder.op("Where", builder.op("Less", CLASS_INPUT, builder.ints(0)), top, CLASS_INPUT)
    values = builder.const(np.array([0.0, 1.0]), like=score)
    one_hot = builder.op("OneHot", selected, builder.ints([num_classes]), values, axis=-1)
    return selected, builder.reshape_like(one_hot, score)


def _layouts(builder: GraphBuilder, targets: list[str], given, names: list[str]) -> list[str]:
    """Each target's layout: as given, else guessed from its static shape; checked either way."""
    given = list(given) if given else [None] * len(targets)
    if len(given) != len(targets):
        raise ExportError(f"{len(given)} layouts given for {len(targets)} targets")
    layouts = []
    for target, layout, name in zip(targets, given, names):
        shape = builder.shape(target)
        layout = layout or guess_layout(shape)
        if layout is None:
            raise ExportError(f"cannot tell how target '{name}' of shape {shape} maps onto the image: "
                              f"give its layout (nchw, nhwc or tokens:P:HxW)")
        try:
            layouts.append(check_layout(layout, shape))
        except ValueError as error:
            raise ExportError(f"target '{name}': {error}") from None
    return layouts


def _triple(values, what: str, channels: int):
    if values is None:
        return None
    values = [float(v) for v in values]
    if len(values) != channels:
        raise ExportError(f"--{what} needs {channels} values, one per input channel; got {len(values)}")
    return values


def _labels(labels, num_classes: int):
    if labels is None:
        return None
    labels = [str(label) for label in labels]
    if len(labels) != num_classes:
        raise ExportError(f"{len(labels)} class names given for a model with {num_classes} classes")
    return labels
