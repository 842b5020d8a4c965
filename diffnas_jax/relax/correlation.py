"""Differentiable rank correlations: soft Spearman (via soft ranks) and soft Kendall tau."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffnas_jax._checks import as_float_array, check_positive
from diffnas_jax.relax.sorting import soft_rank


def _pearson(a, b):
    a = a - jnp.mean(a, axis=-1, keepdims=True)
    b = b - jnp.mean(b, axis=-1, keepdims=True)
    den = jnp.sqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1))
    return jnp.sum(a * b, -1) / jnp.maximum(den, jnp.finfo(a.dtype).tiny)


def soft_spearman(pred: jax.Array, target: jax.Array, regularization_strength: float = 1.0,
                  regularization: str = "l2") -> jax.Array:
    """Spearman correlation with soft ranks of ``pred`` (Blondel et al., ICML 2020, Sec. 6):
    Pearson correlation of ``soft_rank(pred)`` and the hard ranks of ``target``, over the last axis.

    Args:
      pred, target: ``(..., n)``. Returns ``(...)`` in [-1, 1], differentiable in ``pred``.
    """
    check_positive("regularization_strength", regularization_strength)
    p = as_float_array("pred", pred, min_ndim=1)
    t = as_float_array("target", target, min_ndim=1).astype(p.dtype)
    if p.shape != t.shape:
        raise ValueError(f"`pred` shape {p.shape} differs from `target` shape {t.shape}")
    rp = soft_rank(p, regularization_strength=regularization_strength, regularization=regularization)
    rt = jax.lax.stop_gradient(jnp.argsort(jnp.argsort(t, axis=-1), axis=-1).astype(p.dtype))
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
