"""Run strategies of the methods that need more than the one session run of the gradient CAMs, or extra inputs:
CAM's linear-layer weights, the Score-CAM family's batched masked runs, Ablation-CAM's head runs, the input-gradient
attributions (guided backpropagation, saliency, SmoothGrad, Integrated Gradients), RefineCAM, and the eigen_smooth
and aug_smooth options of every CAM. Each strategy returns (heatmaps, scores, selected, attributions).
"""

from __future__ import annotations

import importlib.util
import weakref
from dataclasses import dataclass

import numpy as np

from .core import heatmaps, normalize, upsample
from .core.attribution import (
    INTEGRATION_RULES,
    attribution_heatmaps,
    fullgrad,
    guided_gradcam,
    integrated_gradients,
    integration_points,
    noisy_inputs,
    path_inputs,
    saliency,
    smoothgrad,
)
from .core.layouts import to_grid
from .core.methods import (
    METHODS,
    WEIGHTED_ACTIVATIONS,
    class_activation_map,
    eigen_smooth,
    fem,
    kpcacam,
    refine,
)
from .core.perturbation import (
    ablation_value,
    ablation_weights,
    iscam_coefficients,
    score_masks,
    score_weights,
    strongest_channels,
)
from .errors import ExplainError

TTA_FACTORS = (0.9, 1.0, 1.1)  # pytorch-grad-cam's aug_smooth: horizontal flip x these intensity factors
INPUT_GRADIENT_METHODS = ("guided-backprop", "guided-gradcam", "saliency", "smoothgrad", "integrated-gradients",
                          "fullgrad")
SCORE_METHODS = ("scorecam", "sscam", "iscam")
ACTIVATION_METHODS = {"fem": fem, "kpcacam": kpcacam}  # class-agnostic maps of the activations alone
FAMILY_METHODS = ("cam", *ACTIVATION_METHODS, *SCORE_METHODS, "ablationcam", "refinecam", *INPUT_GRADIENT_METHODS)

# every option a method takes, with its default
OPTIONS = {
    "cam": {}, "fem": {"k": 2.0}, "kpcacam": {"kernel": "sigmoid", "gamma": None},
    "scorecam": {"channels": None, "batch_size": 32},
    "sscam": {"channels": None, "batch_size": 32, "samples": 35, "noise": 2.0, "seed": 0},
    "iscam": {"channels": None, "batch_size": 32, "samples": 10},
    "ablationcam": {"batch_size": 256},
    "refinecam": {"base": "gradcam++"},
    "guided-backprop": {}, "guided-gradcam": {}, "saliency": {}, "fullgrad": {},
    "smoothgrad": {"samples": 5, "noise": 1.0, "seed": 0},
    "integrated-gradients": {"steps": 50, "integration": "gausslegendre"},
}


@dataclass
class Result:
    heatmaps: np.ndarray
    scores: np.ndarray
    selected: np.ndarray
    attributions: np.ndarray | None = None


def method_options(method: str, given: dict) -> dict:
    """The method's options: its defaults, overridden by those given; an option it does not take is refused."""
    known = OPTIONS.get(method, {})
    unknown = sorted(set(given) - set(known))
    if unknown:
        takes = ", ".join(known) or "no options"
        raise ExplainError(f"method {method} has no option '{unknown[0]}' (it takes {takes})")
    return {**known, **given}


def capabilities(explainer) -> dict[str, str | None]:
    """Per method, None where the loaded file supports it, else the reason it does not (for menus)."""
    from .explainer import ALL_METHODS, ROLLOUT_METHODS

    spec = explainer.spec
    reasons: dict[str, str | None] = dict.fromkeys(ALL_METHODS)
    for method in INPUT_GRADIENT_METHODS:
        if not spec.input_gradient:
            reasons[method] = "needs a file exported with input gradients"
    if not spec.attentions:
        for method in ROLLOUT_METHODS:
            reasons[method] = "needs attention probabilities (a transformer)"
    else:
        if not spec.attention_gradients:
            reasons["grad-rollout"] = "needs a file exported with attention gradients"
        if not spec.legrad_gradients:
            reasons["legrad"] = "needs a file exported with LeGrad's layer-score gradients"
    if len(spec.layers) > 1:
        reasons["ablationcam"] = "explains one target layer; this file has several"
    if importlib.util.find_spec("sklearn") is None:
        reasons["kpcacam"] = "needs scikit-learn (the family extra)"
    try:
        linear_head_weights(explainer)
    except ExplainError as error:
        reasons["cam"] = error.message
    return reasons


