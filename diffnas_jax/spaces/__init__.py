"""Search spaces: DARTS cell, NAS-Bench-201 cell, MobileNetV2 MBConv layers, user-defined.

Each space implements the whole :class:`~diffnas_jax.spaces.base.SearchSpace` protocol and is
registered by name in :mod:`diffnas_jax.spaces.registry` (``make_space("darts", ...)``).
Submodules are imported lazily: ``diffnas_jax.spaces.darts.search_space(...)``.
"""
from __future__ import annotations

import importlib
from typing import Any

# The protocol names are forwarded lazily too: `spaces.registry` must import without JAX, because
# the command line validates `--space` and shows the presets before JAX loads.
_BASE_NAMES = ("ARCH_PASSTHROUGH_KEY", "CATEGORICAL", "PASSTHROUGH", "EvalNetwork", "SearchSpace",
               "check_mix_matches")

_SUBMODULES = ("darts", "nb201", "mbconv", "layers", "user", "registry")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _BASE_NAMES:
        return getattr(importlib.import_module(f"{__name__}.base"), name)
    if name in ("from_module", "fix"):
        return getattr(importlib.import_module(f"{__name__}.user"), name)
    if name in ("make_space", "make_eval_network", "list_spaces", "register_space", "get_space"):
        return getattr(importlib.import_module(f"{__name__}.registry"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
