"""The depthwise-convolution primitives (spaces/_dwconv.py) and their CPU kernel (_dwconv_cpu.cc):
each form equals its XLA reference (what other backends run), the derivatives close (check_grads
to second order in both modes), vmap folds into the group axis, one instruction per form."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from diffnas_jax.spaces import _dwconv, kernels

pytestmark = pytest.mark.skipif(not _dwconv.available(), reason="the depthwise kernel is not built")

GEOMETRIES = [((3, 3), (1, 1), (1, 1), (1, 1)), ((5, 5), (2, 2), (2, 2), (1, 1)), ((3, 3), (2, 1), (2, 1), (2, 1)),
              ((5, 3), (1, 2), (4, 0), (2, 1)), ((1, 1), (1, 1), (0, 0), (1, 1))]


@pytest.mark.parametrize("ksize,stride,padding,dilation", GEOMETRIES)
@pytest.mark.parametrize("gx,g", [(1, 1), (1, 3), (3, 3), (2, 4)])
def test_each_form_equals_its_xla_reference(ksize, stride, padding, dilation, gx, g):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(gx, 2, 9, 8, 3)))
    k = jnp.asarray(rng.normal(size=(g,) + ksize + (3,)))
    p = dict(stride=stride, padding=padding, dilation=dilation)
    y = jax.jit(lambda x, k: _dwconv.conv_p.bind(x, k, **p))(x, k)
    np.testing.assert_allclose(y, _dwconv._reference_conv(x, k, stride, padding, dilation), rtol=1e-12, atol=1e-12)
    ct = jnp.asarray(rng.normal(size=y.shape))
    dx = jax.jit(lambda c, k: _dwconv.input_t_p.bind(c, k, x_shape=x.shape, **p))(ct, k)
    np.testing.assert_allclose(dx, _dwconv._reference_input_t(ct, k, stride, padding, dilation, x.shape),
                               rtol=1e-12, atol=1e-12)
    dk = jax.jit(lambda x, c: _dwconv.kernel_t_p.bind(x, c, kernel_hw=ksize, **p))(x, ct)
    np.testing.assert_allclose(dk, _dwconv._reference_kernel_t(x, ct, stride, padding, dilation, ksize),
                               rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("c", [8, 16, 25, 41])
@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
def test_kernel_transpose_over_its_channel_blocks(c, stride):
    # the kernel's channel loop runs in register blocks of 16, then 8, then one channel at a time:
    # channel counts that exercise each block (16 + 8 + 1 = 25, 2 * 16 + 8 + 1 = 41)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 3, 9, 10, c)))
    p = dict(stride=stride, padding=(2, 2), dilation=(1, 1))
    ct = jnp.asarray(rng.normal(size=_dwconv._reference_conv(x[:1], jnp.zeros((4, 5, 5, c)), stride, (2, 2),
                                                                (1, 1)).shape))
    dk = jax.jit(lambda x, c_: _dwconv.kernel_t_p.bind(x, c_, kernel_hw=(5, 5), **p))(x, ct)
    np.testing.assert_allclose(dk, _dwconv._reference_kernel_t(x, ct, stride, (2, 2), (1, 1), (5, 5)),
                               rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("ksize,stride,padding,dilation", GEOMETRIES[:3])
def test_derivatives_to_second_order_in_both_modes(ksize, stride, padding, dilation):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 2)))
    k = jnp.asarray(rng.normal(size=ksize + (1, 2)))
    check_grads(lambda x, k: kernels.depthwise_conv_ffi(x, k, stride, padding, dilation), (x, k), order=2,
                modes=("fwd", "rev"))


def test_vmap_folds_into_groups_as_the_grouped_convolution_does():
    # edges sharing one input, inputs only, kernels only, and seeds x edges (an input per seed
    # shared by its edges): values and gradients against the grouped convolution (float64)
    rng = np.random.default_rng(2)
    args = ((1, 1), (2, 2), (2, 2))
    xs = jnp.asarray(rng.normal(size=(2, 2, 7, 7, 3)))
    ks = jnp.asarray(rng.normal(size=(2, 4, 3, 3, 1, 3)))

    def run(conv):
        shared = jax.vmap(lambda k: conv(xs[0], k, *args))(ks[0])
        inputs = jax.vmap(lambda x: conv(x, ks[0, 0], *args))(xs)
        kerns = jax.vmap(lambda x, k: conv(x, k, *args), (None, 0))(xs[0], ks[0])

        def seeds(xs, ks):
            return jnp.sum(jnp.sin(jax.vmap(lambda x, kk: jax.vmap(lambda k: conv(x, k, *args))(kk))(xs, ks)))

        return shared, inputs, kerns, jax.grad(seeds, (0, 1))(xs, ks), jax.vmap(jax.grad(seeds, (0, 1)))(xs[:, None],
                                                                                                         ks[:, None])

    got = jax.jit(lambda: run(kernels.depthwise_conv_ffi))()
    want = jax.jit(lambda: run(kernels._grouped))()
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)


def test_each_form_is_one_instruction():
    # the point of the primitives: forward-over-reverse of a 5x5 convolution holds custom calls,
    # not kh*kw shifted multiplies per form
    x = jnp.ones((2, 8, 8, 4), jnp.float32)
    k = jnp.ones((5, 5, 1, 4), jnp.float32)

    def loss(x, k):
        return jnp.sum(jnp.sin(kernels.depthwise_conv_ffi(x, k, (1, 1), (2, 2), (1, 1))))

    hvp = jax.jit(lambda x, k: jax.jvp(jax.grad(loss, (0, 1)), (x, k), (x, k))[1])
    hlo = hvp.lower(x, k).compile().as_text()
    assert 4 <= hlo.count("custom_call_target=\"diffnas_dwconv") <= 8
    assert hlo.count(" slice(") == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64])
def test_keeps_the_dtype_and_propagates_nan(dtype):
    x = jnp.ones((1, 6, 6, 2), dtype).at[0, 2, 2, 0].set(jnp.nan)
    k = jnp.ones((3, 3, 1, 2), dtype)
    y = jax.jit(lambda x: kernels.depthwise_conv_ffi(x, k, (1, 1), (1, 1), (1, 1)))(x)
    assert y.dtype == dtype
    assert bool(jnp.all(jnp.isnan(y[0, 1:4, 1:4, 0])))
    assert bool(jnp.all(jnp.isfinite(y[0, :, :, 1]))) and float(y[0, 5, 5, 0]) == 4.0
    g = jax.grad(lambda k: jnp.sum(kernels.depthwise_conv_ffi(x.astype(jnp.float32), k, (1, 1), (1, 1), (1, 1))))(
        k.astype(jnp.float32))
    assert bool(jnp.all(jnp.isnan(g[..., 0, 0]))) and bool(jnp.all(jnp.isfinite(g[..., 0, 1])))


def test_threaded_kernels_are_deterministic():
    # work is split over (group, image) on XLA's thread pool; the kernel-gradient partial sums are
    # added in task order, so two runs agree bit for bit
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(16, 16, 16, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(4, 5, 5, 1, 8)), jnp.float32)
    f = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(jax.vmap(
        lambda kk: kernels.depthwise_conv_ffi(x, kk, (1, 1), (2, 2), (1, 1)))(k))), (0, 1)))
    a, b = f(x, k), f(x, k)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_group_counts_must_divide():
    with pytest.raises(ValueError, match="divide"):
        jax.eval_shape(lambda x, k: _dwconv.conv_p.bind(x, k, stride=(1, 1), padding=(1, 1), dilation=(1, 1)),
                       jax.ShapeDtypeStruct((2, 1, 5, 5, 2), jnp.float32),
                       jax.ShapeDtypeStruct((3, 3, 3, 2), jnp.float32))
