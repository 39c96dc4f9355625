"""The perturbation CAMs: channel weights from the scores of perturbed inputs (the Score-CAM family, masked images
run forward) or of perturbed activations (Ablation-CAM, the head run on ablated copies). core.perturbation holds
their formulas."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import ExplainError
from ..core.layouts import to_grid
from ..core.maps import heatmaps
from ..core.methods import class_activation_map
from ..core.perturbation import (
    ablation_value,
    ablation_weights,
    iscam_coefficients,
    score_masks,
    score_weights,
    strongest_channels,
)
from ..runtimes.binding import host_array
from .registry import Call, Method, Result, declare


@dataclass(frozen=True)
class ScoreCAMOptions:
    channels: int | None = None  # score only the strongest channels (None: all)
    batch_size: int = 32  # masked images per forward run


@dataclass(frozen=True)
class SSCAMOptions(ScoreCAMOptions):
    samples: int = 35  # noisy copies of each mask
    noise: float = 2.0  # the noise's standard deviation
    seed: int = 0


@dataclass(frozen=True)
class ISCAMOptions(ScoreCAMOptions):
    samples: int = 10  # points of the integral along each mask


@dataclass(frozen=True)
class AblationOptions:
    batch_size: int = 256  # ablated copies per head run


def _class_scores(call: Call, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The score of class targets[i] for each input i: runs of `batch_size` inputs on the forward-only session."""
    spec, batch_size = call.model.spec, call.options.batch_size
    runner = call.model.scores_runner
    found = np.empty(len(inputs))
    for start in range(0, len(inputs), batch_size):
        part = np.ascontiguousarray(inputs[start:start + batch_size], dtype=np.float32)
        (scores,) = runner.run([spec.score_tensor], {spec.input: part})
        scores = scores.reshape(len(part), -1)
        found[start:start + len(part)] = scores[np.arange(len(part)), targets[start:start + len(part)]]
    return found


def _run_explained(call: Call, names: list[str]):
    """One run: the scores and the selected classes, the scores explained per image (N x K: the logits where the
    output squashes them, ExplainSpec.score_tensor), and the tensors `names`."""
    spec = call.model.spec
    extra = [spec.explained] if spec.explained else []
    scores, selected, *tensors = call.model.run(call.batch, call.classes, [*extra, *names])
    scores = scores.reshape(len(selected), -1)
    explained = tensors.pop(0).reshape(len(selected), -1) if extra else scores
    return scores, selected, explained, tensors


def _score_cam(call: Call) -> Result:
    """Score-CAM, SS-CAM, IS-CAM (torchcam's definitions; core.perturbation): one run for the activations, then
    batched forward runs on the image times each scored channel's mask (N channels x S samples per image)."""
    spec, options, name = call.model.spec, call.options, call.method.name
    if options.batch_size < 1 or (options.channels is not None and options.channels < 1):
        raise ExplainError(f"{name}: batch_size and channels must be at least 1")
    scores, selected, explained, activations = _run_explained(call, spec.activations)
    images = host_array(call.batch)
    baseline = explained[np.arange(len(images)), selected]
    samples = getattr(options, "samples", 1)
    rng = np.random.default_rng(getattr(options, "seed", None))
    maps = []
    for activation, layout in zip(activations, spec.layouts, strict=True):
        grid = to_grid(activation, layout)
        masks = score_masks(grid, spec.input_size)
        channels = strongest_channels(grid, options.channels)
        changed = np.empty((*channels.shape, samples))
        for image in range(len(images)):
            for sample in range(samples):
                scored = masks[image, channels[image]]
                if name == "sscam":
                    scored = scored + rng.normal(0.0, options.noise, masks.shape[1:])[channels[image]]
                inputs = scored[:, None] * images[image][None]
                if name == "iscam":
                    inputs *= iscam_coefficients(samples)[sample]
                changed[image, :, sample] = _class_scores(call, inputs, np.full(len(inputs), selected[image]))
        weights = score_weights(changed, baseline, channels, grid.shape[1])
        maps.append(class_activation_map(grid, weights.astype(grid.dtype)))
    return Result(heatmaps(maps, spec.input_size), scores, selected)


def _from_grid(copies: np.ndarray, layout: str) -> np.ndarray:
    """Ablated copies back in the target's own layout (only nchw and nhwc targets can be ablated here)."""
    if layout == "nchw":
        return np.ascontiguousarray(copies)
    if layout == "nhwc":
        return np.ascontiguousarray(copies.transpose(0, 2, 3, 1))
    raise ExplainError(f"ablationcam ablates channels of nchw or nhwc targets; this one is {layout}")


def _ablation_cam(call: Call) -> Result:
    """Ablation-CAM (pytorch-grad-cam's definition; core.perturbation): the backbone runs once; only the head
    between the target layer and the scores runs on the K ablated copies of each image's activation, in
    batches of `batch_size` copies."""
    spec = call.model.spec
    scores, selected, explained, (activation, *cuts) = _run_explained(call, [*spec.activations, *spec.cuts])
    head = call.model.forward_head
    grid = to_grid(activation, spec.layouts[0])
    ablated = np.empty(grid.shape[:2])
    for image in range(len(grid)):
        value = ablation_value(activation[image])
        copies = np.repeat(grid[image][None], min(call.options.batch_size, grid.shape[1]), axis=0)
        for start in range(0, grid.shape[1], len(copies)):
            channels = np.arange(start, min(start + len(copies), grid.shape[1]))
            rows = np.arange(len(channels))
            copies[rows, channels] = value  # copy i has channel start + i ablated; restored after the run
            exposed = {name: np.ascontiguousarray(np.repeat(cut[image:image + 1], len(channels), axis=0))
                       for name, cut in zip(spec.cuts, cuts, strict=True)}
            exposed[spec.activations[0]] = _from_grid(copies[:len(channels)], spec.layouts[0])
            head_scores = head.scores(spec.score_tensor, exposed).reshape(len(channels), -1)
            ablated[image, channels] = head_scores[:, selected[image]]
            copies[rows, channels] = grid[image][channels]
    weights = ablation_weights(explained[np.arange(len(grid)), selected], ablated)
    return Result(heatmaps([class_activation_map(grid, weights.astype(grid.dtype))], spec.input_size), scores,
                  selected)


declare(Method("scorecam", _score_cam, "Score-CAM (Wang et al., arXiv 1910.01279)", options=ScoreCAMOptions,
               gradients=False))
declare(Method("sscam", _score_cam, "SS-CAM (Wang et al., arXiv 2006.14255)", options=SSCAMOptions,
               gradients=False))
declare(Method("iscam", _score_cam, "IS-CAM (Naidu et al., arXiv 2010.03023)", options=ISCAMOptions,
               gradients=False))
declare(Method("ablationcam", _ablation_cam, "Ablation-CAM (Desai & Ramaswamy, WACV 2020)", needs=("one_layer",),
               options=AblationOptions, gradients=False))
