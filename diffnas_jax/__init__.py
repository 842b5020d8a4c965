"""diffnas_jax: differentiable programming over discrete choices in JAX.

Submodules (imported lazily so ``import diffnas_jax`` stays light):

- ``diffnas_jax.relax``: relaxed discrete operators (Gumbel, soft sort/rank, sorting networks, ...)
- ``diffnas_jax.spaces``: search spaces (DARTS, NAS-Bench-201, MobileNet MBConv, user-defined)
- ``diffnas_jax.mixing``: architecture logits -> mixing weights (DARTS, GDAS, SNAS, DrNAS, ...)
- ``diffnas_jax.regularizers``: regularisers, cost losses and schedules of NAS methods
- ``diffnas_jax.hypergrad``: hypergradient estimators (first-order, unrolled, implicit, ...)
- ``diffnas_jax.select``: turning a supernet into a genotype
- ``diffnas_jax.search``: the jit-compiled bilevel search step and driver
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = (
    "relax", "spaces", "mixing", "hypergrad", "select", "search", "cost", "baselines",
    "data", "viz", "methods", "nn", "proxies", "tabular", "regularizers",
    "relaxations", "objectives",  # deprecated aliases of mixing and regularizers
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
