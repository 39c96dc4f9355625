"""The CUDA provider path: same explanations as on CPU, and a batch already on the GPU bound in place.

Marked `gpu`; skipped wherever ONNX Runtime's CUDA provider cannot run (CI has no GPU)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import onnxcam
from onnxcam.runtimes import ProviderError, create_session

pytestmark = pytest.mark.gpu
METHODS = ["gradcam", "gradcam++", "eigencam"]


@pytest.fixture(scope="module")
def cuda_explainer(small_onnx):
    try:
        create_session(small_onnx, "cuda")
    except ProviderError as error:
        pytest.skip(str(error))
    return onnxcam.Explainer(small_onnx, provider="cuda")


def _batch(count=3):
    return np.random.default_rng(5).standard_normal((count, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("method", METHODS)
def test_cuda_explanations_equal_the_cpu_ones(cuda_explainer, small_onnx, method):
    assert cuda_explainer.model.runner.device == "cuda"
    cpu = onnxcam.Explainer(small_onnx, provider="cpu").explain(_batch(), method, targets=[0, 3, -1])
    gpu = cuda_explainer.explain(_batch(), method, targets=[0, 3, -1])
    np.testing.assert_array_equal(gpu.classes, cpu.classes)
    np.testing.assert_allclose(gpu.logits, cpu.logits, rtol=1e-2, atol=1e-2)  # TF32 convolutions on Ampere+
    np.testing.assert_allclose(gpu.heatmaps, cpu.heatmaps, atol=3e-2)


def test_a_batch_on_the_gpu_is_bound_in_place(cuda_explainer):
    on_device = ort.OrtValue.ortvalue_from_numpy(_batch(), "cuda", 0)
    assert on_device.device_name().lower() == "cuda"
    got = cuda_explainer.explain(on_device, "gradcam")
    expected = cuda_explainer.explain(_batch(), "gradcam")
    np.testing.assert_allclose(got.heatmaps, expected.heatmaps, atol=1e-5)
    np.testing.assert_array_equal(got.classes, expected.classes)


def test_a_torch_cuda_tensor_goes_through_dlpack(cuda_explainer):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch build has no CUDA")
    got = cuda_explainer.explain(torch.from_numpy(_batch()).cuda(), "gradcam")
    np.testing.assert_allclose(got.heatmaps, cuda_explainer.explain(_batch(), "gradcam").heatmaps, atol=1e-5)


def test_a_bfloat16_file_gets_the_cpu_explanations_on_cuda(cuda_explainer, tmp_path):
    """The foreign corpus's bfloat16 ViT (opset 18, whose Conv ONNX types without bfloat16): its float32 twin runs
    on the CUDA provider and explains as on CPU."""
    from test_foreign import FOREIGN

    onnxcam.exporters.export_onnx(FOREIGN / "vit_bf16_dynamo.onnx", tmp_path / "vit.onnx")
    images = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(3)]
    gpu = onnxcam.Explainer(tmp_path / "vit.onnx", provider="cuda")
    assert gpu.model.runner.device == "cuda"
    cpu = onnxcam.Explainer(tmp_path / "vit.onnx", provider="cpu").explain(images)
    np.testing.assert_allclose(gpu.explain(images).heatmaps, cpu.heatmaps, atol=3e-2)
