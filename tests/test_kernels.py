"""The depthwise-convolution formulations (spaces/kernels.py) against a direct numpy loop and
against each other: values, gradients, forward mode, forward-over-reverse, under vmap, and inside a
DARTS cell.  ``ffi`` (the CPU kernel) is checked where it was built; tests/test_dwconv.py has its
primitives' own tests."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffnas_jax.spaces import _dwconv, darts, kernels, layers

# the formulations this install can run (``ffi`` needs the built kernel), and those compared with
# the ``shifted`` reference
FORMS = tuple(f for f in kernels.FORMULATIONS if f != "ffi" or _dwconv.available())
OTHERS = tuple(f for f in FORMS if f != "shifted")

CASES = [(3, 1, 1, 1), (5, 1, 2, 1), (3, 2, 2, 2), (5, 1, 4, 2), (5, 2, 2, 1), (3, 2, 0, 1)]


def _numpy_depthwise(x, kern, stride, padding, dilation):
    n, h, w, c = x.shape
    k = kern.shape[0]
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    out = np.zeros((n, ho, wo, c))
    for a in range(ho):
        for b in range(wo):
            for i in range(k):
                for j in range(k):
                    out[:, a, b, :] += xp[:, a * stride + i * dilation, b * stride + j * dilation, :] * kern[i, j, 0]
    return out


@pytest.mark.parametrize("formulation", FORMS)
@pytest.mark.parametrize("k,stride,padding,dilation", CASES)
def test_each_formulation_equals_a_direct_loop(formulation, k, stride, padding, dilation):
    x = np.random.default_rng(0).normal(size=(2, 9, 8, 3))
    kern = np.random.default_rng(1).normal(size=(k, k, 1, 3))
    # jitted: one compile instead of one per tap op (eager dispatch)
    y = jax.jit(lambda x, w: layers.depthwise_conv(x, w, stride, padding, dilation, formulation))(
        jnp.asarray(x), jnp.asarray(kern))
    np.testing.assert_allclose(y, _numpy_depthwise(x, kern, stride, padding, dilation), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,stride,padding,dilation", CASES)
def test_formulations_agree_in_gradients_and_forward_over_reverse(k, stride, padding, dilation):
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3), jnp.float64)
    kern = jax.random.normal(jax.random.key(1), (k, k, 1, 3), jnp.float64)
    tangents = (jnp.cos(x), jnp.ones_like(kern))

    # one jitted program per formulation (eager op-by-op dispatch compiles each primitive apart
    # and took about twice as long)
    @jax.jit
    def derivatives(x, kern, tangents):
        out = {}
        for form in FORMS:
            conv = lambda x, w, form=form: layers.depthwise_conv(x, w, stride, padding, dilation, form)  # noqa: E731
            loss = lambda x, w, conv=conv: jnp.sum(jnp.sin(conv(x, w)))  # noqa: E731
            out[form] = dict(
                grad=jax.grad(loss, (0, 1))(x, kern),
                hvp=jax.jvp(jax.grad(loss, (0, 1)), (x, kern), tangents)[1],
                # forward mode alone (the custom JVPs), one-sided tangents included
                jvp=[jax.jvp(conv, (x, kern), t) for t in
                     (tangents, (tangents[0], jnp.zeros_like(kern)), (jnp.zeros_like(x), tangents[1]))])
        return out

    out = derivatives(x, kern, tangents)
    ref = out["shifted"]
    for form in OTHERS:
        for a, b in zip(ref["grad"], out[form]["grad"]):
            np.testing.assert_allclose(b, a, rtol=1e-11, atol=1e-12)
        for a, b in zip(ref["hvp"], out[form]["hvp"]):
            np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-11)
        for a, b in zip(jax.tree_util.tree_leaves(ref["jvp"]), jax.tree_util.tree_leaves(out[form]["jvp"])):
            np.testing.assert_allclose(b, a, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("input_batched", [False, True])
def test_formulations_agree_under_vmap_over_kernels(input_batched):
    # An edge group vmaps over its edges' kernels, with the state shared or broadcast.
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4), jnp.float64)
    kerns = jax.random.normal(jax.random.key(1), (3, 3, 3, 1, 4), jnp.float64)
    xs = jnp.broadcast_to(x, (3,) + x.shape) if input_batched else x

    def run(form):
        f = jax.vmap(lambda x, w: layers.depthwise_conv(x, w, 1, 2, 2, form), (0 if input_batched else None, 0))
        return jax.jit(jax.value_and_grad(lambda w: jnp.sum(f(xs, w) ** 2)))(kerns)

    v_s, g_s = run("shifted")
    for form in OTHERS:
        v_g, g_g = run(form)
        np.testing.assert_allclose(v_s, v_g, rtol=1e-12)
        np.testing.assert_allclose(g_s, g_g, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("formulation", FORMS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_depthwise_conv_keeps_the_input_dtype(formulation, dtype):
    x = jnp.ones((1, 5, 5, 2), dtype)
    y = jax.jit(lambda x: layers.depthwise_conv(x, jnp.ones((3, 3, 1, 2)), 1, 1, 1, formulation))(x)
    assert y.dtype == dtype
    assert float(y[0, 2, 2, 0]) == 9.0


def test_depthwise_conv_names_bad_arguments():
    x = jnp.ones((1, 5, 5, 2))
    with pytest.raises(ValueError, match="formulation"):
        layers.depthwise_conv(x, jnp.ones((3, 3, 1, 2)), formulation="im2col")
    with pytest.raises(ValueError, match="kernel"):
        layers.depthwise_conv(x, jnp.ones((3, 3, 2, 2)))
    with pytest.raises(TypeError, match="backend"):
        kernels.default_formulation(3)


def test_nan_in_gives_nan_out():
    x = jnp.ones((1, 5, 5, 1)).at[0, 2, 2, 0].set(jnp.nan)
    for form in FORMS:
        y = layers.depthwise_conv(x, jnp.ones((3, 3, 1, 1)), 1, 1, 1, form)
        assert bool(jnp.isnan(y[0, 2, 2, 0])) and bool(jnp.isfinite(y[0, 0, 0, 0]))


def test_darts_cell_is_the_same_function_under_either_formulation(monkeypatch):
    # The vmapped edge groups broadcast their states only for the grouped formulation; both
    # programs must compute the same values and gradients (float64).  (The scanned cell runs no
    # vmap; tests/test_darts_scan.py checks it equals the grouped one.)
    cell = darts.SearchCell(2, 2, 4, True, False, ("sep_conv_3x3", "skip_connect"), 1, True, "groups")
    s0 = jax.random.normal(jax.random.key(0), (2, 6, 6, 4), jnp.float64)
    s1 = jax.random.normal(jax.random.key(1), (2, 6, 6, 4), jnp.float64)
    w = jax.nn.softmax(jax.random.normal(jax.random.key(2), (5, 2), jnp.float64))
    # eval_shape + host draws: cell.init would compile the forward pass and a PRNG kernel per leaf
    shapes = jax.eval_shape(lambda: cell.init(jax.random.key(3), s0, s1, w, None))
    rng = np.random.default_rng(3)
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape) + 1.0, a.dtype), shapes)

    def loss(params, w):
        y, _ = cell.apply({"params": params, "batch_stats": variables["batch_stats"]}, s0, s1, w, None,
                          mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y))

    results = {}
    for form in FORMS:
        monkeypatch.setattr(kernels, "default_formulation", lambda backend=None, form=form: form)
        # jitted (traced after the patch): one program compiles faster than eager op-by-op dispatch
        results[form] = jax.jit(jax.value_and_grad(loss, (0, 1)))(variables["params"], w)
    v_s, g_s = results["shifted"]
    for form in OTHERS:
        v_g, g_g = results[form]
        np.testing.assert_allclose(v_s, v_g, rtol=1e-12)
        for a, b in zip(jax.tree_util.tree_leaves(g_s), jax.tree_util.tree_leaves(g_g)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 2, 1, 1), (5, 2, 4, 2), (3, (2, 1), (1, 2), (1, 2))])
def test_strided_grouped_jvp_equals_xla_autodiff(k, stride, padding, dilation):
    # The strided grouped convolution's custom JVP (unit-stride input tangent, then subsample) is
    # the same linear map as XLA's own derivative: forward mode, reverse mode, forward-over-reverse,
    # one-sided tangents (symbolic zeros) and vmap over edges, in float64.
    pair = lambda v: (v, v) if isinstance(v, int) else v
    args = (pair(stride), pair(padding), pair(dilation))
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3), jnp.float64)
    kern = jax.random.normal(jax.random.key(1), (k, k, 1, 3), jnp.float64)
    new = lambda x, w: kernels.depthwise_conv_grouped(x, w, *args)
    old = lambda x, w: kernels._grouped(x, w, *args)
    tx, tk = jnp.cos(x), jnp.sin(kern)
    for tangents in ((tx, tk), (tx, jnp.zeros_like(kern)), (jnp.zeros_like(x), tk)):
        for u, v in zip(jax.jvp(new, (x, kern), tangents), jax.jvp(old, (x, kern), tangents)):
            np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-12)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)) ** 2)
    for argnums in ((0, 1), (0,), (1,)):
        for u, v in zip(jax.grad(loss(new), argnums)(x, kern), jax.grad(loss(old), argnums)(x, kern)):
            np.testing.assert_allclose(u, v, rtol=1e-11, atol=1e-12)
    hvp = [jax.jvp(jax.grad(loss(f), (0, 1)), (x, kern), (tx, tk))[1] for f in (new, old)]
    for u, v in zip(*hvp):
        np.testing.assert_allclose(u, v, rtol=1e-10, atol=1e-11)
    xs, ks = jnp.stack([x, 2 * x]), jnp.stack([kern, -kern])
    gv = [jax.grad(lambda xs, ks: jnp.sum(jnp.sin(jax.vmap(f)(xs, ks))), (0, 1))(xs, ks) for f in (new, old)]
    for u, v in zip(*gv):
        np.testing.assert_allclose(u, v, rtol=1e-11, atol=1e-12)


def test_default_formulation_per_backend(monkeypatch):
    monkeypatch.delenv("DIFFNAS_DEPTHWISE", raising=False)
    assert kernels.default_formulation("cpu") == ("ffi" if _dwconv.available() else "hybrid")
    monkeypatch.setattr(_dwconv, "available", lambda: False)  # an install without the kernel
    assert kernels.default_formulation("cpu") == "hybrid"
    assert kernels.default_formulation("gpu") == kernels.default_formulation("tpu") == "grouped"
    monkeypatch.setenv("DIFFNAS_DEPTHWISE", "hybrid")
    assert kernels.default_formulation("cpu") == kernels.default_formulation("tpu") == "hybrid"
    monkeypatch.setenv("DIFFNAS_DEPTHWISE", "fast")
    with pytest.raises(ValueError, match="DIFFNAS_DEPTHWISE"):
        kernels.default_formulation("cpu")
    assert kernels.prefers_batched_input("hybrid") and kernels.prefers_batched_input("grouped")
    assert not kernels.prefers_batched_input("shifted") and not kernels.prefers_batched_input("ffi")


@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 1, 1, 1), (5, 2, 4, 2), (3, (2, 1), (1, 2), (1, 2)),
                                                       (5, 1, 0, 1), (3, 2, 2, 2)])
def test_hybrid_scanned_kernel_tangent_equals_grouped_under_vmap(k, stride, padding, dilation):
    # hybrid's kernel tangent is a lax.scan over the taps (kernels._tap_scan); an edge group vmaps
    # it over E edges with the state broadcast.  Values, gradients in x and kernel, forward mode
    # and forward-over-reverse equal XLA's grouped convolution in float64 (odd, non-square sizes).
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    args = (pair(stride), pair(padding), pair(dilation))
    x = jax.random.normal(jax.random.key(0), (2, 9, 7, 3), jnp.float64)
    xs = jnp.broadcast_to(x, (3,) + x.shape)
    ks = jax.random.normal(jax.random.key(1), (3, k, k, 1, 3), jnp.float64)
    tx, tk = jnp.cos(xs), jnp.sin(ks)

    @jax.jit
    def derivatives(xs, ks):
        out = {}
        for name, f in (("hybrid", kernels.depthwise_conv_hybrid), ("grouped", kernels._grouped)):
            conv = jax.vmap(lambda x, w, f=f: f(x, w, *args))
            loss = lambda xs, ks, conv=conv: jnp.sum(jnp.sin(conv(xs, ks)) ** 2)  # noqa: E731
            out[name] = dict(value=conv(xs, ks), grad=jax.grad(loss, (0, 1))(xs, ks),
                             jvp=jax.jvp(conv, (xs, ks), (jnp.zeros_like(xs), tk))[1],
                             hvp=jax.jvp(jax.grad(loss, (0, 1)), (xs, ks), (tx, tk))[1])
        return out

    out = derivatives(xs, ks)
    for a, b in zip(jax.tree_util.tree_leaves(out["grouped"]), jax.tree_util.tree_leaves(out["hybrid"])):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-11)


def test_hybrid_kernel_gradient_is_not_a_convolution():
    # The point of the scanned kernel tangent: XLA:CPU expands a grouped convolution's kernel
    # gradient into a dense (E*C) x (E*C) convolution; the hybrid's must contain no convolution.
    xs = jnp.ones((2, 2, 8, 8, 4), jnp.float32)
    ks = jnp.ones((2, 5, 5, 1, 4), jnp.float32)

    def hlo(f):
        conv = jax.vmap(lambda x, w: f(x, w, (1, 1), (4, 4), (2, 2)))
        grad = jax.grad(lambda ks: jnp.sum(jnp.sin(conv(xs, ks))))
        return jax.jit(grad).lower(ks).compile().as_text()

    assert " convolution(" in hlo(kernels.depthwise_conv_grouped)
    assert " convolution(" not in hlo(kernels.depthwise_conv_hybrid)


def test_hybrid_primal_and_max_pool_do_not_copy_their_producer_into_each_tap():
    # XLA's simplifier rewrites slice(pad(f(x))) into pad(slice(f(x))) per tap, copying x's
    # producer into every shifted slice (a DARTS cell's BN / ReLU chain, 9-25 times per
    # convolution); the barrier between pad and slices keeps one copy (compile time, not values).
    x = jnp.ones((2, 8, 8, 4), jnp.float32)
    k = jnp.ones((5, 5, 1, 4), jnp.float32)
    conv = lambda x, k: kernels.depthwise_conv_hybrid(jnp.sin(x), k, (1, 1), (2, 2), (1, 1))  # noqa: E731
    loss = lambda x, k: jnp.sum(conv(x, k) ** 2)  # noqa: E731
    pool = lambda x: layers.max_pool(jnp.sin(x), 3, 1, 1)  # noqa: E731
    for f, args in ((conv, (x, k)), (jax.grad(loss, (0, 1)), (x, k)), (pool, (x,)),
                    (jax.grad(lambda x: jnp.sum(pool(x) ** 2)), (x,))):
        assert jax.jit(f).lower(*args).compile().as_text().count(" sine(") == 1


def test_hybrid_convolutions_of_one_input_share_its_padded_copy():
    # A DARTS edge group's 3x3, 5x5 and dilated 5x5 convolutions read one state with paddings 1, 2
    # and 4; padded alike (kernels._SHARED_PAD), XLA keeps one padded copy and computes the
    # state's producer once instead of once per padding, in the value and in the gradient.
    x = jnp.ones((2, 8, 8, 4), jnp.float32)
    k3, k5 = jnp.ones((3, 3, 1, 4), jnp.float32), jnp.ones((5, 5, 1, 4), jnp.float32)

    def f(x, k3, k5):
        y = jnp.sin(x)
        return (kernels.depthwise_conv_hybrid(y, k3, (1, 1), (1, 1), (1, 1))
                + kernels.depthwise_conv_hybrid(y, k5, (1, 1), (2, 2), (1, 1))
                + kernels.depthwise_conv_hybrid(y, k5, (1, 1), (4, 4), (2, 2)))

    for g in (f, jax.grad(lambda *a: jnp.sum(f(*a) ** 2), (0, 1, 2))):
        assert jax.jit(g).lower(x, k3, k5).compile().as_text().count(" sine(") == 1
