"""Export a PyTorch classifier into an explainable ONNX graph (needs the `export` extra)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx
import torch

from ..core.contract import ExplainSpec
from ..core.detections import yolo_layout
from ..core.errors import ExportError, renamed
from ..core.layouts import attention_layout, channels_of, guess_layout, to_grid
from .onnx_frontend import export_onnx, unknown_name_error

TORCHSCRIPT_OPSET = 17
EXPORT_BATCH = 2  # tracing specialises sizes 0 and 1: a batch of 2 keeps the batch dimension symbolic


NORMALISATIONS = (torch.nn.LayerNorm, torch.nn.BatchNorm2d, torch.nn.GroupNorm)
SQUASHINGS = (torch.nn.Softmax, torch.nn.LogSoftmax, torch.nn.Sigmoid)  # explained before (onnx_frontend)


def module_outputs(model, input_shape) -> list[tuple[str, tuple]]:
    """(module name, output shape) for every submodule, in the order their forward passes finish."""
    return [(name, shape) for name, _, shape, _ in _probe(model, input_shape)[:-1]]


def _probe(model, input_shape):
    """Per submodule returning a tensor: (name, module, output shape, grid cells the top-1 score's gradient reaches);
    last, the model's output itself (named "")."""
    outputs: list[tuple[str, torch.nn.Module, torch.Tensor]] = []
    squashed: dict[int, torch.Tensor] = {}  # a Softmax, LogSoftmax or Sigmoid module's output -> its input

    def keep(module, args, output, name):
        outputs.append((name, module, output))
        if isinstance(module, SQUASHINGS) and args and isinstance(args[0], torch.Tensor):
            squashed[id(output)] = args[0]

    handles = [module.register_forward_hook(lambda m, i, o, name=name: keep(m, i, o, name))
               for name, module in model.named_modules() if name]
    try:
        example = torch.randn(EXPORT_BATCH, *input_shape, generator=torch.Generator().manual_seed(0))
        scores = model_output(model(example.to(_input_dtype(model)).requires_grad_()))
    finally:
        for handle in handles:
            handle.remove()
    scores = squashed.get(id(scores), scores)  # the logits, as the ONNX front end explains them
    outputs = [(name, m, o) for name, m, o in outputs if isinstance(o, torch.Tensor)]
    outputs.append(("", model, scores))  # the output itself, last: segmenters' class maps are told by its channels
    differentiable = [o for _, _, o in outputs if o.requires_grad]
    grads = torch.autograd.grad(_probed_score(scores, tuple(input_shape[-2:])), differentiable, allow_unused=True) \
        if differentiable else []
    grad_of = {id(o): g for o, g in zip(differentiable, grads, strict=True)}
    probed = []
    for name, module, output in outputs:
        grad = grad_of.get(id(output))
        layout = guess_layout(tuple(output.shape), tuple(input_shape[-2:]))
        reached = 0
        if grad is not None and layout is not None:
            reached = int((to_grid(grad.detach().float().numpy(), layout) != 0).any(axis=1).sum(axis=(1, 2)).max())
        probed.append((name, module, tuple(output.shape), reached))
    return probed


def _probed_score(scores: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """The top-1 score of each image, summed; where the output is a map of class scores over the image, the top
    class's segment (its channel summed over the pixels it wins), as exporters.discovery probes ONNX files."""
    top = scores.flatten(1).argmax(1)
    if scores.ndim != 4 or guess_layout(tuple(scores.shape), image_size) != "nchw":
        return scores.flatten(1).gather(1, top[:, None]).sum()
    classes = top // (scores.shape[2] * scores.shape[3])
    chosen = scores[torch.arange(len(scores)), classes]
    return (chosen * (scores.argmax(1) == classes[:, None, None])).sum()


def model_output(outputs) -> torch.Tensor:
    """The output explained: the tensor a model returns, or the first of several (torchvision's segmenters return a
    dict whose first entry, `out`, is the segmentation)."""
    if isinstance(outputs, dict):
        outputs = next(iter(outputs.values()))
    elif isinstance(outputs, (tuple, list)):
        outputs = outputs[0]
    if not isinstance(outputs, torch.Tensor):
        raise ExportError(f"the model returns {type(outputs).__name__}, not a tensor of scores")
    return outputs


def _input_dtype(model) -> torch.dtype:
    """The type of the model's first floating-point parameter (a model cast to bfloat16 or float16 takes its
    images in that type), float32 for a model with none."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _attention_modules(probed, layouts=()) -> list[str]:
    """Modules named like `attn_drop` (timm, vit-explain) whose output is per-image attention over tokens
    with a CLS token, B x heads x N x N (windowed attention, whose first dimension counts windows, is left out)."""
    return [name for name, _, shape, _ in probed
            if name.split(".")[-1] == "attn_drop" and len(shape) == 4 and shape[0] == EXPORT_BATCH
            and shape[2] == shape[3] and attention_layout(shape[2], layouts) is not None]


def default_layer(model, input_shape) -> str:
    return _default_layer(_probe(model, input_shape), tuple(input_shape[-2:]))


def _default_layer(probed, image_size: tuple[int, int]) -> str:
    """The layer a user would pick: the last spatial activation that the class-score gradient reaches.

    Candidates are 4-D maps, channels-last maps and token sequences on a grid over the image, reached by the
    gradient at more than one grid cell; attention between tokens (B x heads x N x N, N a token count of the
    model) is not one. For convolutional networks that is the last map before global
    pooling; for transformers, whose last blocks feed only the CLS token, it is the last normalisation
    layer still seen by every patch (the first LayerNorm of the last block of a ViT).
    """
    probed, (_, _, score_shape, _) = probed[:-1], probed[-1]
    dense = guess_layout(score_shape, image_size) if len(score_shape) == 4 else None
    tokens = {shape[1] for _, _, shape, _ in probed if len(shape) == 3}
    attention = {name for name, _, shape, _ in probed if len(shape) == 4 and shape[2] == shape[3] in tokens}
    candidates = [(name, module, shape) for name, module, shape, reached in probed
                  if reached > 1 and name not in attention and (len(shape) == 3 or shape[2] * shape[3] > 1)]
    if dense:  # a segmenter: its maps of K channels are the class scores at lower resolutions (discovery's rule)
        candidates = [c for c in candidates if channels_of(guess_layout(c[2]) or "nchw", c[2])
                      != channels_of(dense, score_shape)] or candidates
    if not candidates:
        raise ExportError("no module outputs a spatial activation that the score depends on: name a target layer",
                          option="layers")
    name, _, shape = candidates[-1]
    if guess_layout(shape) == "nchw":
        return name
    norms = [name for name, module, _ in candidates if isinstance(module, NORMALISATIONS)]
    return norms[-1] if norms else name


def export_torch(model, path, *, input_shape, layers=None, mean=None, std=None, labels=None, layouts=None,
                 attention_layers=None, attention_gradients=False, bundled=False,
                 input_gradients=False, legrad=False, explain_probabilities=False, heatmaps=None,
                 target_layers=None, task=None, web=None, ort_web=None, tracer: str = "dynamo") -> ExplainSpec:
    """Export `model` (a torch.nn.Module) to an explainable ONNX file at `path`.

    `input_shape` is C x H x W (a leading batch size is ignored: the batch is dynamic).
    `layers` (the target layers) are module names such as `layer4` or `features.16`; `layouts` optionally gives
    each one's layout (nchw, nhwc, tokens:P:HxW), guessed otherwise. `attention_layers` are the modules
    whose outputs are a block's attention probabilities, for attention rollout (default: modules
    named `attn_drop` that return B x heads x N x N; where none runs, as with fused scaled dot-product
    attention, the exported graph's Softmax outputs of that shape). `attention_gradients`, `bundled`,
    `input_gradients`, `legrad`, `explain_probabilities`, `heatmaps`, `task`, `web`, `ort_web`: see export_onnx (a
    model ending in nn.Softmax, nn.LogSoftmax or nn.Sigmoid is explained before it). `target_layers` is the old
    name of `layers`.
    A detector (`task` detect, or guessed so from its output's shape as export_onnx guesses it) with no `layers`
    gets the ONNX front end's default targets, named by their tensors in the exported graph rather than by module.
    `tracer` "torchscript" exports with the legacy TorchScript tracer, several times faster than torch.export
    ("dynamo") on convolutional networks; a trace that reads the values (a TracerWarning) is refused.
    """
    if target_layers is not None:
        layers = renamed("target_layers", "layers", target_layers)
    input_shape = tuple(int(d) for d in input_shape[-3:])
    model = model.eval()
    probed = _probe(model, input_shape) if not layers or attention_layers is None else []
    detector = not layers and (task == "detect" or task is None and yolo_layout(probed[-1][2][1:], input_shape[-2:]))
    layers = list(layers or []) if layers or detector else [_default_layer(probed, input_shape[-2:])]
    attention = list(attention_layers) if attention_layers is not None else _attention_modules(probed, layouts or ())
    modules = dict(model.named_modules())
    for layer in layers + attention:
        if layer not in modules or not layer:
            raise unknown_name_error("layer", layer, [n for n in modules if n])
    wrapper = _WithActivations(model, [modules[layer] for layer in layers + attention])
    names = [f"onnxcam_target_{i}" for i in range(len(layers) + len(attention))]
    example = torch.randn(EXPORT_BATCH, *input_shape).to(_input_dtype(model))
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed": noise, not news
    try:
        onnx_model = _onnx_model(wrapper, example, names, tracer)
    except Exception as error:
        raise ExportError(f"torch.onnx.export failed: {str(error).splitlines()[0]}") from error
    finally:
        exporter_log.setLevel(level)
        wrapper.remove_hooks()
    kept = [o for o in onnx_model.graph.output if o.name not in names]
    del onnx_model.graph.output[:]
    onnx_model.graph.output.extend(kept)
    # no attention module ran (fused F.scaled_dot_product_attention skips attn_drop): the exporter decomposes
    # the fused kernel, and the ONNX front end finds its Softmax outputs
    attentions = names[len(layers):] if attention or attention_layers is not None else None
    return export_onnx(onnx_model, path, layers=names[:len(layers)] or None, layer_names=layers or None, mean=mean,
                       std=std, labels=labels, layouts=layouts, attentions=attentions,
                       attention_gradients=attention_gradients, bundled=bundled, input_gradients=input_gradients,
                       legrad=legrad, explain_probabilities=explain_probabilities, heatmaps=heatmaps, task=task,
                       web=web, ort_web=ort_web)


def _onnx_model(wrapper, example, names: list[str], tracer: str) -> onnx.ModelProto:
    """The wrapper as ONNX, the batch dynamic: torch.export (dynamo), or the TorchScript tracer with its
    TracerWarnings raised (a trace that read the values would compute other images wrong)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if tracer == "dynamo":
            return torch.onnx.export(wrapper, (example,), input_names=["input"], output_names=["logits", *names],
                                     dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                                     verbose=False).model_proto
        if tracer != "torchscript":
            raise ValueError(f"tracer is dynamo or torchscript, not '{tracer}'")
        warnings.simplefilter("error", torch.jit.TracerWarning)
        wrapper.eval()  # the tracer restores the wrapper's mode afterwards, recursively: the model's too
        written = io.BytesIO()
        outputs = ["logits", *names]
        torch.onnx.export(wrapper, (example,), written, dynamo=False, opset_version=TORCHSCRIPT_OPSET,
                          input_names=["input"], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in ["input", *outputs]})
        return onnx.load_from_string(written.getvalue())


class _WithActivations(torch.nn.Module):
    """Calls the model and also returns the outputs of the target modules, captured by forward hooks."""

    def __init__(self, model: torch.nn.Module, modules: list[torch.nn.Module]):
        super().__init__()
        self.model = model
        self.captured: dict[int, torch.Tensor] = {}
        self.handles = [module.register_forward_hook(self._keeper(i)) for i, module in enumerate(modules)]

    def _keeper(self, index: int):
        def keep(module, args, output):
            if not isinstance(output, torch.Tensor):
                raise ExportError(f"target module {type(module).__name__} does not return one tensor")
            self.captured[index] = output
        return keep

    def forward(self, x):
        self.captured.clear()
        logits = model_output(self.model(x))
        return (logits, *(self.captured[i] for i in range(len(self.handles))))

    def remove_hooks(self):
        for handle in self.handles:
            handle.remove()
