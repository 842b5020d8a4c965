"""Unrolled hypergradients: differentiate L_val through one or k inner optimisation steps.

``unrolled`` is DARTS' second-order gradient (Liu, Simonyan & Yang, "DARTS: Differentiable
Architecture Search", ICLR 2019, eqs. 6-8; reference code ``cnn/architect.py``): one virtual
SGD step ``w' = w - eta (mu * buf + dL_train/dw(w, arch) + wd * w)``, then

    d_arch = dL_val/d arch (w', arch) - eta * H_aw v,   v = dL_val/dw (w', arch),

with ``H_aw v = d/d arch <dL_train/dw (w, arch), v>`` evaluated at the *current* weights ``w``.
``hvp="finite_difference"`` reproduces the reference code: a central difference of
``dL_train/d arch`` at ``w +- R v`` with ``R = r / ||v||`` (``||v||`` over all weights).
``hvp="exact"`` computes the product exactly (forward-over-reverse); the result then equals
``jax.grad`` through the virtual step.

``unrolled_k`` differentiates through ``k`` steps of any optax optimizer (Maclaurin et al.,
"Gradient-based Hyperparameter Optimization through Reversible Learning", ICML 2015; Franceschi
et al., "Forward and Reverse Gradient-Based Hyperparameter Optimization", ICML 2017), each step
under ``jax.checkpoint`` so reverse mode stores only the k weight/optimizer states, not k sets
of activations.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from .._checks import check_choice, check_int_in_range, check_nonnegative, check_positive
from ._core import (Hypergradient, HypergradResult, grad_w, linearize_grad, tree_axpy, tree_norm)

__all__ = ["unrolled", "unrolled_k"]

HVP_MODES = ("finite_difference", "exact")


def _check_eta(eta: Any) -> None:
    if callable(eta):
        return
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise TypeError(f"`eta` must be a positive number or a schedule step -> number, got {type(eta).__name__}")
    check_positive("eta", eta)


def unrolled(eta: float | Callable[[Any], Any], weight_decay: float = 0.0, momentum: float = 0.0,
             hvp: str = "finite_difference", r: float = 1e-2) -> Hypergradient:
    """DARTS second-order (one-step unrolled) hypergradient.

    Args:
      eta: virtual-step learning rate (DARTS uses the current weight learning rate), or a
        schedule ``step -> eta`` evaluated at the ``step`` passed to ``compute``.
      weight_decay: L2 coefficient of the virtual step (the weight optimizer's).
      momentum: the weight optimizer's momentum; the virtual step adds ``momentum * buffer``
        where ``buffer`` is the ``momentum_buffer`` passed to ``compute`` (the optax ``trace``
        of the weight optimizer; :func:`diffnas_jax.search.make_step` passes it), zeros if none,
        as the reference code does before the first weight step.
      hvp: ``"finite_difference"`` (reference) or ``"exact"``.
      r: finite-difference scale, ``R = r / ||v||`` (only for ``"finite_difference"``).
    Returns:
      A :class:`~diffnas_jax.hypergrad.Hypergradient`; ``weight_grad`` is dL_train/dw at the
      current ``(weights, arch)`` (the virtual step's gradient, without weight decay).
    """
    _check_eta(eta)
    check_nonnegative("weight_decay", weight_decay)
    check_nonnegative("momentum", momentum)
    check_choice("hvp", hvp, HVP_MODES)
    check_positive("r", r)
    exact = hvp == "exact"

    def impl(lt, lv, w, a, bt, bv, ctx):
        eta_t = eta(ctx.step) if callable(eta) else eta
        if exact:
            lin = linearize_grad(lt, w, a, bt)
            t_value, t_aux, gw = lin.value, lin.aux, lin.grad_w
        else:
            t_value, t_aux, gw = grad_w(lt, w, a, bt)
        dtheta = tree_axpy(weight_decay, w, gw) if weight_decay else gw
        if momentum and ctx.momentum_buffer is not None:
            dtheta = tree_axpy(momentum, ctx.momentum_buffer, dtheta)
        w_virtual = tree_axpy(-eta_t, dtheta, w)
        (v_value, v_aux), (v, g_arch) = jax.value_and_grad(lv, argnums=(0, 1), has_aux=True)(
            w_virtual, a, bv)
        if exact:
            mixed = lin.tangent(v)[1]
        else:
            mixed = _finite_difference_mixed(lt, w, a, bt, v, r)
        d_arch = tree_axpy(-eta_t, mixed, g_arch)
        return HypergradResult(d_arch=d_arch, weight_grad=gw, train_loss=t_value, train_aux=t_aux,
                               val_loss=v_value, val_aux=v_aux, state=ctx.state)

    return Hypergradient("unrolled", impl, options=(("eta", eta), ("weight_decay", weight_decay),
                                                    ("momentum", momentum), ("hvp", hvp), ("r", r)))


def _finite_difference_mixed(lt, w, a, bt, v, r):
    """(dL/da(w + R v) - dL/da(w - R v)) / 2R with R = r / ||v|| (DARTS ``_hessian_vector_product``)."""
    norm = tree_norm(v)
    nonzero = norm > 0
    # v = 0 makes the mixed term exactly zero; avoid 0/0 rather than returning NaN.
    big_r = r / jnp.where(nonzero, norm, 1.0)

    def ga(sign):
        return jax.grad(lambda a_: lt(tree_axpy(sign * big_r, v, w), a_, bt)[0])(a)

    # One loop over the two signs, not two calls: the supernet's gradient program is traced and
    # compiled once instead of twice (this estimator on the full-size DARTS supernet: XLA compile
    # 104 -> 60 s, StableHLO -24 %, step no slower; BUILD_NOTES section 5, round 12). The body
    # holds no kernel gradients, so it avoids XLA:CPU's slow in-loop convolution emitter.
    g = jax.lax.map(ga, jnp.array([1.0, -1.0], dtype=big_r.dtype))
    return jax.tree.map(
        lambda gi: jnp.where(nonzero, (gi[0] - gi[1]) / (2 * big_r), 0.0).astype(gi.dtype), g)


def unrolled_k(k: int, inner_optimizer: optax.GradientTransformation) -> Hypergradient:
    """Hypergradient through ``k`` steps of ``inner_optimizer`` on L_train (reverse mode).

    ``w_0 = weights`` with a fresh ``inner_optimizer.init(weights)`` state; ``w_{i+1}`` is one optax
    step on ``batch_train``; the result is d L_val(w_k(arch), arch) / d arch. Steps 2..k run in a
    ``lax.scan`` over a ``jax.checkpoint``-ed body: reverse mode keeps the k carries (weights and
    optimizer state) and recomputes each step's activations, so activation memory does not grow
    with ``k``. With ``k=1`` and ``optax.sgd(eta)`` this equals ``unrolled(eta, hvp="exact")``.

    Args:
      k: number of inner steps (>= 1).
      inner_optimizer: an optax ``GradientTransformation``.
    Returns:
      A :class:`~diffnas_jax.hypergrad.Hypergradient`; ``weight_grad`` is the first step's
      gradient dL_train/dw at the current ``(weights, arch)``.
    """
    k = check_int_in_range("k", k, 1, 10**6)
    if not (hasattr(inner_optimizer, "init") and hasattr(inner_optimizer, "update")):
        raise TypeError("`inner_optimizer` must be an optax GradientTransformation, got "
                        f"{type(inner_optimizer).__name__}")

    def impl(lt, lv, w, a, bt, bv, ctx):
        def inner_step(w_, s_, a_):
            g = jax.grad(lambda ww: lt(ww, a_, bt)[0])(w_)
            u, s_ = inner_optimizer.update(g, s_, w_)
            return optax.apply_updates(w_, u), s_

        def outer(a_):
            t_value, t_aux, g0 = grad_w(lt, w, a_, bt)
            u, s = inner_optimizer.update(g0, inner_optimizer.init(w), w)
            w1 = optax.apply_updates(w, u)

            @jax.checkpoint
            def body(carry, _):
                return inner_step(*carry, a_), None

            (wk, _), _ = jax.lax.scan(body, (w1, s), None, length=k - 1)
            v_value, v_aux = lv(wk, a_, bv)
            return v_value, (v_aux, t_value, t_aux, g0)

        (v_value, (v_aux, t_value, t_aux, g0)), d_arch = jax.value_and_grad(outer, has_aux=True)(a)
        return HypergradResult(d_arch=d_arch, weight_grad=g0, train_loss=t_value, train_aux=t_aux,
                               val_loss=v_value, val_aux=v_aux, state=ctx.state)

    return Hypergradient("unrolled_k", impl, options=(("k", k), ("inner_optimizer", inner_optimizer)))