def explain_family(explainer, batch, classes: np.ndarray, method: str, eigen: bool, augment: bool,
                   options: dict) -> Result:
    """The heatmaps of `method` (a family method, or any CAM with eigen_smooth or aug_smooth)."""
    if method not in FAMILY_METHODS and method not in METHODS:
        raise ExplainError(f"eigen_smooth, aug_smooth and method options apply to the CAMs, not to {method}")
    options = method_options(method, options) if method in FAMILY_METHODS else method_options("cam", options)
    if augment:
        if method in INPUT_GRADIENT_METHODS or method in (*SCORE_METHODS, "ablationcam", "refinecam"):
            raise ExplainError(f"aug_smooth applies to the single-run CAMs, not to {method}")
        return _augmented(explainer, batch, classes, method, eigen, options)
    if method in INPUT_GRADIENT_METHODS:
        return _input_gradient_method(explainer, batch, classes, method, options)
    if method in SCORE_METHODS:
        return _score_cam(explainer, batch, classes, method, options)
    if method == "ablationcam":
        return _ablation_cam(explainer, batch, classes, options)
    if method == "refinecam":
        return _refine_cam(explainer, batch, classes, options["base"], eigen)
    scores, selected, maps = _single_run_maps(explainer, batch, classes, method, eigen, options)
    return Result(heatmaps(maps, explainer.spec.input_size), scores, selected)


def host_array(batch) -> np.ndarray:
    """The batch as a host array (OrtValues and device tensors are copied once)."""
    return batch if isinstance(batch, np.ndarray) else np.ascontiguousarray(batch.numpy())


def _single_run_maps(explainer, batch, classes, method: str, eigen: bool, options: dict):
    """(scores, selected, per-layer maps before upsampling) of a CAM computed from one session run."""
    spec = explainer.spec
    needs_gradients = method in METHODS and METHODS[method][1]
    names = spec.activations + (spec.gradients if needs_gradients else [])
    scores, selected, *tensors = explainer._run(batch, classes, names)
    activations = [to_grid(a, layout) for a, layout in zip(tensors[:len(spec.activations)], spec.layouts,
                                                             strict=True)]
    gradients = [None] * len(activations)
    if needs_gradients:
        gradients = [to_grid(g, layout) for g, layout in zip(tensors[len(spec.activations):], spec.layouts,
                                                               strict=True)]
    if method == "cam":
        weights = linear_head_weights(explainer)
        maps = [class_activation_map(a, weights[selected]) for a in activations]
    elif method in ACTIVATION_METHODS:
        maps = [ACTIVATION_METHODS[method](a, None, **options) for a in activations]
    elif eigen and method in WEIGHTED_ACTIVATIONS:
        maps = [eigen_smooth(WEIGHTED_ACTIVATIONS[method](a, g)) for a, g in zip(activations, gradients, strict=True)]
    else:
        compute = METHODS[method][0]
        maps = [compute(a, g) for a, g in zip(activations, gradients, strict=True)]
    return scores, selected, maps


def _augmented(explainer, batch, classes, method: str, eigen: bool, options: dict) -> Result:
    """pytorch-grad-cam's aug_smooth: the heatmaps of the batch flipped or not, times 0.9, 1 and 1.1, from ONE
    session run of all six copies; each map flipped back, then the six averaged. Each copy's class is chosen on
    that copy (as pytorch-grad-cam does) unless targets are given; logits and classes reported are the plain
    copy's."""
    images = host_array(batch)
    count = len(images)
    copies = [view * factor for view in (images, images[..., ::-1]) for factor in TTA_FACTORS]
    stacked = np.ascontiguousarray(np.concatenate(copies), dtype=np.float32)
    scores, selected, maps = _single_run_maps(explainer, stacked, np.tile(classes, len(copies)), method, eigen,
                                              options)
    heat = heatmaps(maps, explainer.spec.input_size).reshape(len(copies), count, *explainer.spec.input_size)
    heat[len(TTA_FACTORS):] = heat[len(TTA_FACTORS):, ..., ::-1]
    plain = TTA_FACTORS.index(1.0)
    rows = slice(plain * count, (plain + 1) * count)
    return Result(heat.mean(axis=0), scores.reshape(len(stacked), -1)[rows], selected[rows])


