"""Search spaces: DARTS cell, NAS-Bench-201 cell, MobileNetV2 MBConv layers, user-defined.

Each space follows the protocol in :mod:`diffnas_jax.spaces.base`. Submodules are imported
lazily: ``diffnas_jax.spaces.darts.search_space(...)``.
"""
from __future__ import annotations

import importlib
from typing import Any

from .base import ARCH_PASSTHROUGH_KEY, SearchSpace, check_mix_matches

_SUBMODULES = ("darts", "nb201", "mbconv", "layers", "user")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in ("from_module", "fix"):
        return getattr(importlib.import_module(f"{__name__}.user"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
