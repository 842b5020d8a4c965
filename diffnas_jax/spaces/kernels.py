"""Four formulations of the depthwise 2-D convolution, equal up to float rounding, and the choice
between them.

``grouped``: one ``lax.conv_general_dilated(..., feature_group_count=C)``.  Three HLO ops for
forward and backward, so programs built from it compile fastest, and the native kernel on GPU
(cuDNN) and TPU.  XLA:CPU runs it 15-60x slower than the shifted multiplies below (one forward
pass, 16x16x16xC: 4-19 ms against 0.2-0.6 ms for C = 8..128).  A strided one carries a custom JVP
whose input tangent is a unit-stride convolution followed by subsampling: the same linear map,
but its transpose (the input gradient) avoids XLA:CPU's transposed strided convolution, which
took 30-80 ms against 1-5 ms for the forward pass (stride-2 DARTS edges).

``shifted``: a sum of ``kh*kw`` shifted multiplies under ``jax.checkpoint``, differentiated by
JAX.  ~10 HLO ops per kernel tap (a 5x5 kernel's value and gradient: ~1000 optimised HLO lines
against ~100); this made the DARTS supernet take ten minutes to compile.

``hybrid`` (the CPU default when the ``ffi`` kernel is not built): a custom JVP whose primal and
input tangent are shifted multiplies (XLA fuses each into one loop; the input gradient is their
transpose, shifted pads) and whose kernel tangent is :func:`_tap_scan`, one ``lax.scan`` over the
taps (its transpose, the kernel gradient, is one multiply-reduce per tap in one loop body). The
primal reads one padded copy of its input, padded at least :data:`_SHARED_PAD` so that convolutions
of one tensor share it, behind an ``optimization_barrier`` that keeps XLA's simplifier from copying
the input's producer into every tap. DARTS first-order weight step at C=16, 8 layers, batch 32,
32x32 on the idle 2-core CPU (BUILD_NOTES section 5): step 6.1 s against 17.1 s grouped (PyTorch
5.4-5.8 s in the same runs), compile 66.8 s against 42.3 s; with ``layers.state_barrier`` on the
node states, step 4.8 s (PyTorch 5.4 s) and compile 44.7 s.

``ffi`` (the CPU default when built): three primitives, the convolution and its transposes in the
input and in the kernel, each the other two's derivative (:mod:`diffnas_jax.spaces._dwconv`), run
by the C++ kernel ``_dwconv_cpu.cc`` through XLA's FFI: one HLO instruction per form where the
hybrid spends ~4-6 per tap and form (a supernet's forward-over-reverse program held five forms
per convolution, three quarters of its instructions, and XLA:CPU's compile time follows the
instruction count).

The kernel gradient is where XLA:CPU loses most at the supernet's sizes: it has no batch-grouped
convolution, so the kernel gradient of a grouped depthwise convolution (``batch_group_count``) is
expanded into a dense (E*C) x (E*C) convolution whose diagonal is kept (E edges of an edge group
side by side: 64-256 times the needed work at C=16).  That was 32 % of the grouped DARTS weight
step and 47 % of the hybrid's at C=16, 8 layers, batch 32 (BUILD_NOTES section 5, round 6).  The scanned taps
do the needed work only (memory-bound) and compile as one loop body; 3-4x faster per kernel
gradient at those shapes (``benchmarks/bench_depthwise.py``).

Under ``vmap`` the grouped convolution needs its input batched too: with a shared (unbatched)
input and batched kernels JAX emits a channel-multiplier convolution, which XLA:CPU runs 20-70x
slower.  Callers that vmap over kernels only (an edge group reading one state) broadcast the
input first (``jnp.broadcast_to``, free in the program); see :func:`prefers_batched_input`.

Reference: the depthwise convolution of MobileNets (Howard et al., 2017) as PyTorch's
``Conv2d(C, C, k, groups=C)`` computes it; zero padding, PyTorch output size.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from diffnas_jax._checks import backend_default

Array = jax.Array

__all__ = ["FORMULATIONS", "depthwise_conv_grouped", "depthwise_conv_shifted", "depthwise_conv_hybrid",
           "depthwise_conv_ffi",
           "default_formulation", "prefers_batched_input", "conv_out_size"]

FORMULATIONS = ("grouped", "shifted", "hybrid", "ffi")


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output length of a convolution / pooling window along one axis (PyTorch floor rule)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def default_formulation(backend: str | None = None) -> str:
    """The depthwise formulation used for ``backend`` (default: ``jax.default_backend()``).

    ``$DIFFNAS_DEPTHWISE`` (one of :data:`FORMULATIONS`) overrides it; otherwise on CPU ``"ffi"``
    when its kernel was built (the full-size DARTS weight step compiles in 25-32 s against 40-48 s
    with ``"hybrid"`` and steps 2.1-3.3 s against 3.7-4.6 s; the second-order step compiles in
    106-148 s against 216 s; BUILD_NOTES section 5, round 8) and ``"hybrid"`` when it was not, and
    ``"grouped"`` elsewhere (the native cuDNN / TPU kernel). Chosen at trace time, so a program is
    specialised for the backend it is traced on.
    """
    backend = jax.default_backend() if backend is None else backend
    if backend == "cpu":
        from diffnas_jax.spaces import _dwconv  # noqa: PLC0415 - loads the kernel only when asked
        default = "ffi" if _dwconv.available() else "hybrid"
    else:
        default = "grouped"
    return backend_default("DIFFNAS_DEPTHWISE", FORMULATIONS, backend, default)


def prefers_batched_input(formulation: str | None = None) -> bool:
    """Whether a ``vmap`` over kernels should broadcast a shared input (see the module docstring)."""
    return _check_formulation(formulation) in ("grouped", "hybrid")


def _check_formulation(formulation: str | None) -> str:
    if formulation is None:
        return default_formulation()
    if formulation not in FORMULATIONS:
        raise ValueError(f"`formulation` must be one of {FORMULATIONS} or None, got {formulation!r}")
    return formulation


def _grouped(x: Array, kernel: Array, stride: tuple[int, int], padding: tuple[int, int],
             dilation: tuple[int, int]) -> Array:
    (ph, pw) = padding
    return lax.conv_general_dilated(x, kernel.astype(x.dtype), tuple(stride), ((ph, ph), (pw, pw)),
                                    rhs_dilation=tuple(dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=x.shape[-1])


def _make_hybrid(primal, input_tangent, kernel_tangent):
    """A depthwise convolution computed by ``primal`` whose JVP is ``input_tangent(x_dot, kernel)
    + kernel_tangent(x, kernel_dot)``: three formulations of one bilinear map, so reverse mode
    transposes the tangent forms, forward mode and forward-over-reverse stay exact."""
    @functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
    def conv(x, kernel, stride, padding, dilation):
        return primal(x, kernel, stride, padding, dilation)

    @functools.partial(conv.defjvp, symbolic_zeros=True)
    def conv_jvp(stride, padding, dilation, primals, tangents):
        x, kernel = primals
        x_dot, kernel_dot = tangents
        y = primal(x, kernel, stride, padding, dilation)
        y_dot = None
        if not isinstance(x_dot, SymbolicZero):
            y_dot = input_tangent(x_dot, kernel, stride, padding, dilation)
        if not isinstance(kernel_dot, SymbolicZero):
            t = kernel_tangent(x, kernel_dot, stride, padding, dilation)
            y_dot = t if y_dot is None else y_dot + t
        return y, jnp.zeros_like(y) if y_dot is None else y_dot

    return conv


def _padded_input(x: Array, kernel_size: tuple[int, int], stride: tuple[int, int],
                  padding: tuple[int, int], dilation: tuple[int, int]) -> tuple[Array, int, int]:
    """``x`` (N, H, W, C) zero-padded in H and W, and the output height and width."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    ho = conv_out_size(x.shape[1], kh, sh, ph, dh)
    wo = conv_out_size(x.shape[2], kw, sw, pw, dw)
    return jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0))), ho, wo


