"""Sampling genotypes from the learned architecture distribution."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffnas_jax._checks import check_int_in_range
from ._tree import ArchLayout
from diffnas_jax.spaces.base import SearchSpace

PyTree = Any


def sample(space: SearchSpace, arch: PyTree, key: jax.Array, num_samples: int, *,
           score_fn: Callable[[Any], float] | None = None, temperature: float = 1.0,
           log_probs: Callable[[PyTree], PyTree] | None = None, unique: bool = False) -> list:
    """Genotypes sampled from the categorical distributions the search learned.

    Each decision's candidate is drawn from ``softmax(alpha / temperature)`` with the Gumbel-max
    trick (Gumbel 1954; as used by GDAS, Dong & Yang 2019, and SNAS, Xie et al. 2019): the
    perturbed logits ``alpha / temperature + G`` are decoded by ``space.genotype``, so a space's
    own rule applies unchanged — NB201 and MBConv decisions are exact categorical samples, and
    DARTS's choice of two inputs per node ranks the edges by their perturbed strengths (a
    Plackett-Luce-style sample of the topology).

    Args:
      space: any search space.
      arch: architecture logits.
      key: PRNG key.
      num_samples: number of draws, >= 1.
      score_fn: optional ``genotype -> float`` (higher is better: a proxy, a supernet accuracy,
        a table look-up); with it the result is sorted best first.
      temperature: > 0; large values approach uniform sampling, small ones the argmax.
      log_probs: optional ``arch -> log-probabilities`` pytree of the arch's structure, for
        relaxations whose distribution is not ``softmax(alpha)`` (e.g. DrNAS's Dirichlet mean).
      unique: drop repeated genotypes (compared by ``repr``).

    Returns:
      ``[genotype, ...]`` or, with ``score_fn``, ``[(genotype, score), ...]`` best first.
    """
    check_int_in_range("num_samples", num_samples, 1, 10**7)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"`temperature` must be a positive number, got {temperature!r}")
    layout = ArchLayout(arch)
    logits = layout.rows(log_probs(arch) if log_probs is not None else arch)
    keys = jax.random.split(key, len(logits))
    noisy = []
    for k, a in zip(keys, logits):
        a = jnp.asarray(a)
        dtype = a.dtype if jnp.issubdtype(a.dtype, jnp.floating) else jnp.float32
        # float32 noise at least: bfloat16 Gumbel samples have too few distinct values
        g = jax.random.gumbel(k, (num_samples,) + a.shape, jnp.promote_types(dtype, jnp.float32))
        noisy.append(np.asarray(a.astype(g.dtype) / temperature + g))
    out, seen = [], set()
    for s in range(num_samples):
        genotype = space.genotype(layout.rebuild(arch, [n[s] for n in noisy]))
        if unique:
            r = repr(genotype)
            if r in seen:
                continue
            seen.add(r)
        out.append(genotype)
    if score_fn is None:
        return out
    scored = [(g, float(score_fn(g))) for g in out]
    return sorted(scored, key=lambda gs: -gs[1])
