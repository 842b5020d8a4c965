"""The search loop's building blocks: ``SearchState``, ``init_search_state`` and ``make_step``
(one pure, jit-compiled bilevel step); the driver (``diffnas_jax.search.driver``) runs it.
"""
from __future__ import annotations

import importlib
from typing import Any

from .objective import LossContext, Objective
from .state import SearchState, init_search_state
from .step import StepStages, arch_entropy, cross_entropy, make_step

__all__ = ["SearchState", "init_search_state", "make_step", "StepStages", "arch_entropy", "cross_entropy", "Objective",
           "LossContext"]


def __getattr__(name: str) -> Any:
    # Other modules of the package (driver, checkpoints, logging) load on first use.
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from e
