"""Sinkhorn sorting and ranking (Cuturi, Teboul & Vert, "Differentiable Ranks and Sorting using
Optimal Transport", NeurIPS 2019).

The n values, squashed to [0, 1], are transported onto m sorted targets ``y = linspace(0, 1, m)``
with uniform masses by entropy-regularised optimal transport (cost ``(x_i - y_j)^2``).  From the
plan ``P`` (n, m):

* soft sort  ``S = (P^T x) / (P^T 1)``  — the barycentric projection of the *raw* values on the
  targets (m of them, ascending);
* soft ranks ``R = n * (P / a) cumsum(b)`` — 1-based, in [1, n] when m = n.

``epsilon -> 0`` gives the hard operators (on distinct values).

The plan is computed by log-domain Sinkhorn iterations on the potentials (numerically stable for
any epsilon), written as a fixed point ``beta = T(beta, K)`` of the column potential alone
(``K = cost / epsilon``; the row potential is eliminated in closed form).  The forward loop is a
``lax.while_loop`` with a tolerance on the column marginals and a hard ``maxiter``; it starts at a
large temperature and lowers it geometrically to ``epsilon`` ("epsilon scaling"), which cuts the
iterations for small epsilon by orders of magnitude without changing the fixed point.

Gradients never unroll the loop: a ``custom_vjp`` applies the implicit function theorem at the
fixed point.  With ``B = diag(b)`` the adjoint system ``(I - dT/dbeta)^T u = g`` becomes, after
``u = B w``, the symmetric positive semi-definite system ``(B - P^T diag(1/a) P) w = g`` (a Schur
complement of the Hessian of the dual), solved by conjugate gradient through
:mod:`diffnas_jax._solvers`.  Its kernel is the constant vector (the potentials' gauge); the
right-hand side is orthogonal to it (the outputs are gauge invariant), so a rank-one term on the
constant direction fixes the gauge without changing the solution.

(:func:`diffnas_jax.relax.soft_topk_mask` with method "ot", Xie et al. 2020, is the two-target
case of the same problem, solved there in closed form up to a 1-D root.)
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from diffnas_jax import _solvers
from diffnas_jax.relax.sorting import _from_2d, _mask_nan_rows, _to_2d
from diffnas_jax._checks import (as_float_array, check_axis, check_choice, check_int_in_range,
                                 check_positive)

__all__ = ["sinkhorn_sort", "sinkhorn_rank"]

_DIRECTIONS = ("ASCENDING", "DESCENDING")
_SQUASHINGS = ("sigmoid", "minmax", "none")


# ----------------------------------------------------------------------------------------------
# Layout and dtype helpers.


def _compute_dtype(dtype) -> Any:
    # bfloat16/float16 potentials would lose the marginals entirely; float64 stays float64.
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def _default_tol(dtype) -> float:
    return 1e-10 if dtype == jnp.float64 else 1e-5


def squash(x: jax.Array, kind: str) -> jax.Array:
    """Map each row of ``x`` (batch, n) into [0, 1], invariant to the scale of ``x``.

    "sigmoid": ``sigmoid((x - mean) / std)`` (the paper's choice); "minmax": ``(x - min) /
    (max - min)``; "none": ``x`` unchanged (the caller promises values of order [0, 1]).
    Rows are first divided by their largest magnitude, so |x| = 1e30 neither overflows the
    variance nor loses the spread; constant rows map to 0.5 (sigmoid) or 0 (minmax).
    """
    if kind == "none":
        return x
    big = jnp.finfo(x.dtype).max / 4
    x = jnp.clip(x, -big, big)
    scale = lax.stop_gradient(jnp.max(jnp.abs(x), axis=-1, keepdims=True))
    z = x / jnp.where(scale > 0, scale, 1)
    if kind == "sigmoid":
        c = z - jnp.mean(z, axis=-1, keepdims=True)
        var = jnp.mean(c * c, axis=-1, keepdims=True)
        ok = var > 0
        std = jnp.sqrt(jnp.where(ok, var, 1))  # the where keeps sqrt'(0) out of the gradient
        return jax.nn.sigmoid(jnp.where(ok, c / std, 0))
    lo = jnp.min(z, axis=-1, keepdims=True)
    span = jnp.max(z, axis=-1, keepdims=True) - lo
    ok = span > 0
    return jnp.where(ok, (z - lo) / jnp.where(ok, span, 1), 0)


# ----------------------------------------------------------------------------------------------
# The Sinkhorn core on one problem: cost K = C / epsilon (n, m), log-marginals log_a (n,), log_b (m,).


def _row_potential(beta, K, log_a):
    return log_a - jax.nn.logsumexp(beta[None, :] - K, axis=1)


def _sinkhorn_map(beta, K, log_a, log_b):
    """One Sinkhorn sweep: rows exact for ``beta``, then the column potential that fixes columns."""
    alpha = _row_potential(beta, K, log_a)
    return log_b - jax.nn.logsumexp(alpha[:, None] - K, axis=0)


def _forward(K, log_a, log_b, tol, maxiter, scaling):
    # Epsilon scaling: run on lam * K with lam rising geometrically to 1.  A potential in units of
    # epsilon is rescaled with it (g = eps * beta is what stays put between temperatures).
    kmax = lax.stop_gradient(jnp.max(jnp.abs(K)))
    lam0 = jnp.where(kmax > 1, 1 / jnp.maximum(kmax, 1), 1) if scaling else jnp.ones_like(kmax)
    growth = 2.0

    def lam_at(t):
        return jnp.minimum(1, lam0 * growth ** t.astype(K.dtype))

    def cond(carry):
        t, _, err = carry
        return (t < maxiter) & ((err > tol) | (lam_at(t) < 1))

    def body(carry):
        t, beta, _ = carry
        lam, lam_next = lam_at(t), lam_at(t + 1)
        new = _sinkhorn_map(beta, lam * K, log_a, log_b)
        # beta - T(beta) is log(column sums / b) of the row-normalised plan of beta
        err = jnp.max(jnp.abs(new - beta))
        return t + 1, new * (lam_next / lam), err

    beta0 = jnp.zeros_like(log_b)
    t, beta, _ = lax.while_loop(cond, body, (jnp.int32(0), beta0, jnp.asarray(jnp.inf, K.dtype)))
    return beta, t


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fixed_point(K, log_a, log_b, tol, maxiter, scaling):
    return _forward(K, log_a, log_b, tol, maxiter, scaling)[0]


def _fixed_point_fwd(K, log_a, log_b, tol, maxiter, scaling):
    beta = _fixed_point(K, log_a, log_b, tol, maxiter, scaling)
    return beta, (beta, K, log_a, log_b)


def _fixed_point_bwd(tol, maxiter, scaling, res, g):
    beta, K, log_a, log_b = res
    m = beta.shape[0]
    b = jnp.exp(log_b)
    _, vjp_beta = jax.vjp(lambda v: _sinkhorn_map(v, K, log_a, log_b), beta)

    def matvec(w):
        # (I - dT/dbeta)^T B w = (B - P^T diag(1/a) P) w, plus a gauge term on the constant vector
        bw = b * w
        return bw - vjp_beta(bw)[0] + jnp.mean(w) * (1.0 / m)

    g = g - jnp.mean(g)  # exactly orthogonal to the kernel (it is, up to rounding)
    cg_tol = tol if g.dtype == jnp.float64 else max(tol, 1e-6)  # float32 stalls below ~1e-6
    w = _solvers.solve_cg(matvec, g, tol=cg_tol, maxiter=10 * m + 10)
    w = jnp.where(jnp.isfinite(w), w, 0)
    _, vjp_k = jax.vjp(lambda k: _sinkhorn_map(beta, k, log_a, log_b), K)
    return vjp_k(b * w)[0], jnp.zeros_like(log_a), jnp.zeros_like(log_b)


_fixed_point.defvjp(_fixed_point_fwd, _fixed_point_bwd)


def transport_plan(x: jax.Array, y: jax.Array, log_a: jax.Array, log_b: jax.Array,
                   epsilon: Any, tol: float, maxiter: int, scaling: bool = True) -> jax.Array:
    """Row-normalised entropic OT plan ``diag(1/a) P`` (batch, n, m) between each row of ``x``
    (batch, n) and the targets ``y`` (m,), differentiable by the implicit function theorem."""
    big = jnp.finfo(x.dtype).max / 8
    d = x[..., :, None] - y
    K = jnp.minimum(d * d / epsilon, big)  # stays finite for any epsilon and unsquashed input

    def one(k):
        beta = _fixed_point(k, log_a, log_b, tol, maxiter, scaling)
        logits = beta[None, :] - k
        return jax.nn.softmax(logits, axis=1)

    return jax.vmap(one)(K)


def _iterations(x, y, log_a, log_b, epsilon, tol, maxiter, scaling=True):
    """Sweeps the forward loop takes on each row (for benchmarks and tests)."""
    d = x[..., :, None] - y
    K = d * d / epsilon
    return jax.vmap(lambda k: _forward(k, log_a, log_b, tol, maxiter, scaling)[1])(K)


# ----------------------------------------------------------------------------------------------
# Public API.


def _prepare(values, epsilon, direction, squashing, num_targets, tol, maxiter, axis):
    values = as_float_array("values", values, min_ndim=1)
    check_positive("epsilon", epsilon)
    check_choice("direction", direction, _DIRECTIONS)
    check_choice("squashing", squashing, _SQUASHINGS)
    axis = check_axis("axis", axis, values.ndim)
    n = values.shape[axis]
    if num_targets is not None:
        num_targets = check_int_in_range("num_targets", num_targets, 1, 10**9)
    m = n if num_targets is None else num_targets
    cdt = _compute_dtype(values.dtype)
    tol = _default_tol(cdt) if tol is None else tol
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"`tol` must be a Python float, got {type(tol).__name__}")
    check_positive("tol", tol)
    maxiter = check_int_in_range("maxiter", maxiter, 1, 10**7)
    return values, axis, n, m, cdt, float(tol), maxiter


# jit so that eager calls reuse one compilation per shape (the loops close over fresh functions)
@functools.partial(jax.jit, static_argnames=("m", "squashing", "tol", "maxiter", "scaling"))
def _plan(x, epsilon, m, squashing, tol, maxiter, scaling):
    n = x.shape[-1]
    xs = squash(x, squashing)
    y = jnp.linspace(0, 1, m, dtype=x.dtype) if m > 1 else jnp.full((1,), 0.5, x.dtype)
    log_a = jnp.full((n,), -math.log(n), x.dtype)
    log_b = jnp.full((m,), -math.log(m), x.dtype)
    return transport_plan(xs, y, log_a, log_b, jnp.asarray(epsilon, x.dtype), tol, maxiter, scaling)


def sinkhorn_sort(
    values: jax.Array,
    epsilon: float | jax.Array = 1e-2,
    direction: str = "ASCENDING",
    *,
    num_targets: int | None = None,
    squashing: str = "sigmoid",
    tol: float | None = None,
    maxiter: int = 1000,
    epsilon_scaling: bool = True,
    axis: int = -1,
) -> jax.Array:
    """Soft sort by entropic optimal transport (Cuturi, Teboul & Vert, NeurIPS 2019, Eq. 6).

    ``S = (P^T x) / (P^T 1)`` with ``P`` the Sinkhorn plan between the squashed values and
    ``m`` sorted targets on [0, 1]: each output is a convex combination of the raw values, so it
    stays within ``[min x, max x]``.  ``epsilon -> 0`` gives ``sort(x)`` (m = n, distinct values);
    a large ``epsilon`` gives ``mean(x)`` everywhere.  O(n m) per Sinkhorn sweep.

    Args:
      values: (..., n) array; any leading batch dimensions.
      epsilon: entropic regularisation > 0, in units of the squashed cost (which lies in [0, 1]).
      direction: "ASCENDING" or "DESCENDING".
      num_targets: m, the number of sorted outputs (default n: a full soft sort; fewer give soft
        quantiles).
      squashing: "sigmoid" (standardise, then sigmoid; the paper's choice), "minmax" or "none"
        (values already in about [0, 1]).
      tol: stop when every column marginal is within relative ``tol`` (default 1e-5 in 32-bit,
        1e-10 in float64); also the CG tolerance of the backward pass.
      maxiter: hard cap on the Sinkhorn sweeps.
      epsilon_scaling: start at a high temperature and lower it to ``epsilon`` (same fixed point,
        far fewer sweeps for small ``epsilon``).
      axis: the axis to sort along.
    Returns:
      Array of the dtype of ``values`` with ``m`` entries along ``axis``.
    """
    values, axis, n, m, cdt, tol, maxiter = _prepare(values, epsilon, direction, squashing,
                                                     num_targets, tol, maxiter, axis)
    if n == 0:
        return values
    dtype = values.dtype
    x, lead = _to_2d(values.astype(cdt), axis)
    x, nan_rows = _mask_nan_rows(x)
    sign = 1.0 if direction == "ASCENDING" else -1.0
    big = jnp.finfo(cdt).max / (4 * n)  # the barycentre sums n terms
    x = jnp.clip(sign * x, -big, big)
    p = _plan(x, epsilon, m, squashing, tol, maxiter, epsilon_scaling)  # (batch, n, m), rows sum to 1
    col = jnp.sum(p, axis=1)
    col = jnp.where(col > 0, col, 1)
    out = sign * jnp.einsum("bnm,bn->bm", p, x) / col
    out = jnp.where(nan_rows, jnp.nan, out)
    return _from_2d(out, lead, axis, values.ndim).astype(dtype)


def sinkhorn_rank(
    values: jax.Array,
    epsilon: float | jax.Array = 1e-2,
    direction: str = "ASCENDING",
    *,
    num_targets: int | None = None,
    squashing: str = "sigmoid",
    tol: float | None = None,
    maxiter: int = 1000,
    epsilon_scaling: bool = True,
    axis: int = -1,
) -> jax.Array:
    """Soft ranks (1-based) by entropic optimal transport (Cuturi, Teboul & Vert, NeurIPS 2019,
    Eq. 6).

    ``R = n * (P / a) cumsum(b)``: the expected rank of each value under the row-normalised
    Sinkhorn plan onto ``m`` sorted targets, in ``[n/m, n]``.  ``epsilon -> 0`` gives the hard
    ranks (1 for the smallest value when ``ASCENDING``); a large ``epsilon`` gives the mean
    rank.  Permutation equivariant.

    Args:
      values: (..., n) array; any leading batch dimensions.
      epsilon: entropic regularisation > 0, in units of the squashed cost (which lies in [0, 1]).
      direction: "ASCENDING" (the largest value gets rank n) or "DESCENDING".
      num_targets: m, the number of targets (default n).
      squashing, tol, maxiter, epsilon_scaling, axis: as in :func:`sinkhorn_sort`.
    Returns:
      Array of the shape and dtype of ``values``.
    """
    values, axis, n, m, cdt, tol, maxiter = _prepare(values, epsilon, direction, squashing,
                                                     num_targets, tol, maxiter, axis)
    if n == 0:
        return values
    dtype = values.dtype
    x, lead = _to_2d(values.astype(cdt), axis)
    x, nan_rows = _mask_nan_rows(x)
    sign = 1.0 if direction == "ASCENDING" else -1.0
    p = _plan(sign * x, epsilon, m, squashing, tol, maxiter, epsilon_scaling)
    cum = jnp.arange(1, m + 1, dtype=cdt) * (n / m)
    out = jnp.einsum("bnm,m->bn", p, cum)
    out = jnp.where(nan_rows, jnp.nan, out)
    return _from_2d(out, lead, axis, values.ndim).astype(dtype)
