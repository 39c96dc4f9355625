"""export_torch on a zoo of architecture families, checked against PyTorch autograd.

Each model of tests/zoo.py is exported once (traced at batch 2) and run by ONNX Runtime at batch 3,
so the dynamic batch is exercised too. The reference is plain PyTorch: forward hooks capture the
target modules' outputs and torch.autograd.grad differentiates the selected class's score, summed
over the batch, with respect to them. Run with `pytest -s` to see the largest relative gradient
error of each model (max |onnx - torch| / max |torch| over all its targets).

Inputs away from kinks. ReLU, ReLU6, LeakyReLU, Hardswish, Hardsigmoid and max pooling have
derivatives that jump; the float32 forward passes of ONNX Runtime and PyTorch differ by about 1e-6
of the tensors' scale, so an input to such an operator that lies that close to a kink (or a max-pool
window whose two largest cells are that close, or two top logits) can fall on different sides in the
two runs, and the gradients then legitimately differ by a whole term (seen: resnext_dilated, one
ReLU input at 1.2e-6 in layer4, 1.5% gradient error in layer3). So the images are drawn at random
and kept only if every such operator downstream of the first target keeps a margin of KINK_MARGIN
(relative to the tensor's largest magnitude) from its kinks; the tolerances stay as they are.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from support.zoo import ZOO
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from onnxcam.exporters import export_torch

BATCH = 3
RTOL = 1e-4
ATOL_SCALE = 1e-4  # absolute tolerance, relative to the largest magnitude of the reference tensor
KINK_MARGIN = 1e-5  # an image is used only if no kink lies closer than this (relative) to its inputs
CANDIDATES = 64  # random images tried, in order, to find BATCH that keep the margin

MAX_RELATIVE_GRADIENT_ERROR: dict[str, float] = {}

aten = torch.ops.aten
_AT_ZERO = {aten.relu.default, aten.relu_.default, aten.leaky_relu.default, aten.leaky_relu_.default}
_AT_THREE = {aten.hardswish.default, aten.hardswish_.default, aten.hardsigmoid.default, aten.hardsigmoid_.default}
_BOUNDED = {aten.hardtanh.default, aten.hardtanh_.default, aten.clamp.default, aten.clamp_.default}
_MAX_POOLS = {aten.max_pool2d_with_indices.default, aten.max_pool2d.default}


def _kinks(func, args, kwargs) -> list[float] | None:
    """The inputs at which `func`'s derivative jumps, or None for an operator without kinks."""
    if func in _AT_ZERO:
        return [0.0]
    if func in _AT_THREE:
        return [-3.0, 3.0]
    if func in _BOUNDED:
        names = ("min_val", "max_val") if "hardtanh" in str(func) else ("min", "max")
        defaults = (-1.0, 1.0) if "hardtanh" in str(func) else (None, None)
        bounds = [args[i + 1] if len(args) > i + 1 else kwargs.get(name, default)
                  for i, (name, default) in enumerate(zip(names, defaults))]
        return [float(b) for b in bounds if b is not None]
    return None


def _pair(value, default):
    value = default if value is None or (isinstance(value, (list, tuple)) and not value) else value
    value = [value] if isinstance(value, int) else list(value)
    return value * 2 if len(value) == 1 else value


def _pool_gaps(args, kwargs, values):
    """Per window of a 2-D max pool: its largest cell minus its second largest (exact ties excepted:
    copies of one value, such as ReLU zeros or a max pooled twice, break ties the same way everywhere)."""
    params = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), args[1:]), **kwargs)
    x = args[0]
    (kh, kw) = _pair(params["kernel_size"], None)
    (sh, sw) = _pair(params.get("stride"), (kh, kw))
    (ph, pw) = _pair(params.get("padding"), 0)
    (dh, dw) = _pair(params.get("dilation"), 1)
    n, c, h, w = x.shape
    oh, ow = values.shape[-2:]
    bottom = max((oh - 1) * sh + (kh - 1) * dh + 1 - h - ph, 0)  # ceil_mode windows overhang the input
    right = max((ow - 1) * sw + (kw - 1) * dw + 1 - w - pw, 0)
    padded = F.pad(x, (pw, right, ph, bottom), value=-float("inf"))
    windows = F.unfold(padded, (kh, kw), dilation=(dh, dw), stride=(sh, sw)).reshape(n, c, kh * kw, -1)
    assert windows.shape[-1] == oh * ow, "max pool windows miscounted"
    top = windows.topk(2, dim=2).values
    gaps = top[:, :, 0] - top[:, :, 1]
    return torch.where(gaps == 0, torch.full_like(gaps, float("inf")), gaps)


