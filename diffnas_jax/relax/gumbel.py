"""The Gumbel family: relaxed categorical, binary and k-subset samples.

- ``gumbel_softmax``: Jang, Gu & Poole, "Categorical Reparameterization with Gumbel-Softmax",
  ICLR 2017; Maddison, Mnih & Teh, "The Concrete Distribution", ICLR 2017. ``hard=True`` is the
  straight-through Gumbel-softmax of Jang et al. (exact one-hot value, soft gradient).
- ``gumbel_sigmoid``: the binary Concrete / relaxed Bernoulli (Maddison et al. 2017, sec. 3.3).
- ``gumbel_topk``: relaxed k-subset sampling on the Gumbel-top-k trick (Kool, van Hoof & Welling,
  "Stochastic Beams and Where to Find Them", ICML 2019): perturb the logits with Gumbel noise,
  then relax the k-hot of the top k keys, by default as ``sigmoid((r - tau) / T)`` with the
  threshold that makes the sum k (entries in [0, 1]), or as Xie & Ermon's k successive tempered
  softmaxes ("Reparameterizable Subset Sampling via Continuous Relaxations", IJCAI 2019; entries
  can exceed 1). ``hard=True`` returns the exact k-hot of the Gumbel top-k (a sample of k items
  without replacement) with the soft mask's gradient.

Numerics: the perturbed logits are shifted by their max *before* dividing by the temperature,
so ``|logits| = 1e30`` with ``temperature = 1e-6`` does not overflow; the top-k mask update for the
currently largest key is computed in log space (``log(1 - p_max) = lse_{-max} - lse``) so a
saturated softmax (``p_max == 1`` in floating point) still removes that key. Half-precision inputs
are computed in float32 and cast back. A Python-number temperature must be > 0 (``ValueError``);
a traced temperature is not checked.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from diffnas_jax._checks import as_float_array, check_axis, check_choice, check_int_in_range, check_positive
from diffnas_jax.relax.ste import straight_through
from diffnas_jax.relax.topk import _ot_topk_mask, hard_topk_mask

__all__ = ["gumbel_softmax", "gumbel_sigmoid", "gumbel_topk"]


def _compute_dtype(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _check_key(key: Any) -> None:
    if key is None:
        raise ValueError("`key` must be a PRNG key (jax.random.key or PRNGKey), got None")


def tempered_softmax(z: jax.Array, temperature: Any, axis: int = -1) -> jax.Array:
    """``softmax(z / temperature)`` that neither overflows for huge ``|z| / temperature`` nor
    differentiates through the max (softmax is shift invariant)."""
    shifted = z - jax.lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True))
    return jax.nn.softmax(shifted / temperature, axis=axis)


def _as_temperature(temperature: Any, dtype) -> jax.Array:
    check_positive("temperature", temperature)
    return jnp.asarray(temperature).astype(dtype)


def gumbel_softmax(key: jax.Array, logits: jax.Array, temperature: Any = 1.0, hard: bool = False,
                   axis: int = -1) -> jax.Array:
    """A relaxed one-hot sample ``softmax((logits + g) / temperature)``, ``g ~ Gumbel(0, 1)``.

    Jang et al. 2017; Maddison et al. 2017. As ``temperature -> 0`` the sample becomes the one-hot
    ``argmax(logits + g)``, a draw from ``Categorical(softmax(logits))``; as it grows, uniform.

    Args:
      key: PRNG key.
      logits: unnormalised log-probabilities ``(..., n, ...)``, any batch dims.
      temperature: > 0; a Python number or an array (may be traced, e.g. an annealing schedule).
      hard: return the exact one-hot ``argmax(logits + g)`` with the soft sample's gradient
        (straight-through Gumbel-softmax).
      axis: the categorical axis.

    Returns:
      Array of the shape and dtype of ``logits`` on the simplex along ``axis``.

    Raises:
      ValueError: ``logits`` is a scalar, ``axis`` out of range, non-positive ``temperature``,
        missing ``key``.
    """
    _check_key(key)
    logits = as_float_array("logits", logits)
    if logits.ndim < 1:
        raise ValueError(f"`logits` must have at least 1 dimension, got shape {logits.shape}")
    axis = check_axis("axis", axis, logits.ndim)
    dtype, cdt = logits.dtype, _compute_dtype(logits.dtype)
    tau = _as_temperature(temperature, cdt)
    if logits.shape[axis] == 0:
        return logits
    z = logits.astype(cdt) + jax.random.gumbel(key, logits.shape, cdt)
    soft = tempered_softmax(z, tau, axis=axis)
    if hard:
        idx = jnp.argmax(z, axis=axis)
        one_hot = jnp.moveaxis(jax.nn.one_hot(idx, logits.shape[axis], dtype=cdt), -1, axis)
        # argmax hides a NaN behind a clean one-hot; NaN in must give NaN out
        one_hot = jnp.where(jnp.any(jnp.isnan(z), axis=axis, keepdims=True), jnp.nan, one_hot)
        soft = straight_through(one_hot, soft)
    return soft.astype(dtype)


def gumbel_sigmoid(key: jax.Array, logits: jax.Array, temperature: Any = 1.0,
                   hard: bool = False) -> jax.Array:
    """A relaxed Bernoulli (binary Concrete) sample ``sigmoid((logits + l) / temperature)``.

    Maddison et al. 2017 (binary Concrete); Jang et al. 2017. ``l ~ Logistic(0, 1)`` is the
    difference of two Gumbels, so ``P(logits + l > 0) = sigmoid(logits)``.

    Args:
      key: PRNG key.
      logits: log-odds of any shape (elementwise).
      temperature: > 0, Python number or array.
      hard: return the exact indicator ``logits + l > 0`` with the soft sample's gradient.

    Returns:
      Array of the shape and dtype of ``logits`` with values in [0, 1].

    Raises:
      ValueError: non-positive ``temperature``, missing ``key``.
    """
    _check_key(key)
    logits = as_float_array("logits", logits)
    dtype, cdt = logits.dtype, _compute_dtype(logits.dtype)
    tau = _as_temperature(temperature, cdt)
    z = logits.astype(cdt) + jax.random.logistic(key, logits.shape, cdt)
    soft = jax.nn.sigmoid(z / tau)
    if hard:
        soft = straight_through(jnp.where(jnp.isnan(z), jnp.nan, (z > 0).astype(cdt)), soft)
    return soft.astype(dtype)


def _log1m_softmax(b: jax.Array) -> jax.Array:
    """``log(1 - softmax(b))`` along the last axis, exact even where softmax saturates to 1.

    Only the largest entry can have ``p >= 1/2``; for it ``log(1 - p) = lse_{-max}(b) - lse(b)``
    written as ``d - softplus(d)`` with ``d = lse_{-max}(b) - b_max`` (no cancellation). The other
    entries use ``log1p(-p)``.
    """
    n = b.shape[-1]
    is_max = jax.nn.one_hot(jnp.argmax(b, axis=-1), n, dtype=bool)
    b_max = jnp.max(b, axis=-1, keepdims=True)
    # a finite stand-in for -inf keeps logsumexp's gradient defined when n == 1
    others = jnp.where(is_max, jnp.finfo(b.dtype).min, b)
    lse_others = jax.nn.logsumexp(others, axis=-1, keepdims=True)
    d = lse_others - b_max
    log1m_top = d - jax.nn.softplus(d)
    p = jax.nn.softmax(b, axis=-1)
    log1m_rest = jnp.log1p(-jnp.where(is_max, 0.0, p))
    return jnp.where(is_max, log1m_top, log1m_rest)


def relaxed_topk_mask(keys: jax.Array, k: int, temperature: Any) -> jax.Array:
    """Xie & Ermon's relaxed k-hot of deterministic ``keys`` along the last axis (sums to k).

    ``k`` successive softmaxes of ``a / temperature``; after each, ``a += log(1 - p)``.
    """
    def round_(carry, _):
        a, mask = carry
        # the shift is only for the softmax; keeping ``a`` unshifted keeps the precision of the
        # smaller keys when the largest is huge (e.g. 1e30)
        b = (a - jax.lax.stop_gradient(jnp.max(a, axis=-1, keepdims=True))) / temperature
        return (a + _log1m_softmax(b), mask + jax.nn.softmax(b, axis=-1)), None

    (_, mask), _ = jax.lax.scan(round_, (keys, jnp.zeros_like(keys)), None, length=k)
    return mask


_TOPK_RELAXATIONS = ("bounded", "sequential")


def bounded_topk_mask(keys: jax.Array, k: int, temperature: Any) -> jax.Array:
    """``sigmoid((keys - tau) / temperature)`` along the last axis, ``tau`` making the sum k.

    The maximiser of ``<y, keys> / temperature + sum_i H(y_i)`` (binary entropies) over
    ``{0 <= y <= 1, sum y = k}``: in [0, 1] by construction; the entropic top-k of Xie et al.
    (NeurIPS 2020), ``soft_topk_mask(method="ot")`` on unsquashed keys.  ``tau`` is found by
    bisection and differentiated by the implicit function theorem (``relax.topk``).
    """
    n = keys.shape[-1]
    if k == n:
        return jnp.ones_like(keys)
    big = jnp.finfo(keys.dtype).max / 8  # a -inf key (a masked item) stays out, without NaN
    return _ot_topk_mask(jnp.clip(keys, -big, big), temperature, k)


def gumbel_topk(key: jax.Array, logits: jax.Array, k: int, temperature: Any = 1.0,
                hard: bool = False, relaxation: str = "bounded") -> jax.Array:
    """A relaxed k-subset sample: a soft k-hot mask over the last axis, in [0, 1], summing to k.

    Gumbel-top-k (Kool et al. 2019): keys ``r = logits + g``, ``g`` Gumbel; the k-hot of
    ``top_k(r)`` is a sample of k items without replacement from ``softmax(logits)``
    (``hard=True`` returns it, with the soft mask's gradient). The soft mask relaxes it:

    * ``relaxation="bounded"`` (default): ``sigmoid((r - tau) / temperature)`` with ``tau``
      such that the mask sums to k (:func:`bounded_topk_mask`); every entry in [0, 1].
    * ``relaxation="sequential"``: Xie & Ermon 2019 (IJCAI), k rounds of
      ``p = softmax(r / temperature); mask += p; r += log(1 - p)``. It sums to k, but an entry
      that takes mass in several rounds can exceed 1, at any temperature once k >= 2
      (1.7 at temperature 0.5 for k = 3 of 6 equal logits); kept to reproduce that paper.

    Both reach the hard k-hot as ``temperature -> 0`` and ``k / n`` everywhere as it grows.

    Args:
      key: PRNG key.
      logits: ``(..., n)``, any leading batch dims.
      k: subset size, ``1 <= k <= n`` (static Python int).
      temperature: > 0, Python number or array.
      hard: return the exact k-hot of the Gumbel top-k with the soft mask's gradient.
      relaxation: "bounded" or "sequential" (see above).

    Returns:
      Array of the shape and dtype of ``logits`` whose last axis sums to ``k``.

    Raises:
      ValueError: ``logits`` is a scalar, ``k`` out of ``[1, n]``, non-positive ``temperature``,
        unknown ``relaxation``, missing ``key``. TypeError: ``k`` not an int.
    """
    _check_key(key)
    check_choice("relaxation", relaxation, _TOPK_RELAXATIONS)
    logits = as_float_array("logits", logits)
    if logits.ndim < 1:
        raise ValueError(f"`logits` must have at least 1 dimension, got shape {logits.shape}")
    n = logits.shape[-1]
    k = check_int_in_range("k", k, 1, max(n, 1))
    if n == 0:
        raise ValueError("`logits` must have at least one entry on its last axis for `k` >= 1")
    dtype, cdt = logits.dtype, _compute_dtype(logits.dtype)
    tau = _as_temperature(temperature, cdt)
    r = logits.astype(cdt) + jax.random.gumbel(key, logits.shape, cdt)
    if relaxation == "bounded":
        soft = bounded_topk_mask(r, k, tau)
    else:
        soft = relaxed_topk_mask(r, k, tau)
    soft = jnp.where(jnp.any(jnp.isnan(r), axis=-1, keepdims=True), jnp.nan, soft)
    if hard:
        soft = straight_through(hard_topk_mask(r, k), soft)
    return soft.astype(dtype)
