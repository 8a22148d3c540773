"""Forwards for names that moved (kept for one release, with a DeprecationWarning).

A library module lists its moved names and defines ``__getattr__`` with :func:`moved`; the new
home is imported only when an old name is used, so no library module imports it.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any


def moved(module: str, name: str, targets: dict[str, str]) -> Any:
    """``module.name`` for a module-level ``__getattr__``: the object from its new home in
    ``targets`` (name -> module), with a DeprecationWarning; AttributeError for any other name."""
    if name not in targets:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(
        f"{module}.{name} moved to {targets[name]}.{name}; the old name will be removed in the next release",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(targets[name]), name)


def deprecated_call(old: str, module: str, name: str) -> Any:
    """``module.name`` for a deprecated alias ``old`` that forwards to it, with a DeprecationWarning
    (the alias's module does not import ``module``: it may sit below it in the layers)."""
    warnings.warn(
        f"{old} is deprecated; use {module}.{name} (the old name will be removed in the next release)",
        DeprecationWarning,
        stacklevel=3,
    )
    return getattr(importlib.import_module(module), name)


def old_submodule(package: str, name: str, names: frozenset[str]) -> Any:
    """``package.name`` for the package's ``__getattr__``: the submodules that 0.1 made attributes
    of the package as a side effect of its imports (``mr.smoothing``, ``mr.model``, ...), imported
    on first use; AttributeError for any other name."""
    if name not in names:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return importlib.import_module(f"{package}.{name}")
