"""Decoding and batching of image files for the explainer: a pool of threads reads, decodes and preprocesses the
next files while the session runs the current batch; a file that cannot be read is reported in its batch."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .core import preprocess
from .core.errors import ImageError
from .core.files import load_image
from .explanation import Explanation


@dataclass
class FileBatch:
    """One session run over files: the explanation of those that decoded, and the errors of those that did not."""

    paths: list[str]  # the files explained, in the order of the explanation's images
    explanation: Explanation | None  # None when no file of the batch could be decoded
    images: list[np.ndarray] | None  # the decoded uint8 RGB images, when kept
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, one-line message)
    sizes: list[tuple[int, int]] | None = None  # (height, width) of each decoded image, in the order of `paths`


def _decode(source: str, spec, keep_image: bool):
    """(input tensor, image or None, (height, width)) for one file, or the ImageError's message."""
    try:
        image = load_image(source)
    except ImageError as error:
        return str(error)
    tensor = preprocess([image], spec.input_size, spec.mean, spec.std, spec.input_layout, spec.input_type)[0]
    return tensor, image if keep_image else None, image.shape[:2]


def decode_ahead(paths: Iterable[str], spec, workers: int, ahead: int, keep_images: bool):
    """(path, decoded or message) in order, at most `ahead` files in flight in a pool of `workers` threads."""
    pending: deque[tuple[str, Future]] = deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="onnxcam-decode")
    try:
        for path in paths:
            pending.append((path, pool.submit(_decode, path, spec, keep_images)))
            if len(pending) >= ahead:
                done_path, future = pending.popleft()
                yield done_path, future.result()
        while pending:
            done_path, future = pending.popleft()
            yield done_path, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def explain_batches(explainer, paths: Iterable[str], *, method: str = "gradcam", targets=None,
                    batch_size: int = 8, workers: int | None = None, keep_images: bool = False,
                    **options) -> Iterator[FileBatch]:
    """Explain files batch by batch, one session run each, while a pool of threads decodes the next ones.

    A file that cannot be read or decoded is reported in its batch's `errors` and skipped.
    `explainer`: an onnxcam.Explainer (its `spec` and `explain`). `targets`: None (each image's top-1) or one class
    for all; `options` go to `Explainer.explain`. Boxes of detections are in the pixels of each file's image.
    """
    workers = workers or os.cpu_count() or 1
    batch: list[tuple[str, tuple]] = []
    errors: list[tuple[str, str]] = []
    for path, decoded in decode_ahead(paths, explainer.spec, workers, batch_size * (workers + 2), keep_images):
        if isinstance(decoded, str):
            errors.append((path, decoded))
        else:
            batch.append((path, decoded))
        if len(batch) + len(errors) == batch_size:
            yield _explained(explainer, batch, errors, method, targets, keep_images, options)
            batch, errors = [], []
    if batch or errors:
        yield _explained(explainer, batch, errors, method, targets, keep_images, options)


def _explained(explainer, batch, errors, method, targets, keep_images, options) -> FileBatch:
    """One session run over the decoded files of a batch."""
    if not batch:
        return FileBatch([], None, None, errors)
    tensors = np.stack([tensor for _, (tensor, _, _) in batch])
    sizes = [size for _, (_, _, size) in batch]
    explanation = explainer.explain(tensors, method=method, targets=targets, **options)
    images = [image for _, (_, image, _) in batch] if keep_images else None
    return FileBatch([path for path, _ in batch], explanation.in_image_pixels(sizes, explainer.spec.input_size),
                     images, errors, sizes)

