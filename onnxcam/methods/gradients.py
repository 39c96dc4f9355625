"""The input-gradient attributions: from the gradient of the class score with respect to the image, which a file
exported with input gradients computes in the same run (core.attribution holds the formulas, as captum's)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core import methods as formulas
from ..core.attribution import (
    INTEGRATION_RULES,
    attribution_heatmaps,
    fullgrad,
    guided_gradcam,
    integrated_gradients,
    integration_points,
    path_inputs,
    saliency,
)
from ..core.errors import ExplainError
from ..core.layouts import to_grid
from ..core.maps import heatmaps
from ..runtimes.binding import host_array
from .registry import Call, Method, Result, declare
from .smoothing import NoiseOptions, noise_tunnel

NEEDS_INPUT_GRADIENT = ("input_gradient",)


def input_gradient_run(call: Call, batch, classes: np.ndarray, guided: bool, names: list[str]) -> list[np.ndarray]:
    """One session run fetching the scores, the classes, `names` and the gradient of the score w.r.t. the input
    (guided backpropagation's where `guided`: on the file's guided copy, its ReLU masks rewritten)."""
    spec = call.model.spec
    runner = call.model.guided_runner if guided else call.model.runner
    return runner.run([spec.scores, spec.selected, *names, spec.input_gradient],
                      {spec.input: batch, spec.class_input: classes})


def _attributions(compute):
    """A method whose attributions come from one run of the input gradient: heatmaps as captum draws them."""
    def run(call: Call) -> Result:
        scores, selected, attributions = compute(call)
        attributions = attributions.astype(np.float32)
        return Result(attribution_heatmaps(attributions), scores, selected, attributions)

    return run


def _guided_backprop(call: Call):
    """Guided backpropagation (Springenberg et al., arXiv 1412.6806): the input gradient, ReLU masks guided."""
    return input_gradient_run(call, call.batch, call.classes, True, [])


def _saliency(call: Call):
    scores, selected, gradient = input_gradient_run(call, call.batch, call.classes, False, [])
    return scores, selected, saliency(gradient)


def _guided_gradcam(call: Call):
    """Guided Grad-CAM: guided backpropagation times the Grad-CAM heatmap, from one run of the guided copy."""
    spec = call.model.spec
    scores, selected, *tensors, guided = input_gradient_run(call, call.batch, call.classes, True,
                                                            spec.activations + spec.gradients)
    count = len(spec.activations)
    maps = [formulas.gradcam(to_grid(a, layout), to_grid(g, layout))
            for a, g, layout in zip(tensors[:count], tensors[count:], spec.layouts, strict=True)]
    return scores, selected, guided_gradcam(guided, heatmaps(maps, spec.input_size))


@dataclass(frozen=True)
class IntegratedGradientsOptions:
    steps: int = 50  # points along the path from the baseline
    integration: str = "gausslegendre"  # or riemann_trapezoid


def black_baseline(spec, channels: int) -> np.ndarray:
    """A black image in the model's input space, C x 1 x 1: -mean/std per channel where the file records them,
    else 0 (inputs taken as they are)."""
    mean = np.array(spec.mean if spec.mean else [0.0] * channels, dtype=np.float32)
    std = np.array(spec.std if spec.std else [1.0] * channels, dtype=np.float32)
    return (-mean / std)[:, None, None]


def _integrated_gradients(call: Call):
    """Integrated Gradients: a first run for the classes (where not given) and the scores, then per image ONE run
    of its m points along the path from a black image."""
    spec, options = call.model.spec, call.options
    if options.integration not in INTEGRATION_RULES:
        raise ExplainError(f"unknown integration '{options.integration}'; choose from {', '.join(INTEGRATION_RULES)}")
    images = host_array(call.batch)
    scores, selected = call.model.run(images, call.classes, [])
    alphas, sizes = integration_points(int(options.steps), options.integration)
    baseline = black_baseline(spec, images.shape[1])
    results = []
    for image, target in zip(images, selected, strict=True):
        points = path_inputs(image[None], alphas, baseline)
        *_, gradients = input_gradient_run(call, points, np.full(len(alphas), target), False, [])
        results.append(integrated_gradients(image[None], gradients, sizes, baseline))
    return scores.reshape(len(images), -1), selected, np.concatenate(results)


def _fullgrad(call: Call) -> Result:
    """FullGrad (core.attribution.fullgrad): one run fetching the input gradient and every bias layer's gradient."""
    spec = call.model.spec
    count = len(spec.biases)
    scores, selected, *tensors, gradient = input_gradient_run(call, call.batch, call.classes, False,
                                                              spec.biases + spec.bias_gradients)
    return Result(fullgrad(host_array(call.batch), gradient, tensors[:count], tensors[count:]), scores, selected)


def _attribution(name: str, compute, summary: str, **declared) -> Method:
    return declare(Method(name, _attributions(compute), summary, needs=NEEDS_INPUT_GRADIENT, **declared))


_attribution("guided-backprop", _guided_backprop, "guided backpropagation (Springenberg et al., arXiv 1412.6806)")
_attribution("guided-gradcam", _guided_gradcam, "Guided Grad-CAM (Selvaraju et al., arXiv 1610.02391)")
_attribution("saliency", _saliency, "Saliency (Simonyan et al., arXiv 1312.6034)")
_attribution("smoothgrad", noise_tunnel(_saliency), "SmoothGrad (Smilkov et al., arXiv 1706.03825): Saliency "
             "averaged over noisy copies", options=NoiseOptions)
_attribution("integrated-gradients", _integrated_gradients, "Integrated Gradients (Sundararajan et al., "
             "arXiv 1703.01365)", options=IntegratedGradientsOptions)
declare(Method("fullgrad", _fullgrad, "FullGrad (Srinivas & Fleuret, arXiv 1905.00780)",
               needs=NEEDS_INPUT_GRADIENT))
