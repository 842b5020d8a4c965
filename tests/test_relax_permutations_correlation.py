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
    p = fn(X, temperature=1.0)
    assert p.shape == (2, 5, 5)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    hard = fn(X, temperature=1e-6)
    np.testing.assert_allclose(hard @ X[..., None], -np.sort(-np.asarray(X))[..., None], atol=1e-6)
    asc = fn(X, temperature=1e-6, descending=False)
    np.testing.assert_allclose((asc @ X[..., None])[..., 0], np.sort(np.asarray(X)), atol=1e-6)
    uniform = fn(X, temperature=1e6)
    np.testing.assert_allclose(uniform, 0.2, atol=1e-4)
    check_grads(lambda v: fn(v, temperature=0.5), (X,), order=1, modes=["rev"])
    assert fn(X.astype(jnp.float32)).dtype == jnp.float32
    assert np.all(np.isfinite(jax.grad(lambda v: fn(v, 1e-6).sum())(jnp.array([1e30, -1e30, 0.0]))))
    with pytest.raises(ValueError, match="temperature"):
        fn(X, temperature=0.0)


def test_soft_correlations():
    t = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_allclose(soft_spearman(t * 3, t, regularization_strength=1e-3), 1.0, atol=1e-6)
    np.testing.assert_allclose(soft_spearman(-t, t, regularization_strength=1e-3), -1.0, atol=1e-6)
    assert float(soft_kendall_tau(t, t, temperature=1e-3)) == pytest.approx(1.0)
    assert float(soft_kendall_tau(-t, t, temperature=1e-3)) == pytest.approx(-1.0)
    g = jax.grad(lambda p: soft_spearman(p, t, 0.1))(jnp.array([0.3, 0.1, 0.5, 0.2, 0.9]))
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    check_grads(lambda p: soft_kendall_tau(p, t, 0.5), (jnp.array([0.3, 0.1, 0.5, 0.2, 0.9]),), order=2)
    assert soft_spearman(jnp.ones((3, 5)), jnp.ones((3, 5)) * t).shape == (3,)
    with pytest.raises(ValueError, match="target"):
        soft_spearman(t, t[:3])
    with pytest.raises(ValueError, match="temperature"):
        soft_kendall_tau(t, t, temperature=-1.0)
