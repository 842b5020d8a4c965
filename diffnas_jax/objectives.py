"""Deprecated name of :mod:`diffnas_jax.regularizers` (regularisers, cost losses and schedules of NAS methods; renamed because "objective" means the search step's loss protocol, diffnas_jax.search.objective); kept for one release.

Attribute access forwards to :mod:`diffnas_jax.regularizers` with a ``DeprecationWarning``.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    warnings.warn(f"diffnas_jax.objectives is deprecated; use diffnas_jax.regularizers.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module("diffnas_jax.regularizers"), name)


def __dir__() -> list[str]:
    return dir(importlib.import_module("diffnas_jax.regularizers"))
