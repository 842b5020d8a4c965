"""Names the command line validates before JAX is imported (this module imports nothing heavy).

Each tuple mirrors the module that owns the names; ``tests/test_cli.py`` asserts they agree, so
a new estimator or strategy that is not listed here fails CI instead of being unreachable.
"""
from __future__ import annotations

__all__ = ["SPACES", "HYPERGRADIENTS", "SELECTIONS", "BASELINE_STRATEGIES", "SPACE_PRESETS"]

SPACES = ("nb201", "darts", "mbconv")
"""Built-in search spaces (``diffnas_jax.spaces.<name>.search_space``)."""

HYPERGRADIENTS = ("first_order", "single_level", "unrolled", "unrolled_k", "implicit", "rarts")
"""Estimator constructors of :mod:`diffnas_jax.hypergrad`."""

SELECTIONS = ("argmax", "perturbation")
"""Genotype selection of the driver: magnitude argmax or DARTS-PT perturbation."""

BASELINE_STRATEGIES = ("random", "local_search", "evolution", "bananas")
"""Black-box strategies of :mod:`diffnas_jax.baselines.strategies` offered by ``diffnas baseline``."""

# Sizes that make the default digits search take about two minutes on a 2-core CPU (the driver's
# `make_space` reads them; the CLI shows them in --help). To move into the spaces registry.
SPACE_PRESETS: dict = {
    "nb201": {"C": 8, "N": 1},
    "darts": {"C": 8, "layers": 3},
    "mbconv": {"widths": (8, 8, 16, 16, 32, 32), "stem_width": 8, "first_width": 8, "head_width": 64},
}
