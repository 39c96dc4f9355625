"""The differentiation engine on graphs built with onnx.helper, no torch involved: every gradient is
checked against central finite differences of the same ONNX Runtime session."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcam.exporters import ExportError, UnsupportedOperator, export_onnx

RNG = np.random.default_rng(0)
C, H, W, K = 4, 6, 6, 3


def _init(name, shape=None, value=None, dtype=np.float32):
    value = RNG.standard_normal(shape).astype(dtype) * 0.5 if value is None else np.asarray(value, dtype=dtype)
    return numpy_helper.from_array(value, name)


def _model(nodes, initializers, opset=18, score="scores"):
    graph = helper.make_graph(
        nodes, "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, H, W])],
        [helper.make_tensor_value_info(score, TensorProto.FLOAT, None)],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def _head(pooled: str):
    """GlobalAveragePool -> Flatten -> Gemm(transB) to K scores from a C-channel map named `pooled`."""
    return ([helper.make_node("GlobalAveragePool", [pooled], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["scores"], transB=1)],
            [_init("fc_w", (K, C)), _init("fc_b", (K,))])


def conv_bn_relu_maxpool():
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["padded"], mode="constant"),
        helper.make_node("Conv", ["padded", "w", "b"], ["conv"], group=2, strides=[1, 1], pads=[1, 0, 0, 1]),
        helper.make_node("BatchNormalization", ["conv", "g", "beta", "mean", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["relu"]),
        helper.make_node("MaxPool", ["relu"], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    head, weights = _head("pool")
    return _model(nodes + head, [
        _init("pads", value=[0, 0, 0, 1, 0, 0, 1, 0], dtype=np.int64), _init("w", (C, C // 2, 3, 3)), _init("b", (C,)),
        _init("g", value=RNG.uniform(0.5, 1.5, C)), _init("beta", (C,)), _init("mean", (C,)),
        _init("var", value=RNG.uniform(0.5, 2, C)), *weights])


def dilated_same_conv_avgpool_reduce_matmul():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["dilated"], dilations=[2, 2], pads=[2, 1, 2, 1]),
        helper.make_node("Conv", ["dilated", "w"], ["conv"], auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("LeakyRelu", ["conv"], ["leaky"], alpha=0.2),
        helper.make_node("AveragePool", ["leaky"], ["avg"], kernel_shape=[2, 2], pads=[1, 1, 0, 0], ceil_mode=1,
                         strides=[2, 2], count_include_pad=0),
        helper.make_node("ReduceMean", ["avg", "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "m"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["scores"]),
    ]
    return _model(nodes, [_init("w", (C, C, 3, 3)), _init("axes", value=[2, 3], dtype=np.int64),
                          _init("m", (C, K)), _init("bias", (1, K))])


def squeeze_excite_concat_split_slice():
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["squeeze"]),
        helper.make_node("HardSigmoid", ["squeeze"], ["gate"], alpha=0.3, beta=0.4),
        helper.make_node("Mul", ["x", "gate"], ["excited"]),
        helper.make_node("Clip", ["excited", "lo", "hi"], ["clipped"]),
        helper.make_node("Concat", ["clipped", "x"], ["both"], axis=1),
        helper.make_node("Split", ["both", "halves"], ["first", "second"], axis=1),
        helper.make_node("Sub", ["first", "second"], ["diff"]),
        helper.make_node("Div", ["diff", "denominator"], ["ratio"]),
        helper.make_node("Slice", ["ratio", "starts", "ends", "slice_axes"], ["cut"]),
        helper.make_node("Flatten", ["cut"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc"], ["pre"], alpha=0.5),
        helper.make_node("Softmax", ["pre"], ["scores"], axis=-1),
    ]
    return _model(nodes, [
        _init("lo", value=-0.8), _init("hi", value=0.9), _init("halves", value=[C, C], dtype=np.int64),
        _init("denominator", value=RNG.uniform(1, 2, (1, C, 1, W))),
        _init("starts", value=[1, -4], dtype=np.int64), _init("ends", value=[5, 1000], dtype=np.int64),
        _init("slice_axes", value=[2, 3], dtype=np.int64), _init("fc", (C * 4 * 4, K)),
    ])


def layernorm_channels_last_hardswish():
    nodes = [
        helper.make_node("Transpose", ["x"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("LayerNormalization", ["nhwc", "ln_g", "ln_b"], ["ln"], axis=-1, epsilon=1e-5),
        helper.make_node("Transpose", ["ln"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("HardSwish", ["nchw"], ["hswish"]),
        helper.make_node("Sigmoid", ["hswish"], ["sig"]),
        helper.make_node("Mul", ["sig", "hswish"], ["silu_like"]),
        helper.make_node("Dropout", ["silu_like"], ["dropped"]),
        helper.make_node("Identity", ["dropped"], ["same"]),
        helper.make_node("Reshape", ["same", "shape"], ["tokens"]),
        helper.make_node("ReduceSum", ["tokens", "token_axis"], ["summed"], keepdims=0),
        helper.make_node("Gemm", ["summed", "fc", "fc_b"], ["scores"], transB=1, beta=0.7),
    ]
    return _model(nodes, [_init("ln_g", (C,)), _init("ln_b", (C,)), _init("shape", value=[0, C, -1], dtype=np.int64),
                          _init("token_axis", value=[2], dtype=np.int64), _init("fc", (K, C)), _init("fc_b", (K,))])


def old_opset_reduce_mean():
    """Opset 13 (ReduceMean with axes as an attribute): the exporter upgrades it to opset 17 first."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("ReduceMean", ["relu"], ["mean"], axes=[2, 3], keepdims=1),
             helper.make_node("Reshape", ["mean", "shape"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["scores"])]
    return _model(nodes, [_init("w", (C, C, 3, 3)), _init("shape", value=[-1, C], dtype=np.int64),
                          _init("fc", (C, K))], opset=13)


