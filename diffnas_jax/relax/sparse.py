"""Sparse maps onto the probability simplex: sparsemax and 1.5-entmax.

- sparsemax: Martins & Astudillo, "From Softmax to Sparsemax: A Sparse Model of Attention and
  Multi-Label Classification", ICML 2016 — the Euclidean projection onto the simplex.
- entmax15: Peters, Niculae & Martins, "Sparse Sequence-to-Sequence Models", ACL 2019 — the
  alpha = 1.5 Tsallis-entropy map, computed exactly by sorting.

Both are O(n log n) (one sort) and carry a ``jax.custom_jvp`` with the closed-form sparse Jacobian
(``diag(s) - s s^T / |S|`` for sparsemax, ``diag(g) - g g^T / sum(g)`` with ``g = sqrt(p)`` for
entmax15), which is symmetric, so reverse mode is its transpose and no sort is differentiated.

Numerics: the input is shifted by its max (both maps are shift invariant) and clamped from below
at -1 (sparsemax) or -2 (entmax15), in the map's own scale. The max entry's probability is at most
1, so the threshold is >= -1 and any entry below -1 has probability 0: clamping changes no output but keeps the cumulative
sums (and, for entmax, sums of squares) finite and exact for inputs of +-1e30. Half-precision inputs
are computed in float32 and cast back.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffnas_jax._checks import as_float_array, check_axis

__all__ = ["sparsemax", "entmax15"]


def _compute_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _prepare(name: str, x, axis: int):
    x = as_float_array(name, x)
    if x.ndim < 1:
        raise ValueError(f"`{name}` must have at least 1 dimension, got shape {x.shape}")
    axis = check_axis("axis", axis, x.ndim)
    return x, axis


def _sorted_desc(z: jax.Array) -> jax.Array:
    return -jnp.sort(-z, axis=-1)


@jax.custom_jvp
def _sparsemax_last(x: jax.Array) -> jax.Array:
    n = x.shape[-1]
    z = jnp.maximum(x - jnp.max(x, axis=-1, keepdims=True), -1.0)
    zs = _sorted_desc(z)
    cs = jnp.cumsum(zs, axis=-1)
    ks = jnp.arange(1, n + 1, dtype=z.dtype)
    support = jnp.sum(1.0 + ks * zs > cs, axis=-1, keepdims=True)
    support = jnp.maximum(support, 1)
    tau = (jnp.take_along_axis(cs, support - 1, axis=-1) - 1.0) / support.astype(z.dtype)
    return jnp.maximum(z - tau, 0.0)


@_sparsemax_last.defjvp
def _sparsemax_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    p = _sparsemax_last(x)
    s = (p > 0).astype(p.dtype)
    sdx = s * dx
    size = jnp.maximum(jnp.sum(s, axis=-1, keepdims=True), 1.0)
    return p, sdx - s * jnp.sum(sdx, axis=-1, keepdims=True) / size


@jax.custom_jvp
def _entmax15_last(x: jax.Array) -> jax.Array:
    n = x.shape[-1]
    # -2, not -1: an entry clamped exactly onto tau's lower bound -1 would count as in the
    # support up to rounding and get a probability of ~1e-32 instead of 0
    z = jnp.maximum((x - jnp.max(x, axis=-1, keepdims=True)) / 2.0, -2.0)
    zs = _sorted_desc(z)
    ks = jnp.arange(1, n + 1, dtype=z.dtype)
    mean = jnp.cumsum(zs, axis=-1) / ks
    mean_sq = jnp.cumsum(zs * zs, axis=-1) / ks
    ss = ks * (mean_sq - mean * mean)
    delta = jnp.maximum((1.0 - ss) / ks, 0.0)
    tau = mean - jnp.sqrt(delta)
    support = jnp.maximum(jnp.sum(tau <= zs, axis=-1, keepdims=True), 1)
    tau_star = jnp.take_along_axis(tau, support - 1, axis=-1)
    return jnp.square(jnp.maximum(z - tau_star, 0.0))


@_entmax15_last.defjvp
def _entmax15_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    p = _entmax15_last(x)
    g = jnp.sqrt(p)
    gdx = g * dx
    return p, gdx - g * jnp.sum(gdx, axis=-1, keepdims=True) / jnp.sum(g, axis=-1, keepdims=True)


def _apply_last(fn, name: str, x, axis: int) -> jax.Array:
    x, axis = _prepare(name, x, axis)
    if x.shape[axis] == 0:
        return x
    dtype = x.dtype
    z = jnp.moveaxis(x, axis, -1).astype(_compute_dtype(dtype))
    return jnp.moveaxis(fn(z), -1, axis).astype(dtype)


def sparsemax(x: jax.Array, axis: int = -1) -> jax.Array:
    """Sparsemax: the Euclidean projection of ``x`` onto the probability simplex.

    Martins & Astudillo, ICML 2016. ``sparsemax(x) = argmin_{p in simplex} ||p - x||^2``, i.e.
    ``max(x - tau, 0)`` with the threshold ``tau`` found by sorting. Unlike softmax it gives exact
    zeros; its Jacobian is ``diag(s) - s s^T / |S|`` on the support ``S`` (custom JVP).

    Args:
      x: floating array ``(..., n, ...)``; any leading/trailing batch dims.
      axis: the axis holding the ``n`` scores.

    Returns:
      Array of the shape and dtype of ``x``, nonnegative, summing to 1 along ``axis``.

    Raises:
      ValueError: ``x`` is a scalar or ``axis`` is out of range.
    """
    return _apply_last(_sparsemax_last, "x", x, axis)


def entmax15(x: jax.Array, axis: int = -1) -> jax.Array:
    """1.5-entmax: the Tsallis alpha=1.5 regularised argmax, exact by sorting.

    Peters, Niculae & Martins, ACL 2019. ``entmax15(x) = max(x/2 - tau, 0)^2`` with ``tau`` such
    that the result sums to 1. Sparse like sparsemax but smoother (continuous Jacobian
    ``diag(g) - g g^T / sum(g)``, ``g = sqrt(p)``, as a custom JVP).

    Args:
      x: floating array ``(..., n, ...)``.
      axis: the axis holding the ``n`` scores.

    Returns:
      Array of the shape and dtype of ``x``, nonnegative, summing to 1 along ``axis``.

    Raises:
      ValueError: ``x`` is a scalar or ``axis`` is out of range.
    """
    return _apply_last(_entmax15_last, "x", x, axis)
