"""Explaining image files into a folder: the job behind `onnxcam explain` and `onnxcam demo`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import click
import numpy as np

from .core import overlay
from .explainer import Explainer
from .images import ImageError, read_image, write_atomic, write_png

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def collect_images(paths) -> list[Path]:
    """Files as given, and the images inside given folders (sorted)."""
    found = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)
    return found


def explain_files(explainer: Explainer, paths: list[Path], outdir: Path, *, method="gradcam", target=None,
                  batch_size=8, save_npy=False, alpha=0.4, colormap="jet") -> int:
    """Overlay PNGs (and .npy heatmaps) per image plus predictions.json; one session run per batch.

    A bad image is reported on stderr in one line and skipped; the others are still written.
    Returns the number of images that failed.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    predictions, failures, taken = {}, 0, set()
    for start in range(0, len(paths), batch_size):
        loaded = []
        for path in paths[start:start + batch_size]:
            try:
                loaded.append((path, read_image(path)))
            except ImageError as error:
                click.echo(f"error: {error}", err=True)
                predictions[str(path)] = {"error": str(error)}
                failures += 1
        if not loaded:
            continue
        result = explainer.explain([image for _, image in loaded], method=method, targets=target)
        tops = result.top_k(5, explainer.labels)
        for (path, image), heatmap, chosen, top in zip(loaded, result.heatmaps, result.targets, tops):
            stem = _unique_stem(path, taken)
            write_png(outdir / f"{stem}.png", overlay(image, heatmap, alpha=alpha, colormap=colormap))
            if save_npy:
                buffer = io.BytesIO()
                np.save(buffer, heatmap)
                write_atomic(outdir / f"{stem}.npy", buffer.getvalue())
            predictions[str(path)] = {"overlay": f"{stem}.png", "method": method, "target": int(chosen), "top5": top}
            ranked = ", ".join(f"{p['label'] or p['class']} {p['score']:.3f}" for p in top)
            click.echo(f"{path}: {ranked}; map of class {int(chosen)} -> {outdir / (stem + '.png')}")
    write_atomic(outdir / "predictions.json", json.dumps(predictions, indent=2).encode())
    return failures


def _unique_stem(path: Path, taken: set) -> str:
    stem, n = path.stem, 1
    while stem in taken:
        n += 1
        stem = f"{path.stem}_{n}"
    taken.add(stem)
    return stem
