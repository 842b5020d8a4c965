"""Flax building blocks shared by the search spaces, numerically equal to their PyTorch twins.

Layout is NHWC. Convolution kernels are stored HWIO (``kernel``) so that a PyTorch OIHW weight
imports with ``w.transpose(2, 3, 1, 0)``; linear kernels are stored (in, out) (PyTorch (out, in)
transposed).  BatchNorm follows ``torch.nn.BatchNorm2d``: in train mode it normalises with the
*biased* batch variance and updates the running variance with the *unbiased* one, momentum 0.1,
eps 1e-5; running statistics live in the ``"batch_stats"`` collection as ``mean``, ``var`` and
``num_batches_tracked``.

The depthwise convolution has three formulations (XLA's grouped convolution, ``k*k`` shifted
multiplies, or a hybrid of the two), chosen per backend in :mod:`diffnas_jax.spaces.kernels`; 1x1 convolutions are
``dot_general`` contractions (``vmap`` over stacked weights then stays a batched matmul).
Results equal the direct convolutions up to float rounding.

References: the PyTorch modules ``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.AvgPool2d`` and
``nn.MaxPool2d`` as used by DARTS (Liu et al., ICLR 2019) and NAS-Bench-201 (Dong & Yang, ICLR
2020).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffnas_jax._checks import backend_default

from . import kernels
from .kernels import conv_out_size

Array = jax.Array

__all__ = [
    "torch_uniform_init", "Conv2d", "DepthwiseConv2d", "PointwiseConv2d", "Linear", "BatchNorm2d",
    "avg_pool", "max_pool", "channel_shuffle", "global_avg_pool", "depthwise_conv",
    "pointwise_conv", "conv_out_size", "batch_norm", "ReLUConvBN", "cotangent_barrier", "state_barrier",
    "COTANGENT_BARRIERS", "default_cotangent_barrier",
]

#: how :func:`cotangent_barrier` keeps a cotangent whole: ``"dot"`` (an identity contraction) or
#: ``"none"`` (plain identity)
COTANGENT_BARRIERS = ("dot", "none")


def torch_uniform_init(fan_in: int) -> Callable[..., Array]:
    """PyTorch's default ``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def depthwise_conv(x: Array, kernel: Array, stride: int | Sequence[int] = 1,
                   padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
                   formulation: str | None = None) -> Array:
    """Depthwise 2-D convolution, PyTorch ``Conv2d(C, C, k, groups=C)`` in NHWC.

    ``x``: (N, H, W, C); ``kernel``: (kh, kw, 1, C) (HWIO with one input channel per group, i.e.
    PyTorch OIHW (C, 1, kh, kw) transposed).  Zero padding, PyTorch output size; returns
    (N, Ho, Wo, C) in ``x``'s dtype.

    ``formulation``: ``"grouped"`` (XLA's ``feature_group_count`` convolution), ``"shifted"``
    (``kh*kw`` shifted multiplies, rematerialised in the backward pass), ``"hybrid"`` (shifted
    forward and input gradient, a scan over the taps for the kernel gradient) or ``"ffi"`` (the
    C++ CPU kernel, one primitive per form; needs the built extension); ``None`` picks
    :func:`diffnas_jax.spaces.kernels.default_formulation` for the backend at trace time.  All four
    are equal up to float rounding (values, gradients, forward-over-reverse); they differ in
    compile time, run time and how they batch (see :mod:`diffnas_jax.spaces.kernels`).
    """
    form = kernels._check_formulation(formulation)
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[3] != x.shape[-1]:
        raise ValueError(f"depthwise_conv: `x` must be (N, H, W, C) and `kernel` (kh, kw, 1, C); "
                         f"got x {x.shape}, kernel {kernel.shape}")
    impl = {"grouped": kernels.depthwise_conv_grouped, "shifted": kernels.depthwise_conv_shifted,
            "hybrid": kernels.depthwise_conv_hybrid, "ffi": kernels.depthwise_conv_ffi}[form]
    return impl(x, kernel, _pair(stride), _pair(padding), _pair(dilation))


def default_cotangent_barrier(backend: str | None = None) -> str:
    """The :func:`cotangent_barrier` kind for ``backend`` (default ``jax.default_backend()``):
    ``"dot"`` on CPU, ``"none"`` elsewhere; ``$DIFFNAS_COTANGENT_BARRIER`` (``dot`` or ``none``)
    overrides it. Chosen at trace time, as the depthwise formulation."""
    backend = jax.default_backend() if backend is None else backend
    return backend_default("DIFFNAS_COTANGENT_BARRIER", COTANGENT_BARRIERS, backend,
                           "dot" if backend == "cpu" else "none")


