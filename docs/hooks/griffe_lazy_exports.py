"""A griffe extension for the API page: names that a package serves lazily, through a module-level
`__getattr__` (as `onnxcam.exporters` serves `export_torch`, so that torch loads on first use), are
documented where its `__all__` puts them. Static analysis does not see such names: each is looked up
among the package's submodules, and aliased to the one submodule that defines it."""

from __future__ import annotations

import griffe


class LazyExports(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        self._alias_lazy_names(pkg)

    def _alias_lazy_names(self, module: griffe.Module) -> None:
        for submodule in module.modules.values():
            self._alias_lazy_names(submodule)
        if "__getattr__" not in module.members or not module.exports:
            return
        for name in module.exports:
            if name in module.members:
                continue
            owners = [sub for sub in module.modules.values()
                      if name in sub.members and not sub.members[name].is_alias]
            if len(owners) == 1:
                module.set_member(name, griffe.Alias(name, owners[0].members[name], parent=module))
