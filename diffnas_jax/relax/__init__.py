"""Relaxed discrete operators: pure array functions usable inside any JAX model.

Every operator works on the last axis (or ``axis=``), accepts leading batch dimensions, keeps the
input dtype, and composes with ``jit``, ``vmap`` and ``grad``.  Random operators take an explicit
PRNG key as their first argument.

Names are resolved lazily, so importing this package does not import every operator module.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # Gumbel family (Jang 2017; Maddison 2017; Kool 2019; Xie & Ermon 2019)
    "gumbel_softmax": "gumbel",
    "gumbel_sigmoid": "gumbel",
    "gumbel_topk": "gumbel",
    # Blondel et al. 2020
    "soft_sort": "sorting",
    "soft_rank": "sorting",
    "isotonic_l2": "sorting",
    "isotonic_kl": "sorting",
    # Cuturi, Teboul & Vert 2019 (entropic OT, implicit differentiation)
    "sinkhorn_sort": "sinkhorn",
    "sinkhorn_rank": "sinkhorn",
    # permutation relaxations
    "neural_sort": "permutations",
    "soft_permutation": "permutations",
    # Petersen et al. 2021, 2022
    "sorting_network": "sorting_networks",
    # top-k: sparse (Sander et al. 2023) and entropic OT (Xie et al. 2020)
    "soft_topk_mask": "topk",
    "hard_topk_mask": "topk",
    # perturbed optimizers (Berthet et al. 2020)
    "perturbed": "perturbations",
    "perturbed_argmax": "perturbations",
    "perturbed_topk": "perturbations",
    # sparse simplex maps
    "sparsemax": "sparse",
    "entmax15": "sparse",
    # straight-through
    "straight_through": "ste",
    "ste_round": "ste",
    "ste_sign": "ste",
    "ste_ceil": "ste",
    # rank correlations
    "soft_spearman": "correlation",
    "soft_kendall_tau": "correlation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod = importlib.import_module(f"{__name__}.{module}")
    # bind every name of that module at once, so a later lookup never reaches __getattr__ again
    for other, where in _EXPORTS.items():
        if where == module and hasattr(mod, other):
            globals()[other] = getattr(mod, other)
    return globals()[name]


def __dir__():
    return sorted(list(globals()) + __all__)
