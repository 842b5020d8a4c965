"""Regression tests for issue #19 (and item 5 of #18): each case a hostile user found silently
wrong on float32 inputs. The suite runs with x64 enabled, so every input here is explicitly
float32 (the default dtype of a user's session)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffnas_jax.relax import (gumbel_sigmoid, gumbel_softmax, gumbel_topk, hard_topk_mask, isotonic_kl,
                               isotonic_l2, neural_sort, perturbed_argmax, perturbed_topk, sinkhorn_rank,
                               sinkhorn_sort, soft_rank, soft_sort, soft_spearman, soft_topk_mask, sorting_network)

F32 = jnp.float32
X = jnp.array([0.3, -1.2, 2.5, 0.7, -0.1], F32)
HARD_SORT = np.array([-1.2, -0.1, 0.3, 0.7, 2.5], np.float32)
HARD_RANK = np.array([3, 1, 5, 4, 2], np.float32)
KEY = jax.random.key(0)


@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("eps", [1e-7, 1e-8, 1e-12])
def test_tiny_strength_gives_the_hard_sort_and_ranks(reg, eps):
    np.testing.assert_array_equal(soft_sort(X, regularization_strength=eps, regularization=reg), HARD_SORT)
    np.testing.assert_array_equal(soft_rank(X, regularization_strength=eps, regularization=reg), HARD_RANK)
    np.testing.assert_array_equal(soft_sort(X, "DESCENDING", eps, reg), HARD_SORT[::-1])
    np.testing.assert_array_equal(soft_rank(X, "DESCENDING", eps, reg), 6 - HARD_RANK)


@pytest.mark.parametrize("big", [1e8, 1e30, 3e38, np.inf])
def test_a_huge_value_is_ranked_last_and_the_rest_unchanged(big):
    x = X.at[2].set(big)
    r = soft_rank(x)
    ref = soft_rank(X.at[2].set(10.0))  # at strength 1 the top value is free of the others from ~6 on
    np.testing.assert_allclose(r, ref, atol=1e-6)
    assert r[2] == 5.0
    r_neg = soft_rank(x.at[2].set(-big))
    assert r_neg[2] == 1.0 and np.all(np.isfinite(r_neg))


def test_l2_sort_and_rank_keep_float32_precision_at_large_magnitudes():
    # partly pooled blocks far from zero: the answers are shift invariant (up to the rounding of
    # the shifted input itself, a few ulps of the shift)
    base = jnp.array([0.0, 0.5, 3.0, 3.2, 9.0], F32)
    for shift in (1e3, 1e5, 1e7):
        tol = 8 * float(np.spacing(np.float32(shift)))
        np.testing.assert_allclose(soft_rank(base + shift), soft_rank(base), atol=tol)
        np.testing.assert_allclose(soft_sort(base + shift) - shift, soft_sort(base), atol=tol)
    # scale: rank(c x, c eps) = rank(x, eps); sort(c x, eps / c) = c sort(x, eps)
    for c in (1e-6, 1e6, 1e-20, 1e20):
        np.testing.assert_allclose(soft_rank(base * c, regularization_strength=c), soft_rank(base), rtol=1e-5)
        np.testing.assert_allclose(soft_sort(base * c, regularization_strength=1 / c) / c, soft_sort(base),
                                   rtol=1e-5, atol=1e-6)


def test_isotonic_l2_exact_for_large_offsets():
    s = jnp.array([1e8, 1e8 - 8, 1e8 - 8, 1e8 + 64], F32)
    w = jnp.array([4, 3, 2, 1], F32)
    # y = s - w = 1e8 + (-4, -11, -10, 63): everything pools, at 1e8 + 9.5; within one float32
    # ulp (8) of it, where forming s - w first lost the offsets entirely
    v = np.asarray(isotonic_l2(s, w), np.float64)
    assert np.all(np.abs(v - (1e8 + 9.5)) <= 8)
    np.testing.assert_allclose(isotonic_l2(s - 1e8, w), 9.5, atol=1e-5)


def test_spearman_at_tiny_strength():
    np.testing.assert_allclose(soft_spearman(X, jnp.arange(5, dtype=F32), regularization_strength=1e-8),
                               stats.spearmanr(np.asarray(X), np.arange(5)).statistic, atol=1e-6)


@pytest.mark.parametrize("low", [-1e4, -1e9, -1e30, -np.inf])
def test_sparse_topk_mask_with_a_very_negative_score(low):
    m = soft_topk_mask(jnp.array([0.3, -1.2, low, 0.7, -0.1], F32), 2)
    np.testing.assert_allclose(m, [0.7, 0, 0, 1, 0.3], atol=1e-6)
    np.testing.assert_allclose(jnp.sum(m), 2.0, atol=1e-6)


def test_sparse_topk_mask_float64_with_minus_1e30():
    with jax.enable_x64(True):
        m = soft_topk_mask(jnp.array([0.3, -1.2, -1e30, 0.7, -0.1], jnp.float64), 2)
    np.testing.assert_allclose(m, [0.7, 0, 0, 1, 0.3], atol=1e-12)


def test_sparse_topk_mask_with_infinite_kth_value_shares_the_rest():
    m = soft_topk_mask(jnp.array([1.0, -np.inf, -np.inf, -np.inf], F32), 2)
    np.testing.assert_allclose(m, [1, 1 / 3, 1 / 3, 1 / 3], atol=1e-6)


def test_spearman_gradient_finite_on_constant_predictions():
    # rows: constant predictions (the regression), and a reversed order that must get a gradient;
    # one jitted value-and-gradient at both strengths (one compilation; rows are independent)
    target = jnp.broadcast_to(jnp.arange(8, dtype=F32), (2, 8))
    batch = jnp.stack([jnp.zeros(8, F32), jnp.arange(8, dtype=F32)[::-1]])
    run = jax.jit(lambda p, e: (soft_spearman(p, target, regularization_strength=e),
                                jax.grad(lambda v: jnp.sum(soft_spearman(v, target, regularization_strength=e)))(p)))
    for eps in (1.0, 10.0):
        value, grad = run(batch, jnp.float32(eps))
        assert float(value[0]) == 0.0 and np.all(np.isfinite(np.asarray(grad)))
        assert np.any(np.asarray(grad[1]) != 0)


def test_spearman_ties_in_target_use_average_ranks_like_scipy():
    pred = jnp.arange(5, 0, -1, dtype=F32)
    target = jnp.array([0, 0, 1, 1, 1], F32)
    ours = soft_spearman(pred, target, regularization_strength=1e-3)
    np.testing.assert_allclose(ours, stats.spearmanr(np.asarray(pred), np.asarray(target)).statistic, atol=1e-6)
    np.testing.assert_allclose(ours, -0.8660254, atol=1e-6)


def test_spearman_constant_target_is_nan_like_scipy():
    assert np.isnan(soft_spearman(jnp.arange(5, dtype=F32), jnp.ones(5, F32)))
    with pytest.warns(stats.ConstantInputWarning):
        assert np.isnan(stats.spearmanr(np.arange(5), np.ones(5)).statistic)


X_NAN = X.at[1].set(jnp.nan)


@pytest.mark.parametrize("name,fn", [
    ("sinkhorn_rank", lambda x: sinkhorn_rank(x)),
    ("sinkhorn_sort", lambda x: sinkhorn_sort(x)),
    ("soft_topk_mask ot", lambda x: soft_topk_mask(x, 2, method="ot")),
    ("soft_topk_mask sparse", lambda x: soft_topk_mask(x, 2)),
    ("hard_topk_mask", lambda x: hard_topk_mask(x, 2)),
    ("soft_sort l2", lambda x: soft_sort(x)),
    ("soft_rank l2", lambda x: soft_rank(x)),
    ("soft_sort kl", lambda x: soft_sort(x, regularization="kl")),
    ("soft_rank kl", lambda x: soft_rank(x, regularization="kl")),
    ("gumbel_softmax hard", lambda x: gumbel_softmax(KEY, x, hard=True)),
    ("gumbel_sigmoid hard", lambda x: gumbel_sigmoid(KEY, x, hard=True)[1:2]),
    ("gumbel_topk", lambda x: gumbel_topk(KEY, x, 2)),
    ("gumbel_topk hard", lambda x: gumbel_topk(KEY, x, 2, hard=True)),
    ("perturbed_argmax", lambda x: perturbed_argmax(KEY, x, num_samples=16)),
    ("perturbed_topk", lambda x: perturbed_topk(KEY, x, 2, num_samples=16)),
    ("neural_sort", lambda x: neural_sort(x)),
    ("sorting_network", lambda x: sorting_network(x)[0]),
])
def test_nan_in_gives_nan_out(name, fn):
    assert np.all(np.isnan(fn(X_NAN))), name


def test_nan_row_does_not_touch_other_rows():
    batch = jnp.stack([X_NAN, X])
    for fn in (soft_rank, soft_sort, sinkhorn_rank, lambda x: soft_topk_mask(x, 2)):
        out = fn(batch)
        assert np.all(np.isnan(out[0])) and np.all(np.isfinite(out[1]))
        np.testing.assert_allclose(out[1], fn(X), rtol=1e-5, atol=1e-6)


def test_gumbel_softmax_hard_gradient_is_finite_for_finite_input():
    g = jax.grad(lambda x: gumbel_softmax(KEY, x, hard=True) @ jnp.arange(5, dtype=F32))(X)
    assert np.all(np.isfinite(g))


def test_perturbed_with_a_masked_logit():
    x = X.at[1].set(-jnp.inf)
    p = perturbed_argmax(KEY, x, num_samples=200, sigma=0.5)
    assert np.all(np.isfinite(p)) and p[1] == 0.0
    np.testing.assert_allclose(jnp.sum(p), 1.0, atol=1e-6)
    t = perturbed_topk(KEY, x, 2, num_samples=200, sigma=0.5)
    assert np.all(np.isfinite(t)) and t[1] == 0.0
    np.testing.assert_allclose(jnp.sum(t), 2.0, atol=1e-5)
    g = jax.grad(lambda v: perturbed_argmax(KEY, v, num_samples=200, sigma=0.5) @ jnp.arange(5, dtype=F32))(x)
    assert np.all(np.isfinite(g)) and g[1] == 0.0
    g = jax.grad(lambda v: perturbed_topk(KEY, v, 2, num_samples=200, sigma=0.5) @ jnp.arange(5, dtype=F32))(x)
    assert np.all(np.isfinite(g)) and g[1] == 0.0


@pytest.mark.parametrize("bad", [jnp.float32(0), jnp.float32(-1), jnp.array(-1.0), jnp.array(jnp.nan),
                                 np.float32(0), jnp.array([1.0, 0.0])])
@pytest.mark.parametrize("call", [
    lambda b: soft_sort(X, regularization_strength=b),
    lambda b: soft_rank(X, regularization_strength=b),
    lambda b: soft_spearman(X, X, regularization_strength=b),
    lambda b: soft_topk_mask(X, 2, regularization_strength=b),
    lambda b: soft_topk_mask(X, 2, method="ot", epsilon=b),
    lambda b: sinkhorn_rank(X, epsilon=b),
    lambda b: gumbel_softmax(KEY, X, temperature=b),
    lambda b: gumbel_topk(KEY, X, 2, temperature=b),
    lambda b: neural_sort(X, temperature=b),
    lambda b: sorting_network(X, steepness=b),
])
def test_concrete_jax_scalars_are_validated(bad, call):
    with pytest.raises(ValueError, match="must be a positive"):
        call(bad)


def test_traced_strength_is_not_checked_but_works():
    r = jax.jit(lambda e: soft_rank(X, regularization_strength=e))(jnp.float32(1e-8))
    np.testing.assert_array_equal(r, HARD_RANK)


@pytest.mark.parametrize("call", [
    lambda a: soft_rank(X, axis=a),
    lambda a: soft_sort(X, axis=a),
    lambda a: soft_topk_mask(X, 2, axis=a),
    lambda a: sinkhorn_sort(X, axis=a),
    lambda a: gumbel_softmax(KEY, X, axis=a),
    lambda a: sorting_network(X, axis=a),
])
@pytest.mark.parametrize("axis", [1.0, "0", None, True])
def test_non_integer_axis_is_a_type_error_naming_axis(call, axis):
    with pytest.raises(TypeError, match="`axis`"):
        call(axis)


def test_gumbel_topk_entries_stay_in_unit_interval():
    # issue #18 item 5: the sequential form reached 1.545 at temperature 0.5 (k = 3 of 6)
    keys = jax.random.split(KEY, 64)
    for t in (0.1, 0.5, 1.0, 3.0):
        m = jax.vmap(lambda k: gumbel_topk(k, jnp.zeros(6, F32), 3, t))(keys)
        assert float(m.max()) <= 1.0 and float(m.min()) >= 0.0
        np.testing.assert_allclose(m.sum(-1), 3.0, atol=1e-5)
    seq = jax.vmap(lambda k: gumbel_topk(k, jnp.zeros(6, F32), 3, 0.5, relaxation="sequential"))(keys)
    assert float(seq.max()) > 1.0  # documented: the sequential form exceeds 1
    np.testing.assert_allclose(seq.sum(-1), 3.0, atol=1e-5)


def test_gumbel_topk_bounded_limits_and_masked_items():
    logits = jnp.array([0.0, 1.0, -jnp.inf, 2.0], F32)
    np.testing.assert_allclose(gumbel_topk(KEY, logits, 2, 1e-8), gumbel_topk(KEY, logits, 2, hard=True), atol=1e-6)
    assert gumbel_topk(KEY, logits, 2, 0.5)[2] == 0.0
    np.testing.assert_allclose(gumbel_topk(KEY, jnp.zeros(4, F32), 2, 1e7), 0.5, atol=1e-5)
    g = jax.grad(lambda v: gumbel_topk(KEY, v, 2, 0.5) @ jnp.arange(4, dtype=F32))(logits)
    assert np.all(np.isfinite(g)) and g[2] == 0.0


def test_isotonic_nan_row_is_nan():
    # a NaN in s or w gave plausible numbers for the whole row ([-0.67] * 3 for [1, nan, 3])
    s = jnp.array([[1.0, jnp.nan, 3.0], [1.0, 2.0, 3.0]], F32)
    for fn in (isotonic_l2, isotonic_kl):
        v = np.asarray(fn(s))
        assert np.all(np.isnan(v[0])) and np.all(np.isfinite(v[1])), (fn, v)
        assert np.all(np.isnan(np.asarray(fn(s[1], jnp.array([1.0, jnp.nan, 0.0], F32)))))


def test_kl_soft_rank_float32_gradient_on_a_long_row():
    """Issue 19: on this row of 10^4 standard normals the float32 gradient of kl soft_rank was 36 %
    off (relative to its max) from the float64 one of the same float32 input: log(rho) rounded in
    float32 by up to 5e-7 moved a block boundary whose float64 gap is 1.4e-7, and the block pooled
    a singleton (gradient 0) into a block of 5 (gradient ~8e3).  The solver now works on rho."""
    rng = np.random.default_rng(0)
    rng.standard_normal(2000)
    x = rng.standard_normal(10_000).astype(np.float32)
    g = rng.standard_normal(10_000)
    x = np.stack([x, x[::-1]])  # a batch: the same row reversed ranks to the same blocks
    g = np.stack([g, g[::-1]])

    def grads(dtype):
        f = lambda v, e: jnp.vdot(soft_rank(v, regularization="kl", regularization_strength=e), jnp.asarray(g, dtype))
        gx, ge = jax.grad(f, argnums=(0, 1))(jnp.asarray(x, dtype), jnp.asarray(1.0, dtype))
        assert gx.dtype == dtype and ge.dtype == dtype
        return np.asarray(gx, np.float64), float(ge)

    (g32, e32), (g64, e64) = grads(F32), grads(jnp.float64)
    scale = np.abs(g64).max(axis=-1, keepdims=True)
    assert scale.min() > 1e4  # the pooled blocks carry large gradients
    np.testing.assert_array_less(np.abs(g32 - g64) / scale, 1e-5)
    assert abs(e32 - e64) <= 1e-4 * abs(e64)