@jax.custom_jvp
def _identity_with_dot_tangent(x: Array) -> Array:
    return x


@_identity_with_dot_tangent.defjvp
def _identity_with_dot_tangent_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return x, _dot_identity(t)


def _dot_identity(a: Array) -> Array:
    """``a`` contracted with the identity along its last axis.  Exact for finite entries (every
    other product is a zero) and its transpose is again one: XLA:CPU fuses neither into a consumer,
    so what passes through it is computed once."""
    eye = jnp.eye(a.shape[-1], dtype=a.dtype)
    return lax.dot_general(a, eye, (((a.ndim - 1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST)


def _barrier_kind(name: str, x: Array, kind: str | None) -> str:
    """The checked ``kind`` of :func:`cotangent_barrier` / :func:`state_barrier` (``None``: the
    backend's default), after checking ``x``."""
    kind = default_cotangent_barrier() if kind is None else kind
    if kind not in COTANGENT_BARRIERS:
        raise ValueError(f"{name}: `kind` must be one of {COTANGENT_BARRIERS} or None, got {kind!r}")
    if not hasattr(x, "shape") or len(x.shape) < 1 or not jnp.issubdtype(x.dtype, jnp.inexact):
        raise TypeError(f"{name}: `x` must be a floating array with at least one axis, got "
                        f"{getattr(x, 'dtype', type(x).__name__)} of shape {getattr(x, 'shape', None)}")
    return kind


def cotangent_barrier(x: Array, kind: str | None = None) -> Array:
    """``x`` unchanged; in the backward pass its cotangent is computed once, as one array.

    ``x``: any floating array (..., C); returns it as is (same value, shape and dtype; no copy in
    the forward pass).  With ``kind="dot"`` the tangent, and so the cotangent that reverse mode
    propagates to ``x``'s producers, passes through a contraction of the last axis with the
    C x C identity.  Why: XLA:CPU fuses elementwise producers into every consumer that can take
    them, duplicating them.  The cotangent of a NAS cell's state is a long elementwise expression
    (skip connections and mixing weights chain it through every later node and cell), so each
    convolution-gradient or pooling-gradient fusion recomputed the whole chain: in the NB201
    supernet's weight step (C=16, N=5, batch 32) 60 such fusions took most of the step.  The
    contraction is a fusion boundary XLA keeps (``lax.optimization_barrier`` is removed before
    fusion on CPU); it costs C multiply-adds per element.

    Exact for finite cotangents (every off-diagonal product is a zero); a NaN or infinite
    cotangent entry makes the cotangents of all channels at that position NaN.  Works under
    ``jit``, ``vmap``, ``grad`` and forward-over-reverse (its derivatives are those of the
    identity).  ``kind``: ``"dot"`` or ``"none"`` (plain identity); ``None`` picks
    :func:`default_cotangent_barrier` (``"dot"`` on CPU only: other backends' fusion heuristics
    do not duplicate such chains).  No paper: an XLA:CPU workaround.
    """
    kind = _barrier_kind("cotangent_barrier", x, kind)
    return _identity_with_dot_tangent(x) if kind == "dot" else x


def state_barrier(x: Array, kind: str | None = None) -> Array:
    """``x`` contracted with the C x C identity along its last axis: the same values, computed once.

    ``x``: a floating array (..., C); returns an array of the same shape and dtype, equal to ``x``
    for finite entries.  Why: XLA:CPU fuses a tensor's elementwise producer into every consumer
    fusion that reads it.  A DARTS node state (the mixed sum of its incoming edges, their BN
    chains) is read by the next edge group's padded copies, pools and skip, so every one of those
    fusions recomputed it (~4.5k of 20.8k fused instructions per hybrid cell).  The contraction is
    a boundary XLA keeps (``lax.optimization_barrier`` is removed before fusion on CPU); its
    tangent and cotangent are contractions too.  Full-size DARTS weight step (C=16, 8 layers, batch
    32, 32x32, hybrid, idle): compile 64-67 -> 45 s, step 5.9-6.1 -> 4.8 s (BUILD_NOTES section 5,
    round 7).  A NaN or infinite entry makes all channels at that position NaN (like
    :func:`cotangent_barrier`).  ``kind``: ``"dot"`` or ``"none"`` (``x`` itself); ``None`` picks
    :func:`default_cotangent_barrier` (``"dot"`` on CPU only).  No paper: an XLA:CPU workaround.
    """
    kind = _barrier_kind("state_barrier", x, kind)
    return _dot_identity(x) if kind == "dot" else x


def pointwise_conv(x: Array, kernel: Array) -> Array:
    """1x1 convolution as a contraction over channels: (N, H, W, Ci) x (1, 1, Ci, Co) -> (N, H, W, Co).

    One (N*H*W, Ci) x (Ci, Co) matmul: written as the 4-D ``einsum``, XLA:CPU gave the kernel
    gradient a transposed (Co, N*H*W) copy of the output cotangent and a non-XNNPACK ``dot``; the
    2-D form keeps both in the XNNPACK/YNNPACK matmul (NB201 C=16, N=5 step: ~180 -> ~20 ms).
    """
    k = kernel.reshape(kernel.shape[-2], kernel.shape[-1]).astype(x.dtype)
    return (x.reshape(-1, x.shape[-1]) @ k).reshape(x.shape[:-1] + (k.shape[-1],))


class Conv2d(nn.Module):
    """``torch.nn.Conv2d`` in NHWC with an HWIO ``kernel`` (and ``bias`` when ``use_bias``).

    Zero padding ``padding`` (int or (ph, pw)) on both sides, ``stride``, ``dilation``; no groups
    (see :class:`DepthwiseConv2d`).  1x1 kernels with unit stride use :func:`pointwise_conv`.
    """
    features: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = _pair(self.kernel_size)
        cin = x.shape[-1]
        fan_in = cin * kh * kw
        kernel = self.param("kernel", torch_uniform_init(fan_in), (kh, kw, cin, self.features), x.dtype)
        sh, sw = _pair(self.stride)
        ph, pw = _pair(self.padding)
        if (kh, kw) == (1, 1) and (ph, pw) == (0, 0):
            y = pointwise_conv(x[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else x, kernel)
        else:
            y = lax.conv_general_dilated(
                x, kernel.astype(x.dtype), (sh, sw), ((ph, ph), (pw, pw)),
                rhs_dilation=_pair(self.dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.use_bias:
            y = y + self.param("bias", torch_uniform_init(fan_in), (self.features,), x.dtype).astype(x.dtype)
        return y


class PointwiseConv2d(nn.Module):
    """Bias-free 1x1 ``Conv2d`` (kernel (1, 1, Ci, Co)) as a channel contraction."""
    features: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cin = x.shape[-1]
        kernel = self.param("kernel", torch_uniform_init(cin), (1, 1, cin, self.features), x.dtype)
        return pointwise_conv(x, kernel)


class DepthwiseConv2d(nn.Module):
    """Bias-free ``Conv2d(C, C, k, groups=C)``; kernel (kh, kw, 1, C); see :func:`depthwise_conv`."""
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        k = self.kernel_size
        c = x.shape[-1]
        kernel = self.param("kernel", torch_uniform_init(k * k), (k, k, 1, c), x.dtype)
        return depthwise_conv(x, kernel, self.stride, self.padding, self.dilation)


class Linear(nn.Module):
    """``torch.nn.Linear``: ``kernel`` (in, out) = PyTorch weight transposed, ``bias`` (out,)."""
    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cin = x.shape[-1]
        kernel = self.param("kernel", torch_uniform_init(cin), (cin, self.features), x.dtype)
        y = x @ kernel.astype(x.dtype)
        if self.use_bias:
            y = y + self.param("bias", torch_uniform_init(cin), (self.features,), x.dtype).astype(x.dtype)
        return y


def batch_norm(x: Array, running_mean: Array, running_var: Array, scale: Array | None, bias: Array | None,
               train: bool, momentum: float = 0.1, eps: float = 1e-5,
               out_scale: Array | None = None) -> tuple[Array, tuple[Array, Array] | None]:
    """Functional ``torch.nn.BatchNorm2d`` over the last (channel) axis, the one BatchNorm of every
    space (the :class:`BatchNorm2d` module and the spaces' wide per-edge / per-candidate kernels).

    ``train=True`` normalises with the batch mean and biased variance and returns the new running
    statistics ``((1-m) mean + m batch_mean, (1-m) var + m unbiased_batch_var)`` (no gradient
    through them); ``train=False`` normalises with the running statistics and returns ``None``.
    ``scale`` / ``bias`` (PyTorch ``weight`` / ``bias``) are ``None`` for a non-affine BN.
    ``out_scale`` (optional, a scalar or one factor per channel, shape (C,)): returns ``out_scale *
    BatchNorm(x)`` with the product folded into the normalisation's multiply-add (a search cell's
    mixing weights), so reverse mode takes its gradient from the per-channel sums the backward pass
    forms anyway instead of one more pass over the output; the running statistics do not depend on
    it. Statistics are computed in at least float32; the output keeps ``x``'s dtype.
    """
    sdt = jnp.promote_types(x.dtype, jnp.float32)
    if out_scale is not None:
        out_scale = jnp.asarray(out_scale, sdt)
        scale = jnp.broadcast_to(out_scale, x.shape[-1:]) if scale is None else scale.astype(sdt) * out_scale
        bias = None if bias is None else bias.astype(sdt) * out_scale
    new = None
    if train:
        xf = x.astype(sdt)
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(xf, axes)
        # rematerialised: the backward pass recomputes x - mean from x (a residual already) instead
        # of the forward pass writing it out as one more residual the size of x
        var = jax.checkpoint(lambda xf, mean: jnp.mean(jnp.square(xf - mean), axes))(xf, mean)
        n = x.size // x.shape[-1]
        unbiased = var * (n / max(n - 1, 1))
        new = ((1 - momentum) * running_mean + momentum * lax.stop_gradient(mean),
               (1 - momentum) * running_var + momentum * lax.stop_gradient(unbiased))
    else:
        mean, var = running_mean, running_var
    mul = lax.rsqrt(var + eps)
    if scale is not None:
        mul = mul * scale.astype(sdt)
    add = -mean * mul if bias is None else bias.astype(sdt) - mean * mul
    return (x * mul.astype(x.dtype) + add.astype(x.dtype)).astype(x.dtype), new


class BatchNorm2d(nn.Module):
    """``torch.nn.BatchNorm2d`` over the last (channel) axis of an NHWC batch (:func:`batch_norm`).

    Running statistics are updated (and ``num_batches_tracked`` counted) only in train mode when
    the ``batch_stats`` collection is mutable and not during ``init``.
    ``affine``: learnable ``scale`` (PyTorch ``weight``) and ``bias``.
    ``out_scale`` (a scalar, optional): returns ``out_scale * BatchNorm(x)``, folded into the
    normalisation (:func:`batch_norm`; a search cell's mixing weight, ``darts.MixedOp``).
    """
    affine: bool = True
    momentum: float = 0.1
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: Array, train: bool, out_scale: Array | None = None) -> Array:
        c = x.shape[-1]
        stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), stat_dtype))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), stat_dtype))
        count = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        scale = bias = None
        if self.affine:
            scale = self.param("scale", nn.initializers.ones, (c,), stat_dtype)
            bias = self.param("bias", nn.initializers.zeros, (c,), stat_dtype)
        y, new = batch_norm(x, ra_mean.value, ra_var.value, scale, bias, train, self.momentum, self.eps,
                            out_scale)
        if new is not None and not self.is_initializing() and self.is_mutable_collection("batch_stats"):
            ra_mean.value, ra_var.value = new
            count.value = count.value + 1
        return y


