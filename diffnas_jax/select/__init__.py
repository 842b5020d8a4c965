"""Selectors: turning a searched supernet into a discrete genotype (shared/DESIGN.md, axis 4).

Every selector works on any space of :mod:`diffnas_jax.spaces` with no special case: the
space-specific rule (DARTS's top-2 incoming edges per node, NB201's one op per edge, MBConv's one
block per layer) stays behind ``space.genotype(arch)``; a selector only produces architecture
logits that encode its decision, and lets the space decode them.

- :func:`argmax`: magnitude argmax (the DARTS rule, implemented by the space).
- :func:`perturbation`: DARTS-PT (Wang et al., ICLR 2021), masked variants evaluated with ``vmap``.
- :func:`sample`: genotypes sampled from the learned distribution, optionally scored.
- :func:`threshold`: threshold decoding (FairDARTS sigmoids).
"""
from __future__ import annotations

from .magnitude import argmax, threshold
from .perturbation import PerturbationResult, perturbation
from .sampling import sample

__all__ = ["argmax", "threshold", "perturbation", "PerturbationResult", "sample"]
