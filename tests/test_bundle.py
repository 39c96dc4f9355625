"""Explanations inside the graph: encoded image bytes in, logits and Grad-CAM heatmap out."""

from __future__ import annotations

import cv2
import numpy as np
import onnx
import pytest
from conftest import random_images, run_cli
from support.zoo_transformers import swin, vit

import onnxcam
from onnxcam.core.files import decode_image, encode_png
from onnxcam.exporters import export_torch
from onnxcam.runtimes import Bundle, create_session

OPTIONS = dict(input_shape=(3, 32, 32), layers=["features.6", "features.8"], mean=[0.5] * 3, std=[0.25] * 3)


@pytest.fixture(scope="module")
def files(tmp_path_factory, small_model):
    folder = tmp_path_factory.mktemp("bundle")
    export_torch(small_model, folder / "bundle.onnx", bundled=True, **OPTIONS)
    export_torch(small_model, folder / "plain.onnx", **OPTIONS)
    return folder / "bundle.onnx", folder / "plain.onnx"


def test_bundle_takes_bytes_and_gives_the_numpy_core_heatmap(files):
    bundle_path, plain_path = files
    model = onnx.load(str(bundle_path))
    assert [i.name for i in model.graph.input] == ["image_bytes", "onnxcam_class"]
    assert [o.name for o in model.graph.output] == ["logits", "onnxcam_selected", "heatmap"]
    bundle, explainer = Bundle(bundle_path, provider="cpu"), onnxcam.Explainer(plain_path, provider="cpu")
    for seed, target in [(0, -1), (1, 3)]:
        data = encode_png(random_images(1, seed=seed, size=(32, 32))[0])  # model-sized: no resampling involved
        logits, chosen, heatmap = bundle.explain(data, target)
        expected = explainer.explain(decode_image(data), targets=target)
        assert chosen == expected.classes[0]
        np.testing.assert_allclose(logits, expected.logits[0], rtol=1e-5, atol=1e-5)
        assert heatmap.shape == (32, 32) and heatmap.max() == pytest.approx(1)
        np.testing.assert_allclose(heatmap, expected.heatmaps[0], atol=1e-5)


def test_bundle_resizes_larger_jpegs_itself(files):
    """In-graph resizing (antialiased bilinear) differs from OpenCV's area filter only slightly."""
    bundle_path, plain_path = files
    image = cv2.GaussianBlur(random_images(1, seed=2, size=(96, 128))[0], (9, 9), 3)
    ok, jpeg = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    logits, chosen, heatmap = Bundle(bundle_path, provider="cpu").explain(jpeg.tobytes())
    expected = onnxcam.Explainer(plain_path, provider="cpu").explain(decode_image(jpeg.tobytes()))
    assert chosen == expected.classes[0]
    assert np.corrcoef(heatmap.ravel(), expected.heatmaps[0].ravel())[0, 1] > 0.9


def test_bundle_heatmap_equals_the_numpy_core_on_the_image_it_decoded(files, tmp_path):
    """Past resizing, the in-graph Grad-CAM is the numpy core's: fed the tensor the bundle decoded and
    resized itself, the Python path gives the same heatmap at the image's own size."""
    bundle_path, plain_path = files
    spec = Bundle(bundle_path, provider="cpu").spec
    model = onnx.load(str(bundle_path))
    model.graph.output.append(onnx.helper.make_tensor_value_info(spec.input, onnx.TensorProto.FLOAT, None))
    onnx.save(model, tmp_path / "open.onnx")
    session = create_session(tmp_path / "open.onnx", "cpu", extensions=True)
    ok, jpeg = cv2.imencode(".jpg", random_images(1, seed=3, size=(75, 61))[0])
    feeds = {"image_bytes": np.frombuffer(jpeg.tobytes(), np.uint8), "onnxcam_class": np.array([2], np.int64)}
    logits, heatmap, decoded = session.run([spec.scores, "heatmap", spec.input], feeds)
    expected = onnxcam.Explainer(plain_path, provider="cpu").explain(decoded, targets=2)
    np.testing.assert_allclose(logits, expected.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(heatmap, expected.heatmaps, atol=1e-5)


@pytest.mark.parametrize("build, target", [(vit, "blocks.2.norm1"), (swin, "layers.1.blocks.1.norm1")],
                         ids=["vit-tokens", "swin-channels-last"])
def test_bundles_of_transformers_fold_tokens_onto_the_grid(tmp_path, build, target):
    """Token sequences (CLS dropped) and channels-last maps go onto the grid inside the graph, as in the core."""
    options = dict(input_shape=(3, 32, 32), layers=[target])
    export_torch(build(), tmp_path / "bundle.onnx", bundled=True, **options)
    export_torch(build(), tmp_path / "plain.onnx", **options)
    data = encode_png(random_images(1, seed=4, size=(32, 32))[0])
    logits, chosen, heatmap = Bundle(tmp_path / "bundle.onnx", provider="cpu").explain(data)
    expected = onnxcam.Explainer(tmp_path / "plain.onnx", provider="cpu").explain(decode_image(data))
    assert chosen == expected.classes[0]
    np.testing.assert_allclose(heatmap, expected.heatmaps[0], atol=1e-5)


def test_cli_export_bundle(tmp_path):
    (tmp_path / "nets.py").write_text("from conftest import small_net\n")
    import os
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    result = run_cli("export", "nets:small_net", "-o", "b.onnx", "--input-size", "32", "--bundle", cwd=tmp_path,
                     env=env)
    assert result.returncode == 0, result.stderr
    logits, chosen, heatmap = Bundle(tmp_path / "b.onnx", provider="cpu").explain(encode_png(random_images(1)[0]))
    assert logits.shape == (5,) and heatmap.shape == (32, 32)
