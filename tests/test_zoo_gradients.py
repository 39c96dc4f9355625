"""export_torch on a zoo of architecture families, checked against PyTorch autograd.

Each model of tests/zoo.py is exported once (traced at batch 2) and run by ONNX Runtime at batch 3,
so the dynamic batch is exercised too. The reference is plain PyTorch: forward hooks capture the
target modules' outputs and torch.autograd.grad differentiates the selected class's score, summed
over the batch, with respect to them. Run with `pytest -s` to see the largest relative gradient
error of each model (max |onnx - torch| / max |torch| over all its targets).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from onnxcam.exporters import export_torch
from zoo import ZOO

BATCH = 3
RTOL = 1e-4
ATOL_SCALE = 1e-4  # absolute tolerance, relative to the largest magnitude of the reference tensor

# name -> reason, for models whose export or gradients are known to be wrong (strict: fixing them fails)
KNOWN_FAILURES: dict[str, str] = {}

MAX_RELATIVE_GRADIENT_ERROR: dict[str, float] = {}


class Case:
    """One exported model, run by ONNX Runtime and by PyTorch on the same inputs."""

    def __init__(self, entry, directory):
        self.entry = entry
        model = entry.build()
        path = directory / f"{entry.name}.onnx"
        export_torch(model, path, input_shape=entry.input_shape, target_layers=entry.targets)

        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((BATCH, *entry.input_shape)).astype(np.float32)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        num_classes = int(np.prod(session.get_outputs()[0].shape[1:]))
        self.classes = np.array([-1, 0, num_classes - 1] if num_classes > 1 else [-1, 0, -1], dtype=np.int64)
        names = [o.name for o in session.get_outputs()]
        self.onnx = dict(zip(names, session.run(None, {"input": self.x, "onnxcam_class": self.classes})))

        captured = {}
        handles = [model.get_submodule(name).register_forward_hook(
            lambda module, args, output, i=i: captured.__setitem__(i, output)) for i, name in enumerate(entry.targets)]
        try:
            logits = model(torch.from_numpy(self.x))
        finally:
            for handle in handles:
                handle.remove()
        flat = logits.reshape(BATCH, -1)
        self.top1 = flat.argmax(1).numpy()
        classes = torch.from_numpy(self.classes)
        selected = torch.where(classes < 0, flat.argmax(1), classes)
        score = flat.gather(1, selected[:, None]).sum()
        activations = [captured[i] for i in range(len(entry.targets))]
        gradients = torch.autograd.grad(score, activations)
        self.torch = {"logits": logits.detach().numpy(), "onnxcam_selected": selected.numpy()}
        for i, (activation, gradient) in enumerate(zip(activations, gradients)):
            self.torch[f"onnxcam_activation_{i}"] = activation.detach().numpy()
            self.torch[f"onnxcam_gradient_{i}"] = gradient.numpy()


def assert_close(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    atol = ATOL_SCALE * float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=atol, err_msg=what)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Exports each zoo model at most once per module run; an export error is kept and raised again."""
    directory = tmp_path_factory.mktemp("zoo")
    done: dict[str, Case | Exception] = {}

    def get(entry) -> Case:
        if entry.name not in done:
            try:
                done[entry.name] = Case(entry, directory)
            except Exception as error:  # noqa: BLE001 - re-raised in every test of this model
                done[entry.name] = error
        result = done[entry.name]
        if isinstance(result, Exception):
            raise result
        return result

    yield get
    if MAX_RELATIVE_GRADIENT_ERROR:
        print("\nlargest relative gradient error (max |onnx - torch| / max |torch|):")
        for name, error in MAX_RELATIVE_GRADIENT_ERROR.items():
            print(f"  {name:20s} {error:.2e}")


def _params():
    for entry in ZOO:
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[entry.name])] if entry.name in KNOWN_FAILURES else []
        yield pytest.param(entry, id=entry.name, marks=marks)


@pytest.mark.parametrize("entry", list(_params()))
def test_forward_outputs_match_torch(cases, entry):
    case = cases(entry)
    assert_close(case.onnx["logits"], case.torch["logits"], "logits")
    np.testing.assert_array_equal(case.onnx["onnxcam_selected"], case.torch["onnxcam_selected"])
    top1_rows = case.classes < 0
    np.testing.assert_array_equal(case.onnx["onnxcam_selected"][top1_rows], case.top1[top1_rows])
    for i, layer in enumerate(entry.targets):
        assert_close(case.onnx[f"onnxcam_activation_{i}"], case.torch[f"onnxcam_activation_{i}"],
                     f"activation of {layer}")


@pytest.mark.parametrize("entry", list(_params()))
def test_gradients_match_autograd(cases, entry):
    case = cases(entry)
    worst = 0.0
    for i, layer in enumerate(entry.targets):
        actual, expected = case.onnx[f"onnxcam_gradient_{i}"], case.torch[f"onnxcam_gradient_{i}"]
        assert actual.shape == expected.shape, f"gradient of {layer}: shape {actual.shape} != {expected.shape}"
        scale = float(np.abs(expected).max())
        assert scale > 0, f"the reference gradient of {layer} is all zero: the check would be vacuous"
        worst = max(worst, float(np.abs(actual - expected).max()) / scale)
    MAX_RELATIVE_GRADIENT_ERROR[entry.name] = worst
    print(f"\n{entry.name}: max relative gradient error {worst:.2e}", end="")
    for i, layer in enumerate(entry.targets):
        assert_close(case.onnx[f"onnxcam_gradient_{i}"], case.torch[f"onnxcam_gradient_{i}"], f"gradient of {layer}")
