"""Errors a user can act on. Each says in one line what is wrong; the CLI prints it with no traceback.

`option` names the keyword argument that fixes the problem, when one does. The message never spells
it: Python shows the keyword, the CLI shows its own flag (see `OnnxcamError.describe`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable


class OnnxcamError(Exception):
    """A mistake in what was asked, said in one line."""

    def __init__(self, message: str, *, option: str | None = None):
        self.message, self.option = message, option
        super().__init__(self.describe(str))

    def describe(self, spell: Callable[[str], str]) -> str:
        """The message, followed by the option that fixes it as `spell` names it (a keyword or a flag)."""
        return self.message if self.option is None else f"{self.message} (set {spell(self.option)})"


class ExportError(OnnxcamError):
    """A model that cannot be made explainable."""


class UnsupportedOperator(ExportError):
    """An operator between the target and the score with no gradient rule."""

    def __init__(self, op_type: str, node_name: str):
        super().__init__(f"operator {op_type} (node '{node_name}') lies between the target and the output "
                         f"and has no gradient rule")
        self.op_type = op_type


class ContractError(OnnxcamError):
    """An explainable file whose metadata this version cannot read."""


class ExplainError(OnnxcamError, ValueError):
    """A request the model cannot answer: unknown method, class out of range, wrong input."""


class ImageError(OnnxcamError, ValueError):
    """An input that is not a usable image; the message names the file."""


class ProviderError(OnnxcamError, RuntimeError):
    """The requested execution provider cannot run here."""


def renamed(old: str, new: str, value):
    """`value`, given under a name that changed: said once per call site (FutureWarning, shown to users), so that
    code written for the old name keeps working."""
    warnings.warn(f"onnxcam: '{old}' is now called '{new}'; the old name will be removed", FutureWarning, stacklevel=3)
    return value
