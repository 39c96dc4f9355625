"""Quantized models: the straight-through estimator (STE) of quantization-aware training.

Exact checks on tiny graphs where the STE is known in closed form; the gradient of every quantized operator
against the gradient of the float model the quantized one came from; and the issue's acceptance check: on a
trained classifier, the Grad-CAM map of its int8 versions (QDQ, QOperator, dynamic) correlates with the float
model's map.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper, shape_inference
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from support import shapes
from torch import nn

import onnxcam
from onnxcam.exporters import export_onnx
from onnxcam.exporters.autodiff import QUANTIZED_RULES, GraphBuilder, append_gradients, expose_dequantized, prune

RNG = np.random.default_rng(0)

QOPERATORS = {"QuantizeLinear", "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid",
              "QLinearLeakyRelu", "QLinearSoftmax", "QLinearAveragePool", "QLinearConcat", "DequantizeLinear"}
DYNAMIC = {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "Cast"}

# The rules of QUANTIZED_RULES and the tests that exercise them (tests/test_rules.py may skip these keys).
COVERED_BY_TEST_QUANTIZED = {
    **dict.fromkeys(QOPERATORS, "test_every_operator_follows_the_float_gradient[qoperator]"),
    **dict.fromkeys(DYNAMIC, "test_every_operator_follows_the_float_gradient[dynamic]"),
    "QuantizeLinear": "test_quantize_dequantize_is_the_straight_through_estimator",
    "DequantizeLinear": "test_quantize_dequantize_is_the_straight_through_estimator",
    "MatMulInteger": "test_dynamic_quantization_is_exact_on_codes",
    "QLinearGlobalAveragePool": "test_gradcam_of_quantized_models_matches_the_float_model[qoperator]",
    "MaxPool": "test_gradcam_of_quantized_models_matches_the_float_model[qoperator]",  # over uint8 codes
}


def test_every_rule_is_covered():
    assert set(COVERED_BY_TEST_QUANTIZED) == set(QUANTIZED_RULES)


def gradient_session(model: onnx.ModelProto, target: str) -> ort.InferenceSession:
    """The engine alone, front end aside: outputs the target and the gradient of sum(seed * scores) by it."""
    model = shape_inference.infer_shapes(expose_dequantized(model), data_prop=True)
    model.graph.input.append(helper.make_tensor_value_info("seed", TensorProto.FLOAT, None))
    builder = GraphBuilder(model)
    score = model.graph.output[0].name
    gradient = append_gradients(model, [target], score, builder.value("seed"), builder)[0]
    prune(builder, [gradient.name])
    builder.nodes.append(helper.make_node("Identity", [gradient.name], ["gradient"]))
    model.graph.node.extend(builder.nodes)
    model.graph.initializer.extend(builder.initializers)
    del model.graph.output[:]
    model.graph.output.extend([helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                               for name in (score, target, "gradient")])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def run(session: ort.InferenceSession, x: np.ndarray, seed: np.ndarray) -> list[np.ndarray]:
    return session.run(None, {session.get_inputs()[0].name: x, "seed": seed})


def _graph(nodes, initializers, shape, opset=19):
    graph = helper.make_graph(nodes, "quantized", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


@pytest.mark.parametrize("code_type, axis, scores", [(np.uint8, None, False), (np.int8, 1, False),
                                                     (np.uint8, None, True)])
def test_quantize_dequantize_is_the_straight_through_estimator(code_type, axis, scores):
    """Q -> DQ passes dy exactly where round(x / scale) + zero point is a code, and nothing elsewhere; when
    it quantizes the class scores themselves (DQ writes the graph's output), everywhere."""
    scale = np.float32(0.1) if axis is None else np.array([0.05, 0.1, 0.2], np.float32)
    zero_point = code_type(10) if axis is None else np.array([-5, 0, 7], code_type)
    attributes = {} if axis is None else {"axis": axis}
    model = _graph([helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], **attributes),
                    helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["scores" if scores else "dq"],
                                     **attributes)] + ([] if scores else [helper.make_node("Neg", ["dq"], ["scores"])]),
                   {"s": scale, "zp": zero_point}, ["N", 3, 200])
    x = RNG.uniform(-40, 40, (2, 3, 200)).astype(np.float32)
    seed = RNG.standard_normal(x.shape).astype(np.float32)
    _, _, gradient = run(gradient_session(model, "x"), x, seed)
    info = np.iinfo(code_type)
    per_axis = np.reshape(scale, (-1, 1)), np.reshape(zero_point, (-1, 1)).astype(np.float32)
    code = np.round(x / per_axis[0]) + per_axis[1]
    inside = (code >= info.min) & (code <= info.max)
    assert 0.2 < inside.mean() < 0.9  # both cases are exercised
    expected = seed if scores else np.where(inside, -seed, 0)
    np.testing.assert_allclose(gradient, expected, rtol=1e-6, atol=0)  # dy scale / scale


