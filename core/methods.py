"""The Grad-CAM family's formulas: each is a pure function of a target layer's activations A and the
gradients G = dy^c/dA of the selected class score, both B x K x H x W, and returns the map before
upsampling, B x H x W, after the final ReLU.
"""

from __future__ import annotations

import numpy as np

from .errors import ExplainError


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def _weighted_sum(weights: np.ndarray, activations: np.ndarray) -> np.ndarray:
    """ReLU(sum_k w_k A^k): the map of every channel-weighting method."""
    return relu(np.einsum("bk,bkhw->bhw", weights, activations))


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is exactly 0 (no epsilon to skew small values)."""
    out = np.zeros(np.broadcast_shapes(numerator.shape, denominator.shape), dtype=numerator.dtype)
    return np.divide(numerator, denominator, out=out, where=denominator != 0)


def gradcam_weights(activations, gradients):
    """Grad-CAM's channel weights (Selvaraju et al., arXiv 1610.02391, eq. 1): alpha_k = mean_ij dy/dA^k_ij."""
    return gradients.mean(axis=(2, 3))


def gradcam(activations, gradients):
    """Grad-CAM (Selvaraju et al., arXiv 1610.02391, eq. 1-2): alpha_k = mean_ij dy/dA^k_ij."""
    return _weighted_sum(gradcam_weights(activations, gradients), activations)


def gradcam_plus_plus_weights(activations, gradients):
    """Grad-CAM++'s channel weights (Chattopadhay et al., arXiv 1710.11063, eq. 19 with the exponential
    output of eq. 17): alpha_ij^k = g^2 / (2 g^2 + sum_ab A^k_ab g^3) with g = dy/dA^k_ij, and
    w_k = sum_ij alpha_ij^k ReLU(g). Only exactly zero denominators are guarded (alpha = 0 there, where
    g = 0 too): an additive epsilon would dominate alpha wherever gradients are small, as they are deep
    in a network.
    """
    g2 = gradients * gradients
    denominator = 2 * g2 + activations.sum(axis=(2, 3), keepdims=True) * g2 * gradients
    alpha = _safe_divide(g2, denominator)
    return (alpha * relu(gradients)).sum(axis=(2, 3))


def gradcam_plus_plus(activations, gradients):
    """Grad-CAM++ (Chattopadhay et al., arXiv 1710.11063, eq. 19): see gradcam_plus_plus_weights."""
    return _weighted_sum(gradcam_plus_plus_weights(activations, gradients), activations)


def xgradcam_weights(activations, gradients):
    """XGrad-CAM's channel weights (Fu et al., arXiv 2008.02312, eq. 14): sum_ij (A^k_ij / sum_ab A^k_ab) dy/dA^k_ij."""
    share = _safe_divide(activations, activations.sum(axis=(2, 3), keepdims=True))
    return (share * gradients).sum(axis=(2, 3))


def xgradcam(activations, gradients):
    """XGrad-CAM (Fu et al., arXiv 2008.02312, eq. 14): see xgradcam_weights."""
    return _weighted_sum(xgradcam_weights(activations, gradients), activations)


def hirescam(activations, gradients):
    """HiResCAM (Draelos & Carin, arXiv 2011.08891, eq. 4): ReLU(sum_k dy/dA^k (.) A^k), no averaging."""
    return relu((gradients * activations).sum(axis=1))


def gradcam_elementwise(activations, gradients):
    """Element-wise Grad-CAM (as in pytorch-grad-cam): sum_k ReLU(dy/dA^k (.) A^k)."""
    return relu(gradients * activations).sum(axis=1)


def layercam(activations, gradients):
    """LayerCAM (Jiang et al., IEEE TIP 2021, eq. 5-6): ReLU(sum_k ReLU(dy/dA^k_ij) A^k_ij)."""
    return relu((relu(gradients) * activations).sum(axis=1))


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
    return relu(first_principal_component(activations))


def eigengradcam(activations, gradients):
    """EigenGrad-CAM (as in pytorch-grad-cam): the first principal component of dy/dA (.) A."""
    return relu(first_principal_component(activations * gradients))


def class_activation_map(activations: np.ndarray, class_weights: np.ndarray) -> np.ndarray:
    """CAM (Zhou et al., arXiv 1512.04150, eq. 2): M_c = ReLU(sum_k w^c_k A^k), with w^c the row of the linear
    layer that follows global average pooling for each image's class c (B x K)."""
    return _weighted_sum(class_weights, activations)


def fem(activations: np.ndarray, gradients=None, k: float = 2.0) -> np.ndarray:
    """FEM (Fuad et al., IPTA 2020, as pytorch-grad-cam computes it): per channel the binary mask
    A^k > mean(A^k) + k std(A^k) (the k-sigma rule), its spatial mean as the channel weight w_k, and
    ReLU(sum_k w_k A^k). Class-agnostic: it reads no gradient."""
    means = activations.mean(axis=(2, 3), keepdims=True)
    threshold = means + k * activations.std(axis=(2, 3), keepdims=True)
    return _weighted_sum((activations > threshold).mean(axis=(2, 3)).astype(activations.dtype), activations)


def kpcacam(activations: np.ndarray, gradients=None, kernel: str = "sigmoid", gamma: float | None = None) -> np.ndarray:
    """KPCA-CAM (Karmani et al., arXiv 2410.00267, as pytorch-grad-cam computes it): the first kernel principal
    component of each image's centred HW x K activations (scikit-learn's KernelPCA, sigmoid kernel by
    default), then ReLU. Needs scikit-learn (the `family` extra)."""
    try:
        from sklearn.decomposition import KernelPCA
    except ImportError:
        raise ExplainError("kpcacam needs scikit-learn: pip install 'onnxcam[family]'") from None
    _, channels, height, width = activations.shape
    maps = []
    for image in activations.astype(np.float64):
        rows = image.reshape(channels, -1).T
        projection = KernelPCA(n_components=1, kernel=kernel, gamma=gamma).fit_transform(rows - rows.mean(axis=0))
        maps.append(projection.reshape(height, width))
    return relu(np.array(maps)).astype(activations.dtype)


def eigen_smooth(weighted_activations: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's eigen_smooth: the first principal component of the weighted activations w_k A^k
    (or of the element-wise terms) instead of their sum over channels, then ReLU; the component's sign is
    fixed as in first_principal_component (pytorch-grad-cam leaves it to the SVD)."""
    return relu(first_principal_component(weighted_activations))


def refine(layer_heatmaps: list[np.ndarray]) -> np.ndarray:
    """RefineCAM's combination (pytorch-grad-cam's RefineCAM): the product over layers of each layer's
    map, each already upsampled and scaled to [0, 1]; the caller normalises the product again."""
    return np.prod(np.stack(layer_heatmaps), axis=0)
