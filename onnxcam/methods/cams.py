"""The CAMs computed from one session run: a target layer's activations (and the gradients of the class score)
fetched once, then each layer's map from its core formula (core.methods)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core import methods as formulas
from ..core.errors import ExplainError
from ..core.layouts import to_grid
from ..core.maps import heatmaps, normalize, upsample
from .registry import METHODS, Call, Method, Result, declare


def layer_tensors(call: Call, gradients: bool):
    """(scores, selected, per-layer activations, per-layer gradients or Nones) from one session run, as grids."""
    spec = call.model.spec
    names = spec.activations + (spec.gradients if gradients else [])
    scores, selected, *tensors = call.model.run(call.batch, call.classes, names)
    count = len(spec.activations)
    activations = [to_grid(a, layout) for a, layout in zip(tensors[:count], spec.layouts, strict=True)]
    grads = [to_grid(g, layout) for g, layout in zip(tensors[count:], spec.layouts, strict=True)] if gradients \
        else [None] * count
    return scores, selected, activations, grads


def layer_maps(call: Call):
    """(scores, selected, per-layer maps before upsampling) of a CAM whose formula reads one layer's tensors."""
    method = call.method
    scores, selected, activations, gradients = layer_tensors(call, method.gradients)
    return scores, selected, [method.formula(a, g) for a, g in zip(activations, gradients, strict=True)]


def single_run(call: Call) -> Result:
    """The maps of every target layer from one run, upsampled, normalised, averaged over layers."""
    scores, selected, maps = layer_maps(call)
    return Result(heatmaps(maps, call.model.spec.input_size), scores, selected)


def _channel_weighted(weights):
    """The terms w_k A^k of a method that weights whole channels."""
    return lambda activations, gradients: weights(activations, gradients)[:, :, None, None] * activations


def _cam(name: str, formula, summary: str, terms=None, gradients: bool = True) -> Method:
    return declare(Method(name, single_run, summary, needs=(), formula=formula, terms=terms, gradients=gradients,
                          augmentable=True, objects=True))


_cam("gradcam", formulas.gradcam, "Grad-CAM (Selvaraju et al., arXiv 1610.02391)",
     _channel_weighted(formulas.gradcam_weights))
_cam("gradcam++", formulas.gradcam_plus_plus, "Grad-CAM++ (Chattopadhay et al., arXiv 1710.11063)",
     _channel_weighted(formulas.gradcam_plus_plus_weights))
_cam("xgradcam", formulas.xgradcam, "XGrad-CAM (Fu et al., arXiv 2008.02312)",
     _channel_weighted(formulas.xgradcam_weights))
_cam("hirescam", formulas.hirescam, "HiResCAM (Draelos & Carin, arXiv 2011.08891)",
     lambda activations, gradients: gradients * activations)
_cam("gradcam-elementwise", formulas.gradcam_elementwise, "element-wise Grad-CAM (pytorch-grad-cam)",
     lambda activations, gradients: formulas.relu(gradients * activations))
_cam("layercam", formulas.layercam, "LayerCAM (Jiang et al., IEEE TIP 2021)",
     lambda activations, gradients: formulas.relu(gradients) * activations)
_cam("eigencam", formulas.eigencam, "Eigen-CAM (Muhammad & Yeasin, arXiv 2008.00299)", gradients=False)
_cam("eigengradcam", formulas.eigengradcam, "EigenGrad-CAM (pytorch-grad-cam)")


def _class_activation_map(call: Call) -> Result:
    """CAM: the linear layer's row of each image's class weights the target layer's channels."""
    weights = call.model.linear_head_weights
    scores, selected, activations, _ = layer_tensors(call, gradients=False)
    maps = [formulas.class_activation_map(a, weights[selected]) for a in activations]
    return Result(heatmaps(maps, call.model.spec.input_size), scores, selected)


declare(Method("cam", _class_activation_map, "CAM (Zhou et al., arXiv 1512.04150): global average pooling, then "
               "one linear layer", needs=("linear_head",), gradients=False, augmentable=True))


@dataclass(frozen=True)
class FEMOptions:
    k: float = 2.0  # the k-sigma rule's k


@dataclass(frozen=True)
class KPCAOptions:
    kernel: str = "sigmoid"  # scikit-learn KernelPCA's kernel
    gamma: float | None = None


def _activation_map(formula):
    """A class-agnostic map of the activations alone, with the method's options."""
    def run(call: Call) -> Result:
        scores, selected, activations, _ = layer_tensors(call, gradients=False)
        options = vars(call.options)
        maps = [formula(a, None, **options) for a in activations]
        return Result(heatmaps(maps, call.model.spec.input_size), scores, selected)

    return run


declare(Method("fem", _activation_map(formulas.fem), "FEM (Fuad et al., IPTA 2020)", options=FEMOptions,
               gradients=False, augmentable=True))
declare(Method("kpcacam", _activation_map(formulas.kpcacam), "KPCA-CAM (Karmani et al., arXiv 2410.00267)",
               needs=("scikit-learn",), options=KPCAOptions, gradients=False, augmentable=True))


@dataclass(frozen=True)
class RefineOptions:
    base: str = "gradcam++"  # the CAM whose per-layer maps are multiplied


def _refine(call: Call) -> Result:
    """RefineCAM (pytorch-grad-cam): the product of the base method's per-layer heatmaps, normalised again."""
    base = METHODS.get(call.options.base)
    if base is None or base.formula is None:
        choices = [name for name, m in METHODS.items() if m.formula is not None]
        raise ExplainError(f"refinecam's base must be one of {', '.join(choices)}, not '{call.options.base}'")
    scores, selected, maps = layer_maps(Call(call.model, call.batch, call.classes, base.options(), base))
    layer_heat = [normalize(upsample(m, call.model.spec.input_size)) for m in maps]
    return Result(normalize(formulas.refine(layer_heat)), scores, selected)


declare(Method("refinecam", _refine, "RefineCAM (pytorch-grad-cam): the product of a CAM's per-layer maps",
               options=RefineOptions))

