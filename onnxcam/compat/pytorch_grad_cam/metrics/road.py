"""ROAD (Rong et al., arXiv 2202.00449): the score change when the map's most (MoRF) or least (LeRF) relevant pixels
are imputed from their neighbours, with onnxcam's noisy linear imputation (core.metrics) and pytorch-grad-cam's
noise (torch's generator, so that a seeded run draws the same)."""

from __future__ import annotations

import numpy as np
import torch

from ....core.metrics import ROAD_PERCENTILES, noisy_linear_imputation
from .perturbation_confidence import (
    AveragerAcrossThresholds,
    PerturbationConfidenceMetric,
    RemoveLeastRelevantFirst,
    RemoveMostRelevantFirst,
)

PERCENTILES = ROAD_PERCENTILES  # pytorch-grad-cam's default


class NoisyLinearImputer:
    """The pixels where `mask` is 0 take the weighted mean of their 8 neighbours (a sparse linear system), plus
    Gaussian noise of std `noise` drawn from torch's generator. `weighting` is ignored, as pytorch-grad-cam
    ignores it."""

    def __init__(self, noise: float = 0.01, weighting=None):
        self.noise = noise

    def __call__(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask.cpu().numpy() != 0
        filled = torch.from_numpy(noisy_linear_imputation(img.cpu().numpy(), keep, noise=0.0))
        missing = np.flatnonzero(~keep.ravel())
        flat = filled.reshape(img.shape[0], -1)
        # as pytorch-grad-cam draws it, like its solution transposed: C x N, contiguous (scipy's is Fortran-ordered)
        flat[:, missing] += self.noise * torch.randn(img.shape[0], len(missing))
        return flat.reshape_as(img)


class ROADMostRelevantFirst(PerturbationConfidenceMetric):
    def __init__(self, percentile=80):
        super().__init__(RemoveMostRelevantFirst(percentile, NoisyLinearImputer()))


class ROADLeastRelevantFirst(PerturbationConfidenceMetric):
    def __init__(self, percentile=20):
        super().__init__(RemoveLeastRelevantFirst(percentile, NoisyLinearImputer()))


class ROADMostRelevantFirstAverage(AveragerAcrossThresholds):
    def __init__(self, percentiles=PERCENTILES):
        super().__init__(ROADMostRelevantFirst, percentiles)


class ROADLeastRelevantFirstAverage(AveragerAcrossThresholds):
    def __init__(self, percentiles=PERCENTILES):
        super().__init__(ROADLeastRelevantFirst, percentiles)


class ROADCombined:
    """(LeRF - MoRF) / 2, each averaged over the percentiles."""

    def __init__(self, percentiles=PERCENTILES):
        self.percentiles = percentiles
        self.morf_averager = ROADMostRelevantFirstAverage(percentiles)
        self.lerf_averager = ROADLeastRelevantFirstAverage(percentiles)

    def __call__(self, input_tensor: torch.Tensor, cams: np.ndarray, targets, model: torch.nn.Module):
        lerf = self.lerf_averager(input_tensor, cams, targets, model)
        return (lerf - self.morf_averager(input_tensor, cams, targets, model)) / 2