def test_dynamic_quantization_is_exact_on_codes():
    """x -> DynamicQuantizeLinear -> MatMulInteger -> Cast: on codes, the float matmul's gradient, by the
    batch's dynamic scale: dx = dy (W - w_zp)^T / scale."""
    weight = RNG.integers(0, 256, (6, 4)).astype(np.uint8)
    model = _graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "q_scale", "q_zp"]),
                    helper.make_node("MatMulInteger", ["q", "w", "q_zp", "w_zp"], ["product"]),
                    helper.make_node("Cast", ["product"], ["scores"], to=TensorProto.FLOAT)],
                   {"w": weight, "w_zp": np.uint8(128)}, ["N", 6])
    x = RNG.standard_normal((3, 6)).astype(np.float32)
    seed = RNG.standard_normal((3, 4)).astype(np.float32)
    _, _, gradient = run(gradient_session(model, "x"), x, seed)
    scale = (max(x.max(), 0) - min(x.min(), 0)) / 255
    np.testing.assert_allclose(gradient, seed @ (weight.astype(np.float32) - 128).T / scale, rtol=1e-5)


class Operators(nn.Module):
    """One network that makes onnxruntime.quantization write every QOperator the rules cover."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.query, self.fc = nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x):
        a = nn.functional.leaky_relu(self.c1(x), 0.1)
        r = a + self.c2(a)
        gated = r * torch.sigmoid(self.c3(r))
        tokens = nn.functional.avg_pool2d(torch.cat([gated, r], 1), 2).flatten(2).transpose(1, 2)
        q = self.query(tokens)
        attention = torch.softmax(q @ q.transpose(1, 2), -1)
        return self.fc((attention @ q).mean(1))


class Calibration(CalibrationDataReader):
    def __init__(self, batches: list[np.ndarray], name: str = "image"):
        self.batches = iter([{name: batch} for batch in batches])

    def get_next(self):
        return next(self.batches, None)


def _to_onnx(model: nn.Module, path, size: int) -> None:
    torch.onnx.export(model, torch.randn(2, 3, size, size), str(path), dynamo=False, input_names=["image"],
                      output_names=["scores"], dynamic_axes={"image": {0: "N"}, "scores": {0: "N"}},
                      opset_version=17)


@pytest.mark.parametrize("form", ["qoperator", "qoperator per channel", "qdq", "dynamic"])
def test_every_operator_follows_the_float_gradient(form, tmp_path):
    """The STE gradient at the first convolution's output, with respect to the dequantized map, against the
    float model's exact gradient there (per image, Pearson >= 0.95 on average; >= 0.9 for each image)."""
    float_path, quantized_path = tmp_path / "float.onnx", tmp_path / "int8.onnx"
    _to_onnx(Operators().eval(), float_path, 8)
    batches = [RNG.standard_normal((4, 3, 8, 8)).astype(np.float32) for _ in range(4)]
    if form.startswith("qoperator"):
        quantize_static(float_path, quantized_path, Calibration(batches), quant_format=QuantFormat.QOperator,
                        per_channel=form.endswith("channel"))
        target = "/c1/Conv_output_0_quantized/dequantized"
    elif form == "qdq":
        quantize_static(float_path, quantized_path, Calibration(batches), quant_format=QuantFormat.QDQ)
        target = "/c1/Conv_output_0"
    else:
        quantize_dynamic(float_path, quantized_path, op_types_to_quantize=["Conv", "MatMul"])
        target = "/c1/Conv_output_0"
    ops = {node.op_type for node in onnx.load(str(quantized_path)).graph.node}
    assert ops >= {"dynamic": DYNAMIC, "qdq": {"QuantizeLinear", "DequantizeLinear"}}.get(form, QOPERATORS)
    x = RNG.standard_normal((5, 3, 8, 8)).astype(np.float32)
    seed = np.eye(4, dtype=np.float32)[RNG.integers(0, 4, 5)]
    _, float_map, float_gradient = run(gradient_session(onnx.load(str(float_path)), "/c1/Conv_output_0"), x, seed)
    _, int8_map, int8_gradient = run(gradient_session(onnx.load(str(quantized_path)), target), x, seed)
    assert np.corrcoef(int8_map.ravel(), float_map.ravel())[0, 1] > 0.99
    correlations = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(int8_gradient, float_gradient,
                                                                               strict=True)]
    assert np.mean(correlations) >= 0.95 and min(correlations) >= 0.9, correlations


