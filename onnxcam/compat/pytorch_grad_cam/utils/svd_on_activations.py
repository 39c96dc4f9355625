"""pytorch-grad-cam's projections on the first principal component, with the sign numpy's SVD gives (as it does)."""

from __future__ import annotations

import numpy as np


def _centred_rows(activations: np.ndarray) -> np.ndarray:
    """The H*W x C matrix of one image's C x H x W activations, NaNs zeroed, each channel centred."""
    rows = np.where(np.isnan(activations), 0, activations).reshape(activations.shape[0], -1).T
    return rows - rows.mean(axis=0)


def get_2d_projection(activation_batch: np.ndarray) -> np.ndarray:
    """B x H x W: each position's channels projected on the first right singular vector."""
    return np.float32([_projection(a) for a in activation_batch])


def get_2d_projection_with_sign_correction(activation_batch: np.ndarray) -> np.ndarray:
    """get_2d_projection, each map negated where its minimum is larger in magnitude than its maximum (Seg-Eigen-CAM)."""
    projections = [_projection(a) for a in activation_batch]
    return np.float32([-p if abs(p.min()) > abs(p.max()) else p for p in projections])


def _projection(activations: np.ndarray) -> np.ndarray:
    rows = _centred_rows(activations)
    return (rows @ np.linalg.svd(rows, full_matrices=False)[2][0]).reshape(activations.shape[1:])


def get_2d_projection_kernel(activation_batch: np.ndarray, kernel: str = "sigmoid", gamma=None) -> np.ndarray:
    """B x H x W: each position's channels projected on the first kernel principal component (scikit-learn)."""
    from sklearn.decomposition import KernelPCA

    return np.float32([KernelPCA(n_components=1, kernel=kernel, gamma=gamma).fit_transform(_centred_rows(a))
                       .reshape(a.shape[1:]) for a in activation_batch])