class ReLUConvBN(nn.Module):
    """ReLU -> Conv2d(k, stride, padding) -> BatchNorm, named as the reference ``ReLUConvBN``
    (``op.1`` conv, ``op.2`` BN) of DARTS and NAS-Bench-201; ``use_bias`` for NB201's non-affine
    edge ops (``bias=not affine`` in the reference)."""
    features: int
    kernel_size: int = 1
    stride: int = 1
    padding: int = 0
    affine: bool = True
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = Conv2d(self.features, self.kernel_size, self.stride, self.padding, use_bias=self.use_bias,
                   name="op.1")(jax.nn.relu(x))
        return BatchNorm2d(self.affine, name="op.2")(x, train)


def _window_slices(x: Array, k: int, stride: int, pad_value: float, padding: int):
    n, h, w, c = x.shape
    ho = conv_out_size(h, k, stride, padding)
    wo = conv_out_size(w, k, stride, padding)
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=pad_value)
    # Between the pad and the slices: XLA's simplifier would rewrite each slice(pad(f(x))) into
    # pad(slice(f(x))), copying x's producer f into every window slice.  XLA:CPU removes the
    # barrier before fusion (no run-time cost); in front of the pad it had no effect.
    xp = lax.optimization_barrier(xp)
    for i in range(k):
        for j in range(k):
            yield lax.slice(xp, (0, i, j, 0), (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                            (1, stride, stride, 1))


def avg_pool(x: Array, kernel_size: int, stride: int, padding: int = 0) -> Array:
    """``nn.AvgPool2d(k, stride, padding, count_include_pad=False)`` on NHWC ``x``: (N, H, W, C) ->
    (N, Ho, Wo, C), PyTorch output size, ``x``'s dtype.

    Each window's sum is divided by the number of cells inside the unpadded input. The sum is
    separable: a windowed sum along H, then one along W (``reduce_window`` each; the gradient of
    each is another windowed sum). XLA:CPU runs the two 1-D windowed sums 3-4x faster than one
    k x k ``reduce_window`` (forward and backward, NB201 shapes). Not ``k*k`` shifted slices: XLA
    fused the producer of ``x`` into every slice, and a cell's chain of pools multiplied the
    program (NB201 search step: optimised HLO 89k -> 37k lines, XLA compile halved).
    """
    n, h, w, c = x.shape
    # the init value must be a concrete 0 for JAX to see a differentiable windowed sum
    zero = np.array(0, x.dtype)
    total = lax.reduce_window(x, zero, lax.add, (1, kernel_size, 1, 1), (1, stride, 1, 1),
                              ((0, 0), (padding, padding), (0, 0), (0, 0)))
    total = lax.reduce_window(total, zero, lax.add, (1, 1, kernel_size, 1), (1, 1, stride, 1),
                              ((0, 0), (0, 0), (padding, padding), (0, 0)))
    ones = np.pad(np.ones((h, w)), padding)
    ho, wo = total.shape[1], total.shape[2]
    counts = np.zeros((ho, wo))
    for i in range(kernel_size):
        for j in range(kernel_size):
            counts += ones[i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
    return total * jnp.asarray(1.0 / counts, x.dtype)[None, :, :, None]


def _max_and_first_argmax(x: Array, kernel_size: int, stride: int, padding: int) -> tuple[Array, Array]:
    """Each window's maximum and the index (row-major over the window) of its first maximum, as
    PyTorch's MaxPool2d picks it: a later cell wins only if larger or NaN (so NaN propagates)."""
    best = idx = None
    for t, s in enumerate(_window_slices(x, kernel_size, stride, -np.inf, padding)):
        if best is None:
            best, idx = s, jnp.zeros(s.shape, jnp.int32)
            continue
        take = (s > best) | jnp.isnan(s)
        best = jnp.where(take, s, best)
        idx = jnp.where(take, jnp.int32(t), idx)
    return best, idx


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def max_pool(x: Array, kernel_size: int, stride: int, padding: int = 0) -> Array:
    """``nn.MaxPool2d(k, stride, padding)`` on NHWC ``x`` (padding cells never win).

    Written as a maximum over ``k*k`` shifted slices: the ``reduce_window`` form differentiates
    into ``select_and_scatter``, which XLA on CPU compiles and runs very slowly (minutes of compile
    inside the vmapped DARTS cell). The derivative is explicit (``custom_jvp``): the tangent of the
    window's first maximum (PyTorch's choice on ties), selected by that cell's index, so reverse mode
    and forward-over-reverse read one index per output instead of differentiating the chain of
    pairwise maxima (whose gradient XLA recomputed per window and tap: the costliest kernel of the
    DARTS weight step's backward pass). A barrier on the padded input keeps XLA from copying the
    producer of ``x`` into each of the ``k*k`` slices (see :func:`avg_pool`).
    """
    return _max_and_first_argmax(x, kernel_size, stride, padding)[0]


@max_pool.defjvp
def _max_pool_jvp(kernel_size, stride, padding, primals, tangents):
    (x,), (dx,) = primals, tangents
    y, idx = _max_and_first_argmax(x, kernel_size, stride, padding)
    dy = None
    for t, ds in enumerate(_window_slices(dx, kernel_size, stride, 0.0, padding)):
        term = jnp.where(idx == t, ds, jnp.zeros_like(ds))
        dy = term if dy is None else dy + term
    return y, dy


def global_avg_pool(x: Array) -> Array:
    """``nn.AdaptiveAvgPool2d(1)`` followed by flattening: (N, H, W, C) -> (N, C)."""
    return jnp.mean(x, axis=(1, 2))


def channel_shuffle(x: Array, groups: int) -> Array:
    """ShuffleNet channel shuffle on the last axis, as PC-DARTS' ``channel_shuffle(x, groups)``.

    Channel ``g * (C // groups) + i`` moves to position ``i * groups + g``.
    """
    c = x.shape[-1]
    if c % groups:
        raise ValueError(f"channel_shuffle: {c} channels are not divisible by `groups`={groups}")
    y = x.reshape(x.shape[:-1] + (groups, c // groups))
    y = jnp.swapaxes(y, -1, -2)
    return y.reshape(x.shape)

