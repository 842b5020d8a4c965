"""The shifted-multiply depthwise convolution: equal to XLA's grouped convolution, and cheap to keep."""
from __future__ import annotations

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest

from diffnas_jax.cost.counting import _grouped_depthwise  # XLA's feature_group_count convolution
from diffnas_jax.spaces import layers


@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 1, 1, 1), (5, 2, 2, 1), (3, 2, 2, 2), (5, 1, 4, 2),
                                                       (3, 2, 0, 1)])
def test_shifted_depthwise_conv_equals_grouped_conv_values_and_gradients(k, stride, padding, dilation):
    with jax.enable_x64():
        x = jax.random.normal(jax.random.key(0), (2, 9, 8, 3), jnp.float64)
        kern = jax.random.normal(jax.random.key(1), (k, k, 1, 3), jnp.float64)
        ours = lambda x, w: layers.depthwise_conv(x, w, stride, padding, dilation, "shifted")  # noqa: E731
        ref = lambda x, w: _grouped_depthwise(x, w, stride, padding, dilation)  # noqa: E731
        y, vjp = jax.vjp(ours, x, kern)
        y_ref, vjp_ref = jax.vjp(ref, x, kern)
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        g = jax.random.normal(jax.random.key(2), y.shape, jnp.float64)
        for a, b in zip(vjp(g), vjp_ref(g)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        # forward-over-reverse (exact Hessian-vector products in the hypergradients) goes through it too
        hvp = jax.jvp(jax.grad(lambda w: jnp.sum(ours(x, w) ** 2)), (kern,), (jnp.ones_like(kern),))[1]
        hvp_ref = jax.jvp(jax.grad(lambda w: jnp.sum(ref(x, w) ** 2)), (kern,), (jnp.ones_like(kern),))[1]
        np.testing.assert_allclose(hvp, hvp_ref, rtol=1e-10)


def test_depthwise_conv_backward_keeps_only_the_input():
    # Differentiated as written, the k*k shifted slices are all residuals (25 input copies for 5x5);
    # this is what took the DARTS supernet past 24 GB. The residuals of the VJP are its leaves.
    x = jnp.ones((2, 16, 16, 4))
    kern = jnp.ones((5, 5, 1, 4))
    _, vjp = jax.vjp(lambda x, w: layers.depthwise_conv(x, w, 1, 2, 1, "shifted"), x, kern)
    saved = sum(leaf.size for leaf in jax.tree_util.tree_leaves(vjp))
    assert saved <= 1.1 * x.size + kern.size


def _pool_reference(x, k, stride, padding, kind):
    """Direct loops: PyTorch's AvgPool2d(count_include_pad=False) / MaxPool2d on NHWC."""
    n, h, w, c = x.shape
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    out = np.zeros((n, ho, wo, c))
    for i in range(ho):
        for j in range(wo):
            r0, c0 = i * stride - padding, j * stride - padding
            win = x[:, max(r0, 0):min(r0 + k, h), max(c0, 0):min(c0 + k, w), :]
            out[:, i, j, :] = win.mean(axis=(1, 2)) if kind == "avg" else win.max(axis=(1, 2))
    return out


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (2, 2, 0), (5, 3, 0), (3, 2, 1)])
def test_pools_equal_direct_loops_with_exact_gradients(k, stride, padding):
    from jax.test_util import check_grads
    with jax.enable_x64():
        x = jax.random.normal(jax.random.key(3), (2, 7, 6, 3), jnp.float64)
        for kind, pool in (("avg", layers.avg_pool), ("max", layers.max_pool)):
            f = jax.jit(lambda x: pool(x, k, stride, padding))  # noqa: B023
            np.testing.assert_allclose(f(x), _pool_reference(np.asarray(x), k, stride, padding, kind),
                                       rtol=1e-12, atol=1e-12)
            # both pools are piecewise linear: first order is the whole derivative
            check_grads(f, (x,), order=1, modes=("fwd", "rev"))
            # vmapped over stacked inputs (the DARTS cell vmaps edges) equals the loop
            xs = jnp.stack([x, 2 * x])
            np.testing.assert_allclose(jax.vmap(f)(xs)[1], f(2 * x), rtol=1e-12)


