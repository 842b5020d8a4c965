"""``_solvers.solve_cg`` from zero: jax's CG iteration without the ``b - A 0`` product."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffnas_jax import _solvers

jax.config.update("jax_enable_x64", True)


def _system(seed=0, n=7):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((n + 2, n + 2))
    a = jnp.asarray(m @ m.T + 0.5 * np.eye(n + 2))  # SPD over a two-leaf pytree of sizes n, 2
    b = {"u": jnp.asarray(rng.standard_normal(n)), "v": jnp.asarray(rng.standard_normal(2))}
    return a, b, n


def _matvec(a, n):
    def mv(t):
        y = a @ jnp.concatenate([t["u"], t["v"]])
        return {"u": y[:n], "v": y[n:]}
    return mv


@pytest.mark.parametrize("ridge", [None, 0.3])
@pytest.mark.parametrize("maxiter", [None, 1, 3])
def test_cg_from_zero_equals_jax_cg(ridge, maxiter):
    a, b, n = _system()
    mv = _matvec(a, n)
    ref_mv = mv if ridge is None else (lambda t: jax.tree.map(lambda x, y: x + ridge * y, mv(t), t))
    want, _ = jax.scipy.sparse.linalg.cg(ref_mv, b, tol=1e-9, maxiter=maxiter)
    got = jax.jit(lambda rhs: _solvers.solve_cg(mv, rhs, ridge=ridge, tol=1e-9, maxiter=maxiter))(b)
    for k in b:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-14)
    if maxiter is None:  # converged: it solves the system
        x = jnp.concatenate([got["u"], got["v"]])
        full = a + (0.0 if ridge is None else ridge) * jnp.eye(n + 2)
        np.testing.assert_allclose(full @ x, jnp.concatenate([b["u"], b["v"]]), atol=1e-7)


def test_cg_from_zero_traces_one_matvec_fewer():
    a, b, n = _system()
    calls = {"n": 0}

    def counted(t):
        calls["n"] += 1
        return _matvec(a, n)(t)

    jax.make_jaxpr(lambda rhs: jax.scipy.sparse.linalg.cg(counted, rhs, maxiter=4)[0])(b)
    reference = calls["n"]
    calls["n"] = 0
    jax.make_jaxpr(lambda rhs: _solvers.solve_cg(counted, rhs, maxiter=4))(b)
    # custom_linear_solve traces the operator once and each of solve / transpose_solve once:
    # jax's has A(x0) and the loop body in each (5), ours only the loop body (3)
    assert (reference, calls["n"]) == (5, 3)


def test_cg_from_zero_gradients_are_implicit():
    a, b, n = _system(1)

    def loss(scale, rhs, solver):
        mv = _matvec(a * scale, n)
        x = solver(mv, rhs)
        return jnp.sum(x["u"] ** 2) + jnp.sum(jnp.sin(x["v"]))

    ours = lambda mv, rhs: _solvers.solve_cg(mv, rhs, tol=1e-12)  # noqa: E731
    ref = lambda mv, rhs: jax.scipy.sparse.linalg.cg(mv, rhs, tol=1e-12)[0]  # noqa: E731
    g_ours = jax.grad(loss, argnums=(0, 1))(1.3, b, ours)
    g_ref = jax.grad(loss, argnums=(0, 1))(1.3, b, ref)
    np.testing.assert_allclose(g_ours[0], g_ref[0], rtol=1e-9)
    for k in b:
        np.testing.assert_allclose(g_ours[1][k], g_ref[1][k], rtol=1e-9, atol=1e-12)


def test_cg_from_zero_keeps_float32_and_vmaps():
    a, b, n = _system(2)
    a32 = a.astype(jnp.float32)
    bs = jax.tree.map(lambda x: jnp.stack([x, 2 * x]).astype(jnp.float32), b)
    xs = jax.vmap(lambda rhs: _solvers.solve_cg(_matvec(a32, n), rhs, tol=1e-6))(bs)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(xs))
    for k in b:  # linear in b
        np.testing.assert_allclose(xs[k][1], 2 * xs[k][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ridge", [None, 0.3])
@pytest.mark.parametrize("maxiter, tol", [(3, 1e-12), (40, 1e-9)])  # stopped by maxiter / by tol
def test_cg_driven_from_outside_equals_solve_cg(ridge, maxiter, tol):
    a, b, n = _system(1)
    mv = _matvec(a, n)
    want = _solvers.solve_cg(mv, b, ridge=ridge, tol=tol, maxiter=maxiter)
    step = jax.jit(lambda st: _solvers.cg_iterate(st, mv(st.p), maxiter=maxiter, ridge=ridge))
    state, calls = _solvers.cg_start(b, tol=tol), 0
    while bool(_solvers.cg_active(state, maxiter)):
        state, alpha = step(state)
        calls += 1
        assert float(alpha) != 0.0
    assert (calls == maxiter) == (maxiter == 3) and int(state.k) == calls
    again, alpha = step(state)  # past the stopping rule: nothing moves
    assert float(alpha) == 0.0
    for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(state)):
        np.testing.assert_array_equal(x, y)
    for k in b:
        np.testing.assert_allclose(state.x[k], want[k], rtol=1e-12, atol=1e-14)
