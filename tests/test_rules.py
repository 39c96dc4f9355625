"""Every gradient rule against central finite differences of the original graph (issue 9).

CASES maps each operator of the rule table to small graphs built with onnx.helper that put that operator
between a target tensor and the score. Each graph is exported with the target named, the explainable file
runs at batch 3 (no static size in any graph is 3), and its gradient is compared with central differences
of the original graph's selected score, the target fed from outside and everything else computed as
usual, so that paths around an intermediate target still count. Graphs are float64 where ONNX Runtime
runs the operator in double (tight tolerances), float32 elsewhere.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper, shape_inference

from onnxcam.exporters import ExportError, export_onnx
from onnxcam.exporters.autodiff import RULES

BATCH = 3
C, H, W, K = 2, 4, 5, 4  # image channels, height, width and classes: none equals BATCH
DOUBLE, FLOAT = TensorProto.DOUBLE, TensorProto.FLOAT


@dataclass
class Case:
    """A graph from the image (N x C x H x W, copied to `x`: a target is a tensor the graph computes) through
    `nodes` to the tensor `out`, which a random linear head turns into K scores; `constants` are initializers
    (float arrays take the case's element type)."""

    nodes: list[onnx.NodeProto]
    out: str
    constants: dict[str, np.ndarray]
    target: str = "x"
    dtype: int = DOUBLE
    opset: int = 18
    head: bool = True  # False: `out` already is N x K
    declared: dict[str, list] = field(default_factory=dict)  # shapes as an exporter writes them (value_info)

    def model(self) -> onnx.ModelProto:
        float_type = helper.tensor_dtype_to_np_dtype(self.dtype)
        initializers = [numpy_helper.from_array(v.astype(float_type) if v.dtype.kind == "f" else v, name)
                        for name, v in self.constants.items()]
        nodes = [node("Identity", "image", "x"), *self.nodes]
        if self.head:
            shape = _shapes(self, nodes, initializers).get(self.out)
            width = int(np.prod((shape if shape and 0 not in shape[1:] else _run_shape(self, nodes, initializers))[1:]))
            initializers.append(numpy_helper.from_array(random(width, K).astype(float_type), "head_w"))
            nodes += [helper.make_node("Flatten", [self.out], ["head_flat"]),
                      helper.make_node("MatMul", ["head_flat", "head_w"], ["scores"])]
        graph = helper.make_graph(nodes, "case", [helper.make_tensor_value_info("image", self.dtype, ["N", C, H, W])],
                                  [helper.make_tensor_value_info("scores" if self.head else self.out, self.dtype,
                                                                 None)], initializers,
                                  value_info=[helper.make_tensor_value_info(name, self.dtype, shape)
                                              for name, shape in self.declared.items()])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=10)


def _shapes(case: Case, nodes, initializers) -> dict[str, list]:
    graph = helper.make_graph(nodes, "partial", [helper.make_tensor_value_info("image", case.dtype, ["N", C, H, W])],
                              [], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)], ir_version=10)
    inferred = shape_inference.infer_shapes(model).graph.value_info
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred}