def linear_head_weights(explainer) -> np.ndarray:
    """num_classes x K: the weights of the linear layer that follows global average pooling of the (one) target
    layer, read from the file's initializers; a head of another shape is refused in one line."""
    cached = _HEAD_WEIGHTS.get(explainer)
    if cached is None:
        from .exporters.linear_head import read_linear_head

        try:
            cached = read_linear_head(explainer.head.path, explainer.spec)
        except ExplainError as error:
            cached = error
        _HEAD_WEIGHTS[explainer] = cached
    if isinstance(cached, ExplainError):
        raise cached
    return cached


_HEAD_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _class_scores(explainer, inputs: np.ndarray, targets: np.ndarray, batch_size: int) -> np.ndarray:
    """The score of class targets[i] for each input i: runs of `batch_size` inputs on the forward-only session."""
    spec = explainer.spec
    runner = _scores_runner(explainer)
    found = np.empty(len(inputs))
    for start in range(0, len(inputs), batch_size):
        part = np.ascontiguousarray(inputs[start:start + batch_size], dtype=np.float32)
        (scores,) = runner.run([spec.scores], {spec.input: part})
        scores = scores.reshape(len(part), -1)
        found[start:start + len(part)] = scores[np.arange(len(part)), targets[start:start + len(part)]]
    return found


def _scores_runner(explainer):
    """A session computing the scores alone: ONNX Runtime runs every node of a graph whatever is fetched, so the
    explainable file would pay its backward pass on every masked batch (exporters.linear_head.forward_model)."""
    cached = _SCORES_RUNNERS.get(explainer)
    if cached is None:
        from .exporters.linear_head import forward_model
        from .runtimes.binding import BoundRunner
        from .runtimes.session import sibling_session

        model = forward_model(explainer.head.path, explainer.spec)
        cached = _SCORES_RUNNERS[explainer] = BoundRunner(sibling_session(model, explainer.session))
    return cached


_SCORES_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _score_cam(explainer, batch, classes, method: str, options: dict) -> Result:
    """Score-CAM, SS-CAM, IS-CAM (torchcam's definitions; core.perturbation): one run for the activations, then
    batched forward runs on the image times each scored channel's mask (N channels x S samples per image)."""
    spec = explainer.spec
    if options["batch_size"] < 1 or (options["channels"] is not None and options["channels"] < 1):
        raise ExplainError(f"{method}: batch_size and channels must be at least 1")
    scores, selected, *activations = explainer._run(batch, classes, spec.activations)
    images = host_array(batch)
    scores = scores.reshape(len(images), -1)
    baseline = scores[np.arange(len(images)), selected]
    samples = 1 if method == "scorecam" else int(options["samples"])
    rng = np.random.default_rng(options.get("seed"))
    maps = []
    for activation, layout in zip(activations, spec.layouts, strict=True):
        grid = to_grid(activation, layout)
        masks = score_masks(grid, spec.input_size)
        channels = strongest_channels(grid, options["channels"])
        changed = np.empty((*channels.shape, samples))
        for image in range(len(images)):
            for sample in range(samples):
                scored = masks[image, channels[image]]
                if method == "sscam":
                    scored = scored + rng.normal(0.0, options["noise"], masks.shape[1:])[channels[image]]
                inputs = scored[:, None] * images[image][None]
                if method == "iscam":
                    inputs *= iscam_coefficients(samples)[sample]
                targets = np.full(len(inputs), selected[image])
                changed[image, :, sample] = _class_scores(explainer, inputs, targets, options["batch_size"])
        weights = score_weights(changed, baseline, channels, grid.shape[1])
        maps.append(class_activation_map(grid, weights.astype(grid.dtype)))
    return Result(heatmaps(maps, spec.input_size), scores, selected)