class _KinkMargins(TorchDispatchMode):
    """Per image, the smallest relative distance to a kink over the operators run once `active` is set."""

    def __init__(self, batch: int):
        super().__init__()
        self.active = False
        self.margin = torch.full((batch,), float("inf"))

    def _update(self, distances, scale):
        per_image = (distances / max(scale, 1e-30)).reshape(len(self.margin), -1).amin(1)
        self.margin = torch.minimum(self.margin, per_image)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kinks = _kinks(func, args, kwargs) if self.active else None
        if kinks:  # measured before the call: relu_ and friends overwrite their input
            x = args[0]
            distances = torch.stack([(x - k).abs() for k in kinks]).amin(0)
            distances = torch.where(distances == 0, torch.full_like(distances, float("inf")), distances)
            self._update(distances, max([float(x.abs().max())] + [abs(k) for k in kinks]))
        out = func(*args, **kwargs)
        if self.active and func in _MAX_POOLS:
            values = out[0] if isinstance(out, tuple) else out
            self._update(_pool_gaps(args, kwargs, values), float(args[0].abs().max()))
        return out


def images_away_from_kinks(model, entry) -> tuple[np.ndarray, list[int]]:
    """BATCH random images whose gradients are not decided by float rounding (see the module docstring),
    and the indices of the candidates that were used."""
    candidates = np.random.default_rng(0).standard_normal((CANDIDATES, *entry.input_shape)).astype(np.float32)
    margins = _KinkMargins(CANDIDATES)
    handles = [model.get_submodule(name).register_forward_hook(lambda *_: setattr(margins, "active", True))
               for name in entry.targets]
    try:
        with torch.no_grad(), margins:
            logits = model(torch.from_numpy(candidates)).reshape(CANDIDATES, -1)
    finally:
        for handle in handles:
            handle.remove()
    margin = margins.margin
    if logits.shape[1] > 1:  # the top-1 class must not be a near tie either
        top = logits.topk(2, dim=1).values
        margin = torch.minimum(margin, (top[:, 0] - top[:, 1]) / logits.abs().max())
    kept = [int(i) for i in np.flatnonzero(margin.numpy() >= KINK_MARGIN)[:BATCH]]
    assert len(kept) == BATCH, (f"only {len(kept)} of {CANDIDATES} random images keep a margin of {KINK_MARGIN} "
                                f"from every kink; smallest margins: {np.sort(margin.numpy())[:BATCH]}")
    return candidates[kept], kept


