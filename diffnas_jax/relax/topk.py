"""Soft top-k masks: a relaxed k-hot indicator of the k largest values.

Two constructions, chosen by ``method``:

* ``"sparse"`` — Sander, Puigcerver, Djolonga, Peyré & Blondel, "Fast, Differentiable and Sparse
  Top-k: a Convex Analysis Perspective", ICML 2023, with the l2 (p = 2) regulariser: the
  Euclidean projection of ``values / regularization_strength`` onto the capped simplex
  ``{0 <= y <= 1, sum(y) = k}`` (the permutahedron of ``(1, ..., 1, 0, ..., 0)``), so
  ``y_i = clip(values_i / s - tau, 0, 1)`` with the threshold ``tau`` that makes the sum k.
  Exact, sparse (entries are exactly 0 or 1 away from the boundary of the top-k set) and
  O(n log n): ``tau`` is found among the 2n breakpoints of the piecewise-linear ``sum(y)(tau)``
  with one sort and prefix sums, no iterations. Its Jacobian is that of a projection:
  ``(I - 1 1^T / |S|) / s`` on the free set ``S = {0 < y < 1}``, zero elsewhere (a ``custom_jvp``).
* ``"ot"`` — Xie, Dai, Chen, Dai, Zhao, Zha, Wei & Pfister, "Differentiable Top-k with Optimal
  Transport", NeurIPS 2020: entropic OT of the n (squashed) values with mass 1/n each onto two
  targets 0 and 1 with masses ``(n - k)/n`` and ``k/n``; the mask is ``n`` times the mass sent to
  target 1. Smooth and dense. With two targets the Sinkhorn fixed point has one free dual
  variable, so it is computed exactly by a 1-D bisection (no Sinkhorn sweeps, which need
  O(1/epsilon) iterations) and differentiated by the implicit function theorem.

Both masks lie in [0, 1], sum to k along the axis, and become the hard k-hot of ``top_k`` as
the regularisation goes to 0 (for distinct values).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from diffnas_jax._checks import as_float_array, check_axis, check_choice, check_int_in_range, check_positive
from diffnas_jax.relax import sinkhorn as _sk

__all__ = ["soft_topk_mask", "hard_topk_mask"]

_METHODS = ("sparse", "ot")


# ----------------------------------------------------------------------------------------------
# Sparse top-k: projection onto the capped simplex, rows of a (batch, n) array.


def _capped_simplex_threshold(z: jax.Array, k: int) -> jax.Array:
    """``tau`` (batch, 1) with ``sum(clip(z - tau, 0, 1)) == k`` for each row of ``z`` (batch, n).

    ``f(tau) = sum_i clip(z_i - tau, 0, 1)`` is continuous, non-increasing and linear between the
    breakpoints ``{z_i} U {z_i - 1}``; evaluate it at every breakpoint with prefix sums over the
    sorted ``z``, take the last breakpoint where ``f >= k`` and interpolate to the next one.
    """
    n = z.shape[-1]
    zs = jnp.sort(z, axis=-1)
    zero = jnp.zeros(zs.shape[:-1] + (1,), z.dtype)
    prefix = jnp.concatenate([zero, jnp.cumsum(zs, axis=-1)], axis=-1)  # (batch, n + 1)
    bp = jnp.sort(jnp.concatenate([zs, zs - 1], axis=-1), axis=-1)  # (batch, 2n), ascending

    def f_row(zs_r, prefix_r, bp_r):
        lo = jnp.searchsorted(zs_r, bp_r, side="right")  # first z > tau
        hi = jnp.searchsorted(zs_r, bp_r + 1, side="left")  # first z >= tau + 1
        hi = jnp.maximum(hi, lo)
        partial = prefix_r[hi] - prefix_r[lo] - (hi - lo).astype(z.dtype) * bp_r
        return (n - hi).astype(z.dtype) + partial

    f = jax.vmap(f_row)(zs, prefix, bp)  # non-increasing along the breakpoints
    # f(bp[0]) = f(min z - 1) = n >= k and f(bp[-1]) = f(max z) = 0 < k: a crossing exists
    j = jnp.sum(f >= k, axis=-1, keepdims=True) - 1
    j = jnp.clip(j, 0, 2 * n - 2)
    t0, t1 = jnp.take_along_axis(bp, j, -1), jnp.take_along_axis(bp, j + 1, -1)
    f0, f1 = jnp.take_along_axis(f, j, -1), jnp.take_along_axis(f, j + 1, -1)
    drop = f0 - f1
    frac = jnp.where(drop > 0, (f0 - k) / jnp.where(drop > 0, drop, 1), 0)
    return t0 + jnp.clip(frac, 0, 1) * (t1 - t0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _capped_simplex_projection(z: jax.Array, k: int) -> jax.Array:
    tau = _capped_simplex_threshold(z, k)
    return jnp.clip(z - tau, 0, 1)


@_capped_simplex_projection.defjvp
def _capped_simplex_projection_jvp(k, primals, tangents):
    (z,), (dz,) = primals, tangents
    y = _capped_simplex_projection(z, k)
    # y_i = z_i - tau on the free set, tau keeps the sum at k: d tau = mean of dz over the free set
    free = ((y > 0) & (y < 1)).astype(z.dtype)
    count = jnp.sum(free, axis=-1, keepdims=True)
    mean = jnp.sum(free * dz, axis=-1, keepdims=True) / jnp.maximum(count, 1)
    return y, free * (dz - mean)


@functools.partial(jax.jit, static_argnums=(1,))  # one compilation per shape for eager calls
def _sparse_topk(x: jax.Array, k: int, strength: Any) -> jax.Array:
    # The threshold tau lies in [z_(k) - 1, z_(k)] (z_(k) the k-th largest of z = x / strength):
    # entries below z_(k) - 1 are 0 and entries above z_(k) + 1 are 1 whatever their size, so z
    # is taken relative to z_(k) and clamped to [-2, 2]. That changes no output, but keeps the
    # prefix sums exact: a score of -1e9 next to scores of order 1 used to shift the sum to 2.09.
    # The projection is shift invariant, so the shift carries no gradient.
    kth = jax.lax.stop_gradient(jax.lax.top_k(x, k)[0][..., -1:])
    d = x - kth
    d = jnp.where(jnp.isnan(d), 0, d)  # an infinite k-th value: the infinities tie
    return _capped_simplex_projection(jnp.clip(d / strength, -2, 2), k)


# ----------------------------------------------------------------------------------------------
# OT top-k. With two targets the entropic plan has one free dual variable: the row-normalised
# plan's share of item i at target 1 is sigmoid((u_i - t) / epsilon), u_i = 2 x_i - 1 (the cost
# difference (x_i - 0)^2 - (x_i - 1)^2), and the column marginal k/n fixes the threshold t. So the
# Sinkhorn fixed point is a monotone 1-D root, found by bisection to machine precision for any
# epsilon (Sinkhorn sweeps converge in O(1/epsilon) and stall for tiny epsilon).

_BISECTION_STEPS = 160  # halves a span of up to ~1e48 down to float64 resolution


def _sigmoid_threshold(u: jax.Array, epsilon: jax.Array, k: int) -> jax.Array:
    """``t`` (batch, 1) with ``sum_i sigmoid((u_i - t) / epsilon) == k`` for each row of ``u``."""
    n = u.shape[-1]
    # With L = log(n) + 2 (so sigmoid(-L) < 1 / (e^2 n)): at t = u_(k+1) - L eps the k + 1
    # largest terms each exceed 1 - 1 / (e^2 n), so the sum exceeds k; at t = u_(k) + L eps the
    # k - 1 largest give at most k - 1 and the others less than 1 / (e^2 n) each, so the sum is
    # below k. The bracket spans the gap between the k-th and (k+1)-th values, not the whole
    # range, so a far outlier (a masked -inf key) costs no bisection steps.
    margin = epsilon * (math.log(n) + 2.0)
    top = jax.lax.top_k(jax.lax.stop_gradient(u), k + 1)[0]
    lo = top[..., k:k + 1] - margin
    hi = top[..., k - 1:k] + margin

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        above = jnp.sum(jax.nn.sigmoid((u - mid) / epsilon), axis=-1, keepdims=True) > k
        return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, body, (lo, hi))
    # lo and hi end as neighbouring floats; their midpoint may round onto a value u_i, which then
    # gets 1/2 however small epsilon is: return the end whose sum is nearer k
    def gap(t):
        return jnp.abs(jnp.sum(jax.nn.sigmoid((u - t) / epsilon), axis=-1, keepdims=True) - k)
    return jnp.where(gap(lo) < gap(hi), lo, hi)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _threshold(u: jax.Array, epsilon: jax.Array, k: int) -> jax.Array:
    return _sigmoid_threshold(u, epsilon, k)


@_threshold.defjvp
def _threshold_jvp(k, primals, tangents):
    # implicit function theorem on sum_i sigmoid(z_i) = k, z = (u - t) / epsilon: the tangent of t
    # is the slope-weighted mean of du - z deps; written with t itself, so it differentiates again
    (u, epsilon), (du, deps) = primals, tangents
    t = _threshold(u, epsilon, k)
    z = (u - t) / epsilon
    m = jax.nn.sigmoid(z)
    slope = m * (1 - m)
    total = jnp.sum(slope, axis=-1, keepdims=True)
    dt = jnp.sum(slope * (du - z * deps), axis=-1, keepdims=True) / jnp.where(total > 0, total, 1)
    return t, dt


@functools.partial(jax.jit, static_argnums=(2,))
def _ot_topk_mask(u: jax.Array, epsilon: jax.Array, k: int) -> jax.Array:
    # relative to the k-th largest value, so the threshold sits where float32 resolves it (keys
    # of 1e4 at epsilon 0.1 gave sums 1e-3 off); the mask is shift invariant
    u = u - jax.lax.stop_gradient(jax.lax.top_k(u, k)[0][..., -1:])
    return jax.nn.sigmoid((u - _threshold(u, epsilon, k)) / epsilon)


# ----------------------------------------------------------------------------------------------
# Public API.


def hard_topk_mask(values: jax.Array, k: int, axis: int = -1) -> jax.Array:
    """The exact k-hot mask of the ``k`` largest entries along ``axis`` (ties: lower index first).

    The limit of :func:`soft_topk_mask` as its regularisation goes to 0; zero gradient.

    Args:
      values: (..., n) array.
      k: 0 <= k <= n.
      axis: the axis to select along.
    Returns:
      Array of the shape and dtype of ``values`` with k ones along ``axis``.
    """
    values = as_float_array("values", values, min_ndim=1)
    axis = check_axis("axis", axis, values.ndim)
    n = values.shape[axis]
    k = check_int_in_range("k", k, 0, n)
    x = jnp.moveaxis(values, axis, -1)
    if k == 0:
        return jnp.zeros_like(values)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(x), k)
    mask = jnp.sum(jax.nn.one_hot(idx, n, dtype=values.dtype), axis=-2)
    mask = jnp.where(jnp.any(jnp.isnan(x), axis=-1, keepdims=True), jnp.nan, mask)
    return jnp.moveaxis(mask, -1, axis)


def soft_topk_mask(
    values: jax.Array,
    k: int,
    method: str = "sparse",
    *,
    regularization_strength: float | jax.Array = 1.0,
    epsilon: float | jax.Array = 1e-2,
    squashing: str = "sigmoid",
    axis: int = -1,
) -> jax.Array:
    """A relaxed k-hot mask of the ``k`` largest values: in [0, 1], summing to ``k``.

    ``method="sparse"`` (Sander et al., ICML 2023, l2 regulariser): the projection of
    ``values / regularization_strength`` onto ``{0 <= y <= 1, sum y = k}``; exact, O(n log n),
    with exact zeros and ones; ``regularization_strength -> 0`` gives :func:`hard_topk_mask`, a
    large strength gives ``k / n`` everywhere. ``method="ot"`` (Xie et al., NeurIPS 2020):
    entropic OT of the squashed values onto the targets {0, 1} with masses ((n-k)/n, k/n),
    controlled by ``epsilon`` (in units of the squashed cost, which lies in [0, 1]). With two
    targets the Sinkhorn fixed point is a 1-D root (the mask is ``sigmoid((2 x_i - 1 - t) /
    epsilon)`` with the threshold ``t`` that makes the sum k), found by bisection for any epsilon
    and differentiated by the implicit function theorem.

    Args:
      values: (..., n) scores; any leading batch dimensions.
      k: number of items to keep, 1 <= k <= n (static Python int).
      method: "sparse" or "ot".
      regularization_strength: > 0, for "sparse" (in the units of ``values``).
      epsilon: > 0, for "ot".
      squashing: for "ot", how values are mapped to [0, 1] ("sigmoid", "minmax", "none"; see
        :func:`diffnas_jax.relax.sinkhorn_sort`).
      axis: the axis to select along.
    Returns:
      Array of the shape and dtype of ``values``; sums to ``k`` along ``axis``.
    Raises:
      ValueError: unknown ``method`` or ``squashing``, ``k`` out of range, non-positive
        ``regularization_strength`` / ``epsilon``, scalar ``values``. TypeError: ``k`` not an int.
    """
    values = as_float_array("values", values, min_ndim=1)
    check_choice("method", method, _METHODS)
    check_positive("regularization_strength", regularization_strength)
    check_positive("epsilon", epsilon)
    check_choice("squashing", squashing, _sk._SQUASHINGS)
    axis = check_axis("axis", axis, values.ndim)
    n = values.shape[axis]
    if n == 0:
        raise ValueError("`values` must have at least one entry along `axis` to select k >= 1 of them")
    k = check_int_in_range("k", k, 1, n)
    dtype, cdt = values.dtype, _sk._compute_dtype(values.dtype)
    if k == n:  # everything is selected; the OT target "drop" would have zero mass
        return jnp.ones_like(values)
    x, lead = _sk._to_2d(values.astype(cdt), axis)
    nan_rows = jnp.any(jnp.isnan(x), axis=-1, keepdims=True)
    x = jnp.where(nan_rows, 0, x)
    if method == "sparse":
        out = _sparse_topk(x, k, jnp.asarray(regularization_strength, cdt))
    else:
        big = jnp.finfo(cdt).max / 4
        u = 2 * _sk.squash(jnp.clip(x, -big, big), squashing) - 1
        out = _ot_topk_mask(u, jnp.asarray(epsilon, cdt), k)
    out = jnp.where(nan_rows, jnp.nan, out)  # NaN in gives NaN out, never a plausible mask
    return _sk._from_2d(out, lead, axis, values.ndim).astype(dtype)
