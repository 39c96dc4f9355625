"""Tensor shapes of a model: ONNX shape inference, completed by running the model where inference stops.

Legacy (TorchScript) exports, Paddle and tf2onnx files often reshape by shapes computed at run time, which
shape inference cannot follow; the gradient rules need static sizes. Where inference leaves a float tensor's
size unknown, the model is run on random images at two batch sizes: a size equal to the batch in both runs
is the batch, a size equal in both is static, anything else stays unknown.
"""

from __future__ import annotations

import onnx
from onnx import helper, shape_inference

from ..errors import ExportError
from .autodiff import GraphBuilder
from .discovery import PROBE_BATCH, ImageInput, random_images, run_model

PROTOBUF_LIMIT = 2**31 - 2**24  # serialised models past this size need their initializers moved out first


def infer_shapes(model: onnx.ModelProto, image: ImageInput, limit: int = PROTOBUF_LIMIT) -> onnx.ModelProto:
    """The model with every float tensor's shape recorded in its value_info, as far as it can be told."""
    model = _inferred(model, limit)
    builder = GraphBuilder(model)
    unknown = [name for node in model.graph.node for name in node.output if name and _unsure(builder, name)]
    if unknown and model.ByteSize() < limit:
        _complete(model, unknown, image)
    return model


def _inferred(model: onnx.ModelProto, limit: int) -> onnx.ModelProto:
    """ONNX shape inference, for models past protobuf's 2 GB too: large initializers are taken out while it
    runs (inference reads only their dims) and put back after."""
    if model.ByteSize() < limit:
        return shape_inference.infer_shapes(model, data_prop=True)
    large = {t.name: t.raw_data for t in model.graph.initializer if len(t.raw_data) > 1024}
    for tensor in model.graph.initializer:
        if tensor.name in large:
            tensor.ClearField("raw_data")
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    finally:
        for tensor in model.graph.initializer:
            if tensor.name in large:
                tensor.raw_data = large[tensor.name]
    for tensor in inferred.graph.initializer:
        if tensor.name in large:
            tensor.raw_data = large[tensor.name]
    return inferred


def _complete(model: onnx.ModelProto, names: list[str], image: ImageInput) -> None:
    """Record the sizes the model really computes for `names` (see the module's docstring)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)  # ORT infers their types
    batches = [image.batch] if isinstance(image.batch, int) else [PROBE_BATCH, PROBE_BATCH + 1]
    try:
        runs = [run_model(probe, names, random_images(image, batch)) for batch in batches]
    except Exception:  # noqa: BLE001 - a model ORT cannot run keeps what inference told
        return
    known = {info.name: info for info in model.graph.value_info}
    for index, name in enumerate(names):
        shapes = [run[index].shape for run in runs]
        if len({len(s) for s in shapes}) != 1:
            continue
        dims = []
        for sizes in zip(*shapes, strict=True):
            if len(set(sizes)) == 1:
                dims.append(sizes[0])
            else:
                dims.append(image.batch if list(sizes) == batches else None)
        elem_type = helper.np_dtype_to_tensor_dtype(runs[0][index].dtype)
        info = helper.make_tensor_value_info(name, elem_type, dims)
        if name in known:
            known[name].CopyFrom(info)
        else:
            model.graph.value_info.append(info)


def _unsure(builder: GraphBuilder, name: str) -> bool:
    """Whether a tensor's type is unknown, or it is a float tensor of unknown sizes past the batch."""
    if builder.elem_type(name) == onnx.TensorProto.UNDEFINED:
        return True
    if not builder.is_float(name):
        return False
    try:
        return None in builder.shape(name)[1:]
    except ExportError:  # an unknown shape is what is asked
        return True


def tensor_shapes(model: onnx.ModelProto, builder: GraphBuilder) -> dict[str, list | None]:
    """Every float tensor the graph computes, in node order, with its shape (None where unknown; a None
    dimension is symbolic, the batch)."""
    shapes = {}
    for node in model.graph.node:
        for name in node.output:
            if name and builder.is_float(name):
                try:
                    shapes[name] = builder.shape(name)
                except ExportError:  # an unknown shape is an answer here
                    shapes[name] = None
    return shapes
