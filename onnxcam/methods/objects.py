"""Maps of target objects (onnxcam.targets: several classes, a segment, a detection, a similarity, a contrast):
targets set after seeing the outputs. The backbone runs once, fetching the outputs explained and those the targets
read besides (Target.reads: a DETR's boxes); the head runs once for all the maps, on the target
activations repeated per map with each map's seed (runtimes.head), and each map comes from the method's formula."""

from __future__ import annotations

import numpy as np

from ..core.errors import ExplainError
from ..core.layouts import to_grid
from ..core.maps import heatmaps
from ..explanation import Explanation
from ..targets import Target
from .registry import Call, Method


def explain_objects(call: Call, targets: list[Target]) -> Explanation:
    """One map per pick of each image's target (boxes in the model input's pixels); `call.classes` are all -1,
    since the classes are picked from the outputs."""
    model, method = call.model, call.method
    spec = model.spec
    shapes = {o.name: tuple(d if isinstance(d, int) else None for d in o.shape[1:])
              for o in model.session.get_outputs() if not o.name.startswith("onnxcam_")}
    for target in targets:
        _check_output(target.output or spec.scores, shapes)
    reads = [target.reads(target.output or spec.scores, shapes) for target in targets]
    for name in (name for names in reads for name in names):
        _check_output(name, shapes)
    outputs = [spec.scores, *(t.output or spec.scores for t in targets), *(name for names in reads for name in names)]
    count = len(targets)
    layers = [*spec.activations, *spec.cuts] if method.formula is not None else []  # rollout reads neither
    names = tuple(dict.fromkeys([*outputs, *layers]))  # one forward-only run: the maps' gradients come from the head
    values = dict(zip(names, model.forward_runner(names).run(list(names), {spec.input: call.batch}), strict=True))
    activations, cuts = ([values[name] for name in group] for group in (spec.activations, spec.cuts)) \
        if layers else ([], [])
    picks = [(image, pick) for image, (target, names) in enumerate(zip(targets, reads, strict=True))
             for pick in target.picks(values[target.output or spec.scores][image],
                                      {name: values[name][image] for name in names}, spec.input_size)]
    image_index = np.array([image for image, _ in picks], dtype=np.int64)
    heat = np.zeros((0, *spec.input_size), dtype=np.float32)
    if picks and method.formula is None:  # attention rollout: class-agnostic, one map per image
        heat = method.run(call).heatmaps[image_index]
    elif picks:
        heat = heatmaps(_pick_maps(model, method, targets, picks, activations, cuts), spec.input_size)
    boxes = None
    if any(pick.box is not None for _, pick in picks):
        boxes = np.stack([np.full(4, np.nan, np.float32) if pick.box is None else pick.box.astype(np.float32)
                          for _, pick in picks])
    return Explanation(heat, values[spec.scores].reshape(count, -1),
                       np.array([p.target for _, p in picks], dtype=np.int64), method.name, image_index,
                       np.array([p.score for _, p in picks], dtype=np.float32), boxes, masks=_masks(picks))


def _check_output(name: str, shapes: dict) -> None:
    if name not in shapes:
        raise ExplainError(f"the model has no output '{name}'; its outputs: {', '.join(shapes)}")


def _pick_maps(model, method: Method, targets: list, picks: list, activations: list, cuts: list) -> list:
    """One map per pick and target layer; the gradients come from one head run per output explained."""
    spec = model.spec
    image_index = np.array([image for image, _ in picks], dtype=np.int64)
    gradients = [None] * len(activations)
    if method.gradients:
        gradients = [np.empty((len(picks), *a.shape[1:]), dtype=a.dtype) for a in activations]
        outputs = [targets[image].output or spec.scores for image, _ in picks]
        for output in dict.fromkeys(outputs):
            rows = np.array([i for i, name in enumerate(outputs) if name == output], dtype=np.int64)
            seeds = np.stack([picks[i][1].seed for i in rows]) if len(rows) > 1 else picks[rows[0]][1].seed[None]
            parts = model.head.gradients(output, activations, cuts, image_index[rows], seeds)
            for gradient, part in zip(gradients, parts, strict=True):
                gradient[rows] = part
    return [method.formula(to_grid(a[image_index], layout), None if g is None else to_grid(g, layout))
            for a, g, layout in zip(activations, gradients, spec.layouts, strict=True)]


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
