"""Relaxations: arch logits -> mixing weights."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffnas_jax import mixing as R

ARCH = {"normal": 0.5 * jax.random.normal(jax.random.PRNGKey(0), (14, 8)),
        "reduce": 0.5 * jax.random.normal(jax.random.PRNGKey(1), (14, 8)),
        "beta": {"normal": jnp.arange(14.0), "reduce": -jnp.arange(14.0)}}

ALL = {
    "softmax": lambda: R.softmax(), "small_temperature": lambda: R.small_temperature(100),
    "sparsemax": lambda: R.sparsemax(), "gdas": lambda: R.gdas(100), "snas": lambda: R.snas(),
    "fbnet": lambda: R.fbnet(), "drnas": lambda: R.drnas(), "fairdarts": lambda: R.fairdarts(),
    "maxw": lambda: R.maxw(), "proxyless": lambda: R.proxyless(2), "proxyless1": lambda: R.proxyless(1),
}
SIMPLEX = ("softmax", "small_temperature", "sparsemax", "gdas", "snas", "fbnet", "drnas", "proxyless", "proxyless1")
ONE_HOT = ("gdas", "proxyless", "proxyless1")


@pytest.mark.parametrize("name", list(ALL))
def test_shapes_passthrough_and_range(name):
    relax = ALL[name]()
    mix = jax.jit(relax)(ARCH, jax.random.PRNGKey(2), 5)
    assert jax.tree_util.tree_structure(mix) == jax.tree_util.tree_structure(ARCH)
    np.testing.assert_array_equal(mix["beta"]["normal"], ARCH["beta"]["normal"])  # copied unchanged
    for cell in ("normal", "reduce"):
        m = np.asarray(mix[cell])
        assert m.shape == (14, 8) and np.all(np.isfinite(m)) and np.all(m >= 0)
        if name in SIMPLEX:
            np.testing.assert_allclose(m.sum(-1), 1.0, rtol=1e-5)
        if name in ONE_HOT:
            assert set(np.unique(m)) <= {0.0, 1.0}
        if name == "fairdarts":
            assert np.all(m <= 1)
        if name == "maxw":
            np.testing.assert_allclose(m.max(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", list(ALL))
def test_gradient_reaches_the_logits(name):
    relax = ALL[name]()
    target = jax.random.normal(jax.random.PRNGKey(3), (14, 8))

    def loss(arch):
        mix = relax(arch, jax.random.PRNGKey(4), 10)
        return jnp.sum(mix["normal"] * target) + jnp.sum(mix["reduce"] * target)

    g = jax.jit(jax.grad(loss))(ARCH)
    assert np.all(np.isfinite(g["normal"])) and np.abs(g["normal"]).max() > 0
    np.testing.assert_array_equal(g["beta"]["normal"], 0.0)


def test_dtypes_are_kept_and_vmap_over_keys():
    relax = R.gdas(10)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float64):
        arch = {"cell": jnp.zeros((6, 5), dtype)}
        assert relax(arch, jax.random.PRNGKey(0), 0)["cell"].dtype == dtype
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    mixes = jax.vmap(lambda k: R.snas()({"cell": jnp.zeros((6, 5))}, k, 0)["cell"])(keys)
    assert mixes.shape == (64, 6, 5) and float(jnp.std(mixes[:, 0, 0])) > 0


def test_schedules_hit_their_endpoints():
    g = R.gdas(total_steps=100, tau_max=10.0, tau_min=0.1)
    assert float(g.temperature(0)) == pytest.approx(10.0) and float(g.temperature(100)) == pytest.approx(0.1, rel=1e-5)
    assert float(g.temperature(1000)) == pytest.approx(0.1, rel=1e-5)
    s = R.snas(tau0=1.0, decay=0.97, steps_per_epoch=10)
    assert float(s.temperature(20)) == pytest.approx(0.97 ** 2, rel=1e-6)
    t = R.small_temperature(total_steps=50, t0=1.0, t_min=0.01)
    assert float(t.temperature(50)) == pytest.approx(0.01, rel=1e-5)
    assert R.drnas().temperature(3) is None


def test_small_temperature_limit_is_one_hot_and_extremes_finite():
    relax = R.small_temperature(total_steps=10, t0=1.0, t_min=1e-6, noise=0.0)
    mix = relax({"cell": jnp.array([[0.1, 0.3, 0.2]])}, jax.random.PRNGKey(0), 10)["cell"]
    np.testing.assert_allclose(mix, [[0.0, 1.0, 0.0]], atol=1e-6)
    big = {"cell": jnp.array([[1e30, -1e30, 0.0]])}
    for name in ALL:
        out = ALL[name]()(big, jax.random.PRNGKey(0), 0)["cell"]
        assert np.all(np.isfinite(np.asarray(out))), name


def test_gdas_samples_follow_softmax():
    logits = jnp.log(jnp.array([0.6, 0.3, 0.1]))
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    mixes = jax.vmap(lambda k: R.gdas(10)({"c": logits[None]}, k, 0)["c"][0])(keys)
    np.testing.assert_allclose(mixes.mean(0), [0.6, 0.3, 0.1], atol=0.03)


def test_proxyless_gradient_estimator():
    # one path: dL/da = p * (dg - <dg, p>) over all ops (Cai et al. 2019, Eq. 4)
    a = jnp.array([[0.2, -0.1, 0.5]])
    dg = jnp.array([[1.0, 2.0, -1.0]])
    g = jax.grad(lambda x: jnp.sum(R.proxyless(1)({"c": x}, jax.random.PRNGKey(0), 0)["c"] * dg))(a)
    p = jax.nn.softmax(a)
    np.testing.assert_allclose(g, p * (dg - jnp.sum(dg * p)), rtol=1e-6)
    # two paths: only the two sampled logits get gradient
    g2 = jax.grad(lambda x: jnp.sum(R.proxyless(2)({"c": x}, jax.random.PRNGKey(0), 0)["c"] * dg))(a)
    assert int(jnp.sum(g2 != 0)) == 2


def test_fairdarts_zero_one_loss_is_defined_once():
    from diffnas_jax import regularizers

    with pytest.warns(DeprecationWarning, match="regularizers"):
        old = R.fairdarts_zero_one_loss
    assert old is regularizers.fairdarts_zero_one_loss
    far = float(old({"c": jnp.full((3, 4), 20.0), "beta": {"c": jnp.zeros(3)}}))
    assert far == pytest.approx(-0.25, rel=1e-6)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="temperature"):
        R.softmax(temperature=0.0)
    with pytest.raises(ValueError, match="tau_min"):
        R.gdas(10, tau_min=-1.0)
    with pytest.raises(ValueError, match="num_paths"):
        R.proxyless(3)
    with pytest.raises(ValueError, match="concentration"):
        R.drnas(concentration="exp")
    with pytest.raises(ValueError, match="relaxation"):
        R.get_relaxation("enas")
    with pytest.raises(ValueError, match="choice"):
        R.softmax()({"c": jnp.float32(1.0)}, jax.random.PRNGKey(0), 0)


def test_deprecated_module_names_forward_with_a_warning():
    from diffnas_jax import mixing, regularizers

    with pytest.warns(DeprecationWarning, match="diffnas_jax.mixing"):
        from diffnas_jax import relaxations
        assert relaxations.softmax is mixing.softmax
    with pytest.warns(DeprecationWarning, match="diffnas_jax.regularizers"):
        from diffnas_jax import objectives
        assert objectives.zero_one_loss is regularizers.zero_one_loss
