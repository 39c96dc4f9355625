"""Files as a user's PyTorch pipeline writes them: the legacy (TorchScript) exporter, at a batch of 2 (tracing
specialises sizes 0 and 1), with the batch left dynamic."""

from __future__ import annotations

import warnings

import torch
from torch import nn

EXPORT_BATCH = 2


def legacy_export(model: nn.Module, path, shape, *, opset: int = 17, input: str = "input", output: str = "out"):
    """`model` (in eval mode) written to `path` for inputs of C x H x W `shape`; returns `path`."""
    example = torch.randn(EXPORT_BATCH, *shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice
        torch.onnx.export(model.eval(), (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[input], output_names=[output],
                          dynamic_axes={input: {0: "batch"}, output: {0: "batch"}})
    return path
