"""Differentiable rank correlations: soft Spearman (via soft ranks) and soft Kendall tau."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffnas_jax._checks import as_float_array, check_positive
from diffnas_jax.relax.sorting import soft_rank


def _pearson(a, b):
    """Pearson correlation over the last axis. A constant ``a`` (a constant row of predictions,
    whose soft ranks are all equal) gives 0 with a zero, not NaN, gradient: the double ``where``
    keeps sqrt'(0) out of the derivative so one such row cannot poison a batch. A constant ``b``
    (the target) gives NaN, as scipy's Spearman does: the correlation is undefined there."""
    a = a - jnp.mean(a, axis=-1, keepdims=True)
    b = b - jnp.mean(b, axis=-1, keepdims=True)
    ssa, ssb = jnp.sum(a * a, -1), jnp.sum(b * b, -1)
    ok = (ssa > 0) & (ssb > 0)
    den = jnp.sqrt(jnp.where(ok, ssa, 1)) * jnp.sqrt(jnp.where(ok, ssb, 1))
    r = jnp.where(ok, jnp.sum(a * b, -1) / den, 0)
    return jnp.where(ssb > 0, r, jnp.nan)


def _average_ranks(t):
    """1-based ranks along the last axis with ties given their average rank (scipy's
    ``rankdata(method="average")``); NaN anywhere in a row gives a NaN row."""
    st = jnp.sort(t, axis=-1)
    flat_t, flat_st = t.reshape(-1, t.shape[-1]), st.reshape(-1, t.shape[-1])
    lo = jax.vmap(lambda s, v: jnp.searchsorted(s, v, side="left"))(flat_st, flat_t)
    hi = jax.vmap(lambda s, v: jnp.searchsorted(s, v, side="right"))(flat_st, flat_t)
    ranks = ((lo + hi + 1) / 2).reshape(t.shape).astype(t.dtype)  # mean of lo+1 .. hi
    return jnp.where(jnp.any(jnp.isnan(t), axis=-1, keepdims=True), jnp.nan, ranks)


def soft_spearman(pred: jax.Array, target: jax.Array, regularization_strength: float | jax.Array = 1.0,
                  regularization: str = "l2") -> jax.Array:
    """Spearman correlation with soft ranks of ``pred`` (Blondel et al., ICML 2020, Sec. 6):
    Pearson correlation of ``soft_rank(pred)`` and the ranks of ``target`` (ties share their
    average rank, as in scipy.stats.spearmanr), over the last axis.

    Args:
      pred, target: ``(..., n)``; regularization_strength > 0 and regularization ("l2" or "kl")
        as in :func:`~diffnas_jax.relax.soft_rank`.
    Returns:
      ``(...)`` in [-1, 1], differentiable in ``pred``. A constant ``target`` row gives NaN
      (the correlation is undefined, as in scipy); a ``pred`` row whose soft ranks are constant
      gives 0 with a zero gradient.
    """
    check_positive("regularization_strength", regularization_strength)
    p = as_float_array("pred", pred, min_ndim=1)
    t = as_float_array("target", target, min_ndim=1).astype(p.dtype)
    if p.shape != t.shape:
        raise ValueError(f"`pred` shape {p.shape} differs from `target` shape {t.shape}")
    rp = soft_rank(p, regularization_strength=regularization_strength, regularization=regularization)
    rt = jax.lax.stop_gradient(_average_ranks(t))
    return _pearson(rp, rt)


def soft_kendall_tau(pred: jax.Array, target: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Soft Kendall tau: the sign of every pairwise difference of ``pred`` replaced by
    ``tanh(diff / temperature)`` (the DiffKendall relaxation used by ParZC), averaged against the
    signs of ``target``'s differences over all pairs of the last axis.

    Args:
      pred, target: ``(..., n)``; temperature > 0. Returns ``(...)`` in [-1, 1].
    """
    check_positive("temperature", temperature)
    p = as_float_array("pred", pred, min_ndim=1)
    t = as_float_array("target", target, min_ndim=1).astype(p.dtype)
    if p.shape != t.shape:
        raise ValueError(f"`pred` shape {p.shape} differs from `target` shape {t.shape}")
    n = p.shape[-1]
    if n < 2:
        return jnp.zeros(p.shape[:-1], p.dtype)
    dp = jnp.tanh((p[..., :, None] - p[..., None, :]) / temperature)
    dt = jnp.sign(t[..., :, None] - t[..., None, :])
    return jnp.sum(dp * dt, axis=(-1, -2)) / (n * (n - 1))
