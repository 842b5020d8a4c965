"""Relaxed permutation matrices: NeuralSort and SoftSort.

Both return row-stochastic ``(..., n, n)`` matrices ``P`` with ``P @ values`` approximately the
values sorted in *descending* order (the papers' convention); ``descending=False`` flips the
rows. Temperature -> 0 gives the hard permutation matrix.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffnas_jax._checks import as_float_array, check_positive


def _prepare(values, temperature):
    check_positive("temperature", temperature)
    s = as_float_array("values", values, min_ndim=1)
    return s, jnp.asarray(temperature, s.dtype)


def neural_sort(values: jax.Array, temperature: float = 1.0, descending: bool = True) -> jax.Array:
    """NeuralSort relaxation of the sorting permutation (Grover et al., ICLR 2019, Eq. 4).

    ``P[i, :] = softmax(((n + 1 - 2 i) s - A_s 1) / tau)`` with ``A_s[j, k] = |s_j - s_k|``.

    Args:
      values: ``(..., n)`` scores.
      temperature: ``tau > 0``.
      descending: row ``i`` selects the ``i``-th largest value (else the ``i``-th smallest).
    Returns:
      ``(..., n, n)`` row-stochastic matrix of the dtype of ``values``.
    """
    s, tau = _prepare(values, temperature)
    n = s.shape[-1]
    if n == 0:
        return jnp.zeros(s.shape + (0,), s.dtype)
    a_s = jnp.abs(s[..., :, None] - s[..., None, :])
    b = jnp.sum(a_s, axis=-1)  # (..., n)
    scaling = (n + 1 - 2 * (jnp.arange(n) + 1)).astype(s.dtype)  # (n,)
    c = scaling[:, None] * s[..., None, :] - b[..., None, :]  # (..., n, n)
    p = jax.nn.softmax(c / tau, axis=-1)
    return p if descending else p[..., ::-1, :]


def soft_permutation(values: jax.Array, temperature: float = 1.0, descending: bool = True) -> jax.Array:
    """SoftSort (Prillo & Eisenschlos, ICML 2020): ``P = softmax(-|sort(s)[:, None] - s[None, :]| / tau)``.

    Args:
      values: ``(..., n)`` scores.
      temperature: ``tau > 0``.
      descending: rows ordered from the largest value.
    Returns:
      ``(..., n, n)`` row-stochastic matrix of the dtype of ``values``.
    """
    s, tau = _prepare(values, temperature)
    if s.shape[-1] == 0:
        return jnp.zeros(s.shape + (0,), s.dtype)
    sorted_s = jnp.sort(s, axis=-1)
    if descending:
        sorted_s = sorted_s[..., ::-1]
    return jax.nn.softmax(-jnp.abs(sorted_s[..., :, None] - s[..., None, :]) / tau, axis=-1)
