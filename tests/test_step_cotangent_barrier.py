"""layers.cotangent_barrier: the identity in value and in every derivative, and NB201 search cells
with it equal the cells without it (float64: values, gradients, BatchNorm state updates,
forward-over-reverse); on CPU it is a fusion boundary that XLA keeps. The NB201 fixture tests
(tests/test_space_nb201.py) run the supernet with the barrier against the PyTorch reference."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from diffnas_jax.spaces import layers, nb201

# Test-only: XLA backend optimisation level 0 halves compile time (one call per program here).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _f(x, kind):
    """A chain whose cotangent reaches ``x`` through several consumers (as a cell state's does)."""
    y = layers.cotangent_barrier(jnp.sin(x) * x, kind)
    return jnp.sum(jnp.cos(y) * y[..., ::-1] + jnp.pad(y, ((0, 0), (1, 0), (0, 0)))[:, :-1] ** 2)


def test_barrier_is_the_identity_in_value_gradient_and_forward_over_reverse():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3), jnp.float64)
    v = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)
    np.testing.assert_array_equal(layers.cotangent_barrier(x, "dot"), x)
    for fn in (lambda f: f, jax.jit):
        g_dot, g_none = (fn(jax.grad(lambda x, k=k: _f(x, k)))(x) for k in ("dot", "none"))
        # identity contraction: every off-diagonal product is an exact zero, so bit-equal
        np.testing.assert_array_equal(g_dot, g_none)
    hvp = [jax.jvp(jax.grad(lambda x, k=k: _f(x, k)), (x,), (v,))[1] for k in ("dot", "none")]
    np.testing.assert_array_equal(*hvp)
    # vmap over a leading axis and jvp of the barrier itself
    gv = jax.vmap(jax.grad(lambda x: _f(x[None], "dot")))(x)
    np.testing.assert_array_equal(gv, jax.vmap(jax.grad(lambda x: _f(x[None], "none")))(x))
    np.testing.assert_array_equal(jax.jvp(lambda x: layers.cotangent_barrier(x, "dot"), (x,), (v,))[1], v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_barrier_keeps_dtype(dtype):
    x = jnp.linspace(-2, 2, 12, dtype=dtype).reshape(3, 4)
    y = layers.cotangent_barrier(x, "dot")
    g = jax.grad(lambda x: jnp.sum(layers.cotangent_barrier(x, "dot") ** 2).astype(jnp.float32))(x)
    assert y.dtype == dtype and g.dtype == dtype
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(2 * x, np.float32))


def test_barrier_nan_cotangent_gives_nan_not_a_number():
    x = jnp.ones((2, 3), jnp.float64)
    g = jax.grad(lambda x: jnp.sum(layers.cotangent_barrier(x, "dot") * jnp.array([1.0, jnp.nan, 1.0])))(x)
    assert np.all(np.isnan(g[:, 1]))  # NaN in gives NaN out (it may spread across the channel axis)


def test_barrier_bad_input():
    with pytest.raises(ValueError, match="`kind`"):
        layers.cotangent_barrier(jnp.ones(3), "fast")
    with pytest.raises(TypeError, match="`x`"):
        layers.cotangent_barrier(jnp.ones(3, jnp.int32), "dot")
    with pytest.raises(TypeError, match="`x`"):
        layers.cotangent_barrier(jnp.float32(1.0), "dot")


def test_default_kind_is_dot_on_cpu_only(monkeypatch):
    monkeypatch.delenv("DIFFNAS_COTANGENT_BARRIER", raising=False)
    assert layers.default_cotangent_barrier("cpu") == "dot"
    assert layers.default_cotangent_barrier("gpu") == "none"
    monkeypatch.setenv("DIFFNAS_COTANGENT_BARRIER", "none")
    assert layers.default_cotangent_barrier("cpu") == "none"
    monkeypatch.setenv("DIFFNAS_COTANGENT_BARRIER", "fast")
    with pytest.raises(ValueError, match="DIFFNAS_COTANGENT_BARRIER"):
        layers.default_cotangent_barrier("cpu")


