"""Tensor shapes of a model: ONNX shape inference, completed by running the model where inference stops.

Legacy (TorchScript) exports, Paddle and tf2onnx files often reshape and pad by sizes computed at run time
(Shape -> Gather -> Concat -> Reshape), which shape inference cannot always follow, while the gradient rules
need static sizes and constant pads, starts and axes. Once the image size is fixed, such a computation can
depend on the batch only. So the model is run on random images at two batch sizes:
- a float tensor's size equal in both runs is static, one equal to the batch in both is the batch;
- an integer tensor computed from shapes alone (no data flows into it) that is equal in both runs is a
  constant, and becomes one in the graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from ..core.errors import ExportError
from .autodiff import GraphBuilder
from .discovery import PROBE_BATCH, ImageInput, random_images, run_model

PROTOBUF_LIMIT = 2**31 - 2**24  # serialised models past this size need their initializers moved out first
SHAPE_SOURCES = {"Shape", "Size"}
MAX_FOLDED = 4096  # elements: shape computations are small


def infer_shapes(model: onnx.ModelProto, image: ImageInput, limit: int = PROTOBUF_LIMIT) -> onnx.ModelProto:
    """The model with every float tensor's shape recorded in its value_info, as far as it can be told, and its
    batch-independent shape computations folded into constants."""
    model = _inferred(model, limit)
    if model.ByteSize() >= limit:
        return model
    builder = GraphBuilder(model)
    unknown = [name for node in model.graph.node for name in node.output if name and _unsure(builder, name, image)]
    computed = _shape_computations(model, builder)
    if not unknown and not computed:
        return model
    runs = _measure(model, unknown + computed, image)
    if runs is None:
        return model
    batches, values = runs
    if _fold(model, computed, values[len(unknown):]):
        model = _inferred(model, limit)
    _record_shapes(model, unknown, values[:len(unknown)], batches, image)
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


def _shape_computations(model: onnx.ModelProto, builder: GraphBuilder) -> list[str]:
    """Tensors computed from tensor shapes and constants alone, not yet constants, that a node other than a shape
    computation reads (as Reshape's shape, Pad's pads, Slice's starts): integers, and floats computed from a shape
    (an opset-9 Upsample's scales, output size / input size)."""
    constants = {t.name for t in model.graph.initializer}
    derived = set()
    for node in model.graph.node:
        if node.op_type == "Constant":
            constants.update(node.output)
        elif node.op_type in SHAPE_SOURCES or all(not i or i in derived or i in constants for i in node.input):
            from_shape = node.op_type in SHAPE_SOURCES or any(i in derived for i in node.input)
            derived.update(o for o in node.output if builder.elem_type(o) in (onnx.TensorProto.INT64,
                                                                              onnx.TensorProto.INT32)
                           or from_shape and builder.is_float(o))
    read = {i for node in model.graph.node if node.output[0] not in derived for i in node.input}
    return [name for name in derived if name in read and name not in constants]


def _measure(model: onnx.ModelProto, names: list[str], image: ImageInput):
    """(batch sizes, per name the values it took at each) from running the model, or None when it cannot run."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)  # ORT infers their types
    batches = [image.batch] if isinstance(image.batch, int) else [PROBE_BATCH, PROBE_BATCH + 1]
    try:
        runs = [run_model(probe, names, random_images(image, batch)) for batch in batches]
    except ExportError:  # a model ORT cannot run keeps what inference told
        return None
    return batches, [[run[i] for run in runs] for i in range(len(names))]


def _fold(model: onnx.ModelProto, names: list[str], values: list[list[np.ndarray]]) -> bool:
    """Replace each computation whose value did not change with the batch by a Constant; whether any was."""
    constant = {name: runs[0] for name, runs in zip(names, values, strict=True)
                if runs[0].size <= MAX_FOLDED and all(np.array_equal(runs[0], r) for r in runs[1:])}
    if not constant:
        return False
    for node in model.graph.node:
        node.output[:] = [f"{o}/measured" if o in constant else o for o in node.output]
    folded = [helper.make_node("Constant", [], [name], name=f"{name}/constant",
                               value=numpy_helper.from_array(value, f"{name}/value"))
              for name, value in constant.items()]
    nodes = folded + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    known = [v for v in model.graph.value_info if v.name not in constant]
    del model.graph.value_info[:]
    model.graph.value_info.extend(known)
    return True


def _record_shapes(model: onnx.ModelProto, names: list[str], values: list[list[np.ndarray]], batches: list[int],
                   image: ImageInput) -> None:
    """Write the sizes measured for `names` into the model's value_info (see the module's docstring)."""
    known = {info.name: info for info in [*model.graph.value_info, *model.graph.output]}  # outputs: as measured
    builder = GraphBuilder(model)
    for name, runs in zip(names, values, strict=True):
        shapes = [r.shape for r in runs]
        if len({len(s) for s in shapes}) != 1 or (name in known and not _is_unsure(known[name], image)):
            continue
        dims = [sizes[0] if len(set(sizes)) == 1 else image.batch if list(sizes) == batches else None
                for sizes in zip(*shapes, strict=True)]
        elem_type = builder.elem_type(name)  # the measured type where inference has none (bfloat16 runs as float32)
        if elem_type == onnx.TensorProto.UNDEFINED:
            elem_type = helper.np_dtype_to_tensor_dtype(runs[0].dtype)
        info = helper.make_tensor_value_info(name, elem_type, dims)
        if name in known:
            known[name].CopyFrom(info)
        else:
            model.graph.value_info.append(info)


def _is_unsure(info: onnx.ValueInfoProto, image: ImageInput) -> bool:
    tensor_type = info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return True
    dims = list(tensor_type.shape.dim)
    return any(not (d.HasField("dim_value") and d.dim_value > 0) for d in dims[1:]) or \
        bool(dims) and _unnamed_batch(dims[0], image)


def _unnamed_batch(dim, image: ImageInput) -> bool:
    """Whether a first dimension is symbolic under a name other than the image's batch (shape inference names the
    sizes it cannot follow `unk__N`): measured, it is recorded as the batch where it is one."""
    return isinstance(image.batch, str) and not dim.HasField("dim_value") and dim.dim_param != image.batch


def _unsure(builder: GraphBuilder, name: str, image: ImageInput) -> bool:
    """Whether a tensor's type is unknown, or it is a float tensor of unknown sizes past the batch or whose first
    dimension is not known to be the batch."""
    if builder.elem_type(name) == onnx.TensorProto.UNDEFINED:
        return True
    if not builder.is_float(name):
        return False
    try:
        shape = builder.shape(name)
    except ExportError:  # an unknown shape is what is asked
        return True
    return None in shape[1:] or bool(shape) and shape[0] is None and builder.dim_param(name, 0) != image.batch


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
