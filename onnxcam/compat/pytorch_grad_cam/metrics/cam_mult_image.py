"""The change of the targets' scores when the image (after normalisation) is multiplied by its map."""

from __future__ import annotations

import numpy as np

from .perturbation_confidence import PerturbationConfidenceMetric


def multiply_tensor_with_cam(input_tensor, cam):
    return input_tensor * cam


class CamMultImageConfidenceChange(PerturbationConfidenceMetric):
    def __init__(self):
        super().__init__(multiply_tensor_with_cam)


class DropInConfidence(CamMultImageConfidenceChange):
    """The drop of the score (0 where it rose)."""

    def __call__(self, *args, **kwargs):
        return np.maximum(-super().__call__(*args, **kwargs), 0)


class IncreaseInConfidence(CamMultImageConfidenceChange):
    """1 where the score rose, else 0."""

    def __call__(self, *args, **kwargs):
        return np.float32(super().__call__(*args, **kwargs) > 0)
