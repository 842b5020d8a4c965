"""Differentiable sorting networks (Petersen, Borgelt, Kuehne & Deussen, ICML 2021 and ICLR 2022).

A sorting network is a fixed sequence of layers of disjoint compare-and-swap operations.  The
relaxation replaces each comparator ``(a, b) -> (min, max)`` by the convex mixture

    alpha = F(b - a),   min = alpha a + (1 - alpha) b,   max = (1 - alpha) a + alpha b,

with ``F`` a sigmoid-shaped CDF scaled by ``steepness`` ("logistic", "logistic_phi", "gaussian",
"reciprocal", "cauchy", "optimal"; the last four are the monotonic ones of the ICLR 2022 paper).
Every layer is a doubly-stochastic matrix; their product is the relaxed permutation matrix.

Outputs equal the authors' code (``Felix-Petersen/diffsort``), including its convention for
bitonic networks on ``n`` that is not a power of two: the network is built on ``2**ceil(log2 n)``
wires whose first wires are virtual, and a comparator touching a virtual wire is the identity
(virtual values never mix into real ones, unlike padding with large finite values, which would
leak ``O(1/steepness)`` through heavy-tailed sigmoids such as the Cauchy CDF).

How it is made fast under XLA (see BUILD_NOTES.md for the numbers against diffsort):

* A layer never builds its (n, n) matrix.  Its comparators join wires at a fixed stride, so a
  static reshape splits the wires into "low" and "high" halves and the layer is a handful of
  elementwise operations on the values (batch, n) and on the permutation (batch, n, n).
* The permutation is carried wire-major (row ``j`` = input weights of output wire ``j``), so a
  comparator mixes two contiguous rows.
* The odd-even transposition network repeats two layers, so it runs as one ``lax.scan`` over
  pairs of layers (compile time independent of ``n``); the bitonic network has
  ``log2(n) (log2(n) + 1) / 2`` distinct layers and is unrolled.
* Reverse mode through the permutation keeps one (batch, n, n) matrix per layer; the scan is
  split into chunks of about ``sqrt(layers)`` whose insides are recomputed in the backward pass
  (``jax.checkpoint``), so memory grows as ``sqrt(layers)`` matrices.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffnas_jax._checks import as_float_array, check_axis, check_choice, check_positive

__all__ = ["sorting_network", "NETWORKS", "DISTRIBUTIONS"]

NETWORKS = ("odd_even", "bitonic")
DISTRIBUTIONS = ("logistic", "logistic_phi", "gaussian", "reciprocal", "cauchy", "optimal")


def _compute_dtype(dtype) -> Any:
    # bfloat16/float16 comparators lose too much over O(n) layers; float64 stays float64.
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _alpha(diff: jax.Array, distribution: str, steepness, art_lambda) -> jax.Array:
    """Relaxed probability that ``a <= b`` given ``diff = b - a`` (F(0) = 1/2 exactly)."""
    if distribution == "logistic":
        return jax.nn.sigmoid(diff * steepness)
    if distribution == "logistic_phi":
        # ICML 2021 "activation replacement trick": flattens F near 0 by |b - a|**lambda.
        return jax.nn.sigmoid(diff * steepness / (jnp.abs(diff) + 1e-10) ** art_lambda)
    v = steepness * diff
    if distribution == "gaussian":
        return 0.5 + 0.5 * lax.erf(v / math.sqrt(2.0))
    if distribution == "reciprocal":
        return 0.5 * (v / (2.0 + jnp.abs(v)) + 1.0)
    if distribution == "cauchy":
        return jnp.arctan(v) / math.pi + 0.5
    if distribution == "optimal":
        # ICLR 2022, eq. for the optimal monotonic sigmoid: linear on [-1/4, 1/4], then
        # 1 - 1/(16|v|) tails.  The double `where` keeps gradients finite at v = 0.
        outer = jnp.abs(v) > 0.25
        safe = jnp.where(outer, jnp.abs(v), 1.0)
        tail = jnp.where(outer, jnp.sign(v) * (0.25 - 1.0 / 16.0 / (safe + 1e-10)), 0.0)
        return jnp.clip(v, -0.25, 0.25) + 0.5 + tail
    raise AssertionError(distribution)  # validated by the caller


# ----------------------------------------------------------------------------------------------
# One layer: comparators between wires `lo` and `hi` at a fixed stride.


def _mix(lo, hi, w_lo, w_hi, keep):
    """``new_lo = w_lo lo + w_hi hi``, ``new_hi = w_hi lo + w_lo hi``; ``keep`` = identity."""
    new_lo = w_lo * lo + w_hi * hi
    new_hi = w_hi * lo + w_lo * hi
    if keep is not None:
        new_lo = jnp.where(keep, lo, new_lo)
        new_hi = jnp.where(keep, hi, new_hi)
    return new_lo, new_hi


def _weights(lo, hi, reverse, alpha_fn):
    alpha = alpha_fn(hi - lo)
    beta = 1.0 - alpha
    if reverse is None:
        return alpha, beta
    # A reversed comparator sends the min to the high wire (diffsort's rounding kept).
    return jnp.where(reverse, beta, alpha), jnp.where(reverse, alpha, beta)


def _odd_even_layer(x, p, parity: int, alpha_fn):
    """Comparators (i, i+1) for i = parity, parity+2, ...; wires outside them are unchanged."""
    n = x.shape[-1]
    pairs = (n - parity) // 2
    if pairs == 0:
        return x, p
    s, e = parity, parity + 2 * pairs
    xs = x[:, s:e].reshape(x.shape[0], pairs, 2)
    w_lo, w_hi = _weights(xs[..., 0], xs[..., 1], None, alpha_fn)
    nlo, nhi = _mix(xs[..., 0], xs[..., 1], w_lo, w_hi, None)
    mid = jnp.stack([nlo, nhi], axis=-1).reshape(x.shape[0], 2 * pairs)
    x = jnp.concatenate([x[:, :s], mid, x[:, e:]], axis=1)
    if p is not None:
        ps = p[:, s:e].reshape(p.shape[0], pairs, 2, p.shape[-1])
        plo, phi = _mix(ps[:, :, 0], ps[:, :, 1], w_lo[..., None], w_hi[..., None], None)
        pmid = jnp.stack([plo, phi], axis=2).reshape(p.shape[0], 2 * pairs, p.shape[-1])
        p = jnp.concatenate([p[:, :s], pmid, p[:, e:]], axis=1)
    return x, p


def _bitonic_layer(x, p, block: int, layer: int, pad: int, alpha_fn):
    """Layer ``layer`` of merge block ``block`` on ``N = x.shape[-1]`` (a power of two) wires."""
    b, N = x.shape
    m = 2 ** (block - layer)
    chunks = N // (2 * m)
    starts = np.arange(chunks) * 2 * m
    reverse = ((starts // 2 ** (block + 1)) % 2 == 1)[:, None]  # (chunks, 1)
    keep = (starts[:, None] + np.arange(m)[None, :]) < pad  # comparator touches a virtual wire
    reverse = jnp.asarray(reverse) if reverse.any() else None
    keep = jnp.asarray(keep) if keep.any() else None
    xs = x.reshape(b, chunks, 2, m)
    w_lo, w_hi = _weights(xs[:, :, 0], xs[:, :, 1], reverse, alpha_fn)
    nlo, nhi = _mix(xs[:, :, 0], xs[:, :, 1], w_lo, w_hi, keep)
    x = jnp.stack([nlo, nhi], axis=2).reshape(b, N)
    if p is not None:
        ps = p.reshape(b, chunks, 2, m, p.shape[-1])
        kp = None if keep is None else keep[..., None]
        plo, phi = _mix(ps[:, :, 0], ps[:, :, 1], w_lo[..., None], w_hi[..., None], kp)
        p = jnp.stack([plo, phi], axis=2).reshape(b, N, p.shape[-1])
    return x, p


# ----------------------------------------------------------------------------------------------
# Whole networks on (batch, n) arrays; `p` is wire-major (batch, wires, inputs).


def _run_odd_even(x, p, alpha_fn):
    n = x.shape[-1]
    rounds = n // 2  # the network has n layers: even, odd, even, ...

    def two_layers(carry):
        cx, cp = carry
        cx, cp = _odd_even_layer(cx, cp, 0, alpha_fn)
        return _odd_even_layer(cx, cp, 1, alpha_fn)

    if rounds > 0:
        # Chunks of ~sqrt(rounds) pairs of layers, each rematerialised in the backward pass, so
        # reverse mode stores O(sqrt(n)) permutation matrices rather than O(n).
        inner = max(1, int(math.isqrt(rounds)))
        outer, rest = divmod(rounds, inner)

        def chunk(carry, _):
            def body(c, _):
                return two_layers(c), None

            carry, _ = lax.scan(body, carry, None, length=inner)
            return carry, None

        chunk = jax.checkpoint(chunk, prevent_cse=False)
        carry, _ = lax.scan(chunk, (x, p), None, length=outer)
        if rest:
            carry, _ = lax.scan(lambda c, _: (two_layers(c), None), carry, None, length=rest)
        x, p = carry
    if n % 2 == 1:
        x, p = _odd_even_layer(x, p, 0, alpha_fn)
    return x, p


def _run_bitonic(x, p, alpha_fn):
    b, n = x.shape
    blocks = max(0, (n - 1).bit_length())
    N = 2**blocks
    pad = N - n
    if pad:
        x = jnp.concatenate([jnp.zeros((b, pad), x.dtype), x], axis=1)
        if p is not None:
            p = jnp.concatenate([jnp.zeros((b, pad, n), p.dtype), p], axis=1)
    for block in range(blocks):
        for layer in range(block + 1):
            x, p = _bitonic_layer(x, p, block, layer, pad, alpha_fn)
    if pad:
        x = x[:, pad:]
        p = None if p is None else p[:, pad:]
    return x, p


def sorting_network(
    values: jax.Array,
    network: str = "odd_even",
    steepness: float | jax.Array = 10.0,
    distribution: str = "cauchy",
    art_lambda: float | jax.Array = 0.25,
    axis: int = -1,
    *,
    return_permutation: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
    """Relaxed sort by a differentiable sorting network (Petersen et al. 2021; 2022).

    Args:
      values: array (..., n, ...) sorted along ``axis``.
      network: ``"odd_even"`` (odd-even transposition, n layers) or ``"bitonic"``
        (``ceil(log2 n)(ceil(log2 n)+1)/2`` layers; any n, see the module docstring).
      steepness: inverse temperature of the comparator sigmoid (> 0; larger = closer to hard).
      distribution: comparator sigmoid: ``"logistic"``, ``"logistic_phi"`` (with
        ``art_lambda``), ``"gaussian"``, ``"reciprocal"``, ``"cauchy"`` or ``"optimal"``.
      art_lambda: exponent of the activation replacement trick of ``"logistic_phi"``.
      axis: the axis to sort.
      return_permutation: if False, skip the (n, n) matrices and return ``None`` for them.

    Returns:
      ``(sorted, permutation)``: ``sorted`` has the shape of ``values`` (ascending along
      ``axis``); ``permutation`` has shape ``batch + (n, n)``, where ``batch`` is the shape of
      ``values`` without ``axis``, is doubly stochastic, and satisfies
      ``sorted == einsum('...i,...ij->...j', values, permutation)`` (values moved to the last
      axis).  Both keep the dtype of ``values``.
    """
    network = check_choice("network", network, NETWORKS)
    distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
    check_positive("steepness", steepness)
    if distribution == "logistic_phi":
        check_positive("art_lambda", art_lambda)
    values = as_float_array("values", values, min_ndim=1)
    axis = check_axis("axis", axis, values.ndim)
    dtype = values.dtype
    ct = _compute_dtype(dtype)
    moved = jnp.moveaxis(values, axis, -1)
    lead, n = moved.shape[:-1], moved.shape[-1]
    x = moved.reshape((math.prod(lead), n)).astype(ct)
    steep = jnp.asarray(steepness, ct)
    lam = jnp.asarray(art_lambda, ct)

    def alpha_fn(diff):
        return _alpha(diff, distribution, steep, lam)

    p = None
    if return_permutation:
        p = jnp.broadcast_to(jnp.eye(n, dtype=ct), (x.shape[0], n, n))
    run = _run_odd_even if network == "odd_even" else _run_bitonic
    x, p = run(x, p, alpha_fn)
    sorted_values = jnp.moveaxis(x.astype(dtype).reshape(lead + (n,)), -1, axis)
    if p is None:
        return sorted_values, None
    perm = jnp.swapaxes(p, -1, -2).astype(dtype).reshape(lead + (n, n))
    return sorted_values, perm
