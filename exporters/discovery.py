"""What a foreign ONNX classifier is made of: its image input, the tensors that lie on a grid over the image,
its attention, and the default target. Found from the graph's structure and shapes, then confirmed by
running it, so that a target is a spatial map the class score really depends on, or the export stops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from ..core.contract import CLASS_INPUT
from ..core.detections import best_detections, class_and_box_masks, decode
from ..core.errors import ExportError
from ..core.layouts import channels_of, grid_of, guess_layout, parse_tokens, to_grid
from .autodiff import GraphBuilder, Value, append_gradients, needed_nodes
from .precision import float32_twin, has_bfloat16

IMAGE_TYPES = {t: helper.tensor_dtype_to_np_dtype(t) for t in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16, onnx.TensorProto.UINT8)}
PROBE_BATCH = 2
PROJECTIONS = {"MatMul": 1, "Gemm": 1, "MatMulInteger": 1, "QLinearMatMul": 3}  # matrix products: their weight input
QUANTIZERS = ("QuantizeLinear", "DynamicQuantizeLinear", "DequantizeLinear", "Cast")
MAX_PROBED = 48  # candidates whose gradient reach is measured, last first, PROBE_GROUP at a time
PROBE_GROUP = 8


@dataclass
class ImageInput:
    """The graph input that takes the images, in the model's own layout."""

    name: str
    layout: str  # nchw or nhwc
    elem_type: int
    size: tuple[int, int]  # H x W
    channels: int
    batch: int | str  # the batch dimension: static, or the name of the symbolic one

    @property
    def shape(self) -> list[int | None]:
        """Its shape with the batch unknown (None), as tensor shapes are recorded."""
        height, width = self.size
        return [None, self.channels, height, width] if self.layout == "nchw" else [None, height, width, self.channels]

    @property
    def dtype(self) -> str:
        """The numpy type the explainable file takes: the input's own, float32 for bfloat16 (see
        exporters.precision)."""
        return "float32" if self.elem_type == onnx.TensorProto.BFLOAT16 else IMAGE_TYPES[self.elem_type].name


