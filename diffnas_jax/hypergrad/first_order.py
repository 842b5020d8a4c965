"""First-order and single-level hypergradients (no second derivatives).

- ``first_order``: DARTS' first-order approximation, d L_val(w, arch) / d arch at the current
  weights (Liu, Simonyan & Yang, "DARTS: Differentiable Architecture Search", ICLR 2019, eq. 7
  with xi = 0).
- ``single_level``: one-level optimisation, where weights and architecture descend the same
  training loss on the same batch (one-level DARTS in Liu et al. 2019, Sec. 3.3; SNAS, Xie et
  al. ICLR 2019; GOLD-NAS, Bi et al. 2020). One backward pass gives both gradients, so the
  weight step reuses it and a full search step costs one forward-backward pass.
"""
from __future__ import annotations

import jax

from ._core import Hypergradient, HypergradResult, grad_wa

__all__ = ["first_order", "single_level"]


def first_order() -> Hypergradient:
    """d L_val / d arch at the current weights (DARTS first order).

    Returns a :class:`~diffnas_jax.hypergrad.Hypergradient`; ``est(loss_train, loss_val, weights,
    arch, batch_train, batch_val)`` returns a pytree like ``arch``. ``weight_grad`` is not computed
    (the weight step evaluates it at the updated architecture, as DARTS does).
    """

    def impl(lt, lv, w, a, bt, bv, ctx):
        (value, aux), d_arch = jax.value_and_grad(lv, argnums=1, has_aux=True)(w, a, bv)
        return HypergradResult(d_arch=d_arch, val_loss=value, val_aux=aux, state=ctx.state)

    return Hypergradient("first_order", impl)


def single_level() -> Hypergradient:
    """d L_train / d arch on ``batch_train`` at the current weights (one-level search).

    ``loss_val`` and ``batch_val`` are not used. ``weight_grad`` (d L_train / d w from the same
    backward pass) is returned for the weight step.
    """

    def impl(lt, lv, w, a, bt, bv, ctx):
        value, aux, (gw, ga) = grad_wa(lt, w, a, bt)
        return HypergradResult(d_arch=ga, weight_grad=gw, train_loss=value, train_aux=aux,
                               state=ctx.state)

    return Hypergradient("single_level", impl)
