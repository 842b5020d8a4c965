"""Module-level forwarding for renamed modules (kept for one release)."""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def forward_module(old: str, new: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the deprecated module ``old``: attribute access warns
    (``DeprecationWarning``) and returns the attribute of ``new``."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        warnings.warn(f"{old} is deprecated; use {new}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)

    def __dir__() -> list[str]:
        return dir(importlib.import_module(new))

    return __getattr__, __dir__
