"""Perturbation CAMs: the Score-CAM family (masked inputs) and Ablation-CAM (zeroed channels). Pure functions that
build the perturbed tensors and turn the scores of their forward runs into channel weights; the runs are the
caller's (onnxcam.methods.perturbation).
"""

from __future__ import annotations

import numpy as np

from .maps import upsample

SCORE_EPSILON = 1e-8  # torchcam's guard in its per-channel min-max scaling


def score_masks(activations: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Score-CAM's masks (Wang et al., arXiv 1910.01279, eq. 7, as torchcam computes them): each channel scaled
    to [0, 1] by its own spatial min and max (A - min) / (max - min + 1e-8), then upsampled bilinearly to the
    input size. B x K x h x w -> B x K x H x W, float32."""
    batch, channels = activations.shape[:2]
    low = activations.min(axis=(2, 3), keepdims=True)
    shifted = activations - low
    scaled = shifted / (shifted.max(axis=(2, 3), keepdims=True) + SCORE_EPSILON)
    upsampled = upsample(scaled.reshape(batch * channels, *scaled.shape[2:]), size)
    return upsampled.reshape(batch, channels, *size)


def strongest_channels(activations: np.ndarray, count: int | None) -> np.ndarray:
    """Indices (B x N) of the `count` channels with the highest spatial mean activation, per image; every channel
    when `count` is None or not smaller than the number of channels."""
    channels = activations.shape[1]
    if count is None or count >= channels:
        return np.broadcast_to(np.arange(channels), activations.shape[:2]).copy()
    means = activations.mean(axis=(2, 3))
    return np.sort(np.argsort(-means, axis=1, kind="stable")[:, :count], axis=1)


def iscam_coefficients(samples: int) -> np.ndarray:
    """IS-CAM's input scales (Naidu et al., arXiv 2010.03023, as torchcam computes them): c_i = sum_{j<=i} j/N."""
    return np.cumsum(np.arange(1, samples + 1) / samples)


def score_weights(masked_scores: np.ndarray, baseline_scores: np.ndarray, channels: np.ndarray,
                  total_channels: int) -> np.ndarray:
    """Score-CAM's channel weights (Wang et al., eq. 5-6; torchcam's baseline subtraction): the softmax over the
    scored channels of the class score's change, mean over samples, Y_c(M_k (.) X) - Y_c(X).

    masked_scores: B x N x S (N scored channels, S samples each: 1 for Score-CAM, more for SS-CAM and IS-CAM),
    baseline_scores: B, channels: B x N indices. Channels not scored get weight 0. Returns B x K.
    """
    change = masked_scores.astype(np.float64).mean(axis=2) - baseline_scores[:, None]
    change -= change.max(axis=1, keepdims=True)
    softmax = np.exp(change) / np.exp(change).sum(axis=1, keepdims=True)
    weights = np.zeros((len(masked_scores), total_channels))
    np.put_along_axis(weights, channels, softmax, axis=1)
    return weights


def ablation_value(activations: np.ndarray) -> float:
    """What pytorch-grad-cam's AblationLayer writes into an ablated channel: 0 when the smallest activation is 0
    (after a ReLU), else that minimum minus 1e7."""
    low = float(activations.min())
    return 0.0 if low == 0 else low - 1e7


def ablation_weights(scores: np.ndarray, ablated_scores: np.ndarray) -> np.ndarray:
    """Ablation-CAM's weights (Desai & Ramaswamy, WACV 2020, eq. 3; pytorch-grad-cam): the relative drop of the
    class score when channel k is ablated, (y_c - y_c^k) / y_c. scores: B, ablated_scores: B x K."""
    return (scores[:, None] - ablated_scores) / scores[:, None]
