"""Counting the built network: parameters from the weights pytree, multiply-adds from the jaxpr.

These are the ground truth the analytic models of :mod:`diffnas_jax.cost` are tested against.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import jax
import numpy as np
from jax import lax

PyTree = Any


def count_params(weights: PyTree) -> int:
    """Number of scalars in a weights pytree (BatchNorm statistics live in ``state``, not here)."""
    return int(sum(math.prod(np.shape(a)) for a in jax.tree_util.tree_leaves(weights)))


def _eqn_macs(eqn) -> int:
    prim = eqn.primitive.name
    if prim == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        dn = eqn.params["dimension_numbers"]
        rhs_spec = dn.rhs_spec  # (out feature, in feature, spatial...)
        per_out = rhs[rhs_spec[1]] * math.prod(rhs[d] for d in rhs_spec[2:])
        return int(math.prod(eqn.outvars[0].aval.shape) * per_out)
    if prim == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return int(math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lc))
    return 0


def _jaxpr_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += _eqn_macs(eqn)
        name = eqn.primitive.name
        subs = []
        for v in eqn.params.values():
            vs = v if isinstance(v, (tuple, list)) else (v,)
            for s in vs:
                if isinstance(s, jax.extend.core.ClosedJaxpr):
                    subs.append(s.jaxpr)
                elif isinstance(s, jax.extend.core.Jaxpr):
                    subs.append(s)
        if not subs:
            continue
        counts = [_jaxpr_macs(s) for s in subs]
        if name == "cond":
            total += max(counts)
        elif name == "scan":
            total += eqn.params["length"] * sum(counts)
        elif name == "while":
            raise ValueError("count_macs: a while loop has no static trip count; cannot count its multiply-adds")
        else:
            total += sum(counts)
    return total


def _grouped_depthwise(x, kernel, stride=1, padding=0, dilation=1):
    pair = lambda v: (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))  # noqa: E731
    (ph, pw), c = pair(padding), x.shape[-1]
    return lax.conv_general_dilated(x, kernel.astype(x.dtype), pair(stride), ((ph, ph), (pw, pw)),
                                    rhs_dilation=pair(dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=c)


@contextlib.contextmanager
def _depthwise_as_grouped_conv():
    # The spaces compute depthwise convolutions as k*k shifted multiplies (faster on CPU XLA);
    # for counting they are traced as the equal grouped convolution so the jaxpr shows them.
    # Modules that imported the function by name are patched too.
    import sys

    try:
        from diffnas_jax.spaces import layers
    except ImportError:  # pragma: no cover
        yield
        return
    original = layers.depthwise_conv
    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("diffnas_jax") and getattr(m, "depthwise_conv", None) is original]
    for m in patched:
        m.depthwise_conv = _grouped_depthwise
    try:
        yield
    finally:
        for m in patched:
            m.depthwise_conv = original


def count_macs(fn: Callable[..., Any], *args: Any, per_example: bool = True, **kwargs: Any) -> int:
    """Multiply-adds of the convolutions and matrix products ``fn(*args)`` executes.

    Walks the jaxpr of ``fn`` (into ``pjit``, ``custom_jvp``/``custom_vjp``, ``remat``; ``scan``
    bodies times their length; the largest ``cond`` branch) and sums, for every
    ``conv_general_dilated``, ``output size x kernel window x input features per group`` and for
    every ``dot_general``, ``output size x contracted size``. Element-wise work (BatchNorm,
    activations, pooling, additions) is not counted — the usual "FLOPs" of NAS papers.

    Args:
      fn: a function of arrays (e.g. ``lambda x: net.apply(w, s, None, x, False)[0]``).
      *args, **kwargs: its arguments (arrays or ``jax.ShapeDtypeStruct``); nothing is computed.
      per_example: divide by the leading (batch) size of the first argument.

    Returns:
      The count (int).
    """
    with _depthwise_as_grouped_conv():
        closed = jax.make_jaxpr(fn)(*args, **kwargs)
    total = _jaxpr_macs(closed.jaxpr)
    if per_example:
        b = int(np.shape(args[0])[0]) if args and np.ndim(args[0]) else 1
        if total % b:
            raise ValueError(f"count_macs: {total} multiply-adds do not split evenly over the batch of {b}")
        total //= b
    return int(total)


def xla_flops(fn: Callable[..., Any], *args: Any) -> float:
    """XLA's own estimate (``jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]``): every
    floating-point operation (a multiply-add counts 2), element-wise ones included."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan")))
