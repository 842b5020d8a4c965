"""The jit-compiled bilevel step: every estimator on the NB201 space; vmap over seeds."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffnas_jax import hypergrad, mixing
from diffnas_jax.search import SearchState, init_search_state, make_step
from diffnas_jax.spaces import nb201

SPACE = nb201.search_space(C=4, N=1, num_classes=10)
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(16, 8, 8, 3)))
Y = jnp.asarray(RNG.integers(0, 10, 16))
BT, BV = (X[:8], Y[:8]), (X[8:], Y[8:])
W_OPT, A_OPT = optax.sgd(0.05, momentum=0.9), optax.adam(3e-2, b1=0.5, b2=0.999)

ESTIMATORS = {
    "first_order": hypergrad.first_order(),
    "unrolled_fd": hypergrad.unrolled(eta=0.05, momentum=0.9, weight_decay=3e-4),
    "unrolled_exact": hypergrad.unrolled(eta=0.05, hvp="exact"),
    "implicit_cg": hypergrad.implicit(solver="cg", maxiter=3, damping=1e-2),
    "rarts": hypergrad.rarts(),
}


# second-order estimators compile slowly on 2 cores; the toy-space matrix (test_zoo_matrix) runs
# them by default, here they are the slow, real-space check
@pytest.mark.parametrize("name", [n if n == "first_order" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in ESTIMATORS])
def test_every_estimator_steps_under_jit(name):
    est = ESTIMATORS[name]
    relax = mixing.gdas(total_steps=10) if name == "first_order" else mixing.softmax()
    step = jax.jit(make_step(SPACE, relax, est, W_OPT, A_OPT))
    state = init_search_state(jax.random.PRNGKey(0), SPACE, X, W_OPT, A_OPT, est)
    assert isinstance(state, SearchState)
    arch0 = state.arch["cell"]
    for _ in range(2):
        state, metrics = step(state, BT, BV)
    assert int(state.step) == 2
    assert all(np.isfinite(float(v)) for v in metrics.values())
    assert np.all(np.isfinite(state.arch["cell"])) and float(jnp.max(jnp.abs(state.arch["cell"] - arch0))) > 0
    if name == "first_order":
        assert float(metrics["temperature"]) < 10.0  # the GDAS schedule is logged


@pytest.mark.slow  # the default run covers this in tests/test_driver.py::test_vmapped_seeds_match_separate_runs
def test_vmapped_seeds_equal_separate_runs():
    est = hypergrad.first_order()
    step = make_step(SPACE, mixing.softmax(), est, W_OPT, A_OPT)
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    states = jax.vmap(lambda k: init_search_state(k, SPACE, X, W_OPT, A_OPT, est))(keys)
    vstep = jax.jit(jax.vmap(step, in_axes=(0, None, None)))
    for _ in range(2):
        states, _ = vstep(states, BT, BV)
    one = jax.jit(step)
    for i, k in enumerate(keys):
        s = init_search_state(k, SPACE, X, W_OPT, A_OPT, est)
        for _ in range(2):
            s, _ = one(s, BT, BV)
        np.testing.assert_allclose(states.arch["cell"][i], s.arch["cell"], rtol=1e-9, atol=1e-12)


def test_bad_arguments():
    with pytest.raises(TypeError, match="hypergradient"):
        make_step(SPACE, mixing.softmax(), lambda *a: None, W_OPT, A_OPT)
    with pytest.raises(TypeError, match="weight_opt"):
        make_step(SPACE, mixing.softmax(), hypergrad.first_order(), object(), A_OPT)
