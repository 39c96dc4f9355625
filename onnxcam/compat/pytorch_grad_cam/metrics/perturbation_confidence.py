"""The perturbation metrics' frame: the targets' scores on perturbed images, minus those on the images."""

from __future__ import annotations

import cv2
import numpy as np
import torch


def _scores(model, batch: torch.Tensor, targets) -> np.ndarray:
    with torch.no_grad():
        outputs = model(batch)
        return np.float32([target(output).cpu().numpy() for target, output in zip(targets, outputs, strict=False)])


class PerturbationConfidenceMetric:
    """Each image perturbed by its map (`perturbation(image, map)`), then the targets' scores after, or their change
    (`return_diff`); with `return_visualization`, the perturbed images too."""

    def __init__(self, perturbation):
        self.perturbation = perturbation

    def __call__(self, input_tensor: torch.Tensor, cams: np.ndarray, targets, model: torch.nn.Module,
                 return_visualization: bool = False, return_diff: bool = True):
        perturbed = torch.stack([self.perturbation(image.cpu(), torch.from_numpy(cam))
                                 for image, cam in zip(input_tensor, cams, strict=False)]).to(input_tensor.device)
        result = _scores(model, perturbed, targets)
        if return_diff:
            result = result - _scores(model, input_tensor, targets)
        return (result, perturbed) if return_visualization else result


class RemoveMostRelevantFirst:
    """The pixels whose map value is at least its `percentile`-th percentile (or, with 'auto', those under Otsu's
    threshold of the map as uint8) imputed by `imputer(image, mask)`, where mask is 0 at the pixels imputed."""

    def __init__(self, percentile, imputer):
        self.percentile, self.imputer = percentile, imputer

    def __call__(self, input_tensor, mask):
        values = mask.cpu().numpy()
        if self.percentile == "auto":
            _, binary = cv2.threshold(np.uint8(values * 255), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        else:
            binary = np.float32(values < np.percentile(values, self.percentile))
        return self.imputer(input_tensor, torch.from_numpy(binary).to(mask.device))


class RemoveLeastRelevantFirst(RemoveMostRelevantFirst):
    """RemoveMostRelevantFirst of the map's complement: its least relevant pixels imputed."""

    def __call__(self, input_tensor, mask):
        return super().__call__(input_tensor, 1 - mask)


class AveragerAcrossThresholds:
    """A metric built per percentile (`imputer(percentile)`), its scores averaged over the percentiles."""

    def __init__(self, imputer, percentiles=(10, 20, 30, 40, 50, 60, 70, 80, 90)):
        self.imputer, self.percentiles = imputer, percentiles

    def __call__(self, input_tensor: torch.Tensor, cams: np.ndarray, targets, model: torch.nn.Module):
        return np.mean(np.float32([self.imputer(p)(input_tensor, cams, targets, model) for p in self.percentiles]),
                       axis=0)