class Case:
    """One exported model, run by ONNX Runtime and by PyTorch on the same inputs."""

    def __init__(self, entry, directory):
        self.entry = entry
        model = entry.build()
        path = directory / f"{entry.name}.onnx"
        export_torch(model, path, input_shape=entry.input_shape, layers=entry.targets)

        self.x, self.images = images_away_from_kinks(model, entry)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        num_classes = int(np.prod(session.get_outputs()[0].shape[1:]))
        self.classes = np.array([-1, 0, num_classes - 1] if num_classes > 1 else [-1, 0, -1], dtype=np.int64)
        names = [o.name for o in session.get_outputs()]
        self.onnx = dict(zip(names, session.run(None, {"input": self.x, "onnxcam_class": self.classes})))

        captured, squashed = {}, {}
        handles = [model.get_submodule(name).register_forward_hook(
            lambda module, args, output, i=i: captured.__setitem__(i, output)) for i, name in enumerate(entry.targets)]
        handles += [module.register_forward_hook(lambda module, args, output: squashed.__setitem__(id(output), args[0]))
                    for module in model.modules() if isinstance(module, (nn.Softmax, nn.LogSoftmax, nn.Sigmoid))]
        try:
            logits = model(torch.from_numpy(self.x))
        finally:
            for handle in handles:
                handle.remove()
        # a model ending in a softmax or sigmoid is explained before it: the score is the logit (issue 19)
        flat = squashed.get(id(logits), logits).reshape(BATCH, -1)
        self.top1 = flat.argmax(1).numpy()
        classes = torch.from_numpy(self.classes)
        selected = torch.where(classes < 0, flat.argmax(1), classes)
        score = flat.gather(1, selected[:, None]).sum()
        activations = [captured[i] for i in range(len(entry.targets))]
        gradients = torch.autograd.grad(score, activations)
        self.torch = {"logits": logits.detach().numpy(), "onnxcam_selected": selected.numpy()}
        for i, (activation, gradient) in enumerate(zip(activations, gradients)):
            self.torch[f"onnxcam_activation_{i}"] = activation.detach().numpy()
            self.torch[f"onnxcam_gradient_{i}"] = gradient.numpy()


def assert_close(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    atol = ATOL_SCALE * float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=atol, err_msg=what)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Exports each zoo model at most once per module run; an export error is kept and raised again."""
    directory = tmp_path_factory.mktemp("zoo")
    done: dict[str, Case | Exception] = {}

    def get(entry) -> Case:
        if entry.name not in done:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny models: more threads only add overhead (and spin on a busy machine)
            try:
                done[entry.name] = Case(entry, directory)
            except Exception as error:  # noqa: BLE001 - re-raised in every test of this model
                done[entry.name] = error
            finally:
                torch.set_num_threads(threads)
        result = done[entry.name]
        if isinstance(result, Exception):
            raise result
        return result

    yield get
    if MAX_RELATIVE_GRADIENT_ERROR:
        print("\nlargest relative gradient error (max |onnx - torch| / max |torch|):")
        for name, error in MAX_RELATIVE_GRADIENT_ERROR.items():
            print(f"  {name:20s} {error:.2e}")


def _params():
    return [pytest.param(entry, id=entry.name) for entry in ZOO]


@pytest.mark.parametrize("entry", _params())
def test_forward_outputs_match_torch(cases, entry):
    case = cases(entry)
    assert_close(case.onnx["logits"], case.torch["logits"], "logits")
    np.testing.assert_array_equal(case.onnx["onnxcam_selected"], case.torch["onnxcam_selected"])
    top1_rows = case.classes < 0
    np.testing.assert_array_equal(case.onnx["onnxcam_selected"][top1_rows], case.top1[top1_rows])
    for i, layer in enumerate(entry.targets):
        assert_close(case.onnx[f"onnxcam_activation_{i}"], case.torch[f"onnxcam_activation_{i}"],
                     f"activation of {layer}")


@pytest.mark.parametrize("entry", _params())
def test_gradients_match_autograd(cases, entry):
    case = cases(entry)
    errors = {}
    for i, layer in enumerate(entry.targets):
        actual, expected = case.onnx[f"onnxcam_gradient_{i}"], case.torch[f"onnxcam_gradient_{i}"]
        assert actual.shape == expected.shape, f"gradient of {layer}: shape {actual.shape} != {expected.shape}"
        scale = float(np.abs(expected).max())
        assert scale > 0, f"the reference gradient of {layer} is all zero: the check would be vacuous"
        errors[layer] = float(np.abs(actual - expected).max()) / scale
    MAX_RELATIVE_GRADIENT_ERROR[entry.name] = max(errors.values())
    print(f"\n{entry.name}: max relative gradient error {max(errors.values()):.2e} "
          f"({', '.join(f'{layer} {error:.2e}' for layer, error in errors.items())}; images {case.images})", end="")
    for i, layer in enumerate(entry.targets):
        assert_close(case.onnx[f"onnxcam_gradient_{i}"], case.torch[f"onnxcam_gradient_{i}"], f"gradient of {layer}")
