"""The method registry: every method onnxcam computes is declared once, here or in a module beside this one.

A declaration (`Method`) says what the method needs from the explainable file, its typed options with their
defaults, the function that runs it (a strategy: from a `Call` to a `Result`), and, for the methods computed
from one target layer's tensors, the core formula that the maps of target objects reuse. The registry knows no
method by name: the command line's `--method` choices, the server's method grid, `capabilities()` and the
documentation's method table all read `METHODS`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..core.errors import ExplainError
from ..runtimes.explainable import ExplainableModel


@dataclass(frozen=True)
class Need:
    """Something a method needs from the file besides the scores: whether a loaded file provides it, why a menu
    greys the method out, what a call is told (after the method's name), and the export option that provides it."""

    provided: Callable[[ExplainableModel], bool]
    menu: str
    told: str
    option: str | None = None

    def lacking(self, method: str, model: ExplainableModel) -> ExplainError | None:
        """The error `method` meets on this file, or None where the file provides what it needs."""
        return None if self.provided(model) else ExplainError(f"{method} {self.told}", option=self.option)


class LinearHead:
    """CAM's need, a linear layer after global average pooling of the target layer: the file's own error says
    what its head lacks (runtimes.linear_head), in menus too."""

    menu = ""

    @staticmethod
    def lacking(method: str, model: ExplainableModel) -> ExplainError | None:
        try:
            model.linear_head_weights  # noqa: B018 - read (and kept) to learn whether the head has the shape
        except ExplainError as error:
            return error
        return None


def _exported(field: str) -> Callable[[ExplainableModel], bool]:
    return lambda model: bool(getattr(model.spec, field))


# in the order a file is checked (a transformer's attention before its gradients)
NEEDS = {
    "input_gradient": Need(_exported("input_gradient"), "needs a file exported with input gradients",
                           "needs the gradient down to the input image, which costs a backward pass through the "
                           "whole network and is exported on request", "input_gradients"),
    "attentions": Need(_exported("attentions"), "needs attention probabilities (a transformer)",
                       "needs attention probabilities, and this model exposes none (export a transformer whose "
                       "attention modules are named attn_drop, or name them)"),
    "attention_gradients": Need(_exported("attention_gradients"), "needs a file exported with attention gradients",
                                "needs the attention gradients, which cost a backward pass through every block and "
                                "are exported on request", "attention_gradients"),
    "legrad_gradients": Need(_exported("legrad_gradients"), "needs a file exported with LeGrad's layer-score "
                             "gradients", "needs each block's gradient of its layer score, which costs a backward "
                             "pass per block and is exported on request", "legrad"),
    "one_layer": Need(lambda model: len(model.spec.layers) == 1, "explains one target layer; this file has several",
                      "explains one target layer; this file has several"),
    "scikit-learn": Need(lambda model: importlib.util.find_spec("sklearn") is not None,
                         "needs scikit-learn (the family extra)", "needs scikit-learn: pip install 'onnxcam[family]'"),
    "linear_head": LinearHead(),
}


@dataclass(frozen=True)
class NoOptions:
    """The options of a method that takes none."""


@dataclass
class Result:
    """What a strategy returns: B x H x W heatmaps in [0, 1], B x K scores, the class each map explains (B), and
    the raw B x C x H x W attributions of the input-gradient methods."""

    heatmaps: np.ndarray
    scores: np.ndarray
    selected: np.ndarray
    attributions: np.ndarray | None = None


@dataclass
class Call:
    """One run of a method: the model's sessions, the batch, the class each image is explained for (-1: its top-1),
    and the method's options."""

    model: ExplainableModel
    batch: object  # numpy array, OrtValue or DLPack-bound tensor in the model's layout
    classes: np.ndarray
    options: object
    method: Method

    def again(self, batch, classes: np.ndarray, method: Method) -> Result:
        """`method` (the one a wrapper wraps) run on another batch with these options: how wrappers compose."""
        return method.run(Call(self.model, batch, classes, self.options, method))


@dataclass(frozen=True)
class Method:
    """A method as declared: its name, what it needs, its options, its strategy and, where it has one, its formula.

    - `needs`: keys of NEEDS the file must provide;
    - `options`: a frozen dataclass whose fields are the options and their defaults;
    - `run`: the strategy, Call -> Result;
    - `formula`: the core function (activations, gradients) -> B x h x w map of one layer, for methods whose map
      is computed from one target layer's tensors: maps of target objects (onnxcam.targets) reuse it;
    - `terms`: the per-channel terms whose sum over channels is the map before its ReLU (pytorch-grad-cam's
      weighted activations): the methods that have them take eigen_smooth;
    - `gradients`: whether the formula reads the gradients;
    - `augmentable`: whether aug_smooth applies (methods whose batch runs as one);
    - `objects`: whether it explains target objects (a detection, a segment) and not only classes;
    - `summary`: one line for tables, with the paper.
    """

    name: str
    run: Callable[[Call], Result]
    summary: str
    needs: tuple[str, ...] = ()
    options: type = NoOptions
    formula: Callable | None = None
    terms: Callable | None = None
    gradients: bool = True
    augmentable: bool = False
    objects: bool = False  # maps per target object (a detection, a segment): from the formula through the head

    def parse_options(self, given: dict):
        """The method's options: its defaults overridden by those given; one it does not take is refused."""
        known = [f.name for f in dataclasses.fields(self.options)]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ExplainError(f"method {self.name} has no option '{unknown[0]}' (it takes "
                               f"{', '.join(known) or 'no options'})")
        return self.options(**given)


METHODS: dict[str, Method] = {}


def declare(method: Method) -> Method:
    """Add a method to the registry (once per name)."""
    if method.name in METHODS:
        raise ValueError(f"method '{method.name}' is declared twice")
    METHODS[method.name] = method
    return method


def method_named(name: str) -> Method:
    if name not in METHODS:
        raise ExplainError(f"unknown method '{name}'; choose from {', '.join(METHODS)}")
    return METHODS[name]


def _first_lacking(method: Method, model: ExplainableModel):
    """(the need, the error) of the first need of `method` this file lacks, or None."""
    for name, need in NEEDS.items():
        if name in method.needs and (error := need.lacking(method.name, model)) is not None:
            return need, error
    return None


def check_needs(method: Method, model: ExplainableModel) -> None:
    """Refuse, in one line, a method whose needs the loaded file lacks."""
    if (lacking := _first_lacking(method, model)) is not None:
        raise lacking[1]


def capabilities(model: ExplainableModel) -> dict[str, str | None]:
    """Per method, None where the loaded file supports it, else the reason it does not (for menus)."""
    reasons: dict[str, str | None] = {}
    for name, method in METHODS.items():
        lacking = _first_lacking(method, model)
        reasons[name] = None if lacking is None else lacking[0].menu or lacking[1].message
    return reasons


def method_table() -> str:
    """The methods as a Markdown table, in the registry's order: what each is, what it needs from the file besides
    the activations, its options with their defaults, and the smoothing it takes. The documentation's table."""
    rows = ["| method | what it is | needs | options | smoothing |", "|---|---|---|---|---|"]
    for name, method in METHODS.items():
        needs = [need.replace("_", " ") for need in method.needs]
        if method.gradients and not method.needs:
            needs.insert(0, "gradients")
        options = ", ".join(f"`{f.name}={f.default!r}`" for f in dataclasses.fields(method.options)) or "-"
        smoothing = [word for word, takes in (("eigen_smooth", method.terms is not None),
                                              ("aug_smooth", method.augmentable)) if takes]
        rows.append(f"| `{name}` | {method.summary} | {', '.join(needs) or '-'} | {options} | "
                    f"{', '.join(smoothing) or '-'} |")
    return "\n".join(rows)