def image_input(model: onnx.ModelProto, name: str | None = None, layout: str | None = None,
                size: tuple[int, int] | None = None) -> ImageInput:
    """The image input, its layout (nhwc when the last dimension is 1 or 3 and the first is not) and its size,
    with dynamic spatial dimensions fixed to `size` in the model itself."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if name is not None:
        chosen = [i for i in inputs if i.name == name]
        if not chosen:
            raise ExportError(f"unknown input '{name}'; the model's inputs are {[i.name for i in inputs]}")
    else:
        chosen = [i for i in inputs if i.type.tensor_type.elem_type in IMAGE_TYPES
                  and len(i.type.tensor_type.shape.dim) == 4]
        if len(chosen) != 1:
            raise ExportError(f"expected one 4-D image input, found {len(chosen)} among {[i.name for i in inputs]}",
                              option="input")
    others = [i.name for i in inputs if i is not chosen[0] and i.name != CLASS_INPUT]  # an explainable file's own
    if others:
        raise ExportError(f"the model has inputs besides the image ({', '.join(others)}) with no default value")
    value = chosen[0]
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type not in IMAGE_TYPES:
        raise ExportError(f"input '{value.name}' holds {helper.tensor_dtype_to_string(tensor_type.elem_type)}, "
                          f"not float or uint8 images")
    dims = tensor_type.shape.dim
    if len(dims) != 4:
        raise ExportError(f"input '{value.name}' must be a 4-D batch of images; it has {len(dims)} dimensions")
    values = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    layout = layout or _input_layout(values, value.name)
    spatial = (1, 2) if layout == "nhwc" else (2, 3)
    channel = 3 if layout == "nhwc" else 1
    if values[channel] is None:
        raise ExportError(f"input '{value.name}' has a dynamic number of channels in the {layout} layout",
                          option="input_layout")
    _fix_size(value.name, [dims[a] for a in spatial], size)
    batch = values[0] or dims[0].dim_param or "batch"
    fixed = (dims[spatial[0]].dim_value, dims[spatial[1]].dim_value)
    return ImageInput(value.name, layout, tensor_type.elem_type, fixed, values[channel], batch)


def _input_layout(values: list[int | None], name: str) -> str:
    """nchw when the second dimension holds 1 or 3 channels, nhwc when the last does; otherwise the layout whose
    spatial dimensions agree (equal, or both dynamic) while the channel dimension is static and differs."""
    _, d1, d2, d3 = values
    if d1 in (1, 3):
        return "nchw"
    if d3 in (1, 3):
        return "nhwc"
    if d1 is not None and d2 == d3 and d1 != d2:
        return "nchw"
    if d3 is not None and d1 == d2 and d3 != d2:
        return "nhwc"
    raise ExportError(f"cannot tell whether input '{name}' of shape {values} is N x C x H x W or N x H x W x C",
                      option="input_layout")


def _fix_size(name: str, dims, size: tuple[int, int] | None) -> None:
    current = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    if size is None:
        if None in current:
            raise ExportError(f"input '{name}' has dynamic spatial dimensions: give the size to explain at",
                              option="input_size")
        return
    if any(c is not None and c != s for c, s in zip(current, size, strict=True)):
        raise ExportError(f"input '{name}' has a fixed size {current[0]}x{current[1]}, not {size[0]}x{size[1]}",
                          option="input_size")
    for dim, value in zip(dims, size, strict=True):
        dim.dim_value = int(value)


@dataclass
class Candidate:
    """A tensor that lies on a grid over the image: a possible target."""

    name: str
    shape: list[int | None]
    layout: str

    @property
    def grid(self) -> tuple[int, int]:
        return grid_of(self.layout, self.shape)


def grid_candidates(model: onnx.ModelProto, score: str, shapes: dict[str, list | None],
                    image: ImageInput) -> list[Candidate]:
    """Float tensors that feed the score, batch first, whose shape lies on a grid over the image (see
    core.layouts.fits_image), in the order the graph computes them. Attention matrices are left out."""
    _, feeds = needed_nodes(model.graph.node, [score])
    attention_sizes = attention_token_counts(model, shapes)
    found = []
    for name, shape in shapes.items():
        if name not in feeds or not shape or len(shape) not in (3, 4) or None in shape[1:]:
            continue
        if shape[0] not in (None, image.batch) or shape[-1] == 1:
            continue
        if is_attention_matrix(shape, attention_sizes):
            continue
        if len(shape) == 3 and attention_sizes and shape[1] not in attention_sizes:
            continue  # in a transformer, token sequences are those its attention reads (not B x C x T transposes)
        layout = guess_layout(shape, image.size)
        if layout is not None:
            found.append(Candidate(name, shape, layout))
    return found


def attention_token_counts(model: onnx.ModelProto, shapes: dict[str, list | None]) -> set[int]:
    """The numbers of tokens attention runs over: the last axis of each 4-D Softmax."""
    return {s[-1] for s in (shapes.get(a) for a in _softmax_outputs(model)) if s and len(s) == 4}


def is_attention_matrix(shape, token_counts: set[int]) -> bool:
    """Whether a 4-D shape is attention over one of the token counts rather than a map: B x heads x T x T (the
    probabilities), or B x heads x T x d (queries, keys, values, and their product, with fewer heads than
    the head size)."""
    if len(shape) != 4 or shape[2] not in token_counts:
        return False
    return shape[3] == shape[2] or shape[1] < shape[3]


def _softmax_outputs(model: onnx.ModelProto) -> list[str]:
    """Softmax outputs; a quantized one (QLinearSoftmax) by the float twin of its codes where it has one."""
    produced = {o for node in model.graph.node for o in node.output}
    found = []
    for node in model.graph.node:
        if node.op_type == "Softmax":
            found.append(node.output[0])
        elif node.op_type == "QLinearSoftmax":
            twin = f"{node.output[0]}/dequantized"
            found.append(twin if twin in produced else node.output[0])
    return found


def attention_probabilities(model: onnx.ModelProto, shapes: dict[str, list | None], image: ImageInput,
                            layouts=()) -> tuple[list[str], str | None]:
    """Per-image attention probabilities for rollout, and their token layout: Softmax outputs B x heads x T x T
    over the same tokens as a target laid out as tokens:P:HxW with P >= 1 (rollout reads the CLS row), so
    that the attention found is the attention between the target's tokens. Windowed attention (whose first
    dimension counts windows), attention over channels (T is then no target's token count) and attention
    in models whose targets are maps are left out."""
    tokens = {_token_count(t): t for t in layouts if t.startswith("tokens:") and parse_tokens(t)[0] >= 1}
    found = []
    for name in _softmax_outputs(model):
        shape = shapes.get(name)
        if not shape or len(shape) != 4 or None in shape[1:] or shape[2] != shape[3] or shape[3] not in tokens:
            continue
        if shape[0] in (None, image.batch):
            found.append((name, tokens[shape[3]]))
    if not found:
        return [], None
    return [name for name, _ in found], found[0][1]


def _token_count(layout: str) -> int:
    prefix, height, width = parse_tokens(layout)
    return prefix + height * width


def attention_reads(model: onnx.ModelProto, shapes: dict[str, list | None], image: ImageInput) -> str | None:
    """The token sequence that the last attention over the image's grid projects into keys: in a pre-norm
    transformer block the normalised tokens, however the exporter wrote the normalisation (one
    LayerNormalization node, or ReduceMean, Sub, Pow, Sqrt, Div) and the attention (fused or not, quantized).

    The last Softmax whose last axis counts P + H*W tokens of a grid over the image is followed upstream,
    through the scores' MatMul and the reshapes of the keys, to the first projection (a matrix product with a
    constant weight) whose other input is, past any quantization, a B x T x C sequence of those T tokens."""
    producers = {o: node for node in model.graph.node for o in node.output}
    constants = constant_tensors(model)
    for softmax in reversed(_softmax_outputs(model)):
        shape = shapes.get(softmax)
        if not shape or shape[-1] is None or guess_layout((None, shape[-1], None), image.size) is None:
            continue
        queue, seen = [producers[softmax].input[0]] if softmax in producers else [], set()
        while queue:
            node = producers.get(queue.pop(0))
            if node is None or node.output[0] in seen:
                continue
            seen.add(node.output[0])
            weight = PROJECTIONS.get(node.op_type)
            if weight is not None and len(node.input) > weight and node.input[weight] in constants:
                source = _unquantized(node.input[0], producers)
                found = shapes.get(source)
                if found and len(found) == 3 and found[1] == shape[-1] and guess_layout(found, image.size):
                    return source
                continue
            queue += [i for i in node.input if i and i not in constants]
    return None


def _unquantized(name: str, producers: dict[str, onnx.NodeProto]) -> str:
    """The float tensor a quantized operand was made from (the tensor itself when it was not quantized)."""
    while name in producers and producers[name].op_type in QUANTIZERS:
        name = producers[name].input[0]
    return name


def constant_tensors(model: onnx.ModelProto) -> set[str]:
    """Initializers and the tensors computed from them alone (dequantized weights, transposed weights)."""
    known = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if all(not name or name in known for name in node.input):
            known.update(node.output)
    return known


def reached_cells(model: onnx.ModelProto, score: str, candidates: list[Candidate], image: ImageInput) -> dict[str, int]:
    """For each candidate, on how many grid cells the gradient of the top class's score is non-zero, measured
    on a random batch: a map over a tensor that the score reads at one cell only (a CLS token, a pooled
    vector) says nothing about the image. Raises ExportError where a candidate's gradient cannot be built."""
    return _measured_reach(*_probe_model(model, score, candidates, image), candidates, image)


