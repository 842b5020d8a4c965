"""NeuralSort, SoftSort and the soft rank correlations."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from diffnas_jax.relax import neural_sort, soft_kendall_tau, soft_permutation, soft_spearman

X = jnp.array([[0.3, -1.2, 2.0, 0.9, 0.95], [1.0, 0.0, -1.0, 3.0, 2.0]])


@pytest.mark.parametrize("fn", [neural_sort, soft_permutation])
def test_rows_stochastic_and_hard_limit(fn):
    # temperature traced: one compilation per direction and dtype instead of one per primitive
    run = jax.jit(lambda v, tau: fn(v, temperature=tau))
    run_asc = jax.jit(lambda v, tau: fn(v, temperature=tau, descending=False))
    p = run(X, 1.0)
    assert p.shape == (2, 5, 5)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    hard = run(X, 1e-6)
    np.testing.assert_allclose(hard @ X[..., None], -np.sort(-np.asarray(X))[..., None], atol=1e-6)
    asc = run_asc(X, 1e-6)
    np.testing.assert_allclose((asc @ X[..., None])[..., 0], np.sort(np.asarray(X)), atol=1e-6)
    uniform = run(X, 1e6)
    np.testing.assert_allclose(uniform, 0.2, atol=1e-4)
    check_grads(jax.jit(lambda v: fn(v, temperature=0.5)), (X,), order=1, modes=["rev"])
    assert fn(X.astype(jnp.float32)).dtype == jnp.float32
    g = jax.jit(jax.grad(lambda v: fn(v, 1e-6).sum()))(jnp.array([1e30, -1e30, 0.0]))
    assert np.all(np.isfinite(g))
    with pytest.raises(ValueError, match="temperature"):
        fn(X, temperature=0.0)


def test_soft_correlations():
    # one jitted program per function and shape (strengths traced); eager calls compiled every
    # primitive on its own (168 compilations)
    t = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
    spearman = jax.jit(lambda p, s: (soft_spearman(p, t, s), jax.grad(lambda v: soft_spearman(v, t, s))(p)))
    kendall = jax.jit(soft_kendall_tau)
    np.testing.assert_allclose(spearman(t * 3, 1e-3)[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(spearman(-t, 1e-3)[0], -1.0, atol=1e-6)
    assert float(kendall(t, t, 1e-3)) == pytest.approx(1.0)
    assert float(kendall(-t, t, 1e-3)) == pytest.approx(-1.0)
    g = spearman(jnp.array([0.3, 0.1, 0.5, 0.2, 0.9]), 0.1)[1]
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    check_grads(jax.jit(lambda p: soft_kendall_tau(p, t, 0.5)), (jnp.array([0.3, 0.1, 0.5, 0.2, 0.9]),), order=2)
    assert jax.eval_shape(soft_spearman, jnp.ones((3, 5)), jnp.ones((3, 5)) * t).shape == (3,)
    with pytest.raises(ValueError, match="target"):
        soft_spearman(t, t[:3])
    with pytest.raises(ValueError, match="temperature"):
        soft_kendall_tau(t, t, temperature=-1.0)
