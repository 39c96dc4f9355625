"""Input-gradient attributions: pure functions of the gradient of the class score with respect to the model's
input (B x C x H x W), as captum defines them, and the reduction of such attributions to one heatmap per image.
"""

from __future__ import annotations

import numpy as np

from .maps import upsample

INTEGRATION_RULES = ("gausslegendre", "riemann_trapezoid")


def saliency(input_gradients: np.ndarray) -> np.ndarray:
    """Saliency (Simonyan et al., arXiv 1312.6034, eq. 2; captum's Saliency with abs=True): |dy_c/dx|."""
    return np.abs(input_gradients)


def noisy_inputs(inputs: np.ndarray, samples: int, stdev: float, rng: np.random.Generator) -> np.ndarray:
    """SmoothGrad's inputs (Smilkov et al., arXiv 1706.03825, eq. 3; captum's NoiseTunnel): each image repeated
    `samples` times with Gaussian noise of standard deviation `stdev` added, image-major (B*samples x C x H x W)."""
    repeated = np.repeat(inputs, samples, axis=0)
    return (repeated + rng.normal(0.0, stdev, repeated.shape)).astype(inputs.dtype)


def smoothgrad(noisy_gradients: np.ndarray, samples: int) -> np.ndarray:
    """SmoothGrad (Smilkov et al., eq. 3) over Saliency, as captum's NoiseTunnel(Saliency) with
    nt_type='smoothgrad': the mean over the `samples` noisy copies of each image of |dy_c/dx|."""
    batch = len(noisy_gradients) // samples
    return saliency(noisy_gradients).reshape(batch, samples, *noisy_gradients.shape[1:]).mean(axis=1)


def integration_points(steps: int, rule: str = "gausslegendre") -> tuple[np.ndarray, np.ndarray]:
    """(alphas, step sizes) of the path integral over [0, 1], as captum's approximation methods: Gauss-Legendre
    nodes and weights rescaled from [-1, 1], or the trapezoid rule on `steps` evenly spaced points."""
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (1 + nodes), 0.5 * weights
    if rule == "riemann_trapezoid":
        if steps < 2:
            raise ValueError("the trapezoid rule needs at least 2 steps")
        sizes = np.full(steps, 1.0 / steps)
        sizes[[0, -1]] /= 2
        return np.linspace(0, 1, steps), sizes
    raise ValueError(f"unknown integration rule '{rule}'; choose from {', '.join(INTEGRATION_RULES)}")


def path_inputs(inputs: np.ndarray, alphas: np.ndarray, baseline: float = 0.0) -> np.ndarray:
    """Integrated Gradients' inputs: baseline + alpha (x - baseline) for every alpha, image-major."""
    steps = baseline + alphas[None, :, None, None, None] * (inputs[:, None] - baseline)
    return steps.reshape(-1, *inputs.shape[1:]).astype(inputs.dtype)


def integrated_gradients(inputs: np.ndarray, path_gradients: np.ndarray, step_sizes: np.ndarray,
                         baseline: float = 0.0) -> np.ndarray:
    """Integrated Gradients (Sundararajan et al., arXiv 1703.01365, eq. 3; captum's IntegratedGradients):
    (x - x') sum_i s_i dy_c/dx(x' + alpha_i (x - x')), with the path's gradients image-major."""
    grads = path_gradients.reshape(len(inputs), len(step_sizes), *inputs.shape[1:])
    return (inputs - baseline) * np.einsum("bschw,s->bchw", grads.astype(np.float64), step_sizes)


def attribution_heatmaps(attributions: np.ndarray, outlier_percent: float = 2.0) -> np.ndarray:
    """B x H x W maps in [0, 1] from B x C x H x W attributions, as captum's visualize_image_attr draws a heat map
    with sign 'absolute_value': |sum over channels|, divided by the value where the sorted cumulative sum reaches
    (100 - outlier_percent)% of the total, clipped to 1. An all-zero attribution stays zero."""
    combined = np.abs(attributions.sum(axis=1))
    maps = np.zeros(combined.shape, dtype=np.float32)
    for index, values in enumerate(combined):
        ordered = np.sort(values, axis=None)
        sums = np.cumsum(ordered)
        if sums[-1] <= 0:
            continue
        threshold = ordered[np.argmax(sums >= sums[-1] * 0.01 * (100.0 - outlier_percent))]
        maps[index] = np.clip(values / threshold, 0, 1)
    return maps


def guided_gradcam(guided_gradients: np.ndarray, gradcam_heatmaps: np.ndarray) -> np.ndarray:
    """Guided Grad-CAM (Selvaraju et al., arXiv 1610.02391, sec. 3): guided backpropagation's input gradients
    times the Grad-CAM heatmap upsampled to the input, per channel (B x C x H x W)."""
    return guided_gradients * gradcam_heatmaps[:, None]


def _scaled_channels(terms: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's scale_accross_batch_and_channels without the resize: each B x C channel shifted to
    0 and divided by its maximum + 1e-7."""
    shifted = terms - terms.min(axis=(2, 3), keepdims=True)
    return shifted / (shifted.max(axis=(2, 3), keepdims=True) + 1e-7)


def fullgrad_terms(inputs: np.ndarray, input_gradients: np.ndarray, biases: list[np.ndarray],
                   bias_gradients: list[np.ndarray]) -> np.ndarray:
    """FullGrad's terms (Srinivas & Fleuret, arXiv 1905.00780, eq. 6, as pytorch-grad-cam computes them), B x (C + L)
    x H x W: the input's C channels of scaled |x (.) dy/dx| and, for each of the L layers with a bias, the sum over
    its channels of scaled |b (.) dy/dz| upsampled to the input. Each channel is scaled before upsampling; upsampling
    is linear, so a layer's channels are summed first."""
    size = inputs.shape[2:]
    terms = [_scaled_channels(np.abs(input_gradients * inputs).astype(np.float64))]
    for bias, gradient in zip(biases, bias_gradients, strict=True):
        layer = _scaled_channels(np.abs(bias[None, :, None, None] * gradient).astype(np.float64)).sum(axis=1)
        terms.append((upsample(layer.astype(np.float32), size) if layer.shape[1:] != size else layer)[:, None])
    return np.concatenate(terms, axis=1)


def fullgrad(inputs: np.ndarray, input_gradients: np.ndarray, biases: list[np.ndarray],
             bias_gradients: list[np.ndarray]) -> np.ndarray:
    """FullGrad (Srinivas & Fleuret, arXiv 1905.00780, eq. 6): the sum of its terms (fullgrad_terms), min-max scaled
    with pytorch-grad-cam's 1e-7."""
    total = fullgrad_terms(inputs, input_gradients, biases, bias_gradients).sum(axis=1)
    shifted = total - total.min(axis=(1, 2), keepdims=True)
    return (shifted / (shifted.max(axis=(1, 2), keepdims=True) + 1e-7)).astype(np.float32)