def _cells_run(monkeypatch, kind):
    """Output, new BatchNorm state, gradients (weights, mixing weights, input) and a forward-over-
    reverse product along the mixing weights of two stacked NB201 search cells, barrier ``kind``."""
    monkeypatch.setenv("DIFFNAS_COTANGENT_BARRIER", kind)
    cells = [nb201.NB201SearchCell(3, 4, nb201.NB201_OPS, name=f"c{i}") for i in range(2)]
    x = jax.random.normal(jax.random.key(0), (3, 5, 5, 3), jnp.float64)
    mix = jax.nn.softmax(jax.random.normal(jax.random.key(1), (6, 5), jnp.float64), -1)
    v = [c.init(jax.random.key(2 + i), x, mix, False) for i, c in enumerate(cells)]
    target = jax.random.normal(jax.random.key(9), x.shape, jnp.float64)

    def loss(p, mix, x):
        states = []
        for c, vi, pi in zip(cells, v, p):
            x, ns = c.apply({"params": pi, "batch_stats": vi["batch_stats"]}, x, mix, True, mutable=["batch_stats"])
            states.append(ns)
        return jnp.sum(jnp.sin(x) * target), (x, states)

    def run(p, mix, x):
        (val, (out, states)), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(p, mix, x)
        # d/d mix of the weight gradient along a direction: what the exact hypergradient computes
        fwd_rev = jax.jvp(lambda m: jax.grad(lambda p: loss(p, m, x)[0])(p), (mix,), (jnp.ones_like(mix),))[1]
        return val, out, states, grads, fwd_rev

    p = [vi["params"] for vi in v]
    return jax.jit(run).lower(p, mix, x).compile(compiler_options=FAST_COMPILE)(p, mix, x)


def test_nb201_cells_with_barrier_equal_cells_without(monkeypatch):
    dot, none = _cells_run(monkeypatch, "dot"), _cells_run(monkeypatch, "none")
    assert jax.tree_util.tree_structure(dot) == jax.tree_util.tree_structure(none)
    # the forward pass is untouched; derivatives differ at most by float64 summation order
    for a, b in zip(jax.tree_util.tree_leaves(dot[:3]), jax.tree_util.tree_leaves(none[:3])):
        np.testing.assert_array_equal(a, b)  # loss, output, BatchNorm running statistics and counters
    # (a conv bias in front of a BatchNorm has a true gradient of 0: rounding noise, hence the floor)
    floor = 1e-12 * max(float(jnp.max(jnp.abs(a))) for a in jax.tree_util.tree_leaves(none[3:]))
    for a, b in zip(jax.tree_util.tree_leaves(dot[3:]), jax.tree_util.tree_leaves(none[3:])):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=floor)
    assert all(float(jnp.max(jnp.abs(a))) > 0 for a in jax.tree_util.tree_leaves(dot[3][1:]))
    assert any(float(jnp.max(jnp.abs(a))) > 0 for a in jax.tree_util.tree_leaves(dot[4]))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the barrier is a CPU workaround")
def test_barrier_stops_xla_cpu_from_duplicating_the_cell_cotangent(monkeypatch):
    """Two stacked NB201 search cells: without the barrier XLA:CPU re-derives the cotangent chain
    inside each consumer fusion; with it the optimised gradient program is much smaller."""
    cells = [nb201.NB201SearchCell(2, 4, nb201.NB201_OPS, name=f"c{i}") for i in range(2)]
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 2), jnp.float32)
    mix = jax.nn.softmax(jax.random.normal(jax.random.key(1), (6, 5)), -1).astype(jnp.float32)

    def size(kind):
        monkeypatch.setenv("DIFFNAS_COTANGENT_BARRIER", kind)
        v = [c.init(jax.random.key(i), x, mix, False) for i, c in enumerate(cells)]

        def loss(p, x):
            for c, vi, pi in zip(cells, v, p):
                x, _ = c.apply({"params": pi, "batch_stats": vi["batch_stats"]}, x, mix, True, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(x))

        text = jax.jit(jax.grad(loss, (0, 1))).lower([vi["params"] for vi in v], x).compile(
            compiler_options=FAST_COMPILE).as_text()
        return len(re.findall(r"^\s+%\S+ = ", text, re.M))

    with_barrier, without = size("dot"), size("none")
    assert with_barrier < 0.8 * without, (with_barrier, without)


