"""Each method is declared once (onnxcam.methods): the command line, the server, capabilities() and the method table
all read the registry, and a method declared there is explained with no other change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import small_net

import onnxcam
from onnxcam.cli import main as cli
from onnxcam.core import methods as formulas
from onnxcam.methods import METHODS, Method
from onnxcam.methods.cams import single_run
from onnxcam.methods.registry import declare, method_table


def test_menus_read_the_registry(small_onnx):
    names = list(METHODS)
    assert list(onnxcam.ALL_METHODS) == names
    for command in ("explain", "demo", "evaluate", "bench"):
        option = next(p for p in cli.commands[command].params if p.name in ("method", "methods"))
        assert list(option.type.choices) == names, command
    assert list(onnxcam.Explainer(small_onnx, provider="cpu").capabilities()) == names


def test_the_method_table_is_rendered_from_the_registry():
    table = method_table()
    for name, method in METHODS.items():
        assert f"| `{name}` | {method.summary} |" in table
    assert table.count("\n") == len(METHODS) + 1


def test_a_method_is_one_declaration(small_onnx):
    """Declared with its formula alone, a method is explained by the Explainer, for classes and for target objects,
    and takes eigen_smooth through its terms."""
    def absolute_gradcam(activations, gradients):  # Grad-CAM with |dy/dA| averaged: a formula for the test
        return formulas.relu(np.einsum("bk,bkhw->bhw", np.abs(gradients).mean(axis=(2, 3)), activations))

    declare(Method("test-absolute-gradcam", single_run, "test only", formula=absolute_gradcam, objects=True,
                   terms=lambda a, g: np.abs(g).mean(axis=(2, 3))[:, :, None, None] * a))
    try:
        explainer = onnxcam.Explainer(small_onnx, provider="cpu")
        x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)).numpy()
        model = small_net()
        activations = {}
        model.features[8].register_forward_hook(lambda m, i, out: activations.update(a=out))
        logits = model(torch.from_numpy(x))
        classes = logits.argmax(dim=1)
        gradients = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), activations["a"])[0]
        weights = gradients.abs().mean(dim=(2, 3))
        expected = torch.relu(torch.einsum("bk,bkhw->bhw", weights, activations["a"])).detach().numpy()
        result = explainer.explain(x, method="test-absolute-gradcam")
        reference = onnxcam.core.heatmaps([expected], (32, 32))
        np.testing.assert_allclose(result.heatmaps, reference, atol=2e-4)
        objects = explainer.explain(x, method="test-absolute-gradcam", targets=onnxcam.targets.Classes(top=1))
        np.testing.assert_allclose(objects.heatmaps, result.heatmaps, atol=1e-5)
        assert explainer.capabilities()["test-absolute-gradcam"] is None
        assert explainer.explain(x, method="test-absolute-gradcam", eigen_smooth=True).heatmaps.shape == (3, 32, 32)
    finally:
        del METHODS["test-absolute-gradcam"]


def test_a_name_is_declared_once():
    with pytest.raises(ValueError, match="declared twice"):
        declare(METHODS["gradcam"])


def test_the_readmes_method_table_is_the_registrys():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = readme.split("<!-- methods: rendered by onnxcam.methods.registry.method_table -->\n")[1]
    assert shown.split("\n<!-- /methods -->")[0] == method_table(), \
        "the README's method table differs from the registry: paste onnxcam.methods.registry.method_table()"


def test_explanation_targets_is_the_old_name_of_classes(small_onnx):
    result = onnxcam.Explainer(small_onnx, provider="cpu").explain(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.warns(FutureWarning, match="'Explanation.targets' is now called 'Explanation.classes'"):
        np.testing.assert_array_equal(result.targets, result.classes)
