"""The record's entry of each map (class, label, score, box) and how it is told: a line per image, the overlay's
annotations, the output names of an image's maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.scores import probabilities
from ..explanation import Explanation
from .table import TABLE


def map_names(name: str, classes: list[int]) -> list[str]:
    """The output names of one image's maps: the image's own for a single map, else one per class explained,
    numbered from the second map of a class on (two detections of one class: NAME.class2, NAME.class2_2)."""
    if len(classes) == 1:
        return [name]
    seen: dict[int, int] = {}
    named = []
    for klass in classes:
        seen[klass] = seen.get(klass, 0) + 1
        named.append(f"{name}.class{klass}" + (f"_{seen[klass]}" if seen[klass] > 1 else ""))
    return named


def has_regions(explanation: Explanation) -> bool:
    """Whether the maps are of detections or segments: their scores are their own, not class probabilities."""
    return explanation.boxes is not None or explanation.masks is not None


def map_entries(explanation: Explanation, image: int, indices: list[int], labels) -> list[dict]:
    """Per map of one image: the class explained (-1 for a target that is not a class), its label and score
    (the class probability; for a detection, a segment or a target that is not a class, the target's own
    score); for a detection its box, x1 y1 x2 y2 in the pixels of the image (Explanation.in_image_pixels)."""
    own, boxes = explanation.scores, explanation.boxes
    own_scores = has_regions(explanation)
    probability = None if own_scores else probabilities(explanation.logits[image:image + 1])[0]
    entries = []
    for m in indices:
        target = int(explanation.classes[m])
        score = own[m] if own_scores or target < 0 else probability[target]
        entry = {"target": target, "label": labels[target] if labels and target >= 0 else None,
                 "score": None if score is None else float(score)}
        if boxes is not None and not np.isnan(boxes[m]).any():
            entry["box"] = [round(float(v), 2) for v in boxes[m]]
        entries.append(entry)
    return entries


def regions(explanation: Explanation, indices: list[int], maps: list[dict]) -> list[dict]:
    """Per map, what its overlay shows besides the heatmap (core.images.annotate's keywords): a detection's box
    (in the image's pixels) and label with its score, a segment's mask outline; empty for a plain class map."""
    masks = explanation.masks
    regions = []
    for m, entry in zip(indices, maps, strict=True):
        region = {}
        if "box" in entry:
            region = {"box": entry["box"], "label": f"{entry['label'] or entry['target']} {entry['score']:.2f}"}
        if masks is not None and masks[m].any():
            region["mask"] = masks[m]
        regions.append(region)
    return regions


def describe(line: dict, outdir: Path) -> str:
    """One line for one image: its top classes, or its detections or segments (label, score and box per map)
    when the maps are of those; and the map(s) written."""
    maps = line.get("maps", [line])
    if line["top5"]:
        ranked = ", ".join(f"{p['label'] or p['class']} {p['score']:.3f}" for p in line["top5"])
    else:
        ranked = ", ".join(_found(m) for m in maps) or "nothing found"
    where = "; ".join(f"map of class {m['target']} -> {outdir / m.get('overlay', m.get('heatmap', TABLE))}"
                      for m in maps)
    return f"{line['path']}: {ranked}; {where}"


def _found(entry: dict) -> str:
    """A detection or segment as told: its label (or class), score and box."""
    score = "" if entry["score"] is None else f" {entry['score']:.3f}"
    box = f" at {entry['box']}" if "box" in entry else ""
    return f"{entry['label'] or entry['target']}{score}{box}"