def _measured_reach(probe: onnx.ModelProto, outputs: list[str], candidates: list[Candidate],
                    image: ImageInput) -> dict[str, int]:
    feed = random_images(image)
    batch = len(next(iter(feed.values())))
    values = run_model(probe, outputs, feed)
    return {c.name: _cells(v, c.layout) if v.shape[0] == batch else 0 for c, v in zip(candidates, values, strict=True)}


def _probe_model(model: onnx.ModelProto, score: str, candidates: list[Candidate],
                 image: ImageInput) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of the model that also outputs the gradient of the top class's score with respect to each candidate:
    of the top-1 score, or where the output is a map of class scores over the image, of the top class's segment
    (the sum of its channel over the pixels that predict it: onnxcam.targets.Segmentation's default)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    builder = GraphBuilder(probe, prefix="onnxcam_probe")
    flat = builder.op("Flatten", score, axis=1)
    top = builder.op("ArgMax", flat, axis=1, keepdims=0)
    shape = builder.shape(score)
    layout = guess_layout(shape, image.size) if len(shape) == 4 and None not in shape[1:] else None
    seed = segment_seed(builder, score, top, layout) if layout in ("nchw", "nhwc") else \
        one_hot_seed(builder, score, top)
    names = [c.name for c in candidates]
    gradients = append_gradients(probe, names, score, seed, builder)
    outputs = [f"onnxcam_probe_gradient_{i}" for i in range(len(names))]
    builder.nodes += [helper.make_node("Identity", [g.name], [o]) for g, o in zip(gradients, outputs, strict=True)]
    probe.graph.node.extend(builder.nodes)
    probe.graph.initializer.extend(builder.initializers)
    probe.graph.output.extend(helper.make_tensor_value_info(o, builder.elem_type(c.name), None)
                              for o, c in zip(outputs, candidates, strict=True))
    return probe, outputs


def _cells(gradient: np.ndarray, layout: str) -> int:
    """On how many grid cells a gradient is non-zero, the fewest over the images of a batch."""
    return int((np.abs(to_grid(gradient.astype(np.float32), layout)) > 0).any(axis=1).sum(axis=(1, 2)).min())


def one_hot_seed(builder: GraphBuilder, score: str, classes: Value) -> Value:
    """A seed shaped like the score output, one at each image's class: the VJP seed that picks that score."""
    flat = builder.op("Flatten", score, axis=1)
    count = builder.op("Slice", builder.op("Shape", flat), builder.ints([1]), builder.ints([2]))
    one_hot = builder.op("OneHot", classes, count, builder.const(np.array([0.0, 1.0])), axis=-1)
    if builder.elem_type(score) != onnx.TensorProto.FLOAT:  # ONNX Runtime's OneHot writes float32, not others
        one_hot = builder.op("Cast", one_hot, to=builder.elem_type(score))
    return builder.op("Reshape", one_hot, builder.op("Shape", score))


def segment_seed(builder: GraphBuilder, score: str, top: Value, layout: str) -> Value:
    """A seed shaped like a map of class scores (N x K x h x w, or N x h x w x K), one on the channel of the class
    of each image's top-1 pixel (`top`, an index into the flattened map) where that class wins the pixel."""
    shape = builder.shape(score)
    axis, classes = (1, shape[1]) if layout == "nchw" else (3, shape[3])
    pixels = int(np.prod(shape[1:])) // classes
    cls = builder.op("Div", top, builder.ints(pixels)) if layout == "nchw" else \
        builder.op("Mod", top, builder.ints(classes))
    keep = [1, 1, 1, 1]
    keep[axis] = classes
    one_hot = builder.op("OneHot", cls, builder.ints([classes]), builder.const(np.array([0.0, 1.0])), axis=-1)
    channel = builder.op("Reshape", one_hot, builder.ints([-1, *keep[1:]]))
    winner = builder.op("ArgMax", score, axis=axis, keepdims=1)
    mask = builder.op("Cast", builder.op("Equal", winner, builder.op("Reshape", cls, builder.ints([-1, 1, 1, 1]))),
                      to=onnx.TensorProto.FLOAT)
    seed = channel * mask
    if builder.elem_type(score) != onnx.TensorProto.FLOAT:
        seed = builder.op("Cast", seed, to=builder.elem_type(score))
    return seed


def random_images(image: ImageInput, batch: int | None = None) -> dict[str, np.ndarray]:
    """A feed of random images for the image input, in its layout and type."""
    batch = batch or (image.batch if isinstance(image.batch, int) else PROBE_BATCH)
    height, width = image.size
    shape = (batch, image.channels, height, width) if image.layout == "nchw" else (batch, height, width, image.channels)
    rng = np.random.default_rng(0)
    if image.elem_type == onnx.TensorProto.UINT8:
        return {image.name: rng.integers(0, 256, shape, dtype=np.uint8)}
    return {image.name: rng.standard_normal(shape).astype(IMAGE_TYPES[image.elem_type])}


def run_model(model: onnx.ModelProto, outputs: list[str], feeds: dict) -> list[np.ndarray]:
    """Run a model in memory on ONNX Runtime's CPU provider, for the export's checks; a bfloat16 model as its
    float32 twin (that provider has no bfloat16 arithmetic), with bfloat16 feeds widened."""
    return model_runner(model)(outputs, feeds)


def model_runner(model: onnx.ModelProto):
    """run_model's session, opened once: a function of (outputs, feeds)."""
    twin = has_bfloat16(model)
    if twin:
        model = float32_twin(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT reports invalid or unsupported graphs with many exception types
        raise _not_run(error) from None

    def run(outputs: list[str], feeds: dict) -> list[np.ndarray]:
        if twin:
            feeds = {name: value.astype(np.float32) if value.dtype == IMAGE_TYPES[onnx.TensorProto.BFLOAT16]
                     else value for name, value in feeds.items()}
        try:
            return session.run(outputs, feeds)
        except Exception as error:  # as above
            raise _not_run(error) from None

    return run


def _not_run(error: Exception) -> ExportError:
    return ExportError(f"ONNX Runtime cannot run the model to check its targets: {str(error).splitlines()[0]}")


def describe(candidates: list[Candidate], limit: int = 5) -> str:
    return ", ".join(f"{c.name} {' x '.join(str(d or 'N') for d in c.shape)}" for c in candidates[-limit:][::-1])


def default_target(model: onnx.ModelProto, score: str, shapes: dict[str, list | None], image: ImageInput) -> Candidate:
    """The target a user would pick: in a transformer with attention over the image's grid, the normalised
    tokens its last attention reads; otherwise the last grid tensor before the score that the score depends
    on at more than one cell (for a CNN, the last map before global pooling). Candidates are measured a few
    at a time, last first; one whose gradient cannot be built (an operator with no rule on its way to the
    score) is passed over. Refused, with the candidates named, when none qualifies."""
    candidates = grid_candidates(model, score, shapes, image)
    if not candidates:
        raise ExportError("no tensor that feeds the output lies on a grid over the image: name a target layer",
                          option="layers")
    features = _features_before_class_maps(candidates, shapes.get(score), image)
    dense = len(features) < len(candidates)  # a segmenter: its last feature map, also in a transformer (SegFormer)
    candidates = features or candidates
    tokens = None if dense else attention_reads(model, shapes, image)
    ordered = ([c for c in candidates if c.name == tokens] + candidates[::-1])[:MAX_PROBED]
    passed_over, unbuilt, most = [], [], -1  # most cells any candidate reached; -1: no gradient could be built
    for start in range(0, len(ordered), PROBE_GROUP):
        group = ordered[start:start + PROBE_GROUP]
        reached = _reached_or_none(model, score, group, image, unbuilt)
        if reached is None:  # some candidate's gradient cannot be built: measure them one by one
            reached = {}
            for candidate in group:
                reached.update(_reached_or_none(model, score, [candidate], image, unbuilt) or {candidate.name: -1})
        for candidate in group:
            if reached[candidate.name] > 1:
                return candidate
            passed_over.append(candidate)
            most = max(most, reached[candidate.name])
    if most < 0:
        raise ExportError(f"no grid tensor's gradient could be built: {unbuilt[-1]}")
    if most == 0:
        raise ExportError(f"the class score does not depend on the image: its gradient is zero on every grid tensor "
                          f"checked ({describe(passed_over)}); are the classifier's weights all zero?")
    raise ExportError(f"the class score depends at more than one cell on none of the grid tensors checked "
                      f"({describe(passed_over)}): name a target layer", option="layers")


def _features_before_class_maps(candidates: list[Candidate], score_shape, image: ImageInput) -> list[Candidate]:
    """Where the output is itself a map of K class scores over the image (a segmenter's), the candidates that are
    not maps of K channels: those are the class scores at a lower resolution (the classifier's 1x1 convolution
    before the upsampling), whose Grad-CAM shows the output again. The default is then the last feature map
    before them, as a user picks for segmentation (pytorch-grad-cam's tutorial takes DeepLabV3's backbone)."""
    layout = guess_layout(score_shape, image.size) if score_shape and len(score_shape) == 4 \
        and None not in score_shape[1:] else None
    if layout is None:
        return candidates
    classes = channels_of(layout, score_shape)
    return [c for c in candidates if channels_of(c.layout, c.shape) != classes]


def _reached_or_none(model, score, candidates: list[Candidate], image: ImageInput,
                     unbuilt: list[str]) -> dict[str, int] | None:
    """reached_cells, or None where a candidate's gradient cannot be built (why is added to `unbuilt`); a model
    that does not run says so."""
    try:
        probe, outputs = _probe_model(model, score, candidates, image)
    except ExportError as error:
        unbuilt.append(str(error))
        return None
    return _measured_reach(probe, outputs, candidates, image)


# a detector's default ------------------------------------------------------------------------------------------

MAX_DETECTION_PROBED = 96  # a detector's candidates nearest its output whose reach is measured
PROBE_DETECTIONS = 5  # detections per random image that confirm a detector's default where its scales are not known
MAX_ANCHORS_PER_CELL = 9
SEED_INPUT = "onnxcam_probe_seed"


def detection_default(model: onnx.ModelProto, score: str, shapes: dict[str, list | None], image: ImageInput,
                      layout: str) -> list[Candidate]:
    """The target layers of a detector whose `score` output is its raw head (core.detections layouts): maps that
    every detection's score reaches at more than one grid cell, one per scale, merged by the explanation.

    The candidates are the grid tensors nearest the output (MAX_DETECTION_PROBED), measured on random images by
    the gradients of seeds on the output. Those that the class rows reach and the box rows do not are the class
    branch (YOLOv8/v11's cv3 at each scale), and the default is taken among them; a head that computes boxes and
    classes together (YOLOv5's one convolution per scale) leaves all the candidates the class rows reach. Then
    the detections of the random images, as the Detection target finds them (NMS with no threshold: the best in
    each scale's anchors where the output's anchor count tells the scales, else the best few), are seeded one at
    a time: a detection belongs to the scale of the last candidate its score reaches, and each scale's target
    is the last candidate on its grid that each of its detections reaches at more than one cell (the features a
    1x1 prediction reads are reached at one cell, and say what the detection sees only through their channels).
    Refused, with the candidates named, where a scale's detections confirm none, or the detections probed do not
    land on every scale."""
    candidates = [c for c in grid_candidates(model, score, shapes, image)
                  if layout == "nms" or c.layout in ("nchw", "nhwc")][-MAX_DETECTION_PROBED:]
    if not candidates:
        raise ExportError("no tensor that feeds the output lies on a grid over the image: name target layers",
                          option="layers")
    probe, outputs = _seeded_probe(model, score, candidates)
    run = model_runner(probe)
    per_image = tuple(shapes[score][1:])
    class_rows, box_rows = (mask.astype(np.float32) for mask in class_and_box_masks(layout, per_image))
    images = random_images(image)[image.name]
    count = len(images)
    out, reach = _run_seeded(run, probe, score, outputs, candidates, image, images,
                             [(i, class_rows) for i in range(count)] + [(i, box_rows) for i in range(count)])
    by_class, by_box = reach[:count].min(axis=0), reach[count:].max(axis=0)
    branch = [c for c, a, b in zip(candidates, by_class, by_box, strict=True) if a > 0 and b == 0]
    pool = branch or [c for c, a in zip(candidates, by_class, strict=True) if a > 0]
    if not pool:
        raise ExportError(f"the detections' class scores do not depend on the image: their gradient is zero on every "
                          f"grid tensor checked ({describe(candidates)})")
    scales = _scales(model, pool)
    blocks = _scale_blocks(scales, _anchor_count(layout, per_image))
    detections = [(i, row) for i in range(count)
                  for row in best_detections(layout, out[i], PROBE_DETECTIONS, within=blocks or None)]
    seeds = [(i, decode(layout, out[i])[3](row)) for i, row in detections]
    indices = [candidates.index(c) for c in pool]
    _, reach = _run_seeded(run, probe, score, outputs, candidates, image, images, seeds)
    return _confirmed(pool, reach[:, indices], scales)


def _confirmed(pool: list[Candidate], reach: np.ndarray, scales: list[tuple[int, int]]) -> list[Candidate]:
    """Per scale, the last candidate of `pool` on its grid that each detection of that scale (the grid of the last
    candidate it reaches) reaches at more than one cell; `reach` is detections x pool cells. `scales`: the grids
    the detections must cover."""
    homes = []
    for cells in reach:
        reached = np.flatnonzero(cells > 0)
        if not reached.size:
            raise ExportError(f"a detection's score reaches none of the candidate layers ({describe(pool)}): name "
                              f"target layers", option="layers")
        homes.append(pool[reached[-1]].grid)
    found = list(dict.fromkeys(homes))
    if set(found) != set(scales):
        missing = [c for c in pool if c.grid in set(scales) - set(found)]
        raise ExportError(f"the detections of random images land on the scales {_grids(found)}, not on "
                          f"{_grids(scales)}: the default cannot be confirmed for {describe(missing)}; name target "
                          f"layers", option="layers")
    chosen, unconfirmed = [], []
    for grid in found:
        mine = reach[[i for i, home in enumerate(homes) if home == grid]]
        on_grid = [i for i, c in enumerate(pool) if c.grid == grid]
        confirmed = [i for i in on_grid if (mine[:, i] > 1).all()]
        if confirmed:
            chosen.append(confirmed[-1])
        else:
            unconfirmed.append(grid)
    if unconfirmed:
        checked = [c for c in pool if c.grid in unconfirmed]
        raise ExportError(f"the detections of random images reach no map at more than one cell on the "
                          f"{_grids(unconfirmed)} grid{'s' if len(unconfirmed) > 1 else ''} (checked "
                          f"{describe(checked, limit=8)}): name target layers", option="layers")
    return [pool[i] for i in sorted(chosen)]


def _grids(grids) -> str:
    return ", ".join(f"{h}x{w}" for h, w in grids)


def _anchor_count(layout: str, per_image: tuple[int, ...]) -> int | None:
    return {"yolov8": per_image[-1], "yolov5": per_image[0]}.get(layout)


def _scales(model: onnx.ModelProto, pool: list[Candidate]) -> list[tuple[int, int]]:
    """The grids of the head's scales, finest first: those of the candidates that no other candidate of the pool is
    computed from (each scale's prediction: YOLOv8's class map, YOLOv5's boxes and classes)."""
    names = {c.name for c in pool}
    before: dict[str, set[str]] = {}  # per tensor, the candidates it is computed from
    for node in model.graph.node:
        sources = set().union(*(before.get(name, set()) | ({name} & names) for name in node.input))
        for name in node.output:
            before[name] = sources
    inner = set().union(*(before.get(c.name, set()) for c in pool))
    return sorted({c.grid for c in pool if c.name not in inner}, key=lambda g: -g[0] * g[1])


def _scale_blocks(scales: list[tuple[int, int]], anchors: int | None) -> list[range]:
    """The anchors of each scale, finest first as YOLO heads concatenate them, where the scales' cells times a
    number of anchors per cell make the output's anchor count; none otherwise."""
    cells = [h * w for h, w in scales]
    per = anchors // sum(cells) if anchors else 0
    if not 1 <= per <= MAX_ANCHORS_PER_CELL or per * sum(cells) != anchors:
        return []
    ends = np.cumsum([0, *cells]) * per
    return [range(int(start), int(end)) for start, end in zip(ends[:-1], ends[1:], strict=True)]


def _seeded_probe(model: onnx.ModelProto, score: str, candidates: list[Candidate]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of the model with an input for a seed shaped like the score output, that also outputs, per candidate,
    the gradient of the seeded score summed in absolute value over its channels (non-zero on the cells reached)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    elem_type = next(o.type.tensor_type.elem_type for o in model.graph.output if o.name == score)
    probe.graph.input.append(helper.make_tensor_value_info(SEED_INPUT, elem_type, None))
    builder = GraphBuilder(probe, prefix="onnxcam_probe")
    gradients = append_gradients(probe, [c.name for c in candidates], score, builder.value(SEED_INPUT), builder)
    outputs = [f"onnxcam_probe_reach_{i}" for i in range(len(candidates))]
    for gradient, output, candidate in zip(gradients, outputs, candidates, strict=True):
        axis = 1 if candidate.layout == "nchw" else len(candidate.shape) - 1
        total = builder.op("ReduceSum", builder.op("Abs", gradient), builder.ints([axis]), keepdims=1)
        builder.nodes.append(helper.make_node("Identity", [total.name], [output]))
    probe.graph.node.extend(builder.nodes)
    probe.graph.initializer.extend(builder.initializers)
    probe.graph.output.extend(helper.make_tensor_value_info(o, elem_type, None) for o in outputs)
    return probe, outputs


def _run_seeded(run, probe: onnx.ModelProto, score: str, outputs: list[str], candidates: list[Candidate],
                image: ImageInput, images: np.ndarray, pairs: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray,
                                                                                                     np.ndarray]:
    """The score output and the cells of each candidate reached (pairs x candidates) for each (image, seed) pair,
    run as many at a time as the model's batch takes."""
    chunk = image.batch if isinstance(image.batch, int) else len(pairs)
    seed_type = helper.tensor_dtype_to_np_dtype(
        next(i.type.tensor_type.elem_type for i in probe.graph.input if i.name == SEED_INPUT))
    scores, reach = [], []
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        padded = part + [(part[-1][0], np.zeros_like(part[-1][1]))] * (chunk - len(part))
        feed = {image.name: images[[i for i, _ in padded]],
                SEED_INPUT: np.stack([seed for _, seed in padded]).astype(seed_type)}
        values = run([score, *outputs], feed)
        scores.append(values[0][:len(part)])
        reach.append(np.stack([_cells_each(v[:len(part)], c.layout) for v, c in zip(values[1:], candidates,
                                                                                     strict=True)], axis=1))
    return np.concatenate(scores), np.concatenate(reach)


def _cells_each(total: np.ndarray, layout: str) -> np.ndarray:
    """Per image, on how many grid cells a gradient summed over its channels is non-zero."""
    return (to_grid(total.astype(np.float32), layout) > 0).sum(axis=(1, 2, 3))
