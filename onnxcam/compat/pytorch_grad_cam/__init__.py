"""pytorch-grad-cam 1.5's public surface on onnxcam: change `from pytorch_grad_cam import ...` to
`from onnxcam.compat.pytorch_grad_cam import ...`; the model and its target layers are exported once per input
shape (cached in memory and on disk) and explained on ONNX Runtime; `cam.onnx_path` is the explainable file."""

from . import metrics, utils
from .base_cam import BaseCAM
from .cams import (
    FEM,
    KPCA_CAM,
    SESS,
    AblationCAM,
    AblationLayer,
    AblationLayerFasterRCNN,
    AblationLayerVit,
    ActivationsAndGradients,
    DeepFeatureFactorization,
    EigenCAM,
    EigenGradCAM,
    FinerCAM,
    FullGrad,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GuidedBackpropReLUModel,
    HiResCAM,
    LayerCAM,
    RandomCAM,
    RefineCAM,
    ScoreCAM,
    SegEigenCAM,
    ShapleyCAM,
    XGradCAM,
    run_dff_on_image,
)

__all__ = ["FEM", "KPCA_CAM", "SESS", "AblationCAM", "AblationLayer", "AblationLayerFasterRCNN", "AblationLayerVit",
           "ActivationsAndGradients", "BaseCAM", "DeepFeatureFactorization", "EigenCAM", "EigenGradCAM",
           "FinerCAM", "FullGrad", "GradCAM", "GradCAMElementWise", "GradCAMPlusPlus", "GuidedBackpropReLUModel",
           "HiResCAM", "LayerCAM", "RandomCAM", "RefineCAM", "ScoreCAM", "SegEigenCAM", "ShapleyCAM", "XGradCAM",
           "metrics", "run_dff_on_image", "utils"]
