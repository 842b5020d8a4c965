"""The depthwise 2-D convolution as three JAX primitives whose derivatives close over each other.

``conv(x, k)`` (forward), ``input_t(ct, k)`` (its transpose in ``x``) and ``kernel_t(x, ct)`` (its
transpose in ``k``) are bilinear; the JVP of each is itself applied to one tangent at a time and
the transpose of each, in either argument, is one of the three (a closed set, as
``lax.conv_general_dilated`` is under JAX's rules).  So reverse mode, forward mode and
forward-over-reverse of a network built on them hold one HLO instruction per convolution form:
on the CPU an XLA FFI custom call into ``_dwconv_cpu.cc`` when that extension was built,
elsewhere (and as the reference) the grouped ``lax.conv_general_dilated``.

Why: the fast XLA formulation on XLA:CPU (``kernels.py``'s ``hybrid``) spends ~4-6 HLO
instructions per kernel tap and form; a DARTS supernet's forward-over-reverse program holds
five forms per convolution, 75 % of its instructions, and XLA:CPU's compile time follows the
instruction count (BUILD_NOTES section 5).

Layout (NHWC with a leading group axis): ``x`` (Gx, N, H, W, C), ``k`` (G, KH, KW, C), ``y`` (G,
N, HO, WO, C) with ``Gx`` dividing ``G``: group ``g`` reads input group ``g // (G // Gx)`` (one
input shared by the E edges of an edge group, or by the edges of one seed).  ``vmap`` folds its
axis into the groups.  Reference: the depthwise convolution of MobileNets (Howard et al., 2017),
PyTorch's ``Conv2d(C, C, k, groups=C)`` with zero padding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from diffnas_jax._ffi_targets import register

__all__ = ["available", "depthwise_conv"]

@functools.cache
def _targets() -> tuple[str, ...] | None:
    """Import the extension and register its handlers with XLA (once); None when not built."""
    return register("diffnas_jax.spaces._dwconv_cpu")


def available() -> bool:
    """Whether the CPU kernel was built and its targets are registered."""
    return _targets() is not None


def _out_size(size: int, k: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1


# --------------------------------------------------------------------------- reference forms
def _reference_conv(x, k, stride, padding, dilation):
    """The forward map in XLA ops: the grouped convolution per group."""
    gx, g = x.shape[0], k.shape[0]
    xs = jnp.repeat(x, g // gx, axis=0) if gx != g else x
    (ph, pw) = padding

    def one(xg, kg):
        return lax.conv_general_dilated(xg, kg[:, :, None, :].astype(xg.dtype), stride, ((ph, ph), (pw, pw)),
                                        rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=xg.shape[-1])

    return jax.vmap(one)(xs, k)


def _reference_input_t(ct, k, stride, padding, dilation, x_shape):
    x0 = jnp.zeros(x_shape, ct.dtype)
    return jax.vjp(lambda x: _reference_conv(x, k, stride, padding, dilation), x0)[1](ct)[0]


def _reference_kernel_t(x, ct, stride, padding, dilation, kernel_hw):
    k0 = jnp.zeros((ct.shape[0],) + tuple(kernel_hw) + (x.shape[-1],), x.dtype)
    return jax.vjp(lambda k: _reference_conv(x, k, stride, padding, dilation), k0)[1](ct)[0]


# --------------------------------------------------------------------------- primitives
conv_p = Primitive("diffnas_dwconv")
input_t_p = Primitive("diffnas_dwconv_input_t")
kernel_t_p = Primitive("diffnas_dwconv_kernel_t")


def _eager(prim):
    @functools.cache
    def compiled(**params):
        return jax.jit(functools.partial(prim.bind, **params))

    def impl(*args, **params):
        return compiled(**params)(*args)

    return impl


for _p in (conv_p, input_t_p, kernel_t_p):
    _p.def_impl(_eager(_p))


def _check_groups(gx: int, g: int) -> None:
    if gx < 1 or g % gx:
        raise ValueError(f"depthwise conv: the input's group count {gx} must divide the kernel's {g}")


@conv_p.def_abstract_eval
def _conv_shape(x, k, *, stride, padding, dilation):
    _check_groups(x.shape[0], k.shape[0])
    ho = _out_size(x.shape[2], k.shape[1], stride[0], padding[0], dilation[0])
    wo = _out_size(x.shape[3], k.shape[2], stride[1], padding[1], dilation[1])
    return jax.core.ShapedArray((k.shape[0], x.shape[1], ho, wo, x.shape[4]), x.dtype)


@input_t_p.def_abstract_eval
def _input_t_shape(ct, k, *, stride, padding, dilation, x_shape):
    return jax.core.ShapedArray(tuple(x_shape), ct.dtype)


@kernel_t_p.def_abstract_eval
def _kernel_t_shape(x, ct, *, stride, padding, dilation, kernel_hw):
    return jax.core.ShapedArray((ct.shape[0],) + tuple(kernel_hw) + (x.shape[4],), x.dtype)


def _shape_of(v):
    aval = getattr(v, "aval", None)
    return tuple(aval.shape) if aval is not None else tuple(np.shape(v))


# conv(x, k): transpose in x is input_t(ct, k), in k is kernel_t(x, ct)
ad.defbilinear(
    conv_p,
    lambda ct, x, k, **p: input_t_p.bind(ct, k, x_shape=_shape_of(x), **p),
    lambda ct, x, k, **p: kernel_t_p.bind(x, ct, kernel_hw=_shape_of(k)[1:3], **p),
)
# input_t(c, k): <input_t(c, k), a> = <c, conv(a, k)> = <k, kernel_t(a, c)>
ad.defbilinear(
    input_t_p,
    lambda a, c, k, *, x_shape, **p: conv_p.bind(a, k, **p),
    lambda a, c, k, *, x_shape, **p: kernel_t_p.bind(a, c, kernel_hw=_shape_of(k)[1:3], **p),
)
# kernel_t(x, c): <kernel_t(x, c), b> = <x, input_t(c, b)> = <c, conv(x, b)>
ad.defbilinear(
    kernel_t_p,
    lambda b, x, c, *, kernel_hw, **p: input_t_p.bind(c, b, x_shape=_shape_of(x), **p),
    lambda b, x, c, *, kernel_hw, **p: conv_p.bind(x, b, **p),
)


# --------------------------------------------------------------------------- vmap
def _fold(v, bdim, size):
    """``v`` with its batch axis (moved to the front, or broadcast when unbatched) merged into
    its group axis: (B, G, ...) -> (B*G, ...)."""
    if bdim is None:
        v = jnp.broadcast_to(v, (size,) + v.shape)
    else:
        v = jnp.moveaxis(v, bdim, 0)
    return v.reshape((size * v.shape[1],) + v.shape[2:])


def _unfold(out, size):
    return out.reshape((size, out.shape[0] // size) + out.shape[1:]), 0


def _input_like(x, bdim, size):
    """Fold an input-like operand; an unbatched one shared by all groups stays shared."""
    if bdim is None and x.shape[0] == 1:
        return x
    return _fold(x, bdim, size)


def _conv_batch(args, dims, **p):
    x, k = args
    bx, bk = dims
    size = x.shape[bx] if bx is not None else k.shape[bk]
    return _unfold(conv_p.bind(_input_like(x, bx, size), _fold(k, bk, size), **p), size)


def _input_t_batch(args, dims, *, x_shape, **p):
    # an unbatched cotangent is broadcast (a copy per batch entry); reverse mode under vmap
    # batches it anyway
    ct, k = args
    bc, bk = dims
    size = ct.shape[bc] if bc is not None else k.shape[bk]
    out = input_t_p.bind(_fold(ct, bc, size), _fold(k, bk, size),
                         x_shape=(size * x_shape[0],) + tuple(x_shape[1:]), **p)
    return _unfold(out, size)


def _kernel_t_batch(args, dims, *, kernel_hw, **p):
    x, ct = args
    bx, bc = dims
    size = x.shape[bx] if bx is not None else ct.shape[bc]
    out = kernel_t_p.bind(_input_like(x, bx, size), _fold(ct, bc, size), kernel_hw=kernel_hw, **p)
    return _unfold(out, size)


batching.primitive_batchers[conv_p] = _conv_batch
batching.primitive_batchers[input_t_p] = _input_t_batch
batching.primitive_batchers[kernel_t_p] = _kernel_t_batch


# --------------------------------------------------------------------------- lowering
def _ffi_attrs(stride, padding, dilation):
    return dict(sh=np.int64(stride[0]), sw=np.int64(stride[1]), ph=np.int64(padding[0]),
                pw=np.int64(padding[1]), dh=np.int64(dilation[0]), dw=np.int64(dilation[1]))


def _cpu_lowering(target):
    def lower(ctx, *args, stride, padding, dilation, **extra):
        _targets()
        return jax.ffi.ffi_lowering(target)(ctx, *args, **_ffi_attrs(stride, padding, dilation))

    return lower


mlir.register_lowering(conv_p, mlir.lower_fun(_reference_conv, multiple_results=False))
mlir.register_lowering(input_t_p, mlir.lower_fun(
    lambda ct, k, *, stride, padding, dilation, x_shape: _reference_input_t(ct, k, stride, padding, dilation,
                                                                             x_shape), multiple_results=False))
mlir.register_lowering(kernel_t_p, mlir.lower_fun(
    lambda x, ct, *, stride, padding, dilation, kernel_hw: _reference_kernel_t(x, ct, stride, padding, dilation,
                                                                                kernel_hw), multiple_results=False))
mlir.register_lowering(conv_p, _cpu_lowering("diffnas_dwconv_fwd"), platform="cpu")
mlir.register_lowering(input_t_p, _cpu_lowering("diffnas_dwconv_dx"), platform="cpu")
mlir.register_lowering(kernel_t_p, _cpu_lowering("diffnas_dwconv_dk"), platform="cpu")


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: tuple[int, int], padding: tuple[int, int],
                   dilation: tuple[int, int]) -> jax.Array:
    """``x`` (N, H, W, C) * ``kernel`` (kh, kw, 1, C) -> (N, HO, WO, C) as one primitive (module
    docstring).  float32 / float64 (other floating dtypes are computed in float32 and cast back).
    Runs the FFI kernel on the CPU; raises when that kernel is not built (check :func:`available`)."""
    if not available():
        raise RuntimeError("the depthwise kernel diffnas_jax.spaces._dwconv_cpu is not built "
                           "(reinstall with a C++17 compiler, or use another formulation)")
    dt = x.dtype
    work = dt if dt in (jnp.float32, jnp.float64) else jnp.float32
    kh, kw, _, c = kernel.shape
    k = kernel.reshape(1, kh, kw, c).astype(work)
    y = conv_p.bind(x.astype(work)[None], k, stride=tuple(int(s) for s in stride),
                    padding=tuple(int(s) for s in padding), dilation=tuple(int(s) for s in dilation))
    return y[0].astype(dt)
