"""The Python API: one session run per batch, then the numpy core."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
from threadpoolctl import ThreadpoolController

from .contract import ExplainSpec
from .core import METHODS, heatmaps, preprocess, top_classes
from .core.layouts import parse_tokens, to_grid
from .core.rollout import HEAD_FUSIONS, grad_rollout, legrad, rollout
from .errors import ExplainError
from .runtimes import create_session
from .runtimes.binding import BoundRunner, as_ortvalue, shape_of
from .runtimes.head import HeadRunner
from .strategies import FAMILY_METHODS, explain_family, host_array
from .targets import Classes, as_target, fixed_classes, per_image

ROLLOUT_METHODS = ("rollout", "grad-rollout", "legrad")  # the attention methods of ViTs
_ORT_TYPES = {"float32": "float", "float16": "float16", "float64": "double", "uint8": "uint8"}
ALL_METHODS = (*METHODS, *ROLLOUT_METHODS, *FAMILY_METHODS)


@cache
def _blas() -> ThreadpoolController:
    """numpy's BLAS, run single-threaded around the core: its matrices are small, and idle BLAS
    threads spin for a while after each call, stealing the cores from the next session run
    (measured: +15% on ResNet-50 at batch 8 on two cores; a 49 x 49 eigh 10x slower)."""
    return ThreadpoolController()


@dataclass
class Explanation:
    heatmaps: np.ndarray  # float32, M x H x W in [0, 1], at the model's input resolution (M = B: one map each)
    logits: np.ndarray  # B x num_classes, the scores before softmax (or the single output)
    targets: np.ndarray  # int64, M: the class each map explains (-1 where none: a similarity)
    method: str
    image_index: np.ndarray | None = None  # int64, M: the image each map belongs to
    scores: np.ndarray | None = None  # float32, M: each map's score (onnxcam.targets), for targets other than a class
    boxes: np.ndarray | None = None  # float32, M x 4: x1 y1 x2 y2 in the pixels of the image as given (detections)
    masks: np.ndarray | None = None  # bool, M x h x w at the output's resolution: each segment's mask (segmentation)
    attributions: np.ndarray | None = None  # float32, M x C x H x W: input-gradient methods' raw attributions

    def __post_init__(self):
        if self.image_index is None:
            self.image_index = np.arange(len(self.targets), dtype=np.int64)

    def top_k(self, k: int = 5, labels: list[str] | None = None) -> list[list[dict]]:
        return top_classes(self.logits, k, labels)


class Explainer:
    """Explains images with an ONNX file written by `onnxcam export`.

    >>> explainer = Explainer("model.explain.onnx")
    >>> result = explainer.explain(image_rgb_uint8, method="gradcam++")
    """

    def __init__(self, path, provider: str = "auto", threads: int | None = None):
        self.session = create_session(path, provider, threads)
        self.runner = BoundRunner(self.session)
        spec = ExplainSpec.from_metadata(self.session.get_modelmeta().custom_metadata_map)
        if spec is None:
            raise ExplainError(f"{path} has no gradient outputs: make it explainable first with "
                               f"`onnxcam export {path} -o OUT.onnx`")
        self.spec: ExplainSpec = spec
        self.head = HeadRunner(path, self.session, spec)

    @property
    def labels(self) -> list[str] | None:
        return self.spec.labels

    @cached_property
    def fixed_batch(self) -> int | None:
        """The batch size the file's image input is fixed at, or None where it is free."""
        size = next(i.shape[0] for i in self.session.get_inputs() if i.name == self.spec.input)
        return size if isinstance(size, int) and size > 0 else None

    def explain_files(self, paths, method: str = "gradcam", targets=None, *, batch_size: int = 8,
                      workers: int | None = None, keep_images: bool = False, **options):
        """Explain image files (paths or URIs, any iterable) batch by batch: yields one `pipeline.FileBatch` per
        session run (the paths explained, their Explanation, the files that could not be read), while a pool
        of `workers` threads decodes the next files. Memory stays flat whatever the number of files.
        `targets`: None (each image's top-1) or one class for all; `options` as in `explain`."""
        from .pipeline import explain_batches

        return explain_batches(self, paths, method=method, targets=targets, batch_size=batch_size, workers=workers,
                               keep_images=keep_images, **options)

    def explain(self, inputs, method: str = "gradcam", targets=None, *, head_fusion: str = "mean",
                discard_ratio: float = 0.9, eigen_smooth: bool = False, aug_smooth: bool = False,
                **options) -> Explanation:
        """Heatmaps for a preprocessed float32 N x C x H x W batch, or uint8 RGB images (one or a list).

        The batch may also be an OrtValue or a DLPack tensor (PyTorch, CuPy): one already on the GPU is
        bound there, with no copy through the host.
        `targets`: None (each image's top-1 class), one class index for all, or one per image; or targets of
        onnxcam.targets (Classes, Segmentation, Detection, Similarity, Contrast), one for all or one per image: the
        heatmaps are then M x H x W, one per (image, target) pair (see Explanation.image_index).
        `head_fusion` and `discard_ratio` apply to the rollout methods only. `eigen_smooth` and `aug_smooth`
        (pytorch-grad-cam's options) apply to the CAMs; `options` are a method's own (onnxcam.strategies.OPTIONS).
        """
        if method not in ALL_METHODS:
            raise ExplainError(f"unknown method '{method}'; choose from {', '.join(ALL_METHODS)}")
        batch = self.prepare(inputs)
        count = shape_of(batch)[0]
        if self.fixed_batch not in (None, count):
            raise ExplainError(f"the model's image input is fixed at batches of {self.fixed_batch}; got {count} "
                               f"images", option="batch_size")
        items = per_image(targets, count)
        classes = fixed_classes(items, self.spec.scores)
        if method in FAMILY_METHODS or eigen_smooth or aug_smooth or options:
            if classes is None:
                return self._explain_family_classes(batch, items, method, eigen_smooth, aug_smooth, options)
            return self._explain_family(batch, classes, count, method, eigen_smooth, aug_smooth, options)
        if classes is None:
            return self._explain_targets(inputs, batch, [as_target(item) for item in items], method)
        classes = self.class_indices(classes, count)
        with _blas().limit(limits=1, user_api="blas"):
            if method in ROLLOUT_METHODS:
                scores, selected, maps = self._rollout(batch, classes, method, head_fusion, discard_ratio)
            else:
                scores, selected, maps = self._cams(batch, classes, method)
            heat = heatmaps(maps, self.spec.input_size)
        return Explanation(heat, scores.reshape(count, -1), selected, method)

    def _explain_family(self, batch, classes, count: int, method: str, eigen: bool, augment: bool,
                        options: dict) -> Explanation:
        """Methods with a run strategy of their own, and the smoothing options (onnxcam.strategies)."""
        classes = self.class_indices(classes, count)
        with _blas().limit(limits=1, user_api="blas"):
            result = explain_family(self, batch, classes, method, eigen, augment, options)
        return Explanation(result.heatmaps, result.scores.reshape(count, -1), result.selected, method,
                           attributions=result.attributions)

    def _explain_family_classes(self, batch, items: list, method: str, eigen: bool, augment: bool,
                                options: dict) -> Explanation:
        """A family method for Classes targets (several classes per image, or those above a probability): the
        classes are read from one run's scores, then the method runs on each image repeated once per class. Other
        targets are refused: the family's strategies perturb and score classes of the exported output."""
        spec = self.spec
        targets = [as_target(item) for item in items]
        if any(not isinstance(t, Classes) or t.output not in (None, spec.scores) for t in targets):
            raise ExplainError(f"{method} with these options explains classes of '{spec.scores}' (class indices, "
                               f"None, or Classes), not other target objects", option="targets")
        host = host_array(batch)
        scores = self._run(host, np.full(len(host), -1, dtype=np.int64), [])[0].reshape(len(host), -1)
        picks = [(image, pick) for image, target in enumerate(targets) for pick in target.picks(scores[image])]
        image_index = np.array([image for image, _ in picks], dtype=np.int64)
        if self.fixed_batch not in (None, len(picks)):
            raise ExplainError(f"the model's image input is fixed at batches of {self.fixed_batch}, and these "
                               f"targets ask for {len(picks)} maps", option="batch_size")
        classes = self.class_indices([pick.target for _, pick in picks], len(picks))
        if not picks:
            return Explanation(np.zeros((0, *spec.input_size), np.float32), scores, classes, method, image_index,
                               np.zeros(0, np.float32))
        with _blas().limit(limits=1, user_api="blas"):
            result = explain_family(self, host[image_index], classes, method, eigen, augment, options)
        return Explanation(result.heatmaps, scores, result.selected, method, image_index,
                           np.array([pick.score for _, pick in picks], dtype=np.float32),
                           attributions=result.attributions)

    def _run(self, batch, classes, names):
        """One session run fetching the scores, the explained classes and `names`, nothing else. Tensors of a
        half- or double-precision model come back as float32, the precision of the numpy core."""
        spec = self.spec
        tensors = self.runner.run([spec.scores, spec.selected, *names], {spec.input: batch, spec.class_input: classes})
        return [t.astype(np.float32, copy=False) if t.dtype.kind == "f" else t for t in tensors]

    def _cams(self, batch, classes, method):
        """One map per target layer, from the layer's activations and gradients laid out as a grid."""
        compute, needs_gradients = METHODS[method]
        spec = self.spec
        names = spec.activations + (spec.gradients if needs_gradients else [])
        scores, selected, *tensors = self._run(batch, classes, names)
        activations = tensors[:len(spec.activations)]
        gradients = tensors[len(spec.activations):] or [None] * len(activations)
        maps = [compute(to_grid(a, layout), None if g is None else to_grid(g, layout))
                for a, g, layout in zip(activations, gradients, spec.layouts, strict=True)]
        return scores, selected, maps

    def _rollout(self, batch, classes, method, head_fusion, discard_ratio):
        spec = self.spec
        if not spec.attentions:
            raise ExplainError(f"{method} needs attention probabilities, and this model exposes none "
                               f"(export a transformer whose attention modules are named attn_drop, or name them)")
        if method == "legrad":
            return self._legrad(batch, classes)
        if head_fusion not in HEAD_FUSIONS:
            raise ExplainError(f"unknown head fusion '{head_fusion}'; choose from {', '.join(HEAD_FUSIONS)}")
        if not 0 <= discard_ratio < 1:
            raise ExplainError(f"discard_ratio must lie in [0, 1), got {discard_ratio}")
        prefix, height, width = parse_tokens(spec.attention_layout)
        if method == "grad-rollout" and not spec.attention_gradients:
            raise ExplainError("grad-rollout needs the attention gradients, which cost a backward pass through every "
                               "block and are exported on request", option="attention_gradients")
        if method == "rollout":
            scores, selected, *attentions = self._run(batch, classes, spec.attentions)
            maps = rollout(attentions, prefix, (height, width), head_fusion, discard_ratio)
        else:
            scores, selected, *tensors = self._run(batch, classes, spec.attentions + spec.attention_gradients)
            count = len(spec.attentions)
            maps = grad_rollout(tensors[:count], tensors[count:], prefix, (height, width), discard_ratio)
        return scores, selected, [maps]

    def _legrad(self, batch, classes):
        """LeGrad (core.rollout.legrad) from the per-block gradients of the layer scores, in one session run."""
        spec = self.spec
        if not spec.legrad_gradients:
            raise ExplainError("legrad needs each block's gradient of its layer score, which costs a backward pass "
                               "per block and is exported on request", option="legrad")
        prefix, height, width = parse_tokens(spec.attention_layout)
        scores, selected, *gradients = self._run(batch, classes, spec.legrad_gradients)
        return scores, selected, [legrad(gradients, prefix, (height, width))]

    def prepare(self, inputs):
        """The model's input batch. A batch already in the model's layout, type and size passes through (numpy,
        OrtValue or DLPack; checked); uint8 RGB images (one, or a list) are resized and preprocessed into it."""
        spec = self.spec
        if not isinstance(inputs, (np.ndarray, list, tuple)):
            try:
                value = as_ortvalue(inputs)
            except TypeError:
                raise ExplainError(f"expected uint8 RGB images, a batch, an OrtValue or a DLPack tensor, "
                                   f"got {type(inputs).__name__}") from None
            except (ValueError, BufferError) as error:  # strided, or a tensor that requires grad
                raise ExplainError(str(error)) from None
            if value.data_type() != f"tensor({_ORT_TYPES[spec.input_type]})" or not self._fits(tuple(value.shape())):
                raise ExplainError(f"expected a {spec.input_type} batch {self._expected()}, "
                                   f"got {value.data_type()} of shape {tuple(value.shape())}")
            return value
        if isinstance(inputs, np.ndarray) and inputs.ndim == 4:
            if not self._fits(inputs.shape):
                raise ExplainError(f"expected a {spec.input_type} batch {self._expected()}, got shape {inputs.shape}")
            return np.ascontiguousarray(inputs, dtype=spec.input_type)
        images = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        if not images:
            raise ExplainError("no images given")
        for image in images:
            if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                    and image.shape[2] == 3):
                raise ExplainError("images must be uint8 RGB arrays of shape H x W x 3")
        return preprocess(list(images), spec.input_size, spec.mean, spec.std, spec.input_layout, spec.input_type)

    def _fits(self, shape: tuple[int, ...]) -> bool:
        """Whether a batch shape is N images in the model's layout and size."""
        height, width = self.spec.input_size
        spatial = shape[1:3] if self.spec.input_layout == "nhwc" else shape[2:4]
        return len(shape) == 4 and tuple(spatial) == (height, width)

    def _expected(self) -> str:
        height, width = self.spec.input_size
        return f"N x {height} x {width} x C" if self.spec.input_layout == "nhwc" else f"N x C x {height} x {width}"

    def class_indices(self, targets, batch: int) -> np.ndarray:
        """int64 [batch]: -1 (top-1) when targets is None, else the classes asked for, range-checked. An output
        that is not a vector of class scores (a detector's raw head, a segmentation map) is refused: its
        flattened 'top-1' would name a box coordinate or a pixel."""
        shape = self.spec.score_shape
        if shape is not None and sum(d > 1 for d in shape) > 1:
            raise ExplainError(f"output '{self.spec.scores}' is N x {' x '.join(map(str, shape))}, not class scores: "
                               f"explain it with a target (onnxcam.targets: Detection, Segmentation, Similarity)",
                               option="targets")
        if targets is None:
            return np.full(batch, -1, dtype=np.int64)
        classes = np.asarray(targets, dtype=np.int64).reshape(-1)
        if classes.size == 1:
            classes = np.full(batch, classes[0], dtype=np.int64)
        if classes.shape != (batch,):
            raise ExplainError(f"{classes.size} targets given for {batch} images")
        bad = classes[(classes < -1) | (classes >= self.spec.num_classes)]
        if bad.size:
            raise ExplainError(f"class index {int(bad[0])} is out of range: the model has {self.spec.num_classes} "
                               f"classes (0 to {self.spec.num_classes - 1}; -1 for the top class)")
        return classes

    def _explain_targets(self, inputs, batch, targets: list, method: str) -> Explanation:
        """Targets set after seeing the outputs: the backbone runs once; the head runs once for all the maps,
        on the target activations repeated per map with each map's seed (runtimes.head)."""
        spec = self.spec
        if method in ("grad-rollout", "legrad"):
            raise ExplainError(f"{method} explains one class per image: give a class index, not a target object")
        outputs = list(dict.fromkeys([spec.scores, *(t.output or spec.scores for t in targets)]))
        known = [o.name for o in self.session.get_outputs() if not o.name.startswith("onnxcam_")]
        for output in outputs:
            if output not in known:
                raise ExplainError(f"the model has no output '{output}'; its outputs: {', '.join(known)}")
        count = len(targets)
        fetched = self.runner.run([*outputs, *spec.activations, *spec.cuts],
                                  {spec.input: batch, spec.class_input: np.full(count, -1, dtype=np.int64)})
        values = dict(zip(outputs, fetched[:len(outputs)], strict=True))
        activations = fetched[len(outputs):len(outputs) + len(spec.activations)]
        cuts = fetched[len(outputs) + len(spec.activations):]
        picks = [(image, pick) for image, target in enumerate(targets)
                 for pick in target.picks(values[target.output or spec.scores][image])]
        image_index = np.array([image for image, _ in picks], dtype=np.int64)
        heat = np.zeros((0, *spec.input_size), dtype=np.float32)
        with _blas().limit(limits=1, user_api="blas"):
            if picks and method == "rollout":
                top = np.full(count, -1, dtype=np.int64)
                heat = heatmaps([self._rollout(batch, top, method, "mean", 0.9)[2][0][image_index]], spec.input_size)
            elif picks:
                heat = heatmaps(self._target_maps(targets, picks, activations, cuts, method), spec.input_size)
        boxes = self._image_boxes(inputs, picks) if any(p.box is not None for _, p in picks) else None
        return Explanation(heat, values[spec.scores].reshape(count, -1),
                           np.array([p.target for _, p in picks], dtype=np.int64), method, image_index,
                           np.array([p.score for _, p in picks], dtype=np.float32), boxes, masks=_masks(picks))

    def _target_maps(self, targets: list, picks: list, activations: list, cuts: list, method: str) -> list:
        """One map per pick and target layer; the gradients come from one head run per output explained."""
        spec = self.spec
        compute, needs_gradients = METHODS[method]
        image_index = np.array([image for image, _ in picks], dtype=np.int64)
        gradients = [None] * len(activations)
        if needs_gradients and picks:
            gradients = [np.empty((len(picks), *a.shape[1:]), dtype=a.dtype) for a in activations]
            outputs = [targets[image].output or spec.scores for image, _ in picks]
            for output in dict.fromkeys(outputs):
                rows = np.array([i for i, name in enumerate(outputs) if name == output], dtype=np.int64)
                seeds = np.stack([picks[i][1].seed for i in rows])
                for gradient, part in zip(gradients, self.head.gradients(output, activations, cuts, image_index[rows],
                                                                         seeds), strict=True):
                    gradient[rows] = part
        return [compute(to_grid(a[image_index], layout), None if g is None else to_grid(g, layout))
                for a, g, layout in zip(activations, gradients, spec.layouts, strict=True)]

    def _image_boxes(self, inputs, picks: list) -> np.ndarray:
        """Detection boxes in the pixels of each image as given (uint8 images are resized to the model's input);
        NaN for maps that are not detections."""
        height, width = self.spec.input_size
        images = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        given = isinstance(inputs, (list, tuple)) or (isinstance(inputs, np.ndarray) and inputs.dtype == np.uint8)
        boxes = np.full((len(picks), 4), np.nan, dtype=np.float32)
        for row, (image, pick) in enumerate(picks):
            if pick.box is None:
                continue
            size = images[image].shape[:2] if given else (height, width)
            scale = np.array([size[1] / width, size[0] / height] * 2, dtype=np.float32)
            boxes[row] = np.clip(pick.box * scale, 0, [size[1], size[0]] * 2)
        return boxes


def _masks(picks: list) -> np.ndarray | None:
    """The segments' masks (M x h x w), all False for maps that are not segments; None where no map is one."""
    shapes = {pick.mask.shape for _, pick in picks if pick.mask is not None}
    if not shapes:
        return None
    masks = np.zeros((len(picks), *shapes.pop()), dtype=bool)
    for row, (_, pick) in enumerate(picks):
        if pick.mask is not None and pick.mask.shape == masks.shape[1:]:
            masks[row] = pick.mask
    return masks
