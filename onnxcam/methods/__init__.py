"""The methods: a registry where each is declared once (`registry`), and the modules that declare them with
their run strategies: single-run CAMs, attention methods, perturbation CAMs, input-gradient attributions.
Smoothing wraps any method that can take it (`smoothing`); target objects get one map each (`objects`)."""

# each module declares its methods; their order is the menus' (the CAMs first)
from . import cams  # noqa: F401  # isort: split

from . import attention, perturbation, gradients  # noqa: F401  # isort: skip
from .objects import explain_objects
from .registry import METHODS, Call, Method, Result, capabilities, check_needs, method_named
from .smoothing import augmented, eigen_smoothed

__all__ = ["METHODS", "Call", "Method", "Result", "augmented", "capabilities", "check_needs", "eigen_smoothed",
           "explain_objects", "method_named"]
