"""What the pure MaxPool rule costs: the rule never edits the forward node, so where the forward MaxPool has no
Indices output it adds a twin MaxPool (same input, same attributes) that returns them. This script times, side
by side in one process, the explainable file made that way against one made from a copy of the model whose
forward MaxPool already returns Indices (which the rule then reuses), and counts the MaxPool nodes left in
ONNX Runtime's optimised graph (does it merge the twin?).

    python benchmarks/maxpool_twin.py [--batch 8] [--size 112]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxcam.core.timing import interleaved
from onnxcam.exporters import export_onnx


def vgg_like(channels: int, size: int, with_indices: bool) -> onnx.ModelProto:
    """Conv-ReLU, a 2x2 MaxPool after the target (as in VGG's last stage), global pooling and a linear head."""
    rng = np.random.default_rng(0)
    pool_outputs = ["pool", "indices"] if with_indices else ["pool"]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["target"]),
             helper.make_node("MaxPool", ["target"], pool_outputs, kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("GlobalAveragePool", ["pool"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["scores"], transB=1)]
    weights = [numpy_helper.from_array((rng.standard_normal(s) * 0.1).astype(np.float32), n)
               for n, s in (("w1", (channels, 3, 3, 3)), ("w2", (channels, channels, 3, 3)), ("fc", (10, channels)))]
    outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])]
    if with_indices:  # the Indices output must be used for the optimiser to keep it
        outputs.append(helper.make_tensor_value_info("indices", TensorProto.INT64, None))
    graph = helper.make_graph(nodes, "vgg_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 ["N", 3, size, size])],
                              outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def session(path: Path, optimized: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    options.log_severity_level = 3  # its note on saving an NCHWc-optimised graph is not news here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--channels", type=int, default=64)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    x = np.random.default_rng(1).standard_normal((args.batch, 3, args.size, args.size)).astype(np.float32)
    calls, counts = {}, {}
    for name, with_indices in (("twin MaxPool (pure rule)", False), ("forward MaxPool's own Indices", True)):
        spec = export_onnx(vgg_like(args.channels, args.size, with_indices), folder / f"{with_indices}.onnx",
                           layers=["target"])
        run = session(folder / f"{with_indices}.onnx", folder / f"{with_indices}.opt.onnx")
        feeds = {"x": x, spec.class_input: np.full(args.batch, -1, np.int64)}
        names = [spec.scores, spec.activations[0], spec.gradients[0]]
        calls[name] = lambda run=run, feeds=feeds, names=names: run.run(names, feeds)
        optimised = onnx.load(str(folder / f"{with_indices}.opt.onnx"))
        counts[name] = sum(node.op_type == "MaxPool" for node in optimised.graph.node)
    medians = {name: float(np.median(times)) * 1000 for name, times in interleaved(calls, 30, 60.0).items()}
    base = medians["forward MaxPool's own Indices"]
    for name, ms in medians.items():
        print(f"{name:<32} {ms:8.2f} ms  x{ms / base:5.3f}  MaxPool nodes after ORT's optimiser: {counts[name]}")


if __name__ == "__main__":
    main()
