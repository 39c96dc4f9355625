"""pytorch-grad-cam's metrics of a map's faithfulness: the model's score after the image is perturbed by the map
(multiplied by it, or its most or least relevant pixels imputed, ROAD), run with the model as pytorch-grad-cam runs
it; the imputation is onnxcam's (core.metrics)."""

from . import cam_mult_image, perturbation_confidence, road

__all__ = ["cam_mult_image", "perturbation_confidence", "road"]
