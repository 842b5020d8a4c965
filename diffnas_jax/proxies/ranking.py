"""Ranking metrics between two scorings of the same architectures.

Kendall's tau-b (ties handled as in Kendall 1945), Spearman's rho (average ranks for ties) and
top-k precision, as used to judge proxies and supernets (e.g. Yu et al., "Evaluating the Search
Phase of Neural Architecture Search", ICLR 2020; Abdelfattah et al. 2021).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from diffnas_jax.spaces.base import SearchSpace


def _pair(a, b):
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"scorings must have equal length, got {a.shape[0]} and {b.shape[0]}")
    if a.size < 2:
        raise ValueError("rank correlations need at least 2 architectures")
    return a, b


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman_rho(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks)."""
    a, b = _pair(a, b)
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b over all pairs (O(n^2), fine for the hundreds of architectures NAS uses)."""
    a, b = _pair(a, b)
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(len(a), 1)
    da, db = da[iu], db[iu]
    n0 = len(da)
    ties_a, ties_b = np.sum(da == 0), np.sum(db == 0)
    denom = np.sqrt((n0 - ties_a) * (n0 - ties_b))
    return float(np.sum(da * db) / denom) if denom > 0 else 0.0


def top_k_precision(pred: Sequence[float], true: Sequence[float], k: int | float = 0.1) -> float:
    """Fraction of the true top-``k`` found in the predicted top-``k`` (``k`` < 1: a fraction)."""
    pred, true = _pair(pred, true)
    n = len(pred)
    kk = int(round(k * n)) if isinstance(k, float) and k < 1 else int(k)
    if not 1 <= kk <= n:
        raise ValueError(f"`k` must select between 1 and {n} architectures, got {k}")
    top_p = set(np.argsort(-pred, kind="stable")[:kk].tolist())
    top_t = set(np.argsort(-true, kind="stable")[:kk].tolist())
    return len(top_p & top_t) / kk


def supernet_scores(space: SearchSpace, weights: Any, state: Any, genotypes: Sequence[Any],
                    batch: tuple[jax.Array, jax.Array], *, train: bool = False) -> np.ndarray:
    """Accuracy of each genotype *inside the supernet* (one-hot mix from
    ``space.arch_from_genotype``, weights shared), evaluated in one ``vmap`` over architectures."""
    x, y = batch
    archs = [space.arch_from_genotype(g) for g in genotypes]
    onehots = [jax.tree_util.tree_map(lambda a: jax.nn.one_hot(jnp.argmax(a, -1), a.shape[-1], dtype=x.dtype), arch)
               for arch in archs]
    stacked = jax.tree_util.tree_map(lambda *l: jnp.stack(l), *onehots)

    def acc(mix):
        logits, _ = space.apply(weights, state, mix, x, train)
        return jnp.mean(jnp.argmax(logits, -1) == y)

    return np.asarray(jax.jit(jax.vmap(acc))(stacked))


def ranking_consistency(scores_a: Sequence[float], scores_b: Sequence[float], k: float = 0.2) -> dict[str, float]:
    """Kendall tau, Spearman rho and top-k precision between two scorings (e.g. supernet vs
    standalone accuracy, or a proxy vs trained accuracy)."""
    return {"kendall_tau": kendall_tau(scores_a, scores_b), "spearman_rho": spearman_rho(scores_a, scores_b),
            "top_k_precision": top_k_precision(scores_a, scores_b, k)}