def _max_pool_chain(x, k, stride, padding):
    """The previous formulation: a chain of pairwise maxima over the shifted windows, differentiated
    by JAX (ties share the gradient)."""
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-np.inf)
    n, h, w, c = x.shape
    ho, wo = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    out = None
    for i in range(k):
        for j in range(k):
            s = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            out = s if out is None else jnp.maximum(out, s)
    return out


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (2, 2, 0), (3, 2, 1)])
def test_max_pool_derivatives_equal_the_pairwise_maxima_without_ties(k, stride, padding):
    """Without ties the explicit JVP equals JAX's derivative of the pairwise-maximum chain: VJP,
    and forward-over-reverse (the second-order DARTS step's product)."""
    with jax.enable_x64():
        x = jax.random.normal(jax.random.key(7), (2, 9, 8, 3), jnp.float64)
        g = jax.random.normal(jax.random.key(8), layers.max_pool(x, k, stride, padding).shape, jnp.float64)
        vjp = jax.vjp(lambda x: layers.max_pool(x, k, stride, padding), x)[1]
        vjp_ref = jax.vjp(lambda x: _max_pool_chain(x, k, stride, padding), x)[1]
        np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])
        loss = lambda pool: lambda x: jnp.sum(jnp.sin(pool(x, k, stride, padding)) * g)  # noqa: E731
        v = jax.random.normal(jax.random.key(9), x.shape, jnp.float64)
        hvp = jax.jit(lambda x, v: jax.jvp(jax.grad(loss(layers.max_pool)), (x,), (v,))[1])(x, v)
        np.testing.assert_allclose(hvp, jax.jvp(jax.grad(loss(_max_pool_chain)), (x,), (v,))[1],
                                   rtol=1e-12, atol=1e-13)
        from jax.test_util import check_grads
        check_grads(loss(layers.max_pool), (x,), order=2, modes=("fwd", "rev"))


def test_max_pool_ties_and_nan_follow_pytorch():
    # ties: the whole gradient goes to the window's first maximum (row-major), as MaxPool2d's index
    x = jnp.zeros((1, 4, 4, 1), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(layers.max_pool(x, 2, 2, 0)))(x)[0, :, :, 0]
    want = np.zeros((4, 4), np.float32)
    want[::2, ::2] = 1
    np.testing.assert_array_equal(g, want)
    # 3x3 / stride 1 / padding 1 over a constant image: each output's gradient to its window's
    # first in-image cell
    g = jax.grad(lambda x: jnp.sum(layers.max_pool(x, 3, 1, 1)))(jnp.ones((1, 3, 3, 1)))[0, :, :, 0]
    np.testing.assert_array_equal(g, [[4, 2, 0], [2, 1, 0], [0, 0, 0]])
    # NaN: the window holding it gives NaN and carries the NaN cell's tangent (PyTorch's index);
    # the other windows and their gradients are untouched
    x = jnp.arange(16.0).reshape(1, 4, 4, 1).at[0, 0, 1, 0].set(jnp.nan)
    y = layers.max_pool(x, 2, 2, 0)[0, :, :, 0]
    assert bool(jnp.isnan(y[0, 0])) and bool(jnp.all(jnp.isfinite(y.ravel()[1:])))
    g = jax.grad(lambda x: jnp.sum(jnp.where(jnp.isnan(layers.max_pool(x, 2, 2, 0)), 1.0,
                                             layers.max_pool(x, 2, 2, 0))))(x)[0, :, :, 0]
    assert float(g[0, 1]) == 0.0 and float(jnp.sum(g)) == 3.0
    dy = jax.jvp(lambda x: layers.max_pool(x, 2, 2, 0), (x,), (jnp.ones_like(x),))[1][0, :, :, 0]
    np.testing.assert_array_equal(dy, np.ones((2, 2)))