# The least zero padding of a hybrid depthwise input.  The convolutions that read one tensor with
# different paddings (a DARTS edge group's 3x3, 5x5 and dilated ones: 1, 2, 2 and 4) then pad it
# identically, so XLA keeps one padded copy; with a padded copy per padding it recomputed the
# tensor's producer (a node state's mixing and BN chain) in each of them.  Full-size DARTS weight
# step, hybrid, A/B at load ~1-3: compile 100 -> 80 s (BUILD_NOTES section 5, round 7).
_SHARED_PAD = 4


def _shared_padded_input(x: Array, kernel_size: tuple[int, int], stride: tuple[int, int],
                         padding: tuple[int, int], dilation: tuple[int, int]
                         ) -> tuple[Array, tuple[int, int], int, int]:
    """``x`` zero-padded by ``max(_SHARED_PAD, padding)`` in H and W, the offset of the requested
    padding inside it, and the output height and width."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    ho = conv_out_size(x.shape[1], kh, sh, ph, dh)
    wo = conv_out_size(x.shape[2], kw, sw, pw, dw)
    qh, qw = max(_SHARED_PAD, ph), max(_SHARED_PAD, pw)
    return jnp.pad(x, ((0, 0), (qh, qh), (qw, qw), (0, 0))), (qh - ph, qw - pw), ho, wo


def _shifted(x: Array, kernel: Array, stride: tuple[int, int], padding: tuple[int, int],
             dilation: tuple[int, int], pad_barrier: bool = False) -> Array:
    kh, kw = kernel.shape[0], kernel.shape[1]
    (sh, sw), (dh, dw) = stride, dilation
    n, c = x.shape[0], x.shape[3]
    if pad_barrier:
        xp, (oh, ow), ho, wo = _shared_padded_input(x, (kh, kw), stride, padding, dilation)
        # XLA's algebraic simplifier rewrites each tap's slice(pad(f(x))) into pad(slice(f(x))),
        # which copies x's elementwise producer f (a cell's BN / ReLU chain) into every tap.
        # The barrier stops that rewrite; XLA:CPU drops it before fusion, so it costs nothing at
        # run time (hybrid primal, DARTS cell at C=16, batch 32, 32x32: fused HLO instructions
        # 25.8k -> 22.1k, compile -20 %).
        xp = lax.optimization_barrier(xp)
    else:
        (xp, ho, wo), oh, ow = _padded_input(x, (kh, kw), stride, padding, dilation), 0, 0
    k = kernel.reshape(kh, kw, c).astype(x.dtype)
    out = None
    for i in range(kh):
        for j in range(kw):
            patch = lax.slice(xp, (0, oh + i * dh, ow + j * dw, 0),
                              (n, oh + i * dh + sh * (ho - 1) + 1, ow + j * dw + sw * (wo - 1) + 1, c),
                              (1, sh, sw, 1))
            term = patch * k[i, j]
            out = term if out is None else out + term
    return out


# Differentiated as written, every one of the kh*kw shifted slices would be kept for the kernel
# gradient (kh*kw copies of the input per convolution, which took the DARTS supernet at C=16,
# 8 layers, batch 32 past 24 GB); under checkpoint the backward pass re-slices the input.
_shifted_remat = jax.checkpoint(_shifted, static_argnums=(2, 3, 4))


def depthwise_conv_shifted(x: Array, kernel: Array, stride: tuple[int, int], padding: tuple[int, int],
                           dilation: tuple[int, int]) -> Array:
    """``x`` (N, H, W, C) * ``kernel`` (kh, kw, 1, C) as ``kh*kw`` shifted multiplies (rematerialised)."""
    return _shifted_remat(x, kernel, tuple(stride), tuple(padding), tuple(dilation))


def _grouped_unit_stride(x: Array, kernel: Array, stride: tuple[int, int], padding: tuple[int, int],
                         dilation: tuple[int, int]) -> Array:
    # the strided convolution as a unit-stride one, then subsampled: same values, cheap transpose
    (sh, sw) = stride
    return _grouped(x, kernel, (1, 1), padding, dilation)[:, ::sh, ::sw, :]


def _tap_scan(x: Array, kernel_dot: Array, stride: tuple[int, int], padding: tuple[int, int],
              dilation: tuple[int, int]) -> Array:
    """``_shifted(x, kernel_dot, ...)`` as one ``lax.scan`` over the ``kh*kw`` taps: the kernel
    tangent of ``hybrid``, linear in ``kernel_dot``.

    Reverse mode transposes it into one loop whose body multiplies the cotangent with one shifted
    slice of ``x`` and reduces: the kernel gradient with no wasted work, where the grouped
    convolution's costs (E*C)^2 per position on XLA:CPU, and one loop body to compile instead of
    ``kh*kw`` fused copies (unrolled, the DARTS supernet compiled over 3x longer).  The body is
    rematerialised, so reverse mode keeps the padded ``x`` only, not ``kh*kw`` slices of it."""
    kh, kw = kernel_dot.shape[0], kernel_dot.shape[1]
    (sh, sw), (dh, dw) = stride, dilation
    n, c = x.shape[0], x.shape[3]
    # the primal's padded copy (same padding), not a second one
    xp, (oh, ow), ho, wo = _shared_padded_input(x, (kh, kw), stride, padding, dilation)
    offsets = jnp.asarray([(oh + i * dh, ow + j * dw) for i in range(kh) for j in range(kw)], jnp.int32)
    taps = kernel_dot.reshape(kh * kw, c).astype(x.dtype)

    @jax.checkpoint
    def body(acc, inp):
        off, k = inp
        zero = jnp.zeros((), off.dtype)
        patch = lax.dynamic_slice(xp, (zero, off[0], off[1], zero), (n, sh * (ho - 1) + 1, sw * (wo - 1) + 1, c))
        patch = patch[:, ::sh, ::sw, :]
        # The tap broadcast along (W, C) behind a reshape: reverse mode then reduces over N*H
        # keeping a contiguous W*C block (then over W); reducing straight to C (what XLA makes of
        # a plain broadcast) ran 2-4x slower on XLA:CPU.
        k = jnp.broadcast_to(k, (wo, c)).reshape(wo * c)
        return acc + (patch.reshape(n * ho, wo * c) * k).reshape(n, ho, wo, c), None

    return lax.scan(body, jnp.zeros((n, ho, wo, c), x.dtype), (offsets, taps))[0]


_grouped_strided = _make_hybrid(_grouped, _grouped_unit_stride, _grouped)
_hybrid = _make_hybrid(functools.partial(_shifted, pad_barrier=True), _shifted, _tap_scan)


def depthwise_conv_grouped(x: Array, kernel: Array, stride: tuple[int, int], padding: tuple[int, int],
                           dilation: tuple[int, int]) -> Array:
    """``x`` (N, H, W, C) * ``kernel`` (kh, kw, 1, C) as XLA's grouped convolution (C groups); a
    strided one differentiates its input through a unit-stride convolution (module docstring)."""
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    if stride == (1, 1):
        return _grouped(x, kernel, stride, padding, dilation)
    return _grouped_strided(x, kernel, stride, padding, dilation)


def depthwise_conv_ffi(x: Array, kernel: Array, stride: tuple[int, int], padding: tuple[int, int],
                       dilation: tuple[int, int]) -> Array:
    """``x`` (N, H, W, C) * ``kernel`` (kh, kw, 1, C) as one primitive per form (forward, input and
    kernel transposes) run by the CPU kernel ``_dwconv_cpu.cc`` (:mod:`diffnas_jax.spaces._dwconv`)."""
    from diffnas_jax.spaces import _dwconv  # noqa: PLC0415 - registers the primitives on first use
    return _dwconv.depthwise_conv(x, kernel, tuple(stride), tuple(padding), tuple(dilation))


def depthwise_conv_hybrid(x: Array, kernel: Array, stride: tuple[int, int], padding: tuple[int, int],
                          dilation: tuple[int, int]) -> Array:
    """``x`` (N, H, W, C) * ``kernel`` (kh, kw, 1, C): shifted multiplies forward and for the input
    gradient, a scan over the taps for the kernel gradient (module docstring)."""
    return _hybrid(x, kernel, tuple(stride), tuple(padding), tuple(dilation))
