"""Export a PyTorch classifier into an explainable ONNX graph (needs the `export` extra)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch

from ..runtimes.metadata import ExplainSpec
from .graph import ExportError
from .onnx_frontend import export_onnx, unknown_name_error

EXPORT_BATCH = 2  # tracing specialises sizes 0 and 1: a batch of 2 keeps the batch dimension symbolic


def module_outputs(model, input_shape) -> list[tuple[str, tuple]]:
    """(module name, output shape) for every submodule, in the order their forward passes finish."""
    seen: list[tuple[str, tuple]] = []
    handles = [module.register_forward_hook(lambda m, i, o, name=name: seen.append((name, getattr(o, 'shape', None))))
               for name, module in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(torch.zeros(EXPORT_BATCH, *input_shape))
    finally:
        for handle in handles:
            handle.remove()
    return [(name, tuple(shape)) for name, shape in seen if shape is not None]


def default_layer(model, input_shape) -> str:
    """The last module whose output is a 4-D activation with a spatial grid (H*W > 1)."""
    candidates = [name for name, shape in module_outputs(model, input_shape) if len(shape) == 4 and shape[2] * shape[3] > 1]
    if not candidates:
        raise ExportError("no module outputs a 4-D activation with a spatial grid: name a target layer")
    return candidates[-1]


def export_torch(model, path, *, input_shape, target_layers=None, mean=None, std=None, labels=None) -> ExplainSpec:
    """Export `model` (a torch.nn.Module) to an explainable ONNX file at `path`.

    `input_shape` is C x H x W (a leading batch size is ignored: the batch is dynamic).
    `target_layers` are module names such as `layer4` or `features.16`.
    """
    input_shape = tuple(int(d) for d in input_shape[-3:])
    model = model.eval()
    layers = list(target_layers) if target_layers else [default_layer(model, input_shape)]
    modules = dict(model.named_modules())
    for layer in layers:
        if layer not in modules or not layer:
            raise unknown_name_error("layer", layer, [n for n in modules if n])
    wrapper = _WithActivations(model, [modules[layer] for layer in layers])
    activation_names = [f"onnxcam_target_{i}" for i in range(len(layers))]
    example = torch.randn(EXPORT_BATCH, *input_shape)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # e.g. "torchvision is not installed": noise, not news
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper, (example,), input_names=["input"], output_names=["logits", *activation_names],
                dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False,
            )
    except Exception as error:
        raise ExportError(f"torch.onnx.export failed: {str(error).splitlines()[0]}") from error
    finally:
        exporter_log.setLevel(level)
        wrapper.remove_hooks()
    onnx_model = program.model_proto
    kept = [o for o in onnx_model.graph.output if o.name not in activation_names]
    del onnx_model.graph.output[:]
    onnx_model.graph.output.extend(kept)
    return export_onnx(onnx_model, path, target_layers=activation_names, layer_names=layers, mean=mean, std=std,
                       labels=labels)


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
        logits = self.model(x)
        return (logits, *(self.captured[i] for i in range(len(self.handles))))

    def remove_hooks(self):
        for handle in self.handles:
            handle.remove()
