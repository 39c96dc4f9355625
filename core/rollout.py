"""Attention rollout for Vision Transformers, class-agnostic and gradient-weighted.

Abnar & Zuidema, "Quantifying Attention Flow in Transformers" (arXiv 2005.00928), eq. for rollout:
each layer's attention, with the residual connection accounted for as (A + I) / 2 and rows
re-normalised, is multiplied through the layers; the CLS row of the product says how much each
patch flows into the class token. The head fusion and discard of weak attention follow jacobgil's
vit-explain; the gradient-weighted form follows Chefer et al. (arXiv 2103.15679): each head's
attention times its gradient, negatives clamped, heads averaged.

LeGrad (Bousselham et al., arXiv 2404.03214) reads per-block gradients instead: each block's layer score (the
model's readout applied to the block's output tokens) differentiated with respect to the block's attention.

Rows are normalised as the paper says, a / a.sum(-1, keepdims=True). The widely copied script divides
by `a.sum(dim=-1)` without keeping the dimension, which broadcasts the row sums across columns.
"""

from __future__ import annotations

import numpy as np

HEAD_FUSIONS = {"mean": np.mean, "max": np.max, "min": np.min}


def _discard(fused: np.ndarray, discard_ratio: float) -> np.ndarray:
    """Zero the lowest `discard_ratio` of each N x N matrix, never the attention paid to the CLS token (column 0)."""
    batch, tokens, _ = fused.shape
    count = int(tokens * tokens * discard_ratio)
    if count == 0:
        return fused
    flat = fused.reshape(batch, -1).copy()
    lowest = np.argsort(flat, axis=1, kind="stable")[:, :count]
    to_cls = lowest % tokens == 0
    np.put_along_axis(flat, lowest, np.where(to_cls, np.take_along_axis(flat, lowest, axis=1), 0), axis=1)
    return flat.reshape(batch, tokens, tokens)


def _roll(fused_layers: list[np.ndarray], discard_ratio: float) -> np.ndarray:
    """Multiply (A + I) / 2, row-normalised, through the layers; B x N x N."""
    batch, tokens, _ = fused_layers[0].shape
    identity = np.eye(tokens)
    result = np.broadcast_to(identity, (batch, tokens, tokens)).copy()
    for fused in fused_layers:
        a = (_discard(fused.astype(np.float64), discard_ratio) + identity) / 2
        a = a / a.sum(axis=-1, keepdims=True)
        result = a @ result
    return result


def _cls_map(result: np.ndarray, prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """The CLS row over the patches, on the grid, divided by its maximum (zero stays zero)."""
    row = result[:, 0, prefix:].reshape(len(result), *grid)
    peak = row.max(axis=(1, 2), keepdims=True)
    return (row / np.where(peak > 0, peak, 1)).astype(np.float32)


def rollout(attentions: list[np.ndarray], prefix: int, grid: tuple[int, int], head_fusion: str = "mean",
            discard_ratio: float = 0.9) -> np.ndarray:
    """Attention rollout from per-block attention probabilities (each B x heads x N x N) to B x H x W."""
    fuse = HEAD_FUSIONS[head_fusion]
    return _cls_map(_roll([fuse(a, axis=1) for a in attentions], discard_ratio), prefix, grid)


def grad_rollout(attentions: list[np.ndarray], gradients: list[np.ndarray], prefix: int, grid: tuple[int, int],
                 discard_ratio: float = 0.9) -> np.ndarray:
    """Gradient attention rollout: heads fused as mean(ReLU(A (.) dy/dA)), then rollout as above."""
    fused = [np.maximum(a * g, 0).mean(axis=1) for a, g in zip(attentions, gradients, strict=True)]
    return _cls_map(_roll(fused, discard_ratio), prefix, grid)


def legrad(gradients: list[np.ndarray], prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """LeGrad (Bousselham et al., arXiv 2404.03214, Sec. 3) from per-block gradients ds^l/dA^l (each B x heads x N
    x N, s^l the selected class's score read out of block l's tokens): E^l = mean over heads and queries of
    ReLU(ds^l/dA^l), the prefix keys dropped, on the grid; the map is the mean of E^l over the blocks, B x H x W.
    It is left unnormalised: the paper's min-max scaling is the heatmaps' own (core.maps.heatmaps)."""
    per_block = [np.maximum(g, 0).mean(axis=(1, 2))[:, prefix:].reshape(len(g), *grid) for g in gradients]
    return np.mean(per_block, axis=0).astype(np.float32)