# The shapes classifier's first ReLU (a map that reaches the score through QLinearConv, MaxPool over codes and
# the head), by the name each format gives it; None: the default target.
FIRST_BLOCK = {"float": "/1/Relu_output_0", "qdq": "/1/Relu_output_0_DequantizeLinear_Output",
               "qdq uint16": "/1/Relu_output_0_DequantizeLinear_Output",
               "qoperator": "/0/Conv_output_0_quantized/dequantized", "dynamic": "/1/Relu_output_0"}


@pytest.fixture(scope="module")
def shapes_models(tmp_path_factory):
    """The trained shapes classifier as float ONNX and in the three int8 formats of onnxruntime.quantization."""
    folder = tmp_path_factory.mktemp("quantized")
    paths = {form: folder / f"{form}.onnx" for form in FIRST_BLOCK}
    _to_onnx(shapes.trained_classifier(), paths["float"], shapes.SIZE)
    images, _, _ = shapes.make(64, seed=7)
    batches = [shapes.to_tensor(images[i:i + 16]).numpy() for i in range(0, 64, 16)]
    for form, quant_format in (("qdq", QuantFormat.QDQ), ("qoperator", QuantFormat.QOperator)):
        quantize_static(paths["float"], paths[form], Calibration(batches), quant_format=quant_format)
    quantize_static(paths["float"], paths["qdq uint16"], Calibration(batches), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt16)
    quantize_dynamic(paths["float"], paths["dynamic"])
    return paths


def _heatmaps(path, out, target, images, classes):
    export_onnx(path, out, layers=[target] if target else None, mean=[0.5] * 3, std=[0.5] * 3)
    return onnxcam.Explainer(out, provider="cpu").explain(list(images), targets=classes).heatmaps


@pytest.mark.parametrize("form", ["qdq", "qdq uint16", "qoperator", "dynamic"])
@pytest.mark.parametrize("layer", ["default", "first block"])
def test_gradcam_of_quantized_models_matches_the_float_model(shapes_models, form, layer, tmp_path):
    """The issue's acceptance check: per image, Pearson >= 0.9 between the quantized model's Grad-CAM map and the
    float model's, on average over a batch of 5 (the export traced 2), for the same classes."""
    images, labels, _ = shapes.make(5, seed=11)
    target = {"default": None, "first block": FIRST_BLOCK}[layer]
    float_maps = _heatmaps(shapes_models["float"], tmp_path / "float.onnx", target and target["float"], images,
                           labels)
    int8_maps = _heatmaps(shapes_models[form], tmp_path / "int8.onnx", target and target[form], images, labels)
    assert int8_maps.dtype == np.float32 and int8_maps.shape == (5, shapes.SIZE, shapes.SIZE)
    correlations = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(int8_maps, float_maps, strict=True)]
    assert np.mean(correlations) >= 0.9, correlations


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float model in float16, as onnxconverter-common's convert_float_to_float16 writes it for these
    operators: float16 weights, input and output."""
    halves = [numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name)
              if t.data_type == TensorProto.FLOAT else t for t in model.graph.initializer]
    del model.graph.initializer[:]
    model.graph.initializer.extend(halves)
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    del model.graph.value_info[:]
    return model


def test_float16_model_is_differentiated_in_float16(shapes_models, tmp_path):
    """The gradient is computed in the model's precision and comes out in it; the heatmaps are float32 and
    match the float32 model's."""
    half = tmp_path / "half.onnx"
    onnx.save(to_float16(onnx.load(str(shapes_models["float"]))), half)
    images, labels, _ = shapes.make(5, seed=11)
    target = FIRST_BLOCK["float"]  # through Conv, ReLU and MaxPool
    explainable = tmp_path / "half.explain.onnx"
    export_onnx(half, explainable, layers=[target], mean=[0.5] * 3, std=[0.5] * 3)
    outputs = {o.name: o.type.tensor_type.elem_type for o in onnx.load(str(explainable)).graph.output}
    assert outputs["onnxcam_gradient_0"] == outputs["onnxcam_activation_0"] == TensorProto.FLOAT16
    half_maps = onnxcam.Explainer(explainable, provider="cpu").explain(list(images), targets=labels).heatmaps
    float_maps = _heatmaps(shapes_models["float"], tmp_path / "float.onnx", target, images, labels)
    assert half_maps.dtype == np.float32
    correlations = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(half_maps, float_maps, strict=True)]
    assert min(correlations) > 0.99, correlations
