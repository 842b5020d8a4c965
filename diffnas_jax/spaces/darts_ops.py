"""The DARTS candidate operations as Flax modules (Liu et al., ICLR 2019, ``cnn/operations.py``).

Submodule names reproduce the reference ``state_dict`` names (``op.1`` is the depthwise conv of
a ``SepConv``, ``conv_1``/``conv_2``/``bn`` of a ``FactorizedReduce`` ...), so a parameter's
Flax path joined with ``.`` is its PyTorch name (the scheme of :mod:`diffnas_jax.spaces.scaffold`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .genotypes import EVAL_OPS
from .layers import BatchNorm2d, Conv2d, DepthwiseConv2d, PointwiseConv2d, ReLUConvBN, avg_pool, max_pool

Array = jax.Array

__all__ = ["ReLUConvBN", "FactorizedReduce", "SepConv", "DilConv", "PoolBN", "Conv7x1_1x7", "make_op",
           "is_identity", "has_params", "pool_3x3"]


class FactorizedReduce(nn.Module):
    """ReLU, two 1x1 stride-2 convs on ``x`` and ``x[1:, 1:]`` concatenated, BatchNorm.

    Spatial sizes must be even (the reference's concatenation fails otherwise).
    """
    features: int
    affine: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool, out_scale: Array | None = None) -> Array:
        if self.features % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {self.features}")
        x = jax.nn.relu(x)
        a = PointwiseConv2d(self.features // 2, name="conv_1")(x[:, ::2, ::2, :])
        b = PointwiseConv2d(self.features // 2, name="conv_2")(x[:, 1::2, 1::2, :])
        return BatchNorm2d(self.affine, name="bn")(jnp.concatenate([a, b], axis=-1), train, out_scale)


class SepConv(nn.Module):
    """Twice ReLU -> depthwise k x k -> 1x1 -> BatchNorm; the first depthwise conv has the stride."""
    features: int
    kernel_size: int
    stride: int
    padding: int
    affine: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool, out_scale: Array | None = None) -> Array:
        c = x.shape[-1]
        x = jax.nn.relu(x)
        x = DepthwiseConv2d(self.kernel_size, self.stride, self.padding, name="op.1")(x)
        x = PointwiseConv2d(c, name="op.2")(x)
        x = BatchNorm2d(self.affine, name="op.3")(x, train)
        x = jax.nn.relu(x)
        x = DepthwiseConv2d(self.kernel_size, 1, self.padding, name="op.5")(x)
        x = PointwiseConv2d(self.features, name="op.6")(x)
        return BatchNorm2d(self.affine, name="op.7")(x, train, out_scale)


class DilConv(nn.Module):
    """ReLU -> dilated depthwise k x k -> 1x1 -> BatchNorm (names ``op.1``, ``op.2``, ``op.3``)."""
    features: int
    kernel_size: int
    stride: int
    padding: int
    dilation: int
    affine: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool, out_scale: Array | None = None) -> Array:
        x = jax.nn.relu(x)
        x = DepthwiseConv2d(self.kernel_size, self.stride, self.padding, self.dilation, name="op.1")(x)
        x = PointwiseConv2d(self.features, name="op.2")(x)
        return BatchNorm2d(self.affine, name="op.3")(x, train, out_scale)


class Conv7x1_1x7(nn.Module):
    """ReLU -> Conv (1, 7) -> Conv (7, 1) -> BatchNorm (AmoebaNet's op; names ``1``, ``2``, ``3``)."""
    features: int
    stride: int
    affine: bool = True

    @nn.compact
    def __call__(self, x: Array, train: bool, out_scale: Array | None = None) -> Array:
        x = jax.nn.relu(x)
        x = Conv2d(self.features, (1, 7), (1, self.stride), (0, 3), name="1")(x)
        x = Conv2d(self.features, (7, 1), (self.stride, 1), (3, 0), name="2")(x)
        return BatchNorm2d(self.affine, name="3")(x, train, out_scale)


class PoolBN(nn.Module):
    """A 3x3 pool followed by a non-affine BatchNorm (name ``1``): the search cell's pool ops.

    ``pooled``: ``pool(x)`` computed by the caller (once per state for all the edges leaving it,
    while each edge keeps its own BatchNorm statistics); ``x`` is then not read.
    """
    kind: str
    stride: int

    @nn.compact
    def __call__(self, x: Array, train: bool, pooled: Array | None = None,
                 out_scale: Array | None = None) -> Array:
        if pooled is None:
            pooled = pool_3x3(self.kind, x, self.stride)
        return BatchNorm2d(False, name="1")(pooled, train, out_scale)


def pool_3x3(kind: str, x: Array, stride: int) -> Array:
    """The 3x3 pool of the pool ops (``kind`` ``"max"`` or ``"avg"``), padding 1."""
    return (max_pool if kind == "max" else avg_pool)(x, 3, stride, 1)


def _zero(x: Array, stride: int) -> Array:
    return jnp.zeros_like(x[:, ::stride, ::stride, :])


def is_identity(name: str, stride: int) -> bool:
    """True where the reference builds ``Identity`` (no drop-path on it in the evaluation cell)."""
    return name == "skip_connect" and stride == 1


def has_params(name: str, stride: int) -> bool:
    return name not in ("none",) and not is_identity(name, stride) and not (
        name in ("max_pool_3x3", "avg_pool_3x3"))


def make_op(op_name: str, C: int, stride: int, affine: bool, name: str, pool_bn: bool = False):
    """The module (or parameter-free function ``f(x, train)``) for ``op_name``.

    ``pool_bn``: wrap pools with a non-affine BatchNorm as the search cell's ``MixedOp`` does.
    Every module returned ends with a BatchNorm and takes ``out_scale`` (a scalar multiplying its
    output, folded into that BatchNorm: :class:`~diffnas_jax.spaces.layers.BatchNorm2d`).
    """
    if op_name not in EVAL_OPS:
        raise ValueError(f"unknown op name {op_name!r}; expected one of {EVAL_OPS}")
    if op_name == "none":
        return lambda x, train: _zero(x, stride)
    if op_name in ("max_pool_3x3", "avg_pool_3x3"):
        kind = op_name[:3]
        if pool_bn:
            return PoolBN(kind, stride, name=name)
        pool = max_pool if kind == "max" else avg_pool
        return lambda x, train: pool(x, 3, stride, 1)
    if op_name == "skip_connect":
        if stride == 1:
            return lambda x, train: x
        return FactorizedReduce(C, affine, name=name)
    if op_name.startswith("sep_conv_"):
        k = int(op_name[-1])
        return SepConv(C, k, stride, k // 2, affine, name=name)
    if op_name.startswith("dil_conv_"):
        k = int(op_name[-1])
        return DilConv(C, k, stride, k - 1, 2, affine, name=name)
    return Conv7x1_1x7(C, stride, affine, name=name)