def _ablation_cam(explainer, batch, classes, options: dict) -> Result:
    """Ablation-CAM (pytorch-grad-cam's definition; core.perturbation): the backbone runs once; only the head
    between the target layer and the scores runs on the K ablated copies of each image's activation, in
    batches of `batch_size` copies."""
    spec = explainer.spec
    if len(spec.activations) != 1:
        raise ExplainError(f"ablationcam explains one target layer; this file has {len(spec.activations)}")
    scores, selected, activation, *cuts = explainer._run(batch, classes, [*spec.activations, *spec.cuts])
    scores = scores.reshape(len(activation), -1)
    head = _forward_head(explainer)
    grid = to_grid(activation, spec.layouts[0])
    ablated = np.empty(grid.shape[:2])
    for image in range(len(grid)):
        value = ablation_value(activation[image])
        copies = np.repeat(grid[image][None], min(options["batch_size"], grid.shape[1]), axis=0)
        for start in range(0, grid.shape[1], len(copies)):
            channels = np.arange(start, min(start + len(copies), grid.shape[1]))
            rows = np.arange(len(channels))
            copies[rows, channels] = value  # copy i has channel start + i ablated; restored after the run
            exposed = {name: np.ascontiguousarray(np.repeat(cut[image:image + 1], len(channels), axis=0))
                       for name, cut in zip(spec.cuts, cuts, strict=True)}
            exposed[spec.activations[0]] = _from_grid(copies[:len(channels)], spec.layouts[0])
            head_scores = head.scores(spec.scores, exposed).reshape(len(channels), -1)
            ablated[image, channels] = head_scores[:, selected[image]]
            copies[rows, channels] = grid[image][channels]
    weights = ablation_weights(scores[np.arange(len(grid)), selected], ablated)
    return Result(heatmaps([class_activation_map(grid, weights.astype(grid.dtype))], spec.input_size), scores,
                  selected)


def _from_grid(copies: np.ndarray, layout: str) -> np.ndarray:
    """Ablated copies back in the target's own layout (only nchw and nhwc targets can be ablated here)."""
    if layout == "nchw":
        return np.ascontiguousarray(copies)
    if layout == "nhwc":
        return np.ascontiguousarray(copies.transpose(0, 2, 3, 1))
    raise ExplainError(f"ablationcam ablates channels of nchw or nhwc targets; this one is {layout}")


def _forward_head(explainer):
    """The head session (exporters.head) that computes the scores from the target activation and the cuts."""
    cached = _FORWARD_HEADS.get(explainer)
    if cached is None:
        from .exporters.linear_head import forward_head_session

        cached = forward_head_session(explainer.head.path, explainer.spec, explainer.session)
        _FORWARD_HEADS[explainer] = cached
    return cached


_FORWARD_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _refine_cam(explainer, batch, classes, base: str, eigen: bool) -> Result:
    """RefineCAM (pytorch-grad-cam): the product of the base method's per-layer heatmaps, normalised again."""
    if base not in METHODS:
        raise ExplainError(f"refinecam's base must be one of {', '.join(METHODS)}, not '{base}'")
    scores, selected, maps = _single_run_maps(explainer, batch, classes, base, eigen, {})
    layer_heat = [normalize(upsample(m, explainer.spec.input_size)) for m in maps]
    return Result(normalize(refine(layer_heat)), scores, selected)


def _input_gradient_run(explainer, batch, classes, guided: bool, names: list[str]):
    """One session run fetching the scores, the classes, `names` and the gradient of the score w.r.t. the input
    (guided backpropagation's where `guided`: on the file's second session, its ReLU masks rewritten)."""
    spec = explainer.spec
    runner = _guided_runner(explainer) if guided else explainer.runner
    return runner.run([spec.scores, spec.selected, *names, spec.input_gradient],
                      {spec.input: batch, spec.class_input: classes})


