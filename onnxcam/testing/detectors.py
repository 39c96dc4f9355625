"""Detectors for tests and benchmarks: nudenet's YOLOv8n file made static at one input size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, shape_inference


def nudenet_file() -> Path:
    """The YOLOv8n detector the nudenet wheel ships (320n.onnx; dynamic input, 18 classes)."""
    import nudenet

    return Path(nudenet.__file__).parent / "320n.onnx"


def with_measured_shapes(src, path, size: tuple[int, int]) -> None:
    """Write `src` with its input fixed at `size` (the batch left free) and every tensor's shape recorded, as
    ONNX Runtime measures it at batches 1 and 2: a dimension that differs between the two is the batch.

    ONNX shape inference cannot follow YOLO heads that compute their reshapes from Shape at run time.
    """
    model = onnx.load(str(src))
    image = model.graph.input[0]
    dims = image.type.tensor_type.shape.dim
    for dim, value in zip(dims[2:], size, strict=True):
        dim.Clear()
        dim.dim_value = value
    del model.graph.value_info[:]
    for output in model.graph.output:
        output.type.tensor_type.ClearField("shape")
    typed = shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*typed.graph.value_info, *typed.graph.output]}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    names = [name for node in model.graph.node for name in node.output if name in types and name not in known]
    probe.graph.output.extend(helper.make_tensor_value_info(name, types[name], None) for name in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    everything = [o.name for o in session.get_outputs()]
    shapes = []
    for batch in (1, 2):
        feed = np.zeros((batch, dims[1].dim_value, *size), dtype=np.float32)
        shapes.append([value.shape for value in session.run(everything, {image.name: feed})])
    recorded = {}
    for name, one, two in zip(everything, *shapes, strict=True):
        if len(one) == len(two):
            recorded[name] = [a if a == b else "batch" for a, b in zip(one, two, strict=True)]
    for output in model.graph.output:
        output.CopyFrom(helper.make_tensor_value_info(output.name, types[output.name], recorded[output.name]))
    model.graph.value_info.extend(helper.make_tensor_value_info(name, types[name], recorded[name])
                                  for name in names if name in recorded)
    onnx.save(model, str(path))
