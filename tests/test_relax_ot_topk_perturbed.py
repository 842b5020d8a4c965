"""Sinkhorn sort/rank, soft top-k masks and perturbed optimizers (issue 2)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from diffnas_jax.relax import (hard_topk_mask, perturbed, perturbed_argmax, perturbed_topk, sinkhorn_rank,
                               sinkhorn_sort, soft_topk_mask)
from diffnas_jax.relax.sinkhorn import squash

X = jnp.array([0.3, -1.2, 2.0, 0.9, 0.95, -0.1, 0.5])
XB = jnp.array([[0.3, -1.2, 2.0, 0.9, 0.95], [1.0, 0.0, -1.0, 3.0, 2.0]])
EXTREME = [jnp.array([1e30, -1e30, 0.0, 1.0, 1.0]), jnp.array([2.0, 2.0, 2.0]), jnp.array([0.7])]


def _hard_ranks(x):
    return np.argsort(np.argsort(np.asarray(x), axis=-1), axis=-1) + 1


# ----------------------------------------------------------------------------------------------
# Sinkhorn sort and rank


def _unrolled(v, eps, iters, sort):
    """Plain log-domain Sinkhorn, unrolled (the reference for the implicit gradient)."""
    n = v.shape[-1]
    xs = squash(v[None], "sigmoid")[0]
    K = (xs[:, None] - jnp.linspace(0, 1, n)[None]) ** 2 / eps
    la = jnp.full((n,), -jnp.log(n))

    def body(_, c):
        f = la - jax.nn.logsumexp(c[1][None] - K, 1)
        return f, la - jax.nn.logsumexp(f[:, None] - K, 0)

    f, g = jax.lax.fori_loop(0, iters, body, (jnp.zeros(n), jnp.zeros(n)))
    p = jnp.exp(f[:, None] + g[None] - K)
    if sort:
        return p.T @ v / p.sum(0)
    return n * (p / p.sum(1, keepdims=True)) @ (jnp.arange(1, n + 1) / n)


def test_sinkhorn_hard_limit_both_directions():
    np.testing.assert_allclose(sinkhorn_rank(XB, 1e-4), _hard_ranks(XB), atol=1e-4)
    np.testing.assert_allclose(sinkhorn_sort(XB, 1e-4), np.sort(XB, -1), atol=1e-4)
    np.testing.assert_allclose(sinkhorn_rank(XB, 1e-4, "DESCENDING"), _hard_ranks(-XB), atol=1e-4)
    np.testing.assert_allclose(sinkhorn_sort(XB, 1e-4, "DESCENDING"), -np.sort(-XB, -1), atol=1e-4)
    # large epsilon: the mean rank / the mean value
    np.testing.assert_allclose(sinkhorn_rank(X, 1e3), 4.0, atol=1e-2)
    np.testing.assert_allclose(sinkhorn_sort(X, 1e3), float(X.mean()), atol=1e-2)
    # axis, batch shapes, fewer targets (soft quantiles)
    np.testing.assert_allclose(sinkhorn_rank(XB.T, 1e-4, axis=0), _hard_ranks(XB).T, atol=1e-4)
    q = sinkhorn_sort(XB, 1e-4, num_targets=3)
    assert q.shape == (2, 3) and np.all(np.diff(np.asarray(q), axis=-1) > 0)


def test_sinkhorn_implicit_gradient_equals_unrolled_and_finite_differences():
    w = jnp.arange(7.0) ** 1.5
    for fn, sort in ((sinkhorn_rank, False), (sinkhorn_sort, True)):
        g = jax.grad(lambda v: jnp.sum(fn(v, 0.1) * w))(X)
        ref = jax.grad(lambda v: jnp.sum(_unrolled(v, 0.1, 1000, sort) * w))(X)
        np.testing.assert_allclose(g, ref, atol=1e-5)
        np.testing.assert_allclose(fn(X, 0.1), _unrolled(X, 0.1, 1000, sort), atol=1e-6)
        check_grads(lambda v: fn(v, 0.1), (X,), order=1, modes=["rev"], atol=1e-4, rtol=1e-4)
    # epsilon may be traced and differentiated
    de = jax.grad(lambda e: jnp.sum(sinkhorn_rank(X, e) * w))(0.1)
    fd = (jnp.sum(sinkhorn_rank(X, 0.1 + 1e-5) * w) - jnp.sum(sinkhorn_rank(X, 0.1 - 1e-5) * w)) / 2e-5
    np.testing.assert_allclose(de, fd, rtol=1e-4)


def test_sinkhorn_permutation_equivariance_jit_vmap():
    perm = np.array([3, 0, 6, 2, 5, 1, 4])
    r = sinkhorn_rank(X, 0.05)
    np.testing.assert_allclose(sinkhorn_rank(X[perm], 0.05), r[perm], atol=1e-8)
    np.testing.assert_allclose(sinkhorn_sort(X[perm], 0.05), sinkhorn_sort(X, 0.05), atol=1e-8)
    f = jax.jit(jax.vmap(lambda v: sinkhorn_rank(v, 0.05)))
    np.testing.assert_allclose(f(XB), sinkhorn_rank(XB, 0.05), atol=1e-8)
    np.testing.assert_allclose(jnp.sum(r), 28.0, atol=1e-6)  # ranks of a doubly stochastic plan


@pytest.mark.parametrize("fn", [sinkhorn_rank, sinkhorn_sort])
def test_sinkhorn_robust(fn):
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float64):
        assert fn(X.astype(dtype)).dtype == dtype
    # epsilon traced: one compilation per shape
    fg = jax.jit(lambda u, e: (fn(u, e), jax.grad(lambda z: jnp.sum(fn(z, e) * jnp.arange(z.shape[0])))(u)))
    for v in EXTREME:
        for eps in (1e-6, 1e-2, 10.0):
            out, g = fg(v.astype(jnp.float32), jnp.float32(eps))
            assert out.shape == v.shape and np.all(np.isfinite(out)) and np.all(np.isfinite(g)), (v, eps)
    g = jax.grad(lambda u: jnp.sum(fn(u, 1e-2) ** 2).astype(jnp.float32))(X.astype(jnp.bfloat16))
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))
    # ties share ranks; a length-1 input is its own sort / rank 1; empty stays empty
    if fn is sinkhorn_rank:
        np.testing.assert_allclose(fn(jnp.array([1.0, 1.0, 3.0]), 1e-3), [1.5, 1.5, 3.0], atol=1e-3)
        np.testing.assert_allclose(fn(jnp.array([0.7]), 1e-3), [1.0])
    assert fn(jnp.zeros((2, 0))).shape == (2, 0)


def test_sinkhorn_bad_arguments():
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_sort(X, 0.0)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_rank(X, -1.0)
    with pytest.raises(ValueError, match="direction"):
        sinkhorn_rank(X, direction="UP")
    with pytest.raises(ValueError, match="squashing"):
        sinkhorn_rank(X, squashing="tanh")
    with pytest.raises(ValueError, match="values"):
        sinkhorn_rank(jnp.float32(1.0))
    with pytest.raises(ValueError, match="axis"):
        sinkhorn_sort(X, axis=2)
    with pytest.raises(ValueError, match="maxiter"):
        sinkhorn_sort(X, maxiter=0)
    with pytest.raises(ValueError, match="tol"):
        sinkhorn_sort(X, tol=-1.0)


# ----------------------------------------------------------------------------------------------
# Soft top-k masks


def _capped_simplex_reference(z, k):
    """Projection onto {0 <= y <= 1, sum y = k} by bisection on the threshold (float64 numpy)."""
    lo, hi = z.min() - 1.0, z.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.clip(z - mid, 0, 1).sum() > k else (lo, mid)
    return np.clip(z - 0.5 * (lo + hi), 0, 1)


def test_sparse_topk_is_the_capped_simplex_projection():
    rng = np.random.default_rng(0)
    f = jax.jit(soft_topk_mask, static_argnums=1)  # one compilation per (n, k)
    for n, k in ((5, 1), (5, 3), (9, 4), (9, 8)):
        for _ in range(5):
            s = float(rng.choice([0.1, 1.0, 3.0]))
            v = rng.normal(size=n) * 2
            np.testing.assert_allclose(f(jnp.asarray(v), k, regularization_strength=s),
                                       _capped_simplex_reference(v / s, k), atol=1e-10)
    # sparsity: far from the k-th value the mask is exactly 0 or 1
    m = np.asarray(soft_topk_mask(X, 3, regularization_strength=0.7))
    assert m[2] == 1.0 and m[1] == 0.0 and m[5] == 0.0


@pytest.mark.parametrize("method,kw", [("sparse", {"regularization_strength": 0.7}), ("ot", {"epsilon": 0.1})])
def test_soft_topk_gradients_sum_and_limits(method, kw):
    w = jnp.arange(7.0) ** 1.5
    modes = ["fwd", "rev"] if method == "sparse" else ["rev"]
    check_grads(lambda v: soft_topk_mask(v, 3, method, **kw) @ w, (X,), order=1, modes=modes, atol=1e-4, rtol=1e-4)
    m = soft_topk_mask(XB, 2, method, **kw)
    np.testing.assert_allclose(m.sum(-1), 2.0, atol=1e-6)
    assert np.all((m >= -1e-12) & (m <= 1 + 1e-12))
    # regularisation -> 0: the hard top-k; -> infinity: k/n everywhere
    small = {"regularization_strength": 1e-6} if method == "sparse" else {"epsilon": 1e-6}
    big = {"regularization_strength": 1e6} if method == "sparse" else {"epsilon": 1e6}
    np.testing.assert_allclose(soft_topk_mask(XB, 2, method, **small), hard_topk_mask(XB, 2), atol=1e-6)
    np.testing.assert_allclose(soft_topk_mask(X, 3, method, **big), 3 / 7, atol=1e-3)
    # permutation equivariance, jit and vmap, another axis
    perm = np.array([3, 0, 6, 2, 5, 1, 4])
    np.testing.assert_allclose(soft_topk_mask(X[perm], 3, method, **kw), soft_topk_mask(X, 3, method, **kw)[perm],
                               atol=1e-8)
    f = jax.jit(jax.vmap(lambda v: soft_topk_mask(v, 2, method, **kw)))
    np.testing.assert_allclose(f(XB), m, atol=1e-8)
    np.testing.assert_allclose(soft_topk_mask(XB.T, 2, method, axis=0, **kw), m.T, atol=1e-8)


@pytest.mark.parametrize("method", ["sparse", "ot"])
def test_soft_topk_robust(method):
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float64):
        out = soft_topk_mask(X.astype(dtype), 3, method)
        assert out.dtype == dtype and np.all(np.isfinite(np.asarray(out, np.float32)))
    for v in EXTREME:
        for reg in (1e-6, 1.0, 1e6):
            kw = {"regularization_strength": reg} if method == "sparse" else {"epsilon": reg}
            k = min(2, v.shape[0])
            out, g = jax.value_and_grad(lambda u: soft_topk_mask(u, k, method, **kw) @ jnp.arange(u.shape[0]))(v)
            assert np.isfinite(float(out)) and np.all(np.isfinite(g)), (v, reg)
            np.testing.assert_allclose(soft_topk_mask(v, k, method, **kw).sum(), k, atol=1e-5)
    # ties split evenly; k == n keeps everything
    np.testing.assert_allclose(soft_topk_mask(jnp.array([2.0, 2.0, 2.0]), 2, method), 2 / 3, atol=1e-6)
    np.testing.assert_allclose(soft_topk_mask(X, 7, method), 1.0)
    np.testing.assert_allclose(soft_topk_mask(jnp.array([1e30, -1e30, 0.0, 1.0, 1.0]), 2, "sparse"),
                               [1.0, 0.0, 0.0, 0.5, 0.5])


def test_soft_topk_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        soft_topk_mask(X, 2, "greedy")
    with pytest.raises(ValueError, match="`k`"):
        soft_topk_mask(X, 0)
    with pytest.raises(ValueError, match="`k`"):
        soft_topk_mask(X, 8)
    with pytest.raises(TypeError, match="`k`"):
        soft_topk_mask(X, 2.5)
    with pytest.raises(ValueError, match="regularization_strength"):
        soft_topk_mask(X, 2, regularization_strength=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        soft_topk_mask(X, 2, "ot", epsilon=-1.0)
    with pytest.raises(ValueError, match="values"):
        soft_topk_mask(jnp.float32(1.0), 1)
    with pytest.raises(ValueError, match="values"):
        soft_topk_mask(jnp.zeros((0,)), 1)


# ----------------------------------------------------------------------------------------------
# Perturbed optimizers


def test_perturbed_argmax_is_softmax_in_expectation_with_its_jacobian():
    """Gumbel noise: E[one_hot(argmax(x + sigma G))] = softmax(x / sigma) (Gumbel-max)."""
    x = X[:5]
    key = jax.random.PRNGKey(0)
    p = perturbed_argmax(key, x, num_samples=20000, sigma=1.0)
    s = jax.nn.softmax(x)
    np.testing.assert_allclose(p, s, atol=0.015)  # 3 standard errors at M = 2e4
    jac = jax.jacrev(lambda v: perturbed_argmax(key, v, num_samples=20000, sigma=1.0))(x)
    np.testing.assert_allclose(jac, jnp.diag(s) - jnp.outer(s, s), atol=0.02)
    # sigma -> 0: the hard argmax; rows of a batch are independent problems
    np.testing.assert_array_equal(perturbed_argmax(key, XB, num_samples=10, sigma=1e-6),
                                  jax.nn.one_hot(jnp.argmax(XB, -1), 5))


def test_perturbed_topk_mask_and_gradient():
    key = jax.random.PRNGKey(1)
    m = perturbed_topk(key, XB, 2, num_samples=500, sigma=0.5)
    np.testing.assert_allclose(m.sum(-1), 2.0, atol=1e-6)
    assert np.all((m >= 0) & (m <= 1))
    np.testing.assert_array_equal(perturbed_topk(key, XB, 2, sigma=1e-6), hard_topk_mask(XB, 2))
    # Jacobian: every sample mask sums to k, so (with optax's baseline) columns sum to 0 exactly;
    # it is the Hessian of the convex perturbed max, so symmetric with a positive diagonal
    jac = jax.jacrev(lambda v: perturbed_topk(key, v, 2, num_samples=4000, sigma=0.5))(XB[0])
    np.testing.assert_allclose(jnp.sum(jac, axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(jac, jac.T, atol=0.08)
    assert np.all(np.diag(jac)[[0, 3, 4]] > 0.1)  # the items near the top-2 boundary


def test_perturbed_general_solver_batches_and_errors():
    key = jax.random.PRNGKey(2)
    rank = perturbed(lambda t: jnp.argsort(jnp.argsort(t)).astype(t.dtype) + 1, num_samples=200, sigma=0.1,
                     noise="normal")
    r = rank(key, XB)
    assert r.shape == XB.shape and r.dtype == XB.dtype
    np.testing.assert_allclose(r.sum(-1), 15.0, atol=1e-9)
    # jit / vmap over keys, and the rows of a batch get independent keys (vmap of one row = batch)
    f = jax.jit(lambda k, v: perturbed_argmax(k, v, num_samples=64, sigma=0.5))
    many = jax.vmap(f, in_axes=(0, None))(jax.random.split(key, 3), XB)
    assert many.shape == (3, 2, 5) and not np.allclose(many[0], many[1])
    assert perturbed_argmax(key, X.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    g = jax.grad(lambda v: perturbed_argmax(key, v, sigma=1e-6) @ jnp.arange(5.0))(EXTREME[0])
    assert np.all(np.isfinite(g))
    with pytest.raises(ValueError, match="sigma"):
        perturbed_argmax(key, X, sigma=0.0)
    with pytest.raises(ValueError, match="noise"):
        perturbed_argmax(key, X, noise="cauchy")
    with pytest.raises(ValueError, match="num_samples"):
        perturbed_argmax(key, X, num_samples=0)
    with pytest.raises(ValueError, match="`k`"):
        perturbed_topk(key, X, 9)
    with pytest.raises(ValueError, match="key"):
        perturbed_argmax(None, X)
    with pytest.raises(TypeError, match="solver"):
        perturbed(3)
