"""Hypergradient estimators: closed forms, exact-vs-approximate limits, the DARTS fixture."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_fixture, rel_err
from diffnas_jax import hypergrad as hg

# ----------------------------------------------------------------------------- bilevel ridge
# L_train(w, a) = 1/2n ||X w - y||^2 + 1/2 sum_j exp(a_j) w_j^2,  L_val(w) = 1/2m ||Xv w - yv||^2.
N, M, D = 40, 30, 6


@pytest.fixture(scope="module")
def ridge():
    rng = np.random.default_rng(0)
    X, Xv = rng.normal(size=(N, D)), rng.normal(size=(M, D))
    w_true = rng.normal(size=D)
    y, yv = X @ w_true + 0.3 * rng.normal(size=N), Xv @ w_true + 0.3 * rng.normal(size=M)
    a = np.log(rng.uniform(0.05, 0.5, size=D))

    def lt(w, a, batch):
        X, y = batch
        return 0.5 * jnp.mean((X @ w["w"] - y) ** 2) + 0.5 * jnp.sum(jnp.exp(a["log_lam"]) * w["w"] ** 2)

    def lv(w, a, batch):
        X, y = batch
        return 0.5 * jnp.mean((X @ w["w"] - y) ** 2)

    H = X.T @ X / N + np.diag(np.exp(a))
    w_star = np.linalg.solve(H, X.T @ y / N)
    g_v = Xv.T @ (Xv @ w_star - yv) / M
    # dw*/da_j = -H^{-1} e_j exp(a_j) w*_j  =>  dL_val/da_j = -exp(a_j) w*_j (H^{-1} g_v)_j
    closed = -np.exp(a) * w_star * np.linalg.solve(H, g_v)
    return dict(lt=lt, lv=lv, w={"w": jnp.asarray(w_star)}, a={"log_lam": jnp.asarray(a)},
                bt=(jnp.asarray(X), jnp.asarray(y)), bv=(jnp.asarray(Xv), jnp.asarray(yv)),
                closed=closed, lam_max=float(np.linalg.eigvalsh(H).max()))


def _call(est, p, w=None):
    return est(p["lt"], p["lv"], p["w"] if w is None else w, p["a"], p["bt"], p["bv"])


@pytest.mark.parametrize("solver", ["cg", "normal_cg", "gmres"])
def test_implicit_matches_closed_form(ridge, solver):
    est = hg.implicit(solver=solver, maxiter=50, tol=1e-12)
    d = jax.jit(lambda w: _call(est, ridge, w))(ridge["w"])
    assert rel_err(d["log_lam"], ridge["closed"]) < 1e-6


def test_implicit_neumann_converges(ridge):
    alpha = 1.0 / ridge["lam_max"]
    errs = [rel_err(_call(hg.implicit("neumann", maxiter=k, neumann_alpha=alpha), ridge)["log_lam"],
                    ridge["closed"]) for k in (2, 20, 400)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-6


def test_first_order_is_grad_of_val(ridge):
    d = _call(hg.first_order(), ridge)
    ref = jax.grad(ridge["lv"], argnums=1)(ridge["w"], ridge["a"], ridge["bv"])
    np.testing.assert_allclose(d["log_lam"], ref["log_lam"], atol=1e-15)


def test_single_level_is_grad_of_train(ridge):
    res = hg.single_level().compute(ridge["lt"], ridge["lv"], ridge["w"], ridge["a"], ridge["bt"], ridge["bv"])
    gw, ga = jax.grad(ridge["lt"], argnums=(0, 1))(ridge["w"], ridge["a"], ridge["bt"])
    np.testing.assert_allclose(res.d_arch["log_lam"], ga["log_lam"], rtol=1e-12)
    np.testing.assert_allclose(res.weight_grad["w"], gw["w"], rtol=1e-12)


def _through_virtual_step(p, w, eta, wd=0.0):
    def f(a):
        g = jax.grad(p["lt"])(w, a, p["bt"])
        w1 = jax.tree.map(lambda wi, gi: wi - eta * (gi + wd * wi), w, g)
        return p["lv"](w1, a, p["bv"])
    return jax.grad(f)(p["a"])


@pytest.fixture(scope="module")
def off_optimum(ridge):
    # Away from the inner optimum so the virtual step and its second-order term matter.
    return {"w": ridge["w"]["w"] + 0.3 * jnp.cos(jnp.arange(D))}


def test_unrolled_exact_equals_grad_through_step(ridge, off_optimum):
    eta, wd = 0.3, 0.1
    d = _call(hg.unrolled(eta, weight_decay=wd, hvp="exact"), ridge, off_optimum)
    ref = _through_virtual_step(ridge, off_optimum, eta, wd)
    assert rel_err(d["log_lam"], ref["log_lam"]) < 1e-12


def test_unrolled_fd_converges_to_exact(ridge, off_optimum):
    # A quartic penalty: dL/da is not quadratic in w, so the central difference has an O(R^2) error.
    p = dict(ridge, lt=lambda w, a, b: ridge["lt"](w, a, b) + 0.25 * jnp.sum(jnp.exp(a["log_lam"]) * w["w"] ** 4))
    eta = 0.3
    exact = _call(hg.unrolled(eta, hvp="exact"), p, off_optimum)["log_lam"]
    errs = [rel_err(_call(hg.unrolled(eta, r=r), p, off_optimum)["log_lam"], exact)
            for r in (1e-1, 1e-2, 1e-3)]
    # central differences: the error falls like r^2 (a factor ~100 per decade)
    assert errs[0] > 50 * errs[1] > 2500 * errs[2]
    assert errs[2] < 1e-6


def test_unrolled_fd_under_vmap_keeps_float32_and_zero_direction(ridge, off_optimum):
    # The two finite-difference gradients run as one loop over the sign: batched over weight sets
    # it must equal separate calls, keep float32, and give exactly the first-order term when the
    # validation gradient v is zero (R = r / ||v|| undefined).
    est = hg.unrolled(0.3, r=1e-2)
    ws = {"w": jnp.stack([off_optimum["w"], ridge["w"]["w"], 2 * off_optimum["w"]])}
    batched = jax.jit(jax.vmap(lambda w: _call(est, ridge, w)))(ws)
    for i in range(3):
        one = _call(est, ridge, {"w": ws["w"][i]})["log_lam"]
        np.testing.assert_allclose(batched["log_lam"][i], one, rtol=1e-12, atol=1e-15)

    f32 = dict(ridge, **{k: jax.tree.map(lambda x: x.astype(jnp.float32), ridge[k]) for k in ("w", "a", "bt", "bv")})
    d32 = _call(est, f32, jax.tree.map(lambda x: x.astype(jnp.float32), off_optimum))
    assert d32["log_lam"].dtype == jnp.float32
    assert rel_err(d32["log_lam"], _call(est, ridge, off_optimum)["log_lam"]) < 1e-3

    flat = dict(ridge, lv=lambda w, a, b: jnp.sum(a["log_lam"] ** 2) + 0.0 * jnp.sum(w["w"]))
    d0 = _call(est, flat, off_optimum)["log_lam"]
    np.testing.assert_array_equal(d0, 2 * ridge["a"]["log_lam"])


def test_unrolled_momentum_buffer_enters_virtual_step(ridge, off_optimum):
    eta, mu = 0.3, 0.9
    buf = {"w": 0.1 * jnp.sin(jnp.arange(D, dtype=jnp.float64))}
    est = hg.unrolled(eta, momentum=mu, hvp="exact")
    got = est.compute(ridge["lt"], ridge["lv"], off_optimum, ridge["a"], ridge["bt"], ridge["bv"],
                      momentum_buffer=buf).d_arch["log_lam"]

    def f(a):
        g = jax.grad(ridge["lt"])(off_optimum, a, ridge["bt"])
        w1 = {"w": off_optimum["w"] - eta * (mu * buf["w"] + g["w"])}
        return ridge["lv"](w1, a, ridge["bv"])
    assert rel_err(got, jax.grad(f)(ridge["a"])["log_lam"]) < 1e-12
    no_buf = _call(est, ridge, off_optimum)["log_lam"]
    assert rel_err(no_buf, got) > 1e-6


def test_unrolled_k1_equals_unrolled_exact(ridge, off_optimum):
    eta = 0.3
    d1 = _call(hg.unrolled_k(1, optax.sgd(eta)), ridge, off_optimum)["log_lam"]
    de = _call(hg.unrolled(eta, hvp="exact"), ridge, off_optimum)["log_lam"]
    assert rel_err(d1, de) < 1e-12


def test_unrolled_k_many_steps_approaches_implicit(ridge, off_optimum):
    # k SGD steps from off the optimum converge to w*; the hypergradient then tends to the IFT one.
    eta = 1.0 / ridge["lam_max"]
    d = _call(hg.unrolled_k(300, optax.sgd(eta)), ridge, off_optimum)["log_lam"]
    assert rel_err(d, ridge["closed"]) < 1e-2


def test_rarts_is_first_order_combination(ridge):
    est = hg.rarts(beta=0.5, lam=2.0, eta_y=0.1)
    res = est.compute(ridge["lt"], ridge["lv"], ridge["w"], ridge["a"], ridge["bt"], ridge["bv"])
    # state starts as a copy of w, so the coupling vanishes and y takes a plain val-gradient step.
    y = {"w": ridge["w"]["w"] - 0.1 * jax.grad(ridge["lv"])(ridge["w"], ridge["a"], ridge["bv"])["w"]}
    np.testing.assert_allclose(res.state["w"], y["w"], rtol=1e-12)
    ga_t = jax.grad(ridge["lt"], argnums=1)(ridge["w"], ridge["a"], ridge["bt"])["log_lam"]
    ga_v = jax.grad(ridge["lv"], argnums=1)(y, ridge["a"], ridge["bv"])["log_lam"]
    np.testing.assert_allclose(res.d_arch["log_lam"], ga_v + 0.5 * ga_t, rtol=1e-12)


def test_has_aux_path(ridge, off_optimum):
    lt_aux = lambda w, a, b: (ridge["lt"](w, a, b), {"n": jnp.sum(w["w"])})  # noqa: E731
    lv_aux = lambda w, a, b: (ridge["lv"](w, a, b), {"n": jnp.sum(w["w"])})  # noqa: E731
    for est in (hg.first_order(), hg.unrolled(0.3, hvp="exact"), hg.unrolled(0.3), hg.implicit(maxiter=3),
                hg.unrolled_k(2, optax.sgd(0.1)), hg.single_level(), hg.rarts()):
        plain = est.compute(ridge["lt"], ridge["lv"], off_optimum, ridge["a"], ridge["bt"], ridge["bv"])
        aux = est.compute(lt_aux, lv_aux, off_optimum, ridge["a"], ridge["bt"], ridge["bv"], has_aux=True)
        np.testing.assert_allclose(aux.d_arch["log_lam"], plain.d_arch["log_lam"], rtol=1e-12)
        assert aux.val_aux is not None or aux.train_aux is not None, est.name


def test_dominant_eigenvalue_matches_eigh():
    rng = np.random.default_rng(1)
    B = rng.normal(size=(5, 5))
    A = B @ B.T + np.diag([8.0, 0, 0, 0, 0])  # a clear spectral gap

    def lv(w, a, batch):
        x = jnp.concatenate([a["p"].reshape(-1), a["q"]])
        return 0.5 * x @ (batch @ x) + w * jnp.sum(x)

    arch = {"p": jnp.ones((1, 3)), "q": jnp.ones(2)}
    lam = hg.dominant_eigenvalue(lv, jnp.asarray(0.3), arch, jnp.asarray(A), 200, jax.random.PRNGKey(0))
    ref = np.linalg.eigvalsh(A)
    assert abs(float(lam) - ref[np.argmax(np.abs(ref))]) < 1e-8 * abs(ref).max()


@pytest.mark.parametrize("ctor, kwargs, name", [
    (hg.implicit, {"solver": "lu"}, "solver"),
    (hg.implicit, {"maxiter": 0}, "maxiter"),
    (hg.implicit, {"damping": -1.0}, "damping"),
    (hg.unrolled, {"eta": 0.1, "hvp": "autodiff"}, "hvp"),
    (hg.unrolled, {"eta": 0.0}, "eta"),
    (hg.unrolled, {"eta": -1.0}, "eta"),
    (hg.unrolled, {"eta": 0.1, "r": 0.0}, "r"),
    (hg.unrolled, {"eta": 0.1, "weight_decay": -1.0}, "weight_decay"),
    (hg.unrolled_k, {"k": 0, "inner_optimizer": optax.sgd(0.1)}, "k"),
    (hg.rarts, {"eta_y": 0.0}, "eta_y"),
])
def test_bad_arguments(ctor, kwargs, name):
    with pytest.raises(ValueError, match=name):
        ctor(**kwargs)


def test_dominant_eigenvalue_needs_key(ridge):
    with pytest.raises(ValueError, match="key"):
        hg.dominant_eigenvalue(ridge["lv"], ridge["w"], ridge["a"], ridge["bv"], 3, None)


# ----------------------------------------------------------------------------- staged estimators
@pytest.fixture(scope="module")
def mlp():
    """A non-convex problem (tanh layer) whose Hessians depend on the weights and the arch."""
    k = jax.random.split(jax.random.PRNGKey(5), 4)
    X, Y = jax.random.normal(k[0], (24, 5)), jax.random.normal(k[1], (24, 3))

    def lt(w, a, batch):
        x, y = batch
        h = jnp.tanh(x @ (w["W"] * jax.nn.sigmoid(a["gate"])))
        return jnp.mean((h @ w["V"] - y) ** 2) + 0.05 * jnp.sum(jnp.exp(a["log_lam"]) * w["W"] ** 2)

    def lv(w, a, batch):
        x, y = batch
        return jnp.mean((jnp.tanh(x @ (w["W"] * jax.nn.sigmoid(a["gate"]))) @ w["V"] - y) ** 2)

    w = {"W": 0.5 * jax.random.normal(k[2], (5, 4)), "V": 0.5 * jax.random.normal(k[3], (4, 3))}
    a = {"gate": 0.1 * jnp.arange(20.0).reshape(5, 4), "log_lam": jnp.full((5, 4), -0.5)}
    return dict(lt=lt, lv=lv, w=w, a=a, bt=(X[:12], Y[:12]), bv=(X[12:], Y[12:]))


def _run_stages_jitted(est, p, w, extra_iterations=0):
    """The stages as separately jitted programs (the losses rebuilt inside each, as make_step does)."""
    args = (w, p["a"], p["bt"], p["bv"])
    bind = lambda w_, a_, bt_, bv_: est.bind(p["lt"], p["lv"], w_, a_, bt_, bv_)  # noqa: E731
    prepare = jax.jit(lambda *xs: est.staged.prepare(bind(*xs)))
    iterate = jax.jit(lambda c, *xs: est.staged.iterate(bind(*xs), c))
    finish = jax.jit(lambda c, *xs: est.staged.finish(bind(*xs), c))
    carry = prepare(*args)
    iterations = 0
    while not bool(est.staged.converged(carry)):
        carry = iterate(carry, *args)
        iterations += 1
    for _ in range(extra_iterations):  # a converged carry must come back unchanged
        again = iterate(carry, *args)
        for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(carry)):
            np.testing.assert_array_equal(x, y)
    return finish(carry, *args), iterations


def _assert_results_close(staged, fused, tol):
    for name in ("d_arch", "weight_grad", "train_loss", "val_loss"):
        for x, y in zip(jax.tree.leaves(getattr(staged, name)), jax.tree.leaves(getattr(fused, name))):
            assert rel_err(x, y, floor=1e-3) < tol, name


@pytest.mark.parametrize("problem, kwargs, early", [
    ("ridge", dict(solver="cg", maxiter=40, tol=1e-8), True),                  # tol reached (D = 6)
    ("ridge", dict(solver="cg", maxiter=3, tol=1e-12), False),
    ("ridge", dict(solver="cg", maxiter=40, tol=1e-8, damping=0.3), True),
    ("ridge", dict(solver="cg", maxiter=3, tol=1e-12, damping=0.3), False),
    ("mlp", dict(solver="cg", maxiter=4, tol=1e-12), False),
    ("mlp", dict(solver="cg", maxiter=60, tol=1e-6, damping=0.5), True),
    ("mlp", dict(solver="cg", maxiter=5, tol=1e-12, damping=0.5), False),
    ("ridge", dict(solver="neumann", maxiter=6, neumann_alpha=0.5), False),
    ("mlp", dict(solver="neumann", maxiter=6, neumann_alpha=0.3, damping=0.2), False),
])
def test_staged_implicit_equals_fused(request, problem, kwargs, early):
    p = request.getfixturevalue(problem)
    w = (p["w"] if problem == "mlp" else {"w": request.getfixturevalue("off_optimum")["w"]})
    est = hg.implicit(**kwargs)
    fused = jax.jit(lambda w_: est.compute(p["lt"], p["lv"], w_, p["a"], p["bt"], p["bv"]))(w)
    staged, iterations = _run_stages_jitted(est, p, w, extra_iterations=2)
    _assert_results_close(staged, fused, 1e-10)
    full = est.staged.max_iterations
    assert (iterations < full) if early else (iterations == full)
    eager = est.compute_staged(p["lt"], p["lv"], w, p["a"], p["bt"], p["bv"])
    _assert_results_close(eager, fused, 1e-10)


def test_staged_implicit_under_vmap_and_has_aux(mlp):
    est = hg.implicit("cg", maxiter=4, damping=0.5)
    lt_aux = lambda w, a, b: (mlp["lt"](w, a, b), {"n": jnp.sum(w["W"])})  # noqa: E731
    lv_aux = lambda w, a, b: (mlp["lv"](w, a, b), {"m": jnp.sum(w["V"])})  # noqa: E731
    archs = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x + 0.2]), mlp["a"])

    def staged(a):
        return est.compute_staged(lt_aux, lv_aux, mlp["w"], a, mlp["bt"], mlp["bv"], has_aux=True)

    out = jax.jit(jax.vmap(staged))(archs)
    for i in range(2):
        a = jax.tree.map(lambda x: x[i], archs)
        ref = est.compute(lt_aux, lv_aux, mlp["w"], a, mlp["bt"], mlp["bv"], has_aux=True)
        _assert_results_close(jax.tree.map(lambda x: x[i], out), ref, 1e-10)
        assert float(out.train_aux["n"][i]) == pytest.approx(float(ref.train_aux["n"]), rel=1e-12)
        assert float(out.val_aux["m"][i]) == pytest.approx(float(ref.val_aux["m"]), rel=1e-12)


def test_grad_and_tangent_equals_linearization(mlp):
    from diffnas_jax.hypergrad._core import grad_and_tangent, linearize_grad, with_aux

    lt = with_aux(mlp["lt"], False)
    v = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype)).reshape(x.shape), mlp["w"])
    value, _, g_w, tangent = jax.jit(lambda w: grad_and_tangent(lt, w, mlp["a"], mlp["bt"], v))(mlp["w"])
    lin = linearize_grad(lt, mlp["w"], mlp["a"], mlp["bt"])
    assert rel_err(value, lin.value) < 1e-14
    for x, y in zip(jax.tree.leaves((g_w, tangent)), jax.tree.leaves((lin.grad_w, lin.tangent(v)))):
        assert rel_err(x, y) < 1e-12


def test_staged_form_only_where_defined(ridge):
    assert hg.implicit("cg").staged is not None and hg.implicit("neumann").staged is not None
    for est in (hg.implicit("gmres"), hg.implicit("normal_cg"), hg.first_order(), hg.unrolled(0.1)):
        assert est.staged is None
        with pytest.raises(ValueError, match="staged"):
            est.compute_staged(ridge["lt"], ridge["lv"], ridge["w"], ridge["a"], ridge["bt"], ridge["bv"])


# ----------------------------------------------------------------------------- DARTS fixture
# The reference's second-order step (Architect._backward_step_unrolled) compiled as one program, as
# a search step runs it: ~75 s on 2 cores (most of it XLA compiling three supernet gradients; the
# two finite-difference ones share one loop body). tests/test_space_darts.py checks the value and
# gradients it is built from.
def test_unrolled_fd_matches_darts_reference():
    from diffnas_jax.spaces import darts

    ref = load_fixture("darts_reference.npz")
    names = [str(n) for n in ref["config_names"]]
    cfg = dict(zip(names, ref["config"].tolist()))
    space = darts.search_space(C=int(cfg["C"]), layers=int(cfg["layers"]), steps=int(cfg["steps"]),
                               multiplier=int(cfg["multiplier"]), stem_multiplier=int(cfg["stem_multiplier"]),
                               num_classes=int(cfg["num_classes"]))
    sd = {k[3:]: ref[k] for k in ref.files if k.startswith("sd/")}
    weights, state = space.from_reference(sd)
    arch = {"normal": jnp.asarray(ref["alphas_normal"]), "reduce": jnp.asarray(ref["alphas_reduce"])}
    to_nhwc = lambda x: jnp.asarray(np.transpose(x, (0, 2, 3, 1)))  # noqa: E731
    bt = (to_nhwc(ref["x"]), jnp.asarray(ref["y"]))
    bv = (to_nhwc(ref["x_valid"]), jnp.asarray(ref["y_valid"]))

    def loss(w, a, batch):
        mix = jax.tree.map(lambda z: jax.nn.softmax(z, axis=-1), a)
        logits, _ = space.apply(w, state, mix, batch[0], True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    est = hg.unrolled(cfg["eta"], weight_decay=cfg["weight_decay"], hvp="finite_difference", r=1e-2)
    d = jax.jit(lambda w: est(loss, loss, w, arch, bt, bv))(weights)
    for k in ("normal", "reduce"):
        assert rel_err(d[k], ref[f"unrolled_grad_alphas_{k}"]) < 1e-7, k