def _avg_pool_2d_window(x, k, stride, padding):
    """The previous formulation: one k x k ``reduce_window`` sum, divided by the in-image counts."""
    total = jax.lax.reduce_window(x, np.array(0, x.dtype), jax.lax.add, (1, k, k, 1), (1, stride, stride, 1),
                                  ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ones = jnp.pad(jnp.ones(x.shape[1:3], x.dtype), padding)[None, :, :, None]
    counts = jax.lax.reduce_window(ones, np.array(0, x.dtype), jax.lax.add, (1, k, k, 1), (1, stride, stride, 1),
                                   "VALID")
    return total / counts


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (2, 2, 0), (5, 3, 0), (3, 2, 1)])
def test_separable_avg_pool_equals_one_window_sum(k, stride, padding):
    """The two 1-D windowed sums equal the k x k one: values, VJP and forward-over-reverse."""
    with jax.enable_x64():
        x = jax.random.normal(jax.random.key(5), (2, 9, 8, 3), jnp.float64)
        y, vjp = jax.vjp(lambda x: layers.avg_pool(x, k, stride, padding), x)
        y_ref, vjp_ref = jax.vjp(lambda x: _avg_pool_2d_window(x, k, stride, padding), x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-13, atol=1e-14)
        g = jax.random.normal(jax.random.key(6), y.shape, jnp.float64)
        np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-13, atol=1e-14)
        loss = lambda pool: lambda x: jnp.sum(jnp.sin(pool(x, k, stride, padding)))  # noqa: E731
        v = jnp.ones_like(x)
        hvp = jax.jvp(jax.grad(loss(layers.avg_pool)), (x,), (v,))[1]
        np.testing.assert_allclose(hvp, jax.jvp(jax.grad(loss(_avg_pool_2d_window)), (x,), (v,))[1],
                                   rtol=1e-12, atol=1e-13)


