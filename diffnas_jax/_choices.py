"""Names the command line validates before JAX is imported (this module imports nothing heavy).

Each tuple mirrors the module that owns the names; ``tests/test_cli.py`` asserts they agree, so
a new estimator or strategy that is not listed here fails CI instead of being unreachable.
"""
from __future__ import annotations

__all__ = ["HYPERGRADIENTS", "SELECTIONS", "BASELINE_STRATEGIES"]

# The space names and presets are read from `diffnas_jax.spaces.registry`, which imports no JAX.

HYPERGRADIENTS = ("first_order", "single_level", "unrolled", "unrolled_k", "implicit", "rarts")
"""Estimator constructors of :mod:`diffnas_jax.hypergrad`."""

SELECTIONS = ("argmax", "perturbation")
"""Genotype selection of the driver: magnitude argmax or DARTS-PT perturbation."""

BASELINE_STRATEGIES = ("random", "local_search", "evolution", "bananas")
"""Black-box strategies of :mod:`diffnas_jax.baselines.strategies` offered by ``diffnas baseline``."""
