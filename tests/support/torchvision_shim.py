"""torchvision (and what imports it: timm, pytorch-grad-cam) for tests and benchmarks only. Its compiled operators
fail to register against this torch build; its pure-Python part works once those registrations are skipped."""

from __future__ import annotations


def import_torchvision():
    """torchvision, imported with `torch.library.register_fake` made tolerant of registrations that fail."""
    import torch

    register_fake = torch.library.register_fake

    def tolerant(*args, **kwargs):
        try:
            decorate = register_fake(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a registration torchvision's binary cannot make
            return lambda function: function

        def apply(function):
            try:
                return decorate(function)
            except Exception:  # noqa: BLE001
                return function
        return apply

    torch.library.register_fake = tolerant
    try:
        import torchvision
    finally:
        torch.library.register_fake = register_fake
    return torchvision
