"""What a job writes per image: overlays (PNG or JPEG, with each map's box or mask outline) and heatmaps (8-bit PNG
or float16 .npy), each file whole or not at all."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..core import overlay
from ..core.errors import ExplainError
from ..core.files import PNG_FAST, encode_image, write_atomic
from ..core.images import annotate

SAVE_CHOICES = ("overlays", "heatmaps", "table")


@dataclass(frozen=True)
class Outputs:
    """What the job writes: overlays (PNG or JPEG), heatmaps (8-bit PNG or float16 .npy), the Parquet table."""

    overlays: bool = True
    heatmaps: bool = False
    table: bool = False
    image_format: str = "png"
    heatmap_format: str = "png"
    alpha: float = 0.4
    colormap: str = "jet"
    rows_per_part: int = 10_000

    @classmethod
    def parse(cls, save: str, **options) -> Outputs:
        """From a comma-separated list of overlays, heatmaps and table."""
        chosen = {word.strip() for word in save.split(",") if word.strip()}
        unknown = chosen - set(SAVE_CHOICES)
        if unknown or not chosen:
            raise ExplainError(f"cannot save '{save}': choose one or more of {', '.join(SAVE_CHOICES)}",
                               option="save")
        return cls(overlays="overlays" in chosen, heatmaps="heatmaps" in chosen, table="table" in chosen, **options)

    @property
    def files(self) -> bool:
        return self.overlays or self.heatmaps


def uint8_map(heatmap: np.ndarray) -> np.ndarray:
    """A [0, 1] heatmap as 8-bit levels (0-255, rounded)."""
    return np.uint8(np.clip(heatmap, 0, 1) * 255 + 0.5)


def _write_maps(outdir: Path, outputs: Outputs, names: list[str], image, heatmaps: np.ndarray, levels: list,
                regions: list[dict]) -> list[dict]:
    """Write one image's overlays (with each map's box and label, or mask outline, from `regions`: keyword
    arguments of core.images.annotate) and heatmaps, whole files; per map, the files written. `levels`: the
    heatmaps as 8-bit levels (uint8_map), drawn and written as they are."""
    written = []
    for name, heatmap, level, region in zip(names, heatmaps, levels, regions, strict=True):
        files = {}
        if outputs.overlays:
            suffix = ".jpg" if outputs.image_format == "jpeg" else ".png"
            picture = overlay(image, level, alpha=outputs.alpha, colormap=outputs.colormap)
            if region:
                picture = annotate(picture, **region)
            write_atomic(outdir / f"{name}{suffix}", encode_image(picture, outputs.image_format))
            files["overlay"] = f"{name}{suffix}"
        if outputs.heatmaps and outputs.heatmap_format == "npy":
            buffer = io.BytesIO()
            np.save(buffer, heatmap.astype(np.float16))
            write_atomic(outdir / f"{name}.heatmap.npy", buffer.getvalue())
            files["heatmap"] = f"{name}.heatmap.npy"
        elif outputs.heatmaps:
            grey = cv2.imencode(".png", level, PNG_FAST)[1]  # one channel, 8 bits
            write_atomic(outdir / f"{name}.heatmap.png", grey.tobytes())
            files["heatmap"] = f"{name}.heatmap.png"
        written.append(files)
    return written


def finish_image(outdir: Path, outputs: Outputs, names, image, heatmaps: np.ndarray, regions: list[dict]):
    """In the writing pool: one image's files, and its maps as 8-bit levels for the table."""
    levels = [uint8_map(heatmap) for heatmap in heatmaps]  # once, for the overlay, the PNG and the table alike
    files = _write_maps(outdir, outputs, names, image, heatmaps, levels, regions) if outputs.files \
        else [{} for _ in heatmaps]
    return files, levels if outputs.table else None

