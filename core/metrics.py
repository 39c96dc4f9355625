"""Faithfulness metrics: perturb the input as a map says and watch the class score. Pure functions.

All take `predict`, a function from a float32 N x C x H x W batch to class probabilities N x K, and
send their perturbed images in batches. Perturbations happen in the model's input space: there, 0 is
the normalisation mean, the usual "grey" baseline.
"""

from __future__ import annotations

import cv2
import numpy as np


def average_drop_increase(predict, inputs, heatmaps, classes) -> tuple[float, float]:
    """Average Drop and Increase in Confidence (Chattopadhay et al., arXiv 1710.11063, sec. 5.1.1).

    Y = p_c(image), O = p_c(image (.) map): Average Drop = 100 * mean(max(0, Y - O) / Y), in %;
    Increase in Confidence = 100 * mean(O > Y), in %. Lower drop and higher increase are better.
    """
    rows = np.arange(len(inputs))
    full = predict(inputs)[rows, classes]
    masked = predict(inputs * heatmaps[:, None].astype(inputs.dtype))[rows, classes]
    drop = np.maximum(full - masked, 0) / np.maximum(full, np.finfo(np.float32).tiny)
    return float(100 * drop.mean()), float(100 * (masked > full).mean())


def _auc(curve: np.ndarray) -> np.ndarray:
    """Area under curves sampled at evenly spaced fractions 0..1 (trapezoidal rule), per row."""
    return (curve[:, 1:] + curve[:, :-1]).sum(axis=1) / (2 * (curve.shape[1] - 1))


def deletion_insertion(predict, inputs, heatmaps, classes, steps: int = 32, blur_sigma: float = 5.0):
    """Deletion and insertion curves and their areas (Petsiuk et al., RISE, arXiv 1806.07421, sec. 4.1).

    Pixels are ranked by the map. Deletion replaces the top fraction k/steps of them with 0 (the
    mean) and tracks p_c: a faithful map makes it fall fast (low area). Insertion starts from a
    blurred image and restores the top pixels: p_c should rise fast (high area). One batched
    prediction per image, steps + 1 images each. Returns (deletion areas, insertion areas,
    deletion curves, insertion curves), per image.
    """
    count = inputs.shape[2] * inputs.shape[3]
    fractions = np.linspace(0, 1, steps + 1)
    deletions, insertions = [], []
    for image, heatmap, target in zip(inputs, heatmaps, classes, strict=True):
        order = np.argsort(-heatmap.ravel(), kind="stable")
        rank = np.empty(count, np.int64)
        rank[order] = np.arange(count)
        shown = (rank[None, :] < np.round(fractions * count)[:, None]).reshape(len(fractions), 1, *heatmap.shape)
        blurred = np.stack([cv2.GaussianBlur(channel, (0, 0), blur_sigma) for channel in image])
        deleted = np.where(shown, 0, image[None]).astype(inputs.dtype)
        inserted = np.where(shown, image[None], blurred[None]).astype(inputs.dtype)
        scores = predict(np.concatenate([deleted, inserted]))[:, target]
        deletions.append(scores[:len(fractions)])
        insertions.append(scores[len(fractions):])
    deletions, insertions = np.array(deletions), np.array(insertions)
    return _auc(deletions), _auc(insertions), deletions, insertions


def pointing_game(heatmaps, boxes, tolerance: int = 15) -> np.ndarray:
    """Pointing game (Zhang et al., arXiv 1608.00507, sec. 5.1): a hit when the map's maximum falls
    in the object's box (x0, y0, x1, y1, in map pixels, inclusive) grown by `tolerance` pixels."""
    hits = []
    for heatmap, (x0, y0, x1, y1) in zip(heatmaps, boxes, strict=True):
        y, x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        hits.append(x0 - tolerance <= x <= x1 + tolerance and y0 - tolerance <= y <= y1 + tolerance)
    return np.array(hits)


# ROAD's neighbours of a pixel and their weights (Rong et al., arXiv 2202.00449, sec. 4: noisy linear imputation)
ROAD_NEIGHBOURS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12), ((0, -1), 1 / 6),
                   ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))
