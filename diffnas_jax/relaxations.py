"""Deprecated name of :mod:`diffnas_jax.mixing` (architecture logits -> mixing weights; renamed so that it is not confused with diffnas_jax.relax, the array-level relaxed operators); kept for one release.

Attribute access forwards to :mod:`diffnas_jax.mixing` with a ``DeprecationWarning``.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    warnings.warn(f"diffnas_jax.relaxations is deprecated; use diffnas_jax.mixing.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module("diffnas_jax.mixing"), name)


def __dir__() -> list[str]:
    return dir(importlib.import_module("diffnas_jax.mixing"))