def _guided_runner(explainer):
    """A second session on the file with its ReLU masks rewritten to guided backpropagation's (built once)."""
    cached = _GUIDED_RUNNERS.get(explainer)
    if cached is None:
        import onnx

        from .exporters.autodiff.guided import guided
        from .runtimes.binding import BoundRunner
        from .runtimes.session import sibling_session

        model = guided(onnx.load(str(explainer.head.path)))
        cached = _GUIDED_RUNNERS[explainer] = BoundRunner(sibling_session(model, explainer.session))
    return cached


_GUIDED_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _input_gradient_method(explainer, batch, classes, method: str, options: dict) -> Result:
    spec = explainer.spec
    if not spec.input_gradient:
        raise ExplainError(f"{method} needs the gradient down to the input image, which costs a backward pass "
                           f"through the whole network and is exported on request", option="input_gradients")
    if method == "guided-gradcam":
        scores, selected, *tensors, guided = _input_gradient_run(explainer, batch, classes, True,
                                                                 spec.activations + spec.gradients)
        count = len(spec.activations)
        maps = [METHODS["gradcam"][0](to_grid(a, layout), to_grid(g, layout))
                for a, g, layout in zip(tensors[:count], tensors[count:], spec.layouts, strict=True)]
        attributions = guided_gradcam(guided, heatmaps(maps, spec.input_size))
    elif method == "fullgrad":
        return _fullgrad(explainer, batch, classes)
    elif method in ("guided-backprop", "saliency"):
        scores, selected, gradient = _input_gradient_run(explainer, batch, classes, method == "guided-backprop", [])
        attributions = gradient if method == "guided-backprop" else saliency(gradient)
    else:
        scores, selected, attributions = _path_attributions(explainer, batch, classes, method, options)
    attributions = attributions.astype(np.float32)
    return Result(attribution_heatmaps(attributions), scores, selected, attributions)


def _fullgrad(explainer, batch, classes) -> Result:
    """FullGrad (core.attribution.fullgrad): one run fetching the input gradient and every bias layer's gradient."""
    spec = explainer.spec
    count = len(spec.biases)
    scores, selected, *tensors, gradient = _input_gradient_run(explainer, batch, classes, False,
                                                               spec.biases + spec.bias_gradients)
    heat = fullgrad(host_array(batch), gradient, tensors[:count], tensors[count:])
    return Result(heat, scores, selected)


def _path_attributions(explainer, batch, classes, method: str, options: dict):
    """SmoothGrad and Integrated Gradients: a first run for the classes (where not given) and the scores, then
    per image ONE run of its noisy copies or of its m points along the path."""
    spec = explainer.spec
    images = host_array(batch)
    (scores, selected) = explainer._run(images, classes, [])
    scores = scores.reshape(len(images), -1)
    results = []
    if method == "smoothgrad":
        rng = np.random.default_rng(options["seed"])
        samples = int(options["samples"])
        for image, target in zip(images, selected, strict=True):
            noisy = noisy_inputs(image[None], samples, options["noise"], rng)
            *_, gradients = _input_gradient_run(explainer, noisy, np.full(samples, target), False, [])
            results.append(smoothgrad(gradients, samples))
    else:
        if options["integration"] not in INTEGRATION_RULES:
            raise ExplainError(f"unknown integration '{options['integration']}'; choose from "
                               f"{', '.join(INTEGRATION_RULES)}")
        alphas, sizes = integration_points(int(options["steps"]), options["integration"])
        baseline = black_baseline(spec, images.shape[1])
        for image, target in zip(images, selected, strict=True):
            points = path_inputs(image[None], alphas, baseline)
            *_, gradients = _input_gradient_run(explainer, points, np.full(len(alphas), target), False, [])
            results.append(integrated_gradients(image[None], gradients, sizes, baseline))
    return scores, selected, np.concatenate(results)


def black_baseline(spec, channels: int) -> np.ndarray:
    """A black image in the model's input space, C x 1 x 1: -mean/std per channel where the file records them,
    else 0 (inputs taken as they are)."""
    mean = np.array(spec.mean if spec.mean else [0.0] * channels, dtype=np.float32)
    std = np.array(spec.std if spec.std else [1.0] * channels, dtype=np.float32)
    return (-mean / std)[:, None, None]
