"""Package re-exports imported on first use (PEP 562), so that importing a package for one torch-free module
(`lmlab --help` reads the config dataclasses) does not import what its other modules need."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, names: dict[str, str], namespace: dict[str, Any], exported: list[str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `package`: `names` maps each re-exported name to the module (relative to the
    package) that defines it, as "module" (the same name there) or "module:name"; any other name is a submodule of
    the package, imported then (`import lmlab` then `lmlab.models.io` worked when the packages imported it all). A name
    once looked up is kept in `namespace` (the package's globals), so the next lookup does not come here."""
    def __getattr__(name: str) -> Any:
        if name in names:
            module, _, attr = names[name].partition(":")
            value = getattr(importlib.import_module(module, package), attr or name)
        else:  # a submodule (lmlab.models.fast, lmlab.train.recipes): imported eagerly before, reached as attributes
            try:
                value = importlib.import_module(f".{name}", package)
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":  # the submodule is there and failed on an import of its own
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exported})
    return __getattr__, __dir__