def _batch_norm_plain(x, running_mean, running_var, scale, bias, momentum=0.1, eps=1e-5):
    """Train-mode BatchNorm2d written out directly (the variance's ``x - mean`` not rematerialised)."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.mean(jnp.square(x - mean), axes)
    n = x.size // x.shape[-1]
    new = ((1 - momentum) * running_mean + momentum * jax.lax.stop_gradient(mean),
           (1 - momentum) * running_var + momentum * jax.lax.stop_gradient(var * n / (n - 1)))
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias, new


def test_batch_norm_equals_the_direct_formula_with_gradients_and_forward_over_reverse():
    with jax.enable_x64():
        ks = jax.random.split(jax.random.key(7), 5)
        x = 3.0 + 2.0 * jax.random.normal(ks[0], (4, 5, 3, 6), jnp.float64)
        rm, rv = jax.random.normal(ks[1], (6,), jnp.float64), 1.5 + jax.random.uniform(ks[2], (6,), jnp.float64)
        scale, bias = jax.random.normal(ks[3], (6,), jnp.float64), jax.random.normal(ks[4], (6,), jnp.float64)
        y, new = layers.batch_norm(x, rm, rv, scale, bias, True)
        y_ref, new_ref = _batch_norm_plain(x, rm, rv, scale, bias)
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(new, new_ref):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        loss = lambda bn: lambda x, s, b: jnp.sum(jnp.sin(bn(x, rm, rv, s, b)[0]) * x)  # noqa: E731
        ours = loss(lambda *a: layers.batch_norm(*a, True))
        ref = loss(_batch_norm_plain)
        for g, g_ref in zip(jax.grad(ours, (0, 1, 2))(x, scale, bias), jax.grad(ref, (0, 1, 2))(x, scale, bias)):
            np.testing.assert_allclose(g, g_ref, rtol=1e-10, atol=1e-12)
        v = jnp.ones_like(x)
        hvp = jax.jvp(lambda x: jax.grad(ours)(x, scale, bias), (x,), (v,))[1]
        hvp_ref = jax.jvp(lambda x: jax.grad(ref)(x, scale, bias), (x,), (v,))[1]
        np.testing.assert_allclose(hvp, hvp_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("affine,train", [(False, True), (True, True), (False, False), (True, False)])
def test_batch_norm_out_scale_equals_scaling_its_output(affine, train):
    # The search cell folds its mixing weight into the op's closing BatchNorm: same value, running
    # statistics, gradients (the weight's included) and forward-over-reverse as scaling after it.
    with jax.enable_x64():
        bn = layers.BatchNorm2d(affine)
        x = 1.0 + 2.0 * jax.random.normal(jax.random.key(10), (3, 4, 5, 6), jnp.float64)
        variables = bn.init(jax.random.key(11), x, True)
        if affine:
            k1, k2 = jax.random.split(jax.random.key(12))
            variables = {**variables, "params": {"scale": jax.random.normal(k1, (6,), jnp.float64),
                                                 "bias": jax.random.normal(k2, (6,), jnp.float64)}}
        stats = jax.tree_util.tree_map(lambda a: a + 0.5 if a.dtype == jnp.float64 else a,
                                       variables["batch_stats"])

        def run(folded):
            def f(p, x, s):
                y, new = bn.apply({"params": p, "batch_stats": stats}, x, train, s if folded else None,
                                  mutable=["batch_stats"])
                return (y if folded else s * y), new
            return f

        p = variables.get("params", {})
        s = jnp.asarray(0.37, jnp.float64)
        (ya, na), (yb, nb) = run(True)(p, x, s), run(False)(p, x, s)
        np.testing.assert_allclose(ya, yb, rtol=1e-13, atol=1e-14)
        for a, b in zip(jax.tree_util.tree_leaves(na), jax.tree_util.tree_leaves(nb)):
            np.testing.assert_array_equal(a, b)
        loss = lambda f: lambda p, x, s: jnp.sum(jnp.sin(f(p, x, s)[0]) * x)  # noqa: E731
        ga = jax.grad(loss(run(True)), (0, 1, 2))(p, x, s)
        gb = jax.grad(loss(run(False)), (0, 1, 2))(p, x, s)
        for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)
        v = jnp.cos(x)
        ha = jax.jvp(lambda x: jax.grad(loss(run(True)), (1, 2))(p, x, s), (x,), (v,))[1]
        hb = jax.jvp(lambda x: jax.grad(loss(run(False)), (1, 2))(p, x, s), (x,), (v,))[1]
        for a, b in zip(ha, hb):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-11)
        jax.test_util.check_grads(lambda x, s: run(True)(p, x, s)[0], (x, s), order=2, modes=("fwd", "rev"))


def test_pointwise_conv_equals_channel_einsum_under_vmap_and_forward_over_reverse():
    with jax.enable_x64():
        x = jax.random.normal(jax.random.key(8), (3, 2, 5, 4, 6), jnp.float64)  # 3 stacked edges
        kern = jax.random.normal(jax.random.key(9), (3, 1, 1, 6, 5), jnp.float64)
        ref = lambda x, k: jnp.einsum("nhwc,cd->nhwd", x, k[0, 0])  # noqa: E731
        ours = jax.vmap(layers.pointwise_conv)
        np.testing.assert_allclose(ours(x, kern), jax.vmap(ref)(x, kern), rtol=1e-13, atol=1e-14)
        loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))  # noqa: E731
        for g, g_ref in zip(jax.grad(loss(ours), (0, 1))(x, kern), jax.grad(loss(jax.vmap(ref)), (0, 1))(x, kern)):
            np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-13)
        hvp = jax.jvp(lambda k: jax.grad(loss(ours), 1)(x, k), (kern,), (jnp.ones_like(kern),))[1]
        hvp_ref = jax.jvp(lambda k: jax.grad(loss(jax.vmap(ref)), 1)(x, k), (kern,), (jnp.ones_like(kern),))[1]
        np.testing.assert_allclose(hvp, hvp_ref, rtol=1e-11, atol=1e-12)
        assert layers.pointwise_conv(x[0].astype(jnp.float32), kern[0]).dtype == jnp.float32
