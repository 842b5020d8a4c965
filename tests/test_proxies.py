"""Zero-cost proxies and ranking metrics."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from diffnas_jax.proxies import (PROXIES, fisher, get_proxy, grad_norm, grasp, jacob_cov, kendall_tau, naswot,
                                 ranking_consistency, relu_activations, score_all, score_population, snip,
                                 spearman_rho, synflow, top_k_precision)

rng = np.random.RandomState(0)
X = jnp.asarray(rng.randn(6, 5))
Y = jnp.asarray(rng.randint(0, 3, 6))
W = {"w1": jnp.asarray(rng.randn(5, 40)), "b1": jnp.asarray(rng.randn(40)), "w2": jnp.asarray(rng.randn(40, 3))}


def mlp(w, x):
    return jax.nn.relu(x @ w["w1"] + w["b1"]) @ w["w2"]


def xent(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1))


def test_relu_activations_are_found_in_flax_models():
    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3))(x))
            x = jax.nn.relu(nn.Conv(4, (3, 3))(x))
            return nn.Dense(3)(x.mean((1, 2)))

    m = CNN()
    x = jnp.asarray(rng.randn(2, 6, 6, 1))
    v = m.init(jax.random.PRNGKey(0), x)
    out, acts = relu_activations(lambda w, xx: m.apply(w, xx), v, x)
    np.testing.assert_allclose(out, m.apply(v, x), rtol=1e-12)
    assert [a.shape for a in acts] == [(2, 6, 6, 4), (2, 6, 6, 4)]
    assert all(float(a.min()) >= 0 for a in acts)


def test_gradient_proxies_equal_direct_formulas():
    g = jax.grad(lambda w: xent(mlp(w, X), Y))(W)
    flat_w = jnp.concatenate([W[k].ravel() for k in sorted(W)])
    flat_g = jnp.concatenate([g[k].ravel() for k in sorted(W)])
    np.testing.assert_allclose(grad_norm(mlp, W, (X, Y)), jnp.linalg.norm(flat_g), rtol=1e-10)
    np.testing.assert_allclose(snip(mlp, W, (X, Y)), jnp.sum(jnp.abs(flat_w * flat_g)), rtol=1e-10)
    # GraSP with the explicit Hessian of the flattened loss
    shapes = {k: W[k].shape for k in sorted(W)}
    sizes = [int(np.prod(s)) for s in shapes.values()]

    def unflat(v):
        parts = jnp.split(v, np.cumsum(sizes)[:-1])
        return {k: p.reshape(shapes[k]) for k, p in zip(sorted(W), parts)}

    # jitted: eagerly, the Hessian's vmapped forward-over-reverse dispatched hundreds of small programs
    hess = jax.jit(jax.hessian(lambda v: xent(mlp(unflat(v), X), Y)))(flat_w)
    np.testing.assert_allclose(grasp(mlp, W, (X, Y)), flat_w @ (hess @ flat_g), rtol=1e-8)


def test_fisher_and_naswot_equal_hand_computations():
    pre = X @ W["w1"] + W["b1"]
    act = jax.nn.relu(pre)
    g_act = jax.grad(lambda a: xent(a @ W["w2"], Y) * X.shape[0])(act)
    expected_fisher = 0.5 * jnp.sum(jnp.mean((act * g_act) ** 2, axis=0))
    np.testing.assert_allclose(fisher(mlp, W, (X, Y)), expected_fisher, rtol=1e-10)
    codes = (pre > 0).astype(jnp.float64)
    k = codes @ codes.T + (1 - codes) @ (1 - codes).T
    np.testing.assert_allclose(naswot(mlp, W, (X, Y)), np.linalg.slogdet(np.asarray(k))[1], rtol=1e-10)


def test_synflow_of_a_homogeneous_network_is_depth_times_flow():
    # f(x) = W2 W1 x has degree 1 in each layer, so sum theta dR/dtheta = 2 R (Euler)
    w = {"w1": jnp.asarray(rng.randn(5, 7)), "w2": jnp.asarray(rng.randn(7, 3))}
    lin = lambda p, x: x @ p["w1"] @ p["w2"]
    r = jnp.sum(jnp.ones((1, 5)) @ jnp.abs(w["w1"]) @ jnp.abs(w["w2"]))
    np.testing.assert_allclose(synflow(lin, w, (X, Y)), 2.0 * r, rtol=1e-10)


def test_all_proxies_finite_deterministic_and_jittable():
    s1, s2 = score_all(mlp, W, (X, Y)), score_all(mlp, W, (X, Y))
    assert s1 == s2 and set(s1) == set(PROXIES)
    assert all(np.isfinite(v) for v in s1.values())
    jitted = jax.jit(lambda w: jacob_cov(mlp, w, (X, Y)))(W)
    np.testing.assert_allclose(jitted, s1["jacob_cov"], rtol=1e-8)
    with pytest.raises(ValueError, match="proxy"):
        get_proxy("zen")
    # two examples with identical ReLU codes make the NASWOT kernel singular: -inf, never NaN
    dup = jnp.concatenate([X[:1], X[:1], X[2:]])
    assert naswot(mlp, W, (dup, Y)) == -np.inf
    with pytest.raises(ValueError, match="ReLU"):
        naswot(lambda w, x: x @ w["w1"], W, (X, Y))


def test_ranking_metrics_agree_with_scipy_including_ties():
    a = np.array([0.1, 0.4, 0.4, 0.9, 0.3, 0.3, 0.8])
    b = np.array([1.0, 2.0, 3.0, 7.0, 2.0, 1.0, 5.0])
    np.testing.assert_allclose(kendall_tau(a, b), scipy.stats.kendalltau(a, b).statistic, rtol=1e-12)
    np.testing.assert_allclose(spearman_rho(a, b), scipy.stats.spearmanr(a, b).statistic, rtol=1e-12)
    assert kendall_tau(a, a) == pytest.approx(1.0) and spearman_rho(a, -a) == pytest.approx(-1.0)
    assert top_k_precision(b, b, 3) == 1.0
    assert top_k_precision([3, 2, 1, 0], [0, 1, 2, 3], 2) == 0.0
    r = ranking_consistency(a, b, k=0.3)
    assert set(r) == {"kendall_tau", "spearman_rho", "top_k_precision"}
    with pytest.raises(ValueError, match="equal length"):
        kendall_tau([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="`k`"):
        top_k_precision(a, b, 0)


def test_score_population_vmaps_over_architectures():
    """A gated MLP: arch (2,) mixes two hidden branches; every proxy, vmapped over 4 one-hot or
    soft architectures, equals scoring each architecture alone."""
    w = {**W, "w1b": jnp.asarray(rng.randn(5, 40))}

    def gated(w_, x, arch):
        h = arch[0] * jax.nn.relu(x @ w_["w1"] + w_["b1"]) + arch[1] * jax.nn.relu(x @ w_["w1b"])
        return h @ w_["w2"]

    archs = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8]])
    for name in PROXIES:
        together = score_population(name, gated, w, (X, Y), archs)
        # one compiled program per proxy, called per architecture (eager dispatch dominated this test)
        one = jax.jit(lambda w_, a, proxy=get_proxy(name): proxy(lambda w2, x: gated(w2, x, a), w_, (X, Y)))
        alone = [float(one(w, a)) for a in archs]
        np.testing.assert_allclose(np.asarray(together), alone, rtol=1e-6, atol=1e-9, err_msg=name)
