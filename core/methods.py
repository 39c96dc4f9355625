"""The Grad-CAM family: each method is a pure function of a target layer's activations A and the
gradients G = dy^c/dA of the selected class score, both B x K x H x W, and returns the map before
upsampling, B x H x W, after the final ReLU.
"""

from __future__ import annotations

import numpy as np


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def _weighted_sum(weights: np.ndarray, activations: np.ndarray) -> np.ndarray:
    """ReLU(sum_k w_k A^k): the map of every channel-weighting method."""
    return _relu(np.einsum("bk,bkhw->bhw", weights, activations))


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is exactly 0 (no epsilon to skew small values)."""
    out = np.zeros(np.broadcast_shapes(numerator.shape, denominator.shape), dtype=numerator.dtype)
    return np.divide(numerator, denominator, out=out, where=denominator != 0)


def gradcam(activations, gradients):
    """Grad-CAM (Selvaraju et al., arXiv 1610.02391, eq. 1-2): alpha_k = mean_ij dy/dA^k_ij."""
    return _weighted_sum(gradients.mean(axis=(2, 3)), activations)


def gradcam_plus_plus(activations, gradients):
    """Grad-CAM++ (Chattopadhay et al., arXiv 1710.11063, eq. 19 with the exponential output of eq. 17).

    alpha_ij^k = g^2 / (2 g^2 + sum_ab A^k_ab g^3) with g = dy/dA^k_ij, and w_k = sum_ij alpha_ij^k ReLU(g).
    Only exactly zero denominators are guarded (alpha = 0 there, where g = 0 too): an additive epsilon
    would dominate alpha wherever gradients are small, as they are deep in a network.
    """
    g2 = gradients * gradients
    denominator = 2 * g2 + activations.sum(axis=(2, 3), keepdims=True) * g2 * gradients
    alpha = _safe_divide(g2, denominator)
    return _weighted_sum((alpha * _relu(gradients)).sum(axis=(2, 3)), activations)


def xgradcam(activations, gradients):
    """XGrad-CAM (Fu et al., arXiv 2008.02312, eq. 14): w_k = sum_ij (A^k_ij / sum_ab A^k_ab) dy/dA^k_ij."""
    share = _safe_divide(activations, activations.sum(axis=(2, 3), keepdims=True))
    return _weighted_sum((share * gradients).sum(axis=(2, 3)), activations)


def hirescam(activations, gradients):
    """HiResCAM (Draelos & Carin, arXiv 2011.08891, eq. 4): ReLU(sum_k dy/dA^k (.) A^k), no averaging."""
    return _relu((gradients * activations).sum(axis=1))


def gradcam_elementwise(activations, gradients):
    """Element-wise Grad-CAM (as in pytorch-grad-cam): sum_k ReLU(dy/dA^k (.) A^k)."""
    return _relu(gradients * activations).sum(axis=1)


def layercam(activations, gradients):
    """LayerCAM (Jiang et al., IEEE TIP 2021, eq. 5-6): ReLU(sum_k ReLU(dy/dA^k_ij) A^k_ij)."""
    return _relu((_relu(gradients) * activations).sum(axis=1))


def first_principal_component(features: np.ndarray) -> np.ndarray:
    """Projection of each position's K-vector on the first principal component, B x H x W.

    With M the centred HW x K matrix of an image, the projection M v1 equals s1 u1, the top
    eigenvector of the smaller Gram matrix (M M^T or M^T M) scaled: no SVD of M is needed.
    The component's sign, arbitrary in any decomposition, is chosen so that the projection's
    largest-magnitude value is positive: the map's peak is the strongest response.
    """
    batch, channels, height, width = features.shape
    rows = features.reshape(batch, channels, height * width).transpose(0, 2, 1).astype(np.float64)
    centred = rows - rows.mean(axis=1, keepdims=True)
    small = height * width <= channels
    gram = centred @ centred.transpose(0, 2, 1) if small else centred.transpose(0, 2, 1) @ centred
    values, vectors = np.linalg.eigh(gram)
    if small:
        projection = vectors[:, :, -1] * np.sqrt(np.maximum(values[:, -1:], 0))
    else:
        projection = np.einsum("bpk,bk->bp", centred, vectors[:, :, -1])
    peak = np.take_along_axis(projection, np.abs(projection).argmax(axis=1)[:, None], axis=1)
    projection *= np.where(peak < 0, -1.0, 1.0)
    return projection.reshape(batch, height, width).astype(features.dtype)


def eigencam(activations, gradients=None):
    """Eigen-CAM (Muhammad & Yeasin, arXiv 2008.00299, eq. 5): the activations' first principal component."""
    return _relu(first_principal_component(activations))


def eigengradcam(activations, gradients):
    """EigenGrad-CAM (as in pytorch-grad-cam): the first principal component of dy/dA (.) A."""
    return _relu(first_principal_component(activations * gradients))


# name -> (function, whether it reads gradients)
METHODS = {
    "gradcam": (gradcam, True),
    "gradcam++": (gradcam_plus_plus, True),
    "xgradcam": (xgradcam, True),
    "hirescam": (hirescam, True),
    "gradcam-elementwise": (gradcam_elementwise, True),
    "layercam": (layercam, True),
    "eigencam": (eigencam, False),
    "eigengradcam": (eigengradcam, True),
}
