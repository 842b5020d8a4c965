"""Sinkhorn sort/rank, soft top-k masks and perturbed optimizers (issue 2)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from diffnas_jax.relax import sinkhorn_rank, sinkhorn_sort
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
