"""Property-based tests (hypothesis) of every public operator of ``diffnas_jax.relax``.

Inputs span magnitudes 1e-30..1e30, regularisation / temperature 1e-8..1e8, ties, constant
rows, -inf entries, NaN rows, leading batch dimensions and ``axis``, in float32 (the user's
default), bfloat16 and float64. Each test checks the invariants that define its operator, and
that outputs and gradients are finite wherever the inputs are.

Speed: every new shape or dtype recompiles, so the drawn shapes come from a small set and each
operator is called through one jitted function whose strength / temperature is a traced argument.
The fixed CI profile draws a fixed number of examples (``derandomize``); set
``DIFFNAS_HYPOTHESIS_PROFILE=long`` for a longer search (n up to 4096 drawn more often too).
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffnas_jax import relax
from diffnas_jax.relax import (entmax15, gumbel_sigmoid, gumbel_softmax, gumbel_topk, hard_topk_mask, isotonic_kl,
                               isotonic_l2, neural_sort, perturbed_argmax, perturbed_topk, sinkhorn_rank,
                               sinkhorn_sort, soft_kendall_tau, soft_permutation, soft_rank, soft_sort,
                               soft_spearman, soft_topk_mask, sorting_network, sparsemax, ste_ceil, ste_round,
                               ste_sign, straight_through)

_COMMON = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
settings.register_profile("ci", max_examples=5, **_COMMON)
settings.register_profile("long", max_examples=300, **_COMMON)
PROFILE = os.environ.get("DIFFNAS_HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
LONG = PROFILE == "long"

F32 = np.float32
SIZES = (1, 7, 64) + ((2, 4096) if LONG else ())
BATCH = 3
KEY = jax.random.key(0)


# ----------------------------------------------------------------------------------------------
# Strategies.


@st.composite
def rows(draw, sizes=SIZES, batch=BATCH, dtype=F32, neginf=False, min_n=1):
    """(batch, n) values: one magnitude in 1e-30..1e30, with ties, a constant row, an outlier up
    to 1e30 times larger, or (``neginf``) masked -inf entries."""
    n = draw(st.sampled_from([s for s in sizes if s >= min_n]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((batch, n))
    kind = draw(st.sampled_from(["plain", "ties", "constant", "outlier"]))
    if kind == "ties":
        x = np.round(x * 2) / 2
    elif kind == "constant":
        x[0] = x[0, 0]
    elif kind == "outlier":
        x[:, 0] *= 10.0 ** draw(st.integers(3, 30))
    x = x * 10.0 ** draw(st.integers(-30, 30))
    big = float(jnp.finfo(dtype).max) / 4
    x = np.clip(x, -big, big)
    if neginf and n > 1 and draw(st.booleans()):
        x[1, rng.integers(n)] = -np.inf
    return np.asarray(x).astype(dtype)


def strengths():
    return st.integers(-8, 8).map(lambda e: 10.0**e)


def _tol(dtype, scale=1.0):
    return {F32: 1e-4, np.float64: 1e-9}.get(np.dtype(dtype).type, 3e-2) * scale


def _finite(*arrays):
    return all(np.all(np.isfinite(np.asarray(a, np.float64))) for a in arrays)


# ----------------------------------------------------------------------------------------------
# Jitted probes: (outputs, gradient of a fixed weighted sum) for traced strength / temperature.


def _probe(fn):
    """jit of ``x, s -> (fn(x, s), d/dx sum(fn(x, s) * w))`` with fixed weights ``w``."""

    @jax.jit
    def run(x, s):
        out, vjp = jax.vjp(lambda v: fn(v, s), x)
        w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape).astype(out.dtype)
        return out, vjp(w)[0]

    return run


SORT_OPS = {
    "rank_l2": _probe(lambda x, s: soft_rank(x, regularization_strength=s)),
    "rank_kl": _probe(lambda x, s: soft_rank(x, regularization_strength=s, regularization="kl")),
    "sort_l2": _probe(lambda x, s: soft_sort(x, regularization_strength=s)),
    "sort_kl": _probe(lambda x, s: soft_sort(x, regularization_strength=s, regularization="kl")),
}


def _check_ranks(x, r, tol):
    n = x.shape[-1]
    r = np.asarray(r, np.float64)
    assert np.all(r >= 1 - tol * n) and np.all(r <= n + tol * n), (x, r)
    np.testing.assert_allclose(r.sum(-1), n * (n + 1) / 2, rtol=tol, atol=tol * n)
    # order preserving; equal values get equal ranks
    xi, xj = x[..., :, None], x[..., None, :]
    ri, rj = r[..., :, None], r[..., None, :]
    assert np.all((ri <= rj + tol * n) | ~(xi < xj))
    assert np.all((np.abs(ri - rj) <= tol * n) | ~(xi == xj))


def _check_sorted(x, s, tol, keeps_sum):
    x = np.asarray(x, np.float64)
    s = np.asarray(s, np.float64)
    span = np.max(np.abs(x), -1, keepdims=True) + 1e-300
    assert np.all(np.diff(s, axis=-1) >= -tol * span * x.shape[-1])
    if keeps_sum:
        np.testing.assert_array_less(np.abs(s.sum(-1) - x.sum(-1)), tol * x.shape[-1] * span[..., 0] + 1e-300)
        assert np.all(s >= x.min(-1, keepdims=True) - tol * span) and np.all(s <= x.max(-1, keepdims=True) + tol * span)


@given(x=rows(), s=strengths(), reg=st.sampled_from(["l2", "kl"]))
def test_soft_rank_in_permutahedron(x, s, reg):
    r, g = SORT_OPS[f"rank_{reg}"](jnp.asarray(x), jnp.float32(s))
    assert _finite(r, g)
    _check_ranks(x, r, _tol(F32, 10))


@given(x=rows(), s=strengths())
def test_soft_sort_l2_sorted_with_the_input_sum(x, s):
    out, g = SORT_OPS["sort_l2"](jnp.asarray(x), jnp.float32(s))
    assert _finite(out, g)
    _check_sorted(x, out, _tol(F32, 10), keeps_sum=True)


@given(x=rows(sizes=(7,)).map(lambda v: np.abs(v) + np.float32(1e-3)), s=strengths())
def test_soft_sort_kl_sorted(x, s):
    # the entropic sort is for positive values (Blondel et al.'s experiments)
    out, g = SORT_OPS["sort_kl"](jnp.asarray(x), jnp.float32(s))
    assert _finite(out, g)
    _check_sorted(x, out, _tol(F32, 10), keeps_sum=False)


def _gaps(x):
    return np.diff(np.sort(x.astype(np.float64), -1), axis=-1)


@given(x=rows(sizes=(7, 64)), reg=st.sampled_from(["l2", "kl"]))
def test_sort_rank_hard_limit(x, reg):
    # ranks depend on x / eps: hard once eps is far below the smallest gap; the sort projects
    # rho / eps onto the permutahedron of x: hard once 1 / eps is far above the largest gap
    gaps = _gaps(x)
    if not np.all(np.isfinite(gaps)) or np.any(gaps == 0):
        return
    s_rank, s_sort = float(gaps.min()) * 1e-3, 1e-3 / float(gaps.max())
    if s_rank > 1e-37:
        r, _ = SORT_OPS[f"rank_{reg}"](jnp.asarray(x), jnp.float32(s_rank))
        np.testing.assert_allclose(r, np.argsort(np.argsort(x, -1), -1) + 1.0, atol=1e-3)
    if reg == "l2" and s_sort > 1e-37:
        out, _ = SORT_OPS["sort_l2"](jnp.asarray(x), jnp.float32(s_sort))
        np.testing.assert_allclose(out, np.sort(x, -1), rtol=1e-5, atol=1e-6 * float(np.max(np.abs(x))))


@given(x=rows(sizes=(7,)))
def test_sort_rank_large_strength_limit(x):
    gaps = _gaps(x)
    spread = float(np.max(np.abs(x.astype(np.float64))))
    if not spread > 0:
        return
    n = x.shape[-1]
    r, _ = SORT_OPS["rank_l2"](jnp.asarray(x), jnp.float32(min(spread * 1e8, 1e38)))
    np.testing.assert_allclose(r, (n + 1) / 2, rtol=1e-3)
    if np.any(gaps == 0) or 1e3 / gaps.min() > 1e38:
        return
    eps = 1e3 / float(gaps.min())  # 1 / eps far below every gap: one pooled block
    out, _ = SORT_OPS["sort_l2"](jnp.asarray(x), jnp.float32(eps))
    ref = x.astype(np.float64).mean(-1, keepdims=True) + (np.arange(1, n + 1) - (n + 1) / 2) / eps
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * spread)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float64])
@given(data=st.data())
def test_sort_rank_other_dtypes(dtype, data):
    x = data.draw(rows(sizes=(7,), dtype=F32))
    s = data.draw(strengths())
    xd = jnp.asarray(x).astype(dtype)
    if dtype == np.float64:
        x = x.astype(np.float64)
    else:
        x = np.asarray(xd.astype(jnp.float32))
    for reg in ("l2", "kl"):
        r = soft_rank(xd, regularization_strength=s, regularization=reg)
        assert r.dtype == xd.dtype and _finite(r)
        _check_ranks(x, r, _tol(dtype, 10))
    out = soft_sort(xd, regularization_strength=s)
    assert out.dtype == xd.dtype
    _check_sorted(x, out, _tol(dtype, 10), keeps_sum=dtype == np.float64)


@given(x=rows(sizes=(7,), neginf=True))
def test_neg_inf_entries_rank_first(x):
    r, g = SORT_OPS["rank_l2"](jnp.asarray(x), jnp.float32(1.0))
    assert _finite(r, g)
    masked = np.isneginf(x)
    assert np.all(np.asarray(r)[masked] <= 1 + 1e-5 * np.sum(masked, -1, keepdims=True).repeat(x.shape[-1], -1)[masked])


@given(x=rows(sizes=(7,)), reg=st.sampled_from(["l2", "kl"]))
def test_isotonic_non_increasing(x, reg):
    fn = isotonic_l2 if reg == "l2" else isotonic_kl
    xs = np.clip(x, -1e15, 1e15) if reg == "kl" else x  # kl takes logs of weights: keep exp finite
    v = np.asarray(fn(jnp.asarray(xs)), np.float64)
    assert _finite(v)
    assert np.all(np.diff(v, axis=-1) <= 1e-4 * (np.max(np.abs(xs)) + 7))


# ----------------------------------------------------------------------------------------------
# Top-k masks.


@functools.lru_cache(maxsize=None)
def _topk_probe(k, method):
    if method == "sparse":
        return _probe(lambda x, s: soft_topk_mask(x, k, regularization_strength=s))
    return _probe(lambda x, s: soft_topk_mask(x, k, method="ot", epsilon=s))


@given(x=rows(neginf=True), s=strengths(), method=st.sampled_from(["sparse", "ot"]), data=st.data())
def test_topk_mask_in_capped_simplex(x, s, method, data):
    n = x.shape[-1]
    k = data.draw(st.sampled_from(sorted({1, max(1, n // 2), n})))
    m, g = _topk_probe(k, method)(jnp.asarray(x), jnp.float32(s))
    assert _finite(m, g)
    m = np.asarray(m, np.float64)
    assert np.all(m >= -1e-6) and np.all(m <= 1 + 1e-6)
    np.testing.assert_allclose(m.sum(-1), k, atol=1e-4 * n)
    assert np.all(m[np.isneginf(x)] <= 1e-6) or np.sum(~np.isneginf(x), -1).min() < k


@given(x=rows(sizes=(7, 64)), data=st.data())
def test_sparse_topk_hard_limit(x, data):
    n = x.shape[-1]
    k = data.draw(st.sampled_from(sorted({1, max(1, n // 2), n})))  # the probes of the test above
    srt = np.sort(x, -1)[:, ::-1]
    if k < n:
        gap = np.min(srt[:, k - 1] - srt[:, k])
        if not gap > 0:
            return
        s = float(gap) * 1e-2
        if s < 1e-37:
            return
    else:
        s = 1.0
    m, _ = _topk_probe(k, "sparse")(jnp.asarray(x), jnp.float32(s))
    np.testing.assert_allclose(m, hard_topk_mask(jnp.asarray(x), k), atol=1e-6)


@given(x=rows(sizes=(7,)), k=st.sampled_from([1, 3, 7]))  # k is static: each value compiles
def test_hard_topk_mask_is_k_hot(x, k):
    m = np.asarray(hard_topk_mask(jnp.asarray(x), k))
    assert set(np.unique(m)) <= {0.0, 1.0} and np.all(m.sum(-1) == k)


# ----------------------------------------------------------------------------------------------
# Sinkhorn (O(n m) per sweep: small n).


@functools.lru_cache(maxsize=None)
def _sinkhorn_probe(kind):
    fn = sinkhorn_rank if kind == "rank" else sinkhorn_sort
    return _probe(lambda x, e: fn(x, epsilon=e))


@given(x=rows(sizes=(1, 7)), e=st.integers(-3, 8).map(lambda v: 10.0**v))
def test_sinkhorn_rank_and_sort(x, e):
    n = x.shape[-1]
    r, g = _sinkhorn_probe("rank")(jnp.asarray(x), jnp.float32(e))
    assert _finite(r, g)
    r = np.asarray(r, np.float64)
    assert np.all(r >= 1 - 1e-3) and np.all(r <= n + 1e-3)
    np.testing.assert_allclose(r.sum(-1), n * (n + 1) / 2, rtol=1e-3)
    out, g = _sinkhorn_probe("sort")(jnp.asarray(x), jnp.float32(e))
    assert _finite(out, g)
    xd = x.astype(np.float64)
    span = np.max(np.abs(xd), -1, keepdims=True)
    assert np.all(out >= xd.min(-1, keepdims=True) - 1e-5 * span)
    assert np.all(out <= xd.max(-1, keepdims=True) + 1e-5 * span)


# ----------------------------------------------------------------------------------------------
# Relaxed permutation matrices and sorting networks.


PERM_OPS = {
    "neural_sort": _probe(lambda x, t: neural_sort(x, temperature=t)),
    "soft_permutation": _probe(lambda x, t: soft_permutation(x, temperature=t)),
}


@given(x=rows(sizes=(1, 7)), t=strengths(), name=st.sampled_from(sorted(PERM_OPS)))
def test_relaxed_permutations_row_stochastic(x, t, name):
    p, g = PERM_OPS[name](jnp.asarray(x), jnp.float32(t))
    assert _finite(p, g)
    p = np.asarray(p, np.float64)
    assert np.all(p >= 0) and np.all(p <= 1 + 1e-6)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)


@functools.lru_cache(maxsize=None)
def _net_probe(network):
    return jax.jit(lambda x, st_: sorting_network(x, network, steepness=st_))


@given(x=rows(sizes=(1, 7)), t=strengths(), network=st.sampled_from(["odd_even", "bitonic"]))
def test_sorting_network_doubly_stochastic(x, t, network):
    x = np.clip(x, -1e18, 1e18)  # x @ P sums n products: keep it inside float32
    s, p = _net_probe(network)(jnp.asarray(x), jnp.float32(t))
    assert _finite(s, p)
    p = np.asarray(p, np.float64)
    assert np.all(p >= -1e-6)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(p.sum(-2), 1.0, atol=1e-4)
    span = np.max(np.abs(x)) + 1e-300
    np.testing.assert_allclose(np.einsum("bi,bij->bj", x.astype(np.float64), p), s, atol=1e-4 * span)


# ----------------------------------------------------------------------------------------------
# Gumbel family, perturbed optimizers, sparse maps, straight-through, correlations.


@functools.lru_cache(maxsize=None)
def _gumbel_probe(kind, k=None):
    fns = {
        "softmax": lambda x, t: gumbel_softmax(KEY, x, t),
        "softmax_hard": lambda x, t: gumbel_softmax(KEY, x, t, hard=True),
        "sigmoid": lambda x, t: gumbel_sigmoid(KEY, x, t),
        "topk": lambda x, t: gumbel_topk(KEY, x, k, t),
        "topk_hard": lambda x, t: gumbel_topk(KEY, x, k, t, hard=True),
    }
    return _probe(fns[kind])


@given(x=rows(neginf=True), t=strengths(), hard=st.booleans())
def test_gumbel_softmax_on_simplex(x, t, hard):
    p, g = _gumbel_probe("softmax_hard" if hard else "softmax")(jnp.asarray(x), jnp.float32(t))
    assert _finite(p, g)
    assert np.all(np.asarray(p) >= 0)
    np.testing.assert_allclose(np.asarray(p, np.float64).sum(-1), 1.0, atol=1e-5)
    if hard:
        assert set(np.unique(np.asarray(p))) <= {0.0, 1.0}
    assert np.all(np.asarray(p)[np.isneginf(x)] == 0)


@given(x=rows(), t=strengths())
def test_gumbel_sigmoid_in_unit_interval(x, t):
    p, g = _gumbel_probe("sigmoid")(jnp.asarray(x), jnp.float32(t))
    assert _finite(p, g) and np.all(np.asarray(p) >= 0) and np.all(np.asarray(p) <= 1)


@given(x=rows(neginf=True), t=strengths(), hard=st.booleans(), data=st.data())
def test_gumbel_topk_in_capped_simplex(x, t, hard, data):
    n = x.shape[-1]
    k = data.draw(st.sampled_from(sorted({1, max(1, n // 2), n})))
    m, g = _gumbel_probe("topk_hard" if hard else "topk", k)(jnp.asarray(x), jnp.float32(t))
    assert _finite(m, g)
    m = np.asarray(m, np.float64)
    assert np.all(m >= -1e-6) and np.all(m <= 1 + 1e-6)
    np.testing.assert_allclose(m.sum(-1), k, atol=1e-4 * n)


@jax.jit
def _perturbed_probe(x, sigma):
    return (perturbed_argmax(KEY, x, num_samples=8, sigma=sigma),
            perturbed_topk(KEY, x, max(1, x.shape[-1] // 2), num_samples=8, sigma=sigma))


@given(x=rows(sizes=(7,), neginf=True), sigma=strengths())
@settings(max_examples=3)
def test_perturbed_argmax_and_topk(x, sigma):
    n = x.shape[-1]
    p, m = _perturbed_probe(jnp.asarray(x), jnp.float32(sigma))  # one compilation, sigma traced
    assert _finite(p) and np.all(np.asarray(p) >= 0)
    np.testing.assert_allclose(np.asarray(p, np.float64).sum(-1), 1.0, atol=1e-5)
    k = max(1, n // 2)
    assert _finite(m) and np.all(np.asarray(m) >= 0) and np.all(np.asarray(m) <= 1)
    np.testing.assert_allclose(np.asarray(m, np.float64).sum(-1), k, atol=1e-5)


SIMPLEX_MAPS = {"sparsemax": jax.jit(jax.value_and_grad(lambda x: jnp.sum(sparsemax(x) * jnp.cos(x)), has_aux=False)),
                "entmax15": jax.jit(jax.value_and_grad(lambda x: jnp.sum(entmax15(x) * jnp.cos(x))))}


@given(x=rows(neginf=True), name=st.sampled_from(sorted(SIMPLEX_MAPS)))
def test_sparse_maps_on_simplex(x, name):
    p = np.asarray((sparsemax if name == "sparsemax" else entmax15)(jnp.asarray(x)), np.float64)
    assert _finite(p) and np.all(p >= 0)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    _, g = SIMPLEX_MAPS[name](jnp.asarray(np.where(np.isneginf(x), -1e30, x)))
    assert _finite(g)


@given(x=rows(sizes=(7,)))
def test_straight_through_value_and_gradient(x):
    xj = jnp.asarray(np.clip(x, -1e6, 1e6))
    for fn, hard in ((ste_round, np.round), (ste_sign, np.sign), (ste_ceil, np.ceil)):
        np.testing.assert_array_equal(fn(xj), hard(np.asarray(xj)))
        np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(fn(v)))(xj), 1.0)
    np.testing.assert_array_equal(straight_through(jnp.zeros_like(xj), xj), 0.0)


@jax.jit
def _correlations(x, y, s):
    return soft_spearman(x, y, regularization_strength=s), soft_kendall_tau(x, y, temperature=s)


@given(x=rows(sizes=(7,)), y=rows(sizes=(7,)), s=strengths())
def test_rank_correlations_in_range(x, y, s):
    if x.shape != y.shape:
        y = np.resize(y, x.shape)
    for c in _correlations(jnp.asarray(x), jnp.asarray(y), jnp.float32(s)):
        c = np.asarray(c, np.float64)
        constant_target = np.ptp(y, axis=-1) == 0
        ok = ~np.isnan(c)
        assert np.all(ok | constant_target)
        assert np.all((c[ok] >= -1 - 1e-5) & (c[ok] <= 1 + 1e-5))


# ----------------------------------------------------------------------------------------------
# NaN in gives NaN out (per row), on every operator.


NAN_OPS = {
    "soft_rank": lambda x: soft_rank(x),
    "soft_rank_kl": lambda x: soft_rank(x, regularization="kl"),
    "soft_sort": lambda x: soft_sort(x),
    "soft_sort_kl": lambda x: soft_sort(x, regularization="kl"),
    "soft_topk_mask": lambda x: soft_topk_mask(x, 1),
    "soft_topk_mask_ot": lambda x: soft_topk_mask(x, 1, method="ot"),
    "hard_topk_mask": lambda x: hard_topk_mask(x, 1),
    "sinkhorn_rank": lambda x: sinkhorn_rank(x),
    "sinkhorn_sort": lambda x: sinkhorn_sort(x),
    "gumbel_softmax": lambda x: gumbel_softmax(KEY, x, hard=True),
    "gumbel_topk": lambda x: gumbel_topk(KEY, x, 1),
    "sparsemax": sparsemax,
    "entmax15": entmax15,
    "perturbed_argmax": lambda x: perturbed_argmax(KEY, x, num_samples=4),
    "perturbed_topk": lambda x: perturbed_topk(KEY, x, 1, num_samples=4),
}


@pytest.mark.parametrize("name", sorted(NAN_OPS))
@given(x=rows(sizes=(7,)), where=st.integers(0, 6))
@settings(max_examples=2)
def test_nan_row_gives_nan_row(name, x, where):
    x = x.copy()
    x[0, where % x.shape[-1]] = np.nan
    out = np.asarray(NAN_OPS[name](jnp.asarray(x)), np.float64)
    assert np.all(np.isnan(out[0]))
    assert np.all(np.isfinite(out[1:]))


# ----------------------------------------------------------------------------------------------
# Batch dims, axis, and jit / vmap / eager agreement.


AXIS_OPS = {
    "soft_rank": lambda x, axis: soft_rank(x, axis=axis),
    "soft_sort": lambda x, axis: soft_sort(x, axis=axis),
    "soft_topk_mask": lambda x, axis: soft_topk_mask(x, 2, axis=axis),
    "sinkhorn_rank": lambda x, axis: sinkhorn_rank(x, axis=axis),
    "gumbel_softmax": lambda x, axis: gumbel_softmax(KEY, x, axis=axis),
    "sparsemax": lambda x, axis: sparsemax(x, axis=axis),
    "sorting_network": lambda x, axis: sorting_network(x, axis=axis)[0],
}


@pytest.mark.parametrize("name", sorted(AXIS_OPS))
@given(x=rows(sizes=(7,), batch=6))
@settings(max_examples=1)
def test_axis_batch_jit_vmap_agree(name, x):
    fn = AXIS_OPS[name]
    x3 = jnp.asarray(x.reshape(2, 3, 7))
    last = fn(x3, -1)
    if name != "gumbel_softmax":  # its noise is drawn in the moved layout, so it differs
        moved = jnp.moveaxis(fn(jnp.moveaxis(x3, -1, 1), 1), 1, -1)
        np.testing.assert_allclose(moved, last, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(x)) + 1e-30))
    np.testing.assert_allclose(jax.jit(lambda v: fn(v, -1))(x3), last, rtol=1e-5,
                               atol=1e-6 * float(np.max(np.abs(x)) + 1e-30))
    if name != "gumbel_softmax":  # the noise is drawn per call: vmap draws it with another shape
        np.testing.assert_allclose(jax.vmap(lambda v: fn(v, -1))(x3), last, rtol=1e-5,
                                   atol=1e-6 * float(np.max(np.abs(x)) + 1e-30))


def test_every_public_operator_is_covered():
    covered = {"entmax15", "gumbel_sigmoid", "gumbel_softmax", "gumbel_topk", "hard_topk_mask", "isotonic_kl",
               "isotonic_l2", "neural_sort", "perturbed_argmax", "perturbed_topk", "sinkhorn_rank", "sinkhorn_sort",
               "soft_kendall_tau", "soft_permutation", "soft_rank", "soft_sort", "soft_spearman", "soft_topk_mask",
               "sorting_network", "sparsemax", "ste_ceil", "ste_round", "ste_sign", "straight_through",
               "perturbed"}  # perturbed: through perturbed_argmax / perturbed_topk
    assert covered == set(relax.__all__)


def test_large_n_rank_sort_topk():
    """n = 4096 once per CI run (more often in the long profile)."""
    x = np.random.default_rng(0).standard_normal((2, 4096)).astype(F32) * 1e3
    x[1, :100] = x[1, 0]  # a block of ties
    r, g = SORT_OPS["rank_l2"](jnp.asarray(x), jnp.float32(1.0))
    assert _finite(r, g)
    assert np.all(np.asarray(r) >= 1 - 1e-3) and np.all(np.asarray(r) <= 4096 + 1e-3)
    np.testing.assert_allclose(np.asarray(r, np.float64).sum(-1), 4096 * 4097 / 2, rtol=1e-6)
    out, g = SORT_OPS["sort_l2"](jnp.asarray(x), jnp.float32(1.0))
    _check_sorted(x, out, 1e-4, keeps_sum=True)
    m, g = _topk_probe(64, "sparse")(jnp.asarray(x), jnp.float32(1.0))
    np.testing.assert_allclose(np.asarray(m, np.float64).sum(-1), 64, atol=1e-2)
    assert math.isfinite(float(jnp.sum(g)))
