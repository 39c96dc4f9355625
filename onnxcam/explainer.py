"""The Python API, a facade: input preparation, dispatch to a method of the registry (onnxcam.methods), and the
result. One session run per batch for the single-run methods, then the numpy core."""

from __future__ import annotations

from functools import cache

import numpy as np
from threadpoolctl import ThreadpoolController

from .batches import explain_batches
from .core import preprocess
from .core.errors import ExplainError
from .explanation import Explanation
from .methods import (
    Call,
    Method,
    augmented,
    capabilities,
    check_needs,
    eigen_smoothed,
    explain_objects,
    method_named,
)
from .runtimes.binding import as_ortvalue, host_array, shape_of
from .runtimes.explainable import ExplainableModel
from .targets import Classes, as_target, fixed_classes, per_image

_ORT_TYPES = {"float32": "float", "float16": "float16", "float64": "double", "uint8": "uint8"}


@cache
def _blas() -> ThreadpoolController:
    """numpy's BLAS, run single-threaded around the core: its matrices are small, and idle BLAS
    threads spin for a while after each call, stealing the cores from the next session run
    (measured: +15% on ResNet-50 at batch 8 on two cores; a 49 x 49 eigh 10x slower)."""
    return ThreadpoolController()


class Explainer:
    """Explains images with an ONNX file written by `onnxcam export`.

    >>> explainer = Explainer("model.explain.onnx")
    >>> result = explainer.explain(image_rgb_uint8, method="gradcam++")
    """

    def __init__(self, path, provider: str = "auto", threads: int | None = None):
        self.model = ExplainableModel(path, provider, threads)
        self.session, self.spec = self.model.session, self.model.spec

    @property
    def labels(self) -> list[str] | None:
        return self.spec.labels

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the file's image input is fixed at, or None where it is free."""
        return self.model.fixed_batch

    def capabilities(self) -> dict[str, str | None]:
        """Per method, None where this file supports it, else the reason it does not (for menus)."""
        return capabilities(self.model)

    def explain_files(self, paths, method: str = "gradcam", targets=None, *, batch_size: int = 8,
                      workers: int | None = None, keep_images: bool = False, **options):
        """Explain image files (paths or URIs, any iterable) batch by batch: yields one `batches.FileBatch` per
        session run (the paths explained, their Explanation, the files that could not be read), while a pool
        of `workers` threads decodes the next files. Memory stays flat whatever the number of files.
        `targets`: None (each image's top-1) or one class for all; `options` as in `explain`."""
        return explain_batches(self, paths, method=method, targets=targets, batch_size=batch_size, workers=workers,
                               keep_images=keep_images, **options)

    def explain(self, inputs, method: str = "gradcam", targets=None, *, eigen_smooth: bool = False,
                aug_smooth: bool = False, **options) -> Explanation:
        """Heatmaps for a preprocessed N x C x H x W batch, or uint8 RGB images (one or a list).

        The batch may also be an OrtValue or a DLPack tensor (PyTorch, CuPy): one already on the GPU is
        bound there, with no copy through the host.
        `targets`: None (each image's top-1 class), one class index for all, or one per image; or targets of
        onnxcam.targets (Classes, Segmentation, Detection, Similarity, Contrast), one for all or one per image: the
        heatmaps are then M x H x W, one per (image, target) pair (see Explanation.image_index). Boxes of
        detections are in the pixels of the images as given.
        `eigen_smooth` and `aug_smooth` (pytorch-grad-cam's options) wrap the CAMs that take them
        (onnxcam.methods.smoothing); `options` are the method's own (its declaration in onnxcam.methods, such as
        rollout's head_fusion and discard_ratio).
        """
        chosen = self._method(method, eigen_smooth, aug_smooth)
        call_options = chosen.parse_options(options)
        batch = self.prepare(inputs)
        count = shape_of(batch)[0]
        self._check_batch(count)
        items = per_image(targets, count)
        classes = fixed_classes(items, self.spec.scores)
        with _blas().limit(limits=1, user_api="blas"):
            if classes is not None:
                classes = self.class_indices(classes, count)
                result = chosen.run(Call(self.model, batch, classes, call_options, chosen))
                return Explanation(result.heatmaps, result.scores.reshape(count, -1), result.selected, method,
                                   attributions=result.attributions)
            targets = [as_target(item) for item in items]
            if chosen.objects:
                top = np.full(count, -1, dtype=np.int64)
                explanation = explain_objects(Call(self.model, batch, top, call_options, chosen), targets)
                return self._in_given_pixels(explanation, inputs)
            return self._explain_classes(batch, targets, chosen, call_options, method)

    def _method(self, name: str, eigen: bool, augment: bool) -> Method:
        """The method asked for, wrapped in the smoothing asked for; refused in one line where the file lacks
        what it needs."""
        method = method_named(name)
        if eigen:
            method = eigen_smoothed(method)
        if augment:
            method = augmented(method)
        check_needs(method, self.model)
        return method

    def _check_batch(self, count: int) -> None:
        if self.fixed_batch not in (None, count):
            raise ExplainError(f"the model's image input is fixed at batches of {self.fixed_batch}; got {count} "
                               f"images", option="batch_size")

    def _explain_classes(self, batch, targets: list, method: Method, options, name: str) -> Explanation:
        """A method that explains classes only, for Classes targets (several classes per image, or those above a
        probability): the classes are read from one run's scores, then the method runs on each image repeated once
        per class. Other targets are refused."""
        spec = self.spec
        if any(not isinstance(t, Classes) or t.output not in (None, spec.scores) for t in targets):
            raise ExplainError(f"{name} with these options explains classes of '{spec.scores}' (class indices, None, "
                               f"or Classes), not other target objects", option="targets")
        host = host_array(batch)
        scores = self.model.run(host, np.full(len(host), -1, dtype=np.int64), [])[0].reshape(len(host), -1)
        picks = [(image, pick) for image, target in enumerate(targets)
                 for pick in target.picks(scores[image], {}, spec.input_size)]
        image_index = np.array([image for image, _ in picks], dtype=np.int64)
        if self.fixed_batch not in (None, len(picks)):
            raise ExplainError(f"the model's image input is fixed at batches of {self.fixed_batch}, and these "
                               f"targets ask for {len(picks)} maps", option="batch_size")
        classes = self.class_indices([pick.target for _, pick in picks], len(picks))
        if not picks:
            return Explanation(np.zeros((0, *spec.input_size), np.float32), scores, classes, name, image_index,
                               np.zeros(0, np.float32))
        result = method.run(Call(self.model, host[image_index], classes, options, method))
        return Explanation(result.heatmaps, scores, result.selected, name, image_index,
                           np.array([pick.score for _, pick in picks], dtype=np.float32),
                           attributions=result.attributions)

    def _in_given_pixels(self, explanation: Explanation, inputs) -> Explanation:
        """Boxes in the pixels of the uint8 images as given (they were resized to the model's input); those of a
        batch already at the model's size stay in its pixels. Either way, clipped to the image."""
        if isinstance(inputs, np.ndarray) and inputs.ndim == 3:
            inputs = [inputs]
        sizes = [image.shape[:2] for image in inputs] if isinstance(inputs, (list, tuple)) \
            else [self.spec.input_size] * len(explanation.logits)
        return explanation.in_image_pixels(sizes, self.spec.input_size)

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
