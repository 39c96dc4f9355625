"""Smoothing that wraps a method, as captum's NoiseTunnel wraps an attribution: each wrapper takes what a method
computes and returns the smoothed method, so that any method that can take a smoothing gets it the same way.

- `eigen_smoothed`: pytorch-grad-cam's eigen_smooth, the first principal component of a CAM's weighted terms
  instead of their sum (for the methods whose declaration gives those terms);
- `augmented`: pytorch-grad-cam's aug_smooth, test-time augmentation (flips x intensities) in one session run;
- `noise_tunnel`: SmoothGrad's noise (Smilkov et al., arXiv 1706.03825, eq. 3), an attribution averaged over
  noisy copies of each image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..core.attribution import noisy_inputs
from ..core.errors import ExplainError
from ..core.methods import eigen_smooth
from ..runtimes.binding import host_array
from .registry import METHODS, Call, Method, Result

TTA_FACTORS = (0.9, 1.0, 1.1)  # pytorch-grad-cam's aug_smooth: horizontal flip x these intensity factors


def eigen_smoothed(method: Method) -> Method:
    """`method` with each layer's map the first principal component of its terms (core.methods.eigen_smooth)."""
    if method.terms is None:
        takers = [name for name, declared in METHODS.items() if declared.terms is not None]
        raise ExplainError(f"eigen_smooth applies to the CAMs that sum weighted channels ({', '.join(takers)}), "
                           f"not to {method.name}")
    terms = method.terms
    return dataclasses.replace(method, formula=lambda activations, gradients: eigen_smooth(terms(activations,
                                                                                                  gradients)),
                               terms=None, objects=False)


def augmented(method: Method) -> Method:
    """`method` with aug_smooth: the heatmaps of the batch flipped or not, times 0.9, 1 and 1.1, from ONE run of
    all six copies; each map flipped back, then the six averaged. Each copy's class is chosen on that copy (as
    pytorch-grad-cam does) unless classes are given; the scores and classes reported are the plain copy's."""
    if not method.augmentable:
        raise ExplainError(f"aug_smooth applies to the single-run CAMs, not to {method.name}")

    def run(call: Call) -> Result:
        spec = call.model.spec
        images = host_array(call.batch)
        count = len(images)
        width_axis = 2 if spec.input_layout == "nhwc" else 3
        copies = [view * factor for view in (images, np.flip(images, width_axis)) for factor in TTA_FACTORS]
        stacked = np.ascontiguousarray(np.concatenate(copies), dtype=images.dtype)
        result = call.again(stacked, np.tile(call.classes, len(copies)), method)
        heat = result.heatmaps.reshape(len(copies), count, *spec.input_size)
        heat[len(TTA_FACTORS):] = heat[len(TTA_FACTORS):, ..., ::-1]
        plain = TTA_FACTORS.index(1.0)
        rows = slice(plain * count, (plain + 1) * count)
        return Result(heat.mean(axis=0), result.scores.reshape(len(stacked), -1)[rows], result.selected[rows])

    return dataclasses.replace(method, run=run, augmentable=False, objects=False)


@dataclass(frozen=True)
class NoiseOptions:
    samples: int = 5  # noisy copies of each image
    noise: float = 1.0  # the noise's standard deviation, in the model's input space
    seed: int = 0


Attribution = Callable[[Call], tuple]  # call -> (scores, selected, B x C x H x W attributions)


def noise_tunnel(attribution: Attribution) -> Attribution:
    """`attribution` averaged over `samples` noisy copies of each image (captum's NoiseTunnel, nt_type
    'smoothgrad'): a first run for the classes (where not given) and the scores, then per image ONE run of its
    noisy copies, all explained for the image's class."""
    def smoothed(call: Call):
        options = call.options
        images = host_array(call.batch)
        scores, selected = call.model.run(images, call.classes, [])
        rng = np.random.default_rng(options.seed)
        samples = int(options.samples)
        results = []
        for image, target in zip(images, selected, strict=True):
            noisy = noisy_inputs(image[None], samples, options.noise, rng)
            _, _, attributions = attribution(dataclasses.replace(call, batch=noisy,
                                                                 classes=np.full(samples, target)))
            results.append(attributions.reshape(1, samples, *attributions.shape[1:]).mean(axis=1))
        return scores.reshape(len(images), -1), selected, np.concatenate(results)

    return smoothed
