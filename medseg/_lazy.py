"""Lazy package attributes (PEP 562), so ``import medseg`` and ``medseg --help`` stay instant.

Subpackages export their public names from modules that import torch and MONAI; those
modules load on first use of a name, not when the package is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` resolving each of ``names`` (name -> module) on first use."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(names[name]), name)

    return __getattr__