def _run_shape(case: Case, nodes, initializers) -> list[int]:
    """The shape of `out` for one image, by running the graph (where shape inference cannot tell)."""
    graph = helper.make_graph(nodes, "partial", [helper.make_tensor_value_info("image", case.dtype, ["N", C, H, W])],
                              [helper.make_tensor_value_info(case.out, case.dtype, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return list(session.run(None, {"image": images(case.dtype)[:1]})[0].shape)


_rng = np.random.default_rng(0)
RNG_INDICES = np.random.default_rng(1)


def random(*shape) -> np.ndarray:
    return _rng.standard_normal(shape)


def ints(*values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def node(op_type: str, inputs, output: str = "y", **attrs) -> onnx.NodeProto:
    outputs = [output] if isinstance(output, str) else output
    return helper.make_node(op_type, inputs.split() if isinstance(inputs, str) else inputs, outputs, **attrs)


def single(op_type: str, extra: str = "", constants=None, **options) -> Case:
    """x -> op_type(x, *extra) -> y -> head; attributes are the options Case does not take."""
    fields = {k: options.pop(k) for k in ("dtype", "opset", "target") if k in options}
    return Case([node(op_type, ["x", *extra.split()], **options)], "y", constants or {}, **fields)


CaseBuilder = Callable[[], Case]
CASES: dict[str, dict[str, CaseBuilder]] = {}


def cases(op_type: str, builder: CaseBuilder | None = None, **variants: CaseBuilder) -> None:
    """Register the graphs that exercise `op_type`'s rule: one unnamed, or named variants."""
    CASES.setdefault(op_type, {}).update({"": builder} if builder else variants)


def batched(name: str, indices: np.ndarray) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """Nodes making `name`: int64 `indices` (first dimension 1) repeated over the batch of x at run time."""
    return [node("Shape", "x", f"{name}_shape", end=1),
            node("Concat", [f"{name}_shape", f"{name}_rest"], f"{name}_dims", axis=0),
            node("Expand", [f"{name}_const", f"{name}_dims"], name)], \
        {f"{name}_rest": ints(*indices.shape[1:]), f"{name}_const": indices}


# element-wise ---------------------------------------------------------------------------------------------
for _op in ("Identity", "Dropout", "Neg", "Relu", "Sigmoid", "Tanh", "Exp", "Abs"):
    cases(_op, lambda op=_op: single(op))
cases("LeakyRelu", lambda: single("LeakyRelu", alpha=0.3))
cases("Clip", both_bounds=lambda: single("Clip", "lo hi", {"lo": np.array(-0.5), "hi": np.array(0.8)}),
      min_only=lambda: single("Clip", "lo", {"lo": np.array(-0.5)}),
      max_only=lambda: Case([node("Clip", ["x", "", "hi"])], "y", {"hi": np.array(0.8)}))
cases("HardSigmoid", lambda: single("HardSigmoid", alpha=0.5, beta=0.6, dtype=FLOAT))  # kinks at -1.2 and 0.8
cases("HardSwish", lambda: Case([node("Mul", "x two", "x2"), node("HardSwish", "x2")], "y",
                                {"two": np.array(2.0)}, dtype=FLOAT))  # kinks at +-3, 0.1 from any 2x
cases("Sqrt", lambda: Case([node("Exp", "x", "e"), node("Sqrt", "e")], "y", {}))
cases("Reciprocal", lambda: Case([node("Exp", "x", "e"), node("Reciprocal", "e")], "y", {}))
cases("Log", lambda: Case([node("Sigmoid", "x", "s"), node("Log", "s")], "y", {}))
cases("Erf", lambda: single("Erf", dtype=FLOAT))
cases("Gelu", exact=lambda: single("Gelu", dtype=FLOAT, opset=20),
      tanh=lambda: single("Gelu", approximate="tanh", dtype=FLOAT, opset=20))
cases("Pow", float_exponent=lambda: Case([node("Exp", "x", "e"), node("Pow", "e p")], "y", {"p": np.array(1.5)}),
      int_exponent=lambda: single("Pow", "p", {"p": np.array(3, np.int64)}))
cases("Cast", lambda: Case([node("Cast", "x", "wide", to=DOUBLE), node("Mul", "wide wide", "square"),
                            node("Cast", "square", to=FLOAT)], "y", {}, dtype=FLOAT))
cases("CastLike", lambda: Case([node("Cast", "x", "wide", to=DOUBLE), node("Mul", "wide wide", "square"),
                                node("CastLike", "square x")], "y", {}, dtype=FLOAT))

# arithmetic with broadcasting: the constant broadcast over x, and x's channel mean `m` broadcast over x
MEAN = node("ReduceMean", "x one", "m", keepdims=1)
for _op in ("Add", "Sub", "Mul"):
    cases(_op, constant=lambda op=_op: single(op, "b", {"b": random(C, 1, 1)}),
          broadcast_first=lambda op=_op: Case([MEAN, node(op, "m x")], "y", {"one": ints(1)}))
cases("Mul", same_operand=lambda: single("Mul", "x"))
# an intermediate target, read by the operator and by a residual path, with a path from the image around it
cases("Add", residual_around_target=lambda: Case([node("Exp", "x", "h"), node("Softmax", "h", "s", axis=1),
                                                  node("Add", "s h", "r"), node("Mul", "r x")], "y", {}, target="h"))
cases("Div", constant_numerator=lambda: Case([node("Exp", "x", "e"), node("Div", "b e")], "y", {"b": random(1, W)}),
      both_from_x=lambda: Case([MEAN, node("Exp", "m", "e"), node("Div", "x e")], "y", {"one": ints(1)}))
cases("Where", lambda: Case([node("Greater", "x zero", "positive"), MEAN,
                             node("Where", "positive m b")], "y", {"zero": np.array(0.0), "b": random(H, 1),
                                                                   "one": ints(1)}))
cases("Expand", lambda: Case([node("ReduceMean", "x three", "m", keepdims=1), node("Unsqueeze", "m one", "u"),
                              node("Expand", "u shape")], "y",
                             {"three": ints(3), "one": ints(1), "shape": ints(1, 2, 1, 1, W)}))

# windows and linear algebra ------------------------------------------------------------------------------
cases("Conv", groups_dilations_strides=lambda: single(
          "Conv", "w b", {"w": random(4, 1, 2, 2), "b": random(4)}, group=2, dilations=[1, 2], strides=[2, 1],
          pads=[1, 2, 0, 1], dtype=FLOAT),
      same_upper=lambda: single("Conv", "w", {"w": random(C, C, 2, 2)}, auto_pad="SAME_UPPER", strides=[2, 1],
                                dtype=FLOAT))
cases("MaxPool", pads_ceil=lambda: single("MaxPool", kernel_shape=[2, 2], strides=[3, 1], pads=[0, 1, 0, 0],
                                          ceil_mode=1),
      with_indices=lambda: single("MaxPool", output=["y", "where"], kernel_shape=[2, 2], dilations=[2, 1]))
cases("AveragePool",
      exclude_pad_ceil=lambda: single("AveragePool", kernel_shape=[2, 2], strides=[3, 1], pads=[0, 1, 0, 0],
                                      ceil_mode=1, count_include_pad=0, dtype=FLOAT),
      include_pad=lambda: single("AveragePool", kernel_shape=[2, 2], strides=[1, 3], pads=[1, 1, 1, 1],
                                 count_include_pad=1, dtype=FLOAT))
cases("GlobalAveragePool", lambda: single("GlobalAveragePool", dtype=FLOAT))
FLAT = node("Flatten", "x", "flat")
FLAT_T = node("Transpose", "flat", "flat_t", perm=[1, 0])
SIZE = C * H * W
cases("Gemm",
      a_plain=lambda: Case([FLAT, node("Gemm", "flat w c", alpha=0.7, beta=1.3)], "y",
                           {"w": random(SIZE, K), "c": random(K)}),
      a_both_transposed=lambda: Case([FLAT, FLAT_T, node("Gemm", "flat_t w", transA=1, transB=1)], "y",
                                     {"w": random(K, SIZE)}),
      b_transposed=lambda: Case([FLAT, node("Gemm", "w flat c", "kn", transB=1, beta=0.5),
                                 node("Transpose", "kn", perm=[1, 0])], "y", {"w": random(K, SIZE), "c": random(K, 1)}),
      b_a_transposed=lambda: Case([FLAT, FLAT_T, node("Gemm", "w flat_t", "kn", transA=1),
                                   node("Transpose", "kn", perm=[1, 0])], "y", {"w": random(SIZE, K)}))
cases("MatMul", constant_second=lambda: single("MatMul", "w", {"w": random(W, 6)}),
      constant_first_broadcast=lambda: Case([node("MatMul", "w x")], "y", {"w": random(2, H)}),
      both_from_x=lambda: Case([node("Transpose", "x", "xt", perm=[0, 1, 3, 2]), node("MatMul", "x xt")], "y", {}),
      vector_second=lambda: single("MatMul", "v", {"v": random(W)}),
      vector_first=lambda: Case([node("MatMul", "v x")], "y", {"v": random(H)}))

# normalisation --------------------------------------------------------------------------------------------
cases("BatchNormalization", lambda: single("BatchNormalization", "g b mean var", {
    "g": random(C), "b": random(C), "mean": random(C), "var": np.exp(random(C))}, epsilon=1e-3))
cases("LayerNormalization", last_axis=lambda: single("LayerNormalization", "g b", {"g": random(W), "b": random(W)}),
      from_channels=lambda: single("LayerNormalization", "g", {"g": random(C, H, W)}, axis=1, epsilon=1e-3))
cases("Softmax", channels=lambda: single("Softmax", axis=1), last=lambda: single("Softmax"))
cases("LogSoftmax", lambda: single("LogSoftmax", axis=2))

# reductions -----------------------------------------------------------------------------------------------
cases("ReduceMean", keepdims_0=lambda: single("ReduceMean", "axes", {"axes": ints(2, 3)}, keepdims=0),
      negative_axis=lambda: single("ReduceMean", "axes", {"axes": ints(-1)}),
      opset_13_attribute=lambda: single("ReduceMean", axes=[2], keepdims=0, opset=13))
cases("ReduceSum", keepdims_0=lambda: single("ReduceSum", "axes", {"axes": ints(1, 3)}, keepdims=0),
      empty_axes_noop=lambda: single("ReduceSum", noop_with_empty_axes=1))

# moving data ----------------------------------------------------------------------------------------------
cases("Flatten", lambda: single("Flatten"))
cases("Reshape", lambda: single("Reshape", "shape", {"shape": ints(0, 5, -1)}))
cases("Squeeze", lambda: Case([node("Unsqueeze", "x axes", "u"), node("Squeeze", "u axes")], "y",
                              {"axes": ints(2, -1)}))
cases("Unsqueeze", lambda: single("Unsqueeze", "axes", {"axes": ints(1, -1)}))
cases("Transpose", lambda: single("Transpose", perm=[0, 3, 1, 2]))
cases("Concat", lambda: Case([node("Exp", "x", "e"), node("Concat", "x e x", axis=-2)], "y", {}))
cases("Split", sizes_some_unused=lambda: Case([node("Split", "x sizes", ["a", "unused", "c"], axis=2),
                                               node("Mul", "a c")], "y", {"sizes": ints(1, 2, 1)}),
      num_outputs=lambda: Case([node("Split", "x", ["a", "b"], axis=-2, num_outputs=2), node("Sub", "b a")], "y", {}))
cases("Slice", steps=lambda: single("Slice", "starts ends axes steps", {
          "starts": ints(0, 1), "ends": ints(4, 5), "axes": ints(2, 3), "steps": ints(2, 2)}),
      negative_start=lambda: single("Slice", "starts ends axes", {
          "starts": ints(-4), "ends": ints(np.iinfo(np.int64).max), "axes": ints(-1)}),
      default_axes=lambda: single("Slice", "starts ends", {
          "starts": ints(0, 0, 1), "ends": ints(np.iinfo(np.int64).max, 1, -1)}))
cases("Gather", negative_indices=lambda: single("Gather", "i", {"i": ints(-1, 0)}, axis=3),
      scalar_index=lambda: single("Gather", "i", {"i": np.array(1, np.int64)}, axis=1),
      matrix_indices=lambda: single("Gather", "i", {"i": ints([0, 1], [1, -1])}, axis=2))
cases("Pad", constant_negative=lambda: single("Pad", "pads value", {
          "pads": ints(0, 0, 1, -1, 0, 0, -1, 2), "value": np.array(0.5)}),
      constant_axes=lambda: Case([node("Pad", ["x", "pads", "", "axes"])], "y",
                                 {"pads": ints(2, 1, 0, 1), "axes": ints(1, -1)}))


# rules for the operators foreign files use (issue 10) ------------------------------------------------------
cases("Softplus", lambda: single("Softplus", dtype=FLOAT))
cases("Softsign", lambda: single("Softsign", dtype=FLOAT))
cases("Mish", lambda: single("Mish"))
cases("Elu", lambda: single("Elu", alpha=0.7, dtype=FLOAT))
cases("Selu", lambda: single("Selu", dtype=FLOAT))
cases("Celu", lambda: single("Celu", alpha=0.8, dtype=FLOAT))
cases("ThresholdedRelu", lambda: single("ThresholdedRelu", alpha=0.5, dtype=FLOAT))  # 0.05 from any x
cases("PRelu", lambda: single("PRelu", "slope", {"slope": random(C, 1, 1)}))
cases("Sum", lambda: Case([MEAN, node("Mul", "x x", "square"), node("Sum", "x m square b")], "y",
                          {"one": ints(1), "b": random(W)}))
cases("Mean", lambda: Case([MEAN, node("Mean", "x m b")], "y", {"one": ints(1), "b": random(H, 1)}, dtype=FLOAT))
for _op in ("Max", "Min"):  # x, -0.6 x, the channel mean shifted off the grid of x, a constant: no ties
    cases(_op, lambda op=_op: Case([node("Mul", "x factor", "scaled"), MEAN, node("Add", "m shift", "shifted"),
                                    node(op, "x scaled shifted b")], "y",
                                   {"one": ints(1), "factor": np.array(-0.6), "shift": np.array(0.0137),
                                    "b": random(W)}))
cases("ReduceMax", keepdims_0=lambda: single("ReduceMax", "axes", {"axes": ints(2, 3)}, keepdims=0),
      channels=lambda: single("ReduceMax", "axes", {"axes": ints(1)}))
cases("ReduceMin", lambda: single("ReduceMin", "axes", {"axes": ints(-1)}, keepdims=0))
cases("ReduceL2", lambda: single("ReduceL2", "axes", {"axes": ints(2)}))
cases("ReduceLogSumExp", lambda: single("ReduceLogSumExp", "axes", {"axes": ints(1, 3)}, keepdims=0))
cases("ReduceSumSquare", lambda: single("ReduceSumSquare", "axes", {"axes": ints(3)}))
cases("ReduceL1", lambda: single("ReduceL1", "axes", {"axes": ints(2, 3)}, keepdims=0))
cases("GlobalMaxPool", lambda: single("GlobalMaxPool", dtype=FLOAT))
cases("InstanceNormalization", lambda: single("InstanceNormalization", "g b", {"g": random(C), "b": random(C)},
                                              epsilon=1e-3, dtype=FLOAT))
FOUR_CHANNELS = [node("Exp", "x", "e"), node("Concat", "x e", "x4", axis=1)]
cases("GroupNormalization",  # opset 21; the deprecated opset-18 form (one scale per group) fails ONNX's checker
      # float32: the statistics are float32 anyway (stash_type); the output's shape declared, as ONNX shape
      # inference leaves it unknown
      lambda: Case([*FOUR_CHANNELS, node("GroupNormalization", "x4 g b", num_groups=2, epsilon=1e-3)], "y",
                   {"g": random(4), "b": random(4)}, dtype=FLOAT, opset=21, declared={"y": ["N", 4, H, W]}))
cases("Einsum", contraction=lambda: single("Einsum", "w", {"w": random(H, 6)}, equation="nchw,hk->nckw"),
      two_from_x=lambda: Case([node("Exp", "x", "e"), node("Einsum", "x e", equation="nchw,nchv->ncwv")], "y", {}),
      summed_in_one_operand=lambda: single("Einsum", "v", {"v": random(6)}, equation="nchw,k->nck"),
      implicit_ellipsis=lambda: single("Einsum", "w", {"w": random(W, 6)}, equation="...w,wk"))
cases("Tile", lambda: single("Tile", "repeats", {"repeats": ints(1, 2, 1, 2)}))
cases("DepthToSpace", dcr=lambda: Case([*FOUR_CHANNELS, node("DepthToSpace", "x4", blocksize=2)], "y", {}),
      crd=lambda: Case([*FOUR_CHANNELS, node("DepthToSpace", "x4", blocksize=2, mode="CRD")], "y", {}))
cases("SpaceToDepth", lambda: Case([node("Slice", "x start end axis", "x44"), node("SpaceToDepth", "x44", blocksize=2)],
                                   "y", {"start": ints(0), "end": ints(4), "axis": ints(3)}))
cases("Pad", reflect=lambda: single("Pad", "pads", {"pads": ints(0, 0, 1, 2, 0, 0, 2, -1)}, mode="reflect"),
      edge=lambda: single("Pad", "pads", {"pads": ints(0, 0, 2, 0, 0, 0, 1, 4)}, mode="edge"),
      wrap=lambda: single("Pad", "pads", {"pads": ints(0, 0, 1, 1, 0, 0, 1, 1)}, mode="wrap", opset=19),
      reflect_axes=lambda: Case([node("Pad", ["x", "pads", "", "axes"], mode="reflect")], "y",
                                {"pads": ints(2, 1), "axes": ints(-1)}))


def gather_elements() -> Case:
    nodes, constants = batched("i", np.array([[[[-1, 0], [2, 2], [4, -5], [1, 3]]] * C]))  # 1 x C x H x 2, repeats
    return Case([*nodes, node("GatherElements", "x i", axis=3)], "y", constants)


def gather_nd_over_the_batch() -> Case:
    """batch_dims = 1 over the dynamic batch: each image picks (channel, row) pairs, one twice."""
    nodes, constants = batched("i", np.array([[[[1, -1]], [[0, 2]], [[1, -1]], [[-2, 0]]]]))  # 1 x 4 x 1 x 2
    return Case([*nodes, node("GatherND", "x i", batch_dims=1)], "y", constants)


cases("GatherElements", gather_elements)
cases("GatherND",
      plain=lambda: Case([node("Transpose", "x", "chnw", perm=[1, 2, 0, 3]), node("GatherND", "chnw i", "picked"),
                          node("Transpose", "picked", perm=[1, 0, 2])], "y",
                         {"i": ints([0, 1], [1, -1], [0, 1], [1, 0])}),
      batch_dims_1=gather_nd_over_the_batch,
      batch_dims_2=lambda: Case([node("Transpose", "x", "chwn", perm=[1, 2, 3, 0]),
                                 node("GatherND", "chwn i", "picked", batch_dims=2),
                                 node("Transpose", "picked", perm=[3, 0, 1, 2])], "y",
                                {"i": RNG_INDICES.integers(-W, W, (C, H, 2, 1))}))


def resize(inputs: str, constants: dict, opset: int = 19, **attributes) -> Case:
    """Resize of x, float32 (ONNX Runtime has no float64 Resize); "-" in `inputs` leaves an input out."""
    return Case([node("Resize", ["x", *[name if name != "-" else "" for name in inputs.split()]], **attributes)],
                "y", {k: np.asarray(v, np.float32 if k != "sizes" else np.int64) for k, v in constants.items()},
                dtype=FLOAT, opset=opset)


UP_DOWN = {"scales": [1, 1, 1.5, 0.8]}  # height 4 -> 6, width 5 -> 4
CROP = {"roi": [0, 0, 0.2, 0.1, 1, 1, 0.9, 1], **UP_DOWN}
MODES = {"nearest": {"nearest_mode": "round_prefer_ceil"}, "linear": {},
         "cubic": {"cubic_coeff_a": -0.5, "exclude_outside": 1}}
TRANSFORMS = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
              "tf_crop_and_resize")
cases("Resize", **{
    f"{mode}_{transform}": lambda mode=mode, extra=extra, transform=transform: resize(
        "roi scales" if transform == "tf_crop_and_resize" else "- scales", CROP if transform == "tf_crop_and_resize"
        else UP_DOWN, mode=mode, coordinate_transformation_mode=transform, extrapolation_value=0.5, **extra)
    for mode, extra in MODES.items() for transform in TRANSFORMS})
cases("Resize", nearest_floor_legacy=lambda: resize("- scales", {"scales": [1, 1, 2, 2]}, mode="nearest",
                                                    coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
      linear_sizes_axes=lambda: resize("- - sizes", {"sizes": [7, 8]}, mode="linear", axes=[2, 3]),
      linear_antialias_down=lambda: resize("- scales", {"scales": [0.5, 0.8]}, mode="linear", antialias=1, axes=[2, 3]),
      linear_opset_17=lambda: resize("- scales", UP_DOWN, opset=17, mode="linear"),
      cubic_antialias_sizes=lambda: resize("- - sizes", {"sizes": [2, 9]}, mode="cubic", antialias=1, axes=[-2, -1]))


# ConvTranspose, the decoders' upsampling (issue 19): float32, as ONNX Runtime has no float64 ConvTranspose.
# The image is 4 x 5; each case's output sizes are worked out in its comment (full = s (n - 1) + d (k - 1) + 1 +
# output_padding, minus the pads). Odd totals put SAME_UPPER's and SAME_LOWER's extra cell on different sides.
def conv_transpose(weight: tuple, extra: str = "", constants=None, before=(), source: str = "x", **attributes) -> Case:
    return Case([*before, node("ConvTranspose", [source, "w", *extra.split()], **attributes)], "y",
                {"w": random(*weight), **(constants or {})}, dtype=FLOAT)


def conv_transpose_volume() -> Case:
    """3-D: x as N x 1 x 2 x 4 x 5, out 5 x 4 x 10: 2 * 1 + 2 + 1, 3 + 2 - 1, 2 * 4 + 3 + 1 - 1 - 1."""
    return conv_transpose((1, 2, 2, 2, 3), before=[node("Unsqueeze", "x one", "x5")], source="x5",
                          constants={"one": ints(1)}, strides=[2, 1, 2], pads=[0, 1, 1, 0, 0, 1],
                          output_padding=[1, 0, 1])


cases("ConvTranspose",
      # 8 x 15: height 2 * 3 + 2 + 1 - 1 - 0, width 3 * 4 + 2 + 2 - 0 - 1; output_padding past the end pads
      strides_pads_output_padding=lambda: conv_transpose((C, 2, 2, 2), "b", {"b": random(2)}, strides=[2, 3],
                                                          pads=[1, 0, 0, 1], output_padding=[1, 2]),
      # 4 x 5 at stride 1, 4 channels out, asymmetric pads, a non-square kernel: 3 + 2 - 1 and 4 + 3 - 2
      stride_1_non_square=lambda: conv_transpose((C, 4, 2, 3), pads=[0, 1, 1, 1]),
      # two groups of two channels in, three out each; height dilated: 3 + 2 (3 - 1) + 1 - 1 - 0 = 7,
      # width 2 * 4 + 2 - 1 - 2 = 7
      groups_dilations=lambda: conv_transpose((4, 3, 3, 2), before=FOUR_CHANNELS, source="x4", group=2,
                                              dilations=[2, 1], strides=[1, 2], pads=[1, 1, 0, 2]),
      # full 2 * 3 + 3 = 9 by 2 * 4 + 3 = 11 cut to 8 x 9: totals 1 and 2, the odd cell at the start
      output_shape=lambda: conv_transpose((C, 2, 3, 3), strides=[2, 2], output_shape=[8, 9]),
      # with output_padding, which counts in the totals: 2 * 3 + 1 + 3 = 10 -> 9, 3 * 4 + 2 + 2 = 16 -> 14
      output_shape_output_padding=lambda: conv_transpose((C, 2, 3, 2), strides=[2, 3], output_padding=[1, 2],
                                                         output_shape=[9, 14]),
      # 8 x 15 (4 * 2, 5 * 3), totals 2 * 3 + 3 - 8 = 1 and 3 * 4 + 4 - 15 = 1
      same_upper=lambda: conv_transpose((C, 2, 3, 4), strides=[2, 3], auto_pad="SAME_UPPER"),
      same_lower=lambda: conv_transpose((C, 2, 3, 4), strides=[2, 3], auto_pad="SAME_LOWER"),
      valid_dilated=lambda: conv_transpose((C, 2, 2, 2), strides=[2, 2], dilations=[1, 2], output_padding=[1, 1],
                                           auto_pad="VALID"),
      # 1-D, x as N x 2 x 20: 3 * 19 + 1 + 3 - 2 - 1 = 58
      one_d=lambda: conv_transpose((C, 2, 3), before=[node("Reshape", "x flat_shape", "x1")], source="x1",
                                   constants={"flat_shape": ints(0, C, H * W)}, strides=[3], pads=[2, 1],
                                   output_padding=[1]),
      three_d=conv_transpose_volume)


# the test -------------------------------------------------------------------------------------------------
def images(dtype: int) -> np.ndarray:
    """BATCH images of distinct values 0.1 apart (none within 0.05 of an integer multiple of 0.1), shuffled
    per image: finite differences of piecewise operators stay on one piece, and maxima have no ties."""
    count = C * H * W
    values = (np.arange(count) - count / 2 + 0.5) * 0.1
    batch = np.stack([np.random.default_rng(i).permutation(values) for i in range(BATCH)])
    return batch.reshape(BATCH, C, H, W).astype(helper.tensor_dtype_to_np_dtype(dtype))


def scored_in_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float64 graph whose score leaves it in float32: the exporter's class selection (OneHot) has no
    float64 kernel in ONNX Runtime. The gradient is still computed in float64 (the Cast rule), and the finite
    differences read the float64 score before this last cast."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    score = model.graph.output[0]
    if score.type.tensor_type.elem_type == DOUBLE:
        model.graph.node.append(node("Cast", [score.name], "scores_float32", to=FLOAT))
        model.graph.output[0].CopyFrom(helper.make_tensor_value_info("scores_float32", FLOAT, None))
    return model


def fed_from_outside(model: onnx.ModelProto, target: str) -> onnx.ModelProto:
    """The original graph with `target` as an extra input (its producer's output renamed away), everything
    else computed as before."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for n in model.graph.node:
        n.output[:] = [f"{o}_cut" if o == target else o for o in n.output]
    elem_type = model.graph.input[0].type.tensor_type.elem_type
    model.graph.input.append(helper.make_tensor_value_info(target, elem_type, None))
    return model


def target_value(model: onnx.ModelProto, target: str, x: np.ndarray) -> np.ndarray:
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    probe.graph.output.append(helper.make_tensor_value_info(target, probe.graph.input[0].type.tensor_type.elem_type,
                                                            None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([target], {"image": x})[0]


def finite_differences(model: onnx.ModelProto, target: str, x: np.ndarray, selected: np.ndarray,
                       eps: float) -> np.ndarray:
    """d score[selected[i]] / d target[i] for every image i by central differences, one batched run per image."""
    session = ort.InferenceSession(fed_from_outside(model, target).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    targets = target_value(model, target, x)
    gradients = []
    for image, (base, chosen) in enumerate(zip(targets, selected, strict=True)):
        count = base.size
        steps = (np.eye(count) * eps).astype(base.dtype).reshape(count, *base.shape)
        feeds = {target: np.concatenate([base + steps, base - steps]),
                 "image": np.repeat(x[image:image + 1], 2 * count, 0)}
        scores = session.run([model.graph.output[0].name], feeds)[0].reshape(2 * count, -1)[:, chosen]
        gradients.append(((scores[:count].astype(np.float64) - scores[count:]) / (2 * eps)).reshape(base.shape))
    return np.stack(gradients)


def _ids() -> list[tuple[str, str]]:
    return [(op, variant) for op, variants in CASES.items() for variant in variants]


@pytest.mark.parametrize(("op_type", "variant"), _ids(), ids=[f"{op}-{v}" if v else op for op, v in _ids()])
def test_rule_matches_finite_differences(op_type: str, variant: str, tmp_path: Path):
    global _rng  # noqa: PLW0603 (each case draws its weights from its own seed, whichever cases run)
    _rng = np.random.default_rng(zlib.crc32(f"{op_type}-{variant}".encode()))
    case = CASES[op_type][variant]()
    model = case.model()
    assert any(n.op_type == op_type for n in model.graph.node), "the case must use the operator it tests"
    static = {d for shape in _shapes(case, model.graph.node, model.graph.initializer).values() for d in shape}
    assert BATCH not in static, "a static size equal to the batch could hide a rule that mixes the two up"
    spec = export_onnx(scored_in_float32(model), tmp_path / "case.onnx", layers=[case.target],
                       input_layout="nchw", layouts=["nchw"])
    session = ort.InferenceSession(str(tmp_path / "case.onnx"), providers=["CPUExecutionProvider"])
    x = images(case.dtype)
    requested = np.array([-1, 0, K - 1], np.int64)
    scores, selected, gradient = session.run([spec.scores, spec.selected, spec.gradients[0]],
                                             {"image": x, "onnxcam_class": requested})
    assert selected[0] == scores.reshape(BATCH, -1)[0].argmax() and list(selected[1:]) == [0, K - 1]
    double = case.dtype == DOUBLE
    expected = finite_differences(model, case.target, x, selected, 1e-6 if double else 1e-2)
    for image in range(BATCH):
        scale = np.abs(expected[image]).max()
        assert scale > 0, "the score must depend on the target"
        np.testing.assert_allclose(gradient[image], expected[image], rtol=1e-6 if double else 1e-2,
                                   atol=(1e-7 if double else 1e-2) * scale, err_msg=f"image {image}")


REFUSED_CONV_TRANSPOSE = {  # forms whose output runtimes or shape inference read differently
    "shape inference": dict(strides=[2, 2], auto_pad="SAME_UPPER", output_padding=[1, 0]),  # 9 rows inferred, 8 run
    "both output_shape and pads": dict(strides=[2, 2], output_shape=[8, 10], pads=[1, 0, 0, 0]),
    "larger than its full output": dict(strides=[2, 2], auto_pad="SAME_LOWER", kernel_shape=[1, 1]),
}


@pytest.mark.parametrize("why", REFUSED_CONV_TRANSPOSE)
def test_conv_transpose_refuses_what_runtimes_disagree_on(why: str, tmp_path: Path):
    """ONNX Runtime sizes SAME_UPPER's output 4 x 2 whatever output_padding, shape inference adds it; it ignores
    pads beside output_shape, ONNX's reference evaluator applies them; a SAME kernel shorter than the stride leaves
    the runtimes' outputs of different sizes. The export stops, naming the node, rather than guess."""
    attributes = REFUSED_CONV_TRANSPOSE[why]
    kernel = attributes.get("kernel_shape", [3, 3])
    case = conv_transpose((C, 2, *kernel), **attributes)
    with pytest.raises(ExportError, match=f"ConvTranspose node 'y' .*{why}"):
        export_onnx(case.model(), tmp_path / "case.onnx", layers=["x"], input_layout="nchw", layouts=["nchw"])


def covered_elsewhere() -> set[str]:
    """Quantized operators' rules (exporters/autodiff/quantized.py, when present) that tests/test_quantized.py
    names: those have their own finite-difference tests there."""
    path = Path(__file__).with_name("test_quantized.py")
    return set(re.findall(r"[\"'](\w+)[\"']", path.read_text())) if path.exists() else set()


def test_every_rule_has_a_case():
    try:
        from onnxcam.exporters.autodiff.quantized import QUANTIZED_RULES
    except ImportError:
        QUANTIZED_RULES = {}  # noqa: N806 (the module's own name)
    quantized = set(QUANTIZED_RULES)
    rules = set(RULES) | quantized
    assert sorted(rules - (quantized & covered_elsewhere()) - set(CASES)) == [], "rules without a case"
    assert sorted(set(CASES) - rules) == [], "cases for operators without a rule"
