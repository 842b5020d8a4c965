"""Gumbel family, sparse simplex maps and straight-through estimators: distributions, limits,
gradients against finite differences, robustness at the extremes and argument errors."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import stats

from diffnas_jax.relax import (entmax15, gumbel_sigmoid, gumbel_softmax, gumbel_topk, sparsemax, ste_ceil,
                               ste_round, ste_sign, straight_through)

LOGITS = jnp.array([0.5, -1.0, 1.5, 0.0])
KEY = jax.random.PRNGKey(0)
DRAWS = 10_000
EXTREME = [jnp.array([1e30, -1e30, 0.0, 1.0, 1.0]), jnp.array([2.0, 2.0, 2.0]), jnp.array([0.7])]


# ----------------------------------------------------------------------------------------------
# Gumbel family


def test_gumbel_softmax_hard_samples_follow_softmax():
    keys = jax.random.split(KEY, DRAWS)
    samples = jax.vmap(lambda k: gumbel_softmax(k, LOGITS, 0.5, hard=True))(keys)
    assert np.all(np.sum(samples, -1) == 1) and set(np.unique(samples)) <= {0.0, 1.0}
    counts = np.asarray(samples.sum(0))
    expected = DRAWS * np.asarray(jax.nn.softmax(LOGITS))
    assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_gumbel_softmax_limits_and_straight_through_gradient():
    hard = gumbel_softmax(KEY, LOGITS, 1.0, hard=True)
    # temperature -> 0: the soft sample is the one-hot of the same Gumbel argmax
    np.testing.assert_allclose(gumbel_softmax(KEY, LOGITS, 1e-6), hard, atol=1e-12)
    # huge temperature: uniform
    np.testing.assert_allclose(gumbel_softmax(KEY, LOGITS, 1e6), 0.25, atol=1e-5)
    w = jnp.arange(4.0)
    g_hard = jax.grad(lambda v: gumbel_softmax(KEY, v, 0.7, hard=True) @ w)(LOGITS)
    g_soft = jax.grad(lambda v: gumbel_softmax(KEY, v, 0.7) @ w)(LOGITS)
    np.testing.assert_allclose(g_hard, g_soft)
    check_grads(lambda v, t: gumbel_softmax(KEY, v, t), (LOGITS, 0.7), order=2, modes=["fwd", "rev"])
    # axis, batch dims, vmap and jit
    batch = jnp.stack([LOGITS, -LOGITS, 2 * LOGITS])
    out = gumbel_softmax(KEY, batch.T, 0.5, axis=0)
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-12)
    v = jax.jit(jax.vmap(lambda k, l: gumbel_softmax(k, l, 0.5)))(jax.random.split(KEY, 3), batch)
    assert v.shape == (3, 4)


def test_gumbel_sigmoid_frequencies_and_limits():
    logits = jnp.array([-1.0, 0.0, 2.0])
    keys = jax.random.split(KEY, DRAWS)
    samples = jax.vmap(lambda k: gumbel_sigmoid(k, logits, 0.5, hard=True))(keys)
    freq = np.asarray(samples.mean(0))
    p = np.asarray(jax.nn.sigmoid(logits))
    np.testing.assert_allclose(freq, p, atol=4 * np.sqrt(p * (1 - p) / DRAWS).max())
    np.testing.assert_allclose(gumbel_sigmoid(KEY, logits, 1e-6), gumbel_sigmoid(KEY, logits, 1.0, hard=True))
    np.testing.assert_allclose(gumbel_sigmoid(KEY, logits, 1e6), 0.5, atol=1e-5)
    check_grads(lambda v: gumbel_sigmoid(KEY, v, 0.7), (logits,), order=2, modes=["fwd", "rev"])


def _inclusion_probabilities(logits, k):
    """P(i in the sample) of k draws without replacement from softmax(logits), by enumeration."""
    p = np.exp(logits - logits.max())
    p /= p.sum()
    incl = np.zeros(len(p))
    for seq in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for i in seq:
            prob *= p[i] / left
            left -= p[i]
        incl[list(seq)] += prob
    return incl


def test_gumbel_topk_is_sampling_without_replacement():
    k = 2
    keys = jax.random.split(KEY, DRAWS)
    samples = jax.vmap(lambda key: gumbel_topk(key, LOGITS, k, 0.5, hard=True))(keys)
    assert np.all(np.sum(samples, -1) == k) and set(np.unique(samples)) <= {0.0, 1.0}
    freq = np.asarray(samples.mean(0))
    expected = _inclusion_probabilities(np.asarray(LOGITS), k)
    np.testing.assert_allclose(freq, expected, atol=4 * np.sqrt(0.25 / DRAWS))


def test_gumbel_topk_soft_mask_sum_limits_gradients():
    for t in (1e-6, 0.1, 1.0, 10.0, 1e6):
        m = gumbel_topk(KEY, LOGITS, 3, t)
        np.testing.assert_allclose(m.sum(), 3.0, atol=1e-9)
        assert np.all(np.asarray(m) >= 0)
    np.testing.assert_allclose(gumbel_topk(KEY, LOGITS, 2, 1e-6), gumbel_topk(KEY, LOGITS, 2, hard=True), atol=1e-9)
    np.testing.assert_allclose(gumbel_topk(KEY, LOGITS, 2, 1e6), 0.5, atol=1e-5)
    w = jnp.arange(4.0)
    g_hard = jax.grad(lambda v: gumbel_topk(KEY, v, 2, 0.5, hard=True) @ w)(LOGITS)
    g_soft = jax.grad(lambda v: gumbel_topk(KEY, v, 2, 0.5) @ w)(LOGITS)
    np.testing.assert_allclose(g_hard, g_soft)
    check_grads(lambda v: gumbel_topk(KEY, v, 2, 0.5), (LOGITS,), order=1, modes=["fwd", "rev"])
    batch = jnp.stack([LOGITS, -LOGITS])
    np.testing.assert_allclose(gumbel_topk(KEY, batch, 2, 0.5).sum(-1), 2.0, atol=1e-9)


@pytest.mark.parametrize("op", ["softmax", "sigmoid", "topk"])
def test_gumbel_robust(op):
    def call(key, v, t, hard=False, k=1):
        if op == "softmax":
            return gumbel_softmax(key, v, t, hard=hard)
        if op == "sigmoid":
            return gumbel_sigmoid(key, v, t, hard=hard)
        return gumbel_topk(key, v, min(k, v.shape[-1]), t, hard=hard)

    for v in EXTREME:
        for t in (1e-6, 1.0, 1e6):
            for hard in (False, True):
                out, g = jax.value_and_grad(lambda u: jnp.sum(call(KEY, u, t, hard, 2) * jnp.arange(u.shape[0])))(v)
                assert np.isfinite(float(out)) and np.all(np.isfinite(g)), (v, t, hard)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float64):
        out = call(KEY, LOGITS.astype(dtype), 0.5)
        assert out.dtype == dtype and np.all(np.isfinite(np.asarray(out, np.float32)))
    if op == "softmax":
        assert gumbel_softmax(KEY, jnp.zeros((2, 0))).shape == (2, 0)
        np.testing.assert_array_equal(gumbel_softmax(KEY, jnp.array([0.3])), [1.0])
    # temperature may be traced (annealing schedules)
    f = jax.jit(lambda t: call(KEY, LOGITS, t))
    assert np.all(np.isfinite(f(jnp.float32(1e-6))))


def test_gumbel_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        gumbel_softmax(KEY, LOGITS, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        gumbel_sigmoid(KEY, LOGITS, -1.0)
    with pytest.raises(ValueError, match="temperature"):
        gumbel_topk(KEY, LOGITS, 2, 0.0)
    with pytest.raises(ValueError, match="key"):
        gumbel_softmax(None, LOGITS)
    with pytest.raises(ValueError, match="logits"):
        gumbel_softmax(KEY, jnp.float32(1.0))
    with pytest.raises(ValueError, match="axis"):
        gumbel_softmax(KEY, LOGITS, axis=3)
    with pytest.raises(ValueError, match="`k`"):
        gumbel_topk(KEY, LOGITS, 5)
    with pytest.raises(ValueError, match="`k`"):
        gumbel_topk(KEY, LOGITS, 0)
    with pytest.raises(TypeError, match="`k`"):
        gumbel_topk(KEY, LOGITS, 1.5)


# ----------------------------------------------------------------------------------------------
# Sparse simplex maps


def _sparsemax_reference(z):
    """Martins & Astudillo 2016, Algorithm 1 (numpy)."""
    zs = np.sort(z)[::-1]
    cs = np.cumsum(zs)
    ks = np.arange(1, len(z) + 1)
    k = ks[1 + ks * zs > cs].max()
    return np.maximum(z - (cs[k - 1] - 1) / k, 0)


def _entmax15_reference(z):
    """max(z/2 - tau, 0)^2 summing to 1, tau by bisection (numpy, float64)."""
    lo, hi = z.max() / 2 - 1, z.max() / 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.sum(np.maximum(z / 2 - mid, 0) ** 2) > 1 else (lo, mid)
    return np.maximum(z / 2 - 0.5 * (lo + hi), 0) ** 2


@pytest.mark.parametrize("fn,ref", [(sparsemax, _sparsemax_reference), (entmax15, _entmax15_reference)])
def test_sparse_maps_equal_references_with_gradients(fn, ref):
    rng = np.random.default_rng(0)
    for scale in (0.1, 1.0, 5.0):
        z = rng.normal(size=(6, 7)) * scale
        out = np.asarray(fn(jnp.asarray(z)))
        np.testing.assert_allclose(out, np.stack([ref(r) for r in z]), atol=1e-10)
        np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-12)
    # shift invariance, sparsity, hard limit for a dominant entry
    x = jnp.array([0.3, -1.2, 2.0, 0.9, 0.95])
    np.testing.assert_allclose(fn(x + 100.0), fn(x), atol=1e-12)
    assert np.sum(np.asarray(fn(x)) == 0) >= 1  # exact zeros (sparsemax: 2, entmax15: 1 here)
    np.testing.assert_array_equal(fn(x * 1e6), jax.nn.one_hot(2, 5))
    check_grads(fn, (x,), order=1, modes=["fwd", "rev"])
    np.testing.assert_allclose(fn(jnp.stack([x, -x]).T, axis=0), fn(jnp.stack([x, -x])).T)


@pytest.mark.parametrize("fn", [sparsemax, entmax15])
def test_sparse_maps_robust(fn):
    for v in EXTREME:
        out, g = jax.value_and_grad(lambda u: jnp.sum(fn(u) * jnp.arange(u.shape[0])))(v)
        assert np.isfinite(float(out)) and np.all(np.isfinite(g)), v
    np.testing.assert_allclose(fn(EXTREME[1]), 1 / 3)  # ties split evenly
    np.testing.assert_array_equal(fn(EXTREME[0]), [1, 0, 0, 0, 0])
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float64):
        assert fn(EXTREME[1].astype(dtype)).dtype == dtype
    assert fn(jnp.zeros((3, 0))).shape == (3, 0)
    with pytest.raises(ValueError, match="x"):
        fn(jnp.float32(1.0))
    with pytest.raises(ValueError, match="axis"):
        fn(EXTREME[1], axis=1)


# ----------------------------------------------------------------------------------------------
# Straight-through


def test_straight_through_value_and_gradient():
    soft = jnp.array([0.2, 0.7, 0.1])
    hard = jax.nn.one_hot(1, 3)
    out = straight_through(hard, soft)
    np.testing.assert_array_equal(out, hard)  # exact, not soft + (hard - soft)
    w = jnp.array([1.0, -2.0, 3.0])
    np.testing.assert_allclose(jax.grad(lambda s: straight_through(hard, s) @ w)(soft), w)
    # infinite soft values do not leak NaN into the hard value
    assert np.all(np.isfinite(straight_through(hard, jnp.array([jnp.inf, 0.0, 0.0]))))
    with pytest.raises(ValueError, match="broadcast"):
        straight_through(jnp.ones(4), soft)


@pytest.mark.parametrize("fn,op", [(ste_round, np.round), (ste_sign, np.sign), (ste_ceil, np.ceil)])
def test_ste_ops(fn, op):
    x = jnp.array([-1.5, -0.2, 0.0, 0.4, 0.5, 2.7, 1e30])
    np.testing.assert_array_equal(fn(x), op(np.asarray(x)))
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(fn(v) * jnp.arange(7.0)))(x), np.arange(7.0))
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float64):
        assert fn(x.astype(dtype)).dtype == dtype
    assert jax.jit(jax.vmap(fn))(x[:, None]).shape == (7, 1)
