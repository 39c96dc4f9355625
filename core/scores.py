"""Class scores: probabilities and the best classes."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """exp(x - max) / sum(exp(x - max)): probabilities, stable for large logits."""
    shifted = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """N x K scores as probabilities: softmax over several classes, the raw score of a single output."""
    return logits if logits.shape[1] == 1 else softmax(logits, axis=1)


def top_classes(logits: np.ndarray, k: int = 5, labels: list[str] | None = None) -> list[list[dict]]:
    """Per image, the k best classes with their probability (softmax; the raw score for one output)."""
    scores = probabilities(logits)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[{"class": int(c), "label": labels[c] if labels else None, "score": float(row[c])} for c in best]
            for row, best in zip(scores, order, strict=True)]
