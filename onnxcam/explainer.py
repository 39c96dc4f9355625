"""The Python API: one session run per batch, then the numpy core."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from threadpoolctl import ThreadpoolController

from .core import METHODS, heatmaps, preprocess
from .core.layouts import parse_tokens, to_grid
from .core.rollout import HEAD_FUSIONS, grad_rollout, rollout
from .runtimes import ExplainSpec, create_session
from .runtimes.binding import BoundRunner, as_ortvalue, shape_of
from .runtimes.metadata import METADATA_KEY

ROLLOUT_METHODS = ("rollout", "grad-rollout")
ALL_METHODS = (*METHODS, *ROLLOUT_METHODS)


@cache
def _blas() -> ThreadpoolController:
    """numpy's BLAS, run single-threaded around the core: its matrices are small, and idle BLAS
    threads spin for a while after each call, stealing the cores from the next session run
    (measured: +15% on ResNet-50 at batch 8 on two cores; a 49 x 49 eigh 10x slower)."""
    return ThreadpoolController()


class ExplainError(ValueError):
    """A request the model cannot answer: unknown method, class out of range, wrong input."""


@dataclass
class Explanation:
    heatmaps: np.ndarray  # float32, B x H x W in [0, 1], at the model's input resolution
    logits: np.ndarray  # B x num_classes, the scores before softmax (or the single output)
    targets: np.ndarray  # int64, B: the class each map explains
    method: str

    def top_k(self, k: int = 5, labels: list[str] | None = None) -> list[list[dict]]:
        return top_classes(self.logits, k, labels)


def top_classes(logits: np.ndarray, k: int = 5, labels: list[str] | None = None) -> list[list[dict]]:
    """Per image, the k best classes with their probability (softmax; the raw score for one output)."""
    scores = logits
    if scores.shape[1] > 1:
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores = shifted / shifted.sum(axis=1, keepdims=True)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[{"class": int(c), "label": labels[c] if labels else None, "score": float(row[c])} for c in best]
            for row, best in zip(scores, order)]


class Explainer:
    """Explains images with an ONNX file written by `onnxcam export`.

    >>> explainer = Explainer("model.explain.onnx")
    >>> result = explainer.explain(image_rgb_uint8, method="gradcam++")
    """

    def __init__(self, path, provider: str = "auto", threads: int | None = None):
        self.session = create_session(path, provider, threads)
        self.runner = BoundRunner(self.session)
        metadata = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in metadata:
            raise ExplainError(f"{path} has no gradient outputs: make it explainable first with "
                               f"`onnxcam export {path} -o OUT.onnx`")
        self.spec: ExplainSpec = ExplainSpec.from_json(metadata[METADATA_KEY])

    @property
    def labels(self) -> list[str] | None:
        return self.spec.labels

    def explain(self, inputs, method: str = "gradcam", targets=None, *, head_fusion: str = "mean",
                discard_ratio: float = 0.9) -> Explanation:
        """Heatmaps for a preprocessed float32 N x C x H x W batch, or uint8 RGB images (one or a list).

        The batch may also be an OrtValue or a DLPack tensor (PyTorch, CuPy): one already on the GPU is
        bound there, with no copy through the host.
        `targets`: None (each image's top-1 class), one class index for all, or one per image.
        `head_fusion` and `discard_ratio` apply to the rollout methods only.
        """
        if method not in ALL_METHODS:
            raise ExplainError(f"unknown method '{method}'; choose from {', '.join(ALL_METHODS)}")
        batch = self.prepare(inputs)
        count = shape_of(batch)[0]
        classes = self.class_indices(targets, count)
        with _blas().limit(limits=1, user_api="blas"):
            if method in ROLLOUT_METHODS:
                scores, selected, maps = self._rollout(batch, classes, method, head_fusion, discard_ratio)
            else:
                scores, selected, maps = self._cams(batch, classes, method)
            heat = heatmaps(maps, self.spec.input_size)
        return Explanation(heat, scores.reshape(count, -1), selected, method)

    def _run(self, batch, classes, names):
        """One session run fetching the scores, the explained classes and `names`, nothing else."""
        spec = self.spec
        return self.runner.run([spec.scores, spec.selected, *names], {spec.input: batch, spec.class_input: classes})

    def _cams(self, batch, classes, method):
        """One map per target layer, from the layer's activations and gradients laid out as a grid."""
        compute, needs_gradients = METHODS[method]
        spec = self.spec
        scores, selected, *tensors = self._run(batch, classes, spec.activations + (spec.gradients if needs_gradients else []))
        activations = tensors[:len(spec.activations)]
        gradients = tensors[len(spec.activations):] or [None] * len(activations)
        maps = [compute(to_grid(a, layout), None if g is None else to_grid(g, layout))
                for a, g, layout in zip(activations, gradients, spec.layouts)]
        return scores, selected, maps

    def _rollout(self, batch, classes, method, head_fusion, discard_ratio):
        spec = self.spec
        if not spec.attentions:
            raise ExplainError(f"{method} needs attention probabilities, and this model exposes none "
                               f"(export a transformer whose attention modules are named attn_drop, or name them)")
        if head_fusion not in HEAD_FUSIONS:
            raise ExplainError(f"unknown head fusion '{head_fusion}'; choose from {', '.join(HEAD_FUSIONS)}")
        if not 0 <= discard_ratio < 1:
            raise ExplainError(f"discard_ratio must lie in [0, 1), got {discard_ratio}")
        prefix, height, width = parse_tokens(spec.attention_layout)
        if method == "grad-rollout" and not spec.attention_gradients:
            raise ExplainError("grad-rollout needs the attention gradients: export with --grad-rollout "
                               "(attention_gradients=True; they cost a backward pass through every block)")
        if method == "rollout":
            scores, selected, *attentions = self._run(batch, classes, spec.attentions)
            maps = rollout(attentions, prefix, (height, width), head_fusion, discard_ratio)
        else:
            scores, selected, *tensors = self._run(batch, classes, spec.attentions + spec.attention_gradients)
            count = len(spec.attentions)
            maps = grad_rollout(tensors[:count], tensors[count:], prefix, (height, width), discard_ratio)
        return scores, selected, [maps]

    def prepare(self, inputs):
        """The model's input batch: float32 arrays, OrtValues and DLPack tensors pass through (checked),
        uint8 RGB images are preprocessed."""
        height, width = self.spec.input_size
        if not isinstance(inputs, (np.ndarray, list, tuple)):
            try:
                value = as_ortvalue(inputs)
            except TypeError:
                raise ExplainError(f"expected uint8 RGB images, a float32 batch, an OrtValue or a DLPack tensor, "
                                   f"got {type(inputs).__name__}") from None
            except (ValueError, BufferError) as error:  # strided, or a tensor that requires grad
                raise ExplainError(str(error)) from None
            shape = tuple(value.shape())
            if value.data_type() != "tensor(float)" or len(shape) != 4 or shape[2:] != (height, width):
                raise ExplainError(f"expected a float32 batch N x C x {height} x {width}, "
                                   f"got {value.data_type()} of shape {shape}")
            return value
        images = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        if isinstance(inputs, np.ndarray) and inputs.dtype != np.uint8:
            if inputs.ndim != 4 or inputs.shape[2:] != (height, width):
                raise ExplainError(f"expected a float32 batch N x C x {height} x {width}, got shape {inputs.shape}")
            return np.ascontiguousarray(inputs, dtype=np.float32)
        if not images:
            raise ExplainError("no images given")
        for image in images:
            if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3):
                raise ExplainError("images must be uint8 RGB arrays of shape H x W x 3")
        return preprocess(list(images), self.spec.input_size, self.spec.mean, self.spec.std)

    def class_indices(self, targets, batch: int) -> np.ndarray:
        """int64 [batch]: -1 (top-1) when targets is None, else the classes asked for, range-checked."""
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