def test_nb201_infer_cells_with_barrier_equal_cells_without(monkeypatch):
    """The evaluation network's cells carry the barrier too (skip connections chain their cotangents)."""
    structure = nb201.parse_structure("|nor_conv_3x3~0|+|skip_connect~0|avg_pool_3x3~1|+|skip_connect~0|"
                                      "nor_conv_1x1~1|skip_connect~2|")
    cells = [nb201.NB201InferCell(3, structure, name=f"c{i}") for i in range(2)]
    x = jax.random.normal(jax.random.key(0), (3, 5, 5, 3), jnp.float64)
    v = [c.init(jax.random.key(1 + i), x, False) for i, c in enumerate(cells)]

    def run(kind):
        monkeypatch.setenv("DIFFNAS_COTANGENT_BARRIER", kind)

        def loss(p, x):
            for c, vi, pi in zip(cells, v, p):
                x, _ = c.apply({"params": pi, "batch_stats": vi["batch_stats"]}, x, True, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(x))

        p = [vi["params"] for vi in v]
        return jax.jit(jax.value_and_grad(loss, (0, 1))).lower(p, x).compile(compiler_options=FAST_COMPILE)(p, x)

    (val, grads), (val0, grads0) = run("dot"), run("none")
    np.testing.assert_array_equal(val, val0)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads0)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_state_barrier_is_exact_identity_for_finite_values(dtype):
    x = (jax.random.normal(jax.random.key(3), (2, 5, 5, 7)) * 1e3).astype(dtype)
    x = x.at[0, 0, 0, 0].set(1e-30).at[0, 0, 0, 1].set(-3.0e30 if dtype != jnp.bfloat16 else -3.0e30)
    y = layers.state_barrier(x, "dot")
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(np.asarray(y, np.float64), np.asarray(x, np.float64))
    assert layers.state_barrier(x, "none") is x


def test_state_barrier_derivatives_are_the_identity():
    x = jax.random.normal(jax.random.key(4), (3, 4, 6), jnp.float64)
    f = lambda z: jnp.sum(jnp.sin(layers.state_barrier(z, "dot")) * z)  # noqa: E731
    g = lambda z: jnp.sum(jnp.sin(z) * z)  # noqa: E731
    np.testing.assert_allclose(jax.grad(f)(x), jax.grad(g)(x), rtol=1e-14, atol=0)
    v = jnp.ones_like(x)
    np.testing.assert_allclose(jax.jvp(jax.grad(f), (x,), (v,))[1], jax.jvp(jax.grad(g), (x,), (v,))[1],
                               rtol=1e-13, atol=1e-13)
    check_grads(lambda z: layers.state_barrier(z, "dot") ** 2, (x,), order=2, modes=("fwd", "rev"))


def test_state_barrier_nan_is_not_hidden_and_bad_input_is_refused():
    x = jnp.ones((2, 3)).at[0, 1].set(jnp.nan)
    y = layers.state_barrier(x, "dot")
    assert bool(jnp.all(jnp.isnan(y[0]))) and bool(jnp.all(y[1] == 1))
    with pytest.raises(ValueError, match="kind"):
        layers.state_barrier(x, "matmul")
    with pytest.raises(TypeError, match="x"):
        layers.state_barrier(jnp.arange(3), "dot")