def gelu_exact_and_tanh():
    """Opset 20's Gelu in both forms: exact (erf) and the tanh approximation."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Gelu", ["conv"], ["tanh_gelu"], approximate="tanh"),
             helper.make_node("Conv", ["tanh_gelu", "w2"], ["conv2"]),
             helper.make_node("Gelu", ["conv2"], ["gelu"])]
    head, weights = _head("gelu")
    return _model(nodes + head, [_init("w", (C, C, 3, 3)), _init("w2", (C, C, 1, 1)), *weights], opset=20)


GRAPHS = [conv_bn_relu_maxpool, dilated_same_conv_avgpool_reduce_matmul, squeeze_excite_concat_split_slice,
          layernorm_channels_last_hardswish, old_opset_reduce_mean, gelu_exact_and_tanh]


def finite_difference(session, x, image, selected, eps=1e-3):
    """d score[selected] / d x[image], one central difference per element, all in one batched run."""
    count = x[image].size
    steps = np.eye(count, dtype=np.float32).reshape(count, *x.shape[1:]) * eps
    batch = np.concatenate([x[image] + steps, x[image] - steps])
    scores = session.run(["scores"], {"x": batch, "onnxcam_class": np.full(len(batch), -1, np.int64)})[0]
    scores = scores.reshape(len(batch), -1)[:, selected].astype(np.float64)
    return ((scores[:count] - scores[count:]) / (2 * eps)).reshape(x.shape[1:])


@pytest.mark.parametrize("build", GRAPHS, ids=lambda f: f.__name__)
def test_gradients_match_finite_differences(build, tmp_path):
    path = tmp_path / "head.onnx"
    # the output's own values, also where it is a Sigmoid or Softmax: the finite differences are the output's
    spec = export_onnx(build(), path, layers=["x"], explain_probabilities=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = RNG.standard_normal((3, C, H, W)).astype(np.float32)
    scores, selected, gradient = session.run([spec.scores, spec.selected, spec.gradients[0]],
                                             {"x": x, "onnxcam_class": np.array([-1, 0, K - 1], np.int64)})
    assert selected[0] == scores.reshape(3, -1)[0].argmax() and list(selected[1:]) == [0, K - 1]
    assert np.abs(gradient).max() > 0
    for image in range(3):
        expected = finite_difference(session, x, image, selected[image])
        np.testing.assert_allclose(gradient[image], expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())


def test_intermediate_target_and_original_outputs_kept(tmp_path):
    path = tmp_path / "mid.onnx"
    spec = export_onnx(conv_bn_relu_maxpool(), path)  # default target: the last 4-D map before pooling
    assert spec.layers == ["pool"]
    model = onnx.load(str(path))
    assert [o.name for o in model.graph.output][0] == "scores"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = RNG.standard_normal((2, C, H, W)).astype(np.float32)
    activation, gradient = session.run(spec.activations + spec.gradients, {"x": x, "onnxcam_class": np.array([1, 2])})
    assert activation.shape == gradient.shape == (2, C, 3, 3)
    # the head after `pool` is linear: d score_c / d pool = fc_w[c] / (3 * 3) at every position
    fc_w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc_w"))
    np.testing.assert_allclose(gradient[1], np.broadcast_to(fc_w[2][:, None, None] / 9, (C, 3, 3)), rtol=1e-5)


def test_operator_without_rule_is_named_and_nothing_written(tmp_path):
    model = _model([helper.make_node("Sin", ["x"], ["wave"], name="the_sine"), *_head("wave")[0]], _head("wave")[1])
    path = tmp_path / "out.onnx"
    with pytest.raises(UnsupportedOperator, match="operator Sin \\(node 'the_sine'\\)"):
        export_onnx(model, path, layers=["x"])
    assert not path.exists() and not list(tmp_path.iterdir())


def test_no_default_target_whose_gradient_can_be_built_names_the_operator(tmp_path):
    """An operator without a rule between every grid tensor and the score (here after the pooling): the export
    stops with the reason, not with 'name a target layer'."""
    nodes = [helper.make_node("Relu", ["x"], ["relu"]), helper.make_node("GlobalAveragePool", ["relu"], ["gap"]),
             helper.make_node("Sin", ["gap"], ["wave"], name="the_sine"),
             helper.make_node("Flatten", ["wave"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["scores"], transB=1)]
    model = _model(nodes, [_init("fc_w", (K, C)), _init("fc_b", (K,))])
    with pytest.raises(ExportError, match="no grid tensor's gradient could be built: .*Sin \\(node 'the_sine'"):
        export_onnx(model, tmp_path / "out.onnx")
    assert not list(tmp_path.iterdir())


def test_unknown_target_lists_close_names(tmp_path):
    with pytest.raises(ExportError, match="unknown target tensor 'rellu'; closest: relu"):
        export_onnx(conv_bn_relu_maxpool(), tmp_path / "out.onnx", layers=["rellu"])


def test_not_a_model_is_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not protobuf")
    with pytest.raises(ExportError, match="not a readable ONNX model"):
        export_onnx(bad, tmp_path / "out.onnx")


def test_classifier_with_zero_weights_is_refused_as_such(tmp_path):
    """A score that depends on nothing (timm zero-initialises some heads) has no default target, and says why."""
    model = conv_bn_relu_maxpool()
    weights = next(t for t in model.graph.initializer if t.name == "fc_w")
    weights.CopyFrom(_init("fc_w", value=np.zeros((K, C))))
    with pytest.raises(ExportError, match="does not depend on the image: its gradient is zero .* weights all zero"):
        export_onnx(model, tmp_path / "out.onnx")
    assert not list(tmp_path.iterdir())
