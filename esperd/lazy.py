"""Lazy package exports: `from esperd.policy import create_policy` imports only what it names.

A package's `__init__` maps each public name to the submodule that defines it; the submodule is
imported on first access (PEP 562). So importing one light submodule (a package's `config`,
say) never drags in the package's heavy ones (torch), and the package namespace stays the
public API. Code inside esperd imports from the defining submodule, which keeps the import
graph explicit (tests/test_layers.py reads it).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    namespace: dict[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(`__getattr__`, `__dir__`) for the package whose `globals()` is `namespace` and whose public
    names live in the `exports` submodules (name -> submodule relative to the package)."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:  # noqa: N807 - the module-level hook's name
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value  # later lookups skip this hook
        return value

    def __dir__() -> list[str]:  # noqa: N807
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