ROAD_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def noisy_linear_imputation(image: np.ndarray, keep: np.ndarray, noise: float = 0.01,
                            rng: np.random.Generator | None = None) -> np.ndarray:
    """ROAD's imputation (Rong et al., arXiv 2202.00449, eq. 2-3, as pytorch-grad-cam's NoisyLinearImputer):
    every removed pixel (keep False) takes the weighted mean of its 8 neighbours (1/6 side, 1/12 diagonal,
    over the neighbours inside the image), removed neighbours being unknowns of one sparse linear system, then
    Gaussian noise of std `noise`. image: C x H x W; keep: H x W bool."""
    try:
        from scipy.sparse import coo_matrix
        from scipy.sparse.linalg import spsolve
    except ImportError:
        raise ImportError("ROAD needs scipy: pip install 'onnxcam[family]'") from None

    channels, height, width = image.shape
    missing = np.flatnonzero(~keep.ravel())
    if missing.size == 0:
        return image.copy()
    unknown = np.full(height * width, -1)
    unknown[missing] = np.arange(missing.size)
    flat = image.reshape(channels, -1).astype(np.float64)
    rows, cols, values = [], [], []
    rhs = np.zeros((missing.size, channels))
    diagonal = np.zeros(missing.size)
    y, x = np.divmod(missing, width)
    for (dy, dx), weight in ROAD_NEIGHBOURS:
        inside = (y + dy >= 0) & (y + dy < height) & (x + dx >= 0) & (x + dx < width)
        neighbour = (y + dy) * width + (x + dx)
        diagonal[inside] -= weight
        known = inside & keep.ravel()[np.where(inside, neighbour, 0)]
        rhs[known] -= weight * flat[:, neighbour[known]].T
        free = inside & ~known
        rows.append(np.flatnonzero(free))
        cols.append(unknown[neighbour[free]])
        values.append(np.full(free.sum(), weight))
    rows.append(np.arange(missing.size))
    cols.append(np.arange(missing.size))
    values.append(diagonal)
    system = coo_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(missing.size, missing.size)).tocsc()
    solved = spsolve(system, rhs).reshape(missing.size, channels)
    rng = rng or np.random.default_rng(0)
    flat[:, missing] = solved.T + noise * rng.standard_normal((channels, missing.size))
    return flat.reshape(image.shape).astype(image.dtype)


def road(predict, inputs, heatmaps, classes, percentiles=ROAD_PERCENTILES, noise: float = 0.01,
         rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ROAD (Rong et al., arXiv 2202.00449; pytorch-grad-cam's ROADMostRelevantFirstAverage and
    ROADLeastRelevantFirstAverage): per percentile p, MoRF imputes the pixels whose map value is at least the map's
    p-th percentile and LeRF those whose (1 - map) is; the score is p_c(imputed) - p_c(image), averaged over the
    percentiles. Returns (MoRF, LeRF) per image: a faithful map has a low MoRF and a LeRF near 0. All imputed
    images go through `predict` in one batch per image."""
    rng = rng or np.random.default_rng(0)
    rows = np.arange(len(inputs))
    full = predict(inputs)[rows, classes]
    morf, lerf = [], []
    for image, heatmap, target, before in zip(inputs, heatmaps, classes, full, strict=True):
        imputed = []
        for relevance in (heatmap, 1 - heatmap):
            for percentile in percentiles:
                keep = relevance < np.percentile(relevance, percentile)
                imputed.append(noisy_linear_imputation(image, keep, noise, rng))
        change = predict(np.stack(imputed))[:, target] - before
        morf.append(change[:len(percentiles)].mean())
        lerf.append(change[len(percentiles):].mean())
    return np.array(morf), np.array(lerf)


def confidence_change(predict, inputs, heatmaps, classes) -> np.ndarray:
    """pytorch-grad-cam's CamMultImageConfidenceChange: p_c(image (.) map) - p_c(image), per image (the input
    multiplied by the map in the model's input space, as that library does)."""
    rows = np.arange(len(inputs))
    full = predict(inputs)[rows, classes]
    return predict(inputs * heatmaps[:, None].astype(inputs.dtype))[rows, classes] - full
