"""RARTS: relaxed architecture search with two weight copies (Xue, Qi & Xin, "RARTS: An
Efficient First-Order Relaxed Architecture Search Method", IEEE Access 2022, arXiv 2008.03901).

Reading of the paper used here. The bilevel problem is relaxed into one objective over the
architecture ``arch``, the training-network weights ``w`` (trained on the training split) and a
second copy ``y`` (trained on the validation split), coupled by a proximity term:

    L(w, y, arch) = L_val(y, arch) + beta * L_train(w, arch) + lam / 2 * ||y - w||^2,

minimised by first-order Gauss-Seidel sweeps (no mixed second derivatives):
``w`` descends ``beta * dL_train/dw`` (plus the coupling when ``couple_weights``), then
``y <- y - eta_y (dL_val/dy (y, arch) + lam (y - w))``, then ``arch`` descends
``dL_val/d arch (y, arch) + beta * dL_train/d arch (w, arch)``. Data splitting: the two weight
copies see disjoint data (train vs. validation), and the architecture sees both.

Differences from the paper's sweep order: :func:`diffnas_jax.search.make_step` updates the
architecture before the weights (DARTS order), so ``y`` and ``arch`` here use the current ``w``,
not the freshly updated one. ``y`` lives in the estimator state (``est.init(weights)`` copies the
weights); it is updated by plain gradient descent with step ``eta_y``.
"""
from __future__ import annotations

import jax

from .._checks import check_nonnegative, check_positive
from ._core import Hypergradient, HypergradResult, grad_wa, tree_axpy

__all__ = ["rarts"]


def rarts(beta: float = 1.0, lam: float = 1.0, eta_y: float = 0.025,
          couple_weights: bool = False) -> Hypergradient:
    """RARTS hypergradient with a second weight copy ``y`` held in the estimator state.

    Args:
      beta: weight of the training loss in the relaxed objective (and in d_arch).
      lam: proximity coefficient coupling ``y`` to ``w``.
      eta_y: gradient-descent step of ``y`` on the validation loss plus coupling.
      couple_weights: also add ``lam (w - y)`` to the weight gradient (the full relaxed
        objective's w-gradient); ``False`` keeps the weight step plain training.
    Returns:
      A :class:`~diffnas_jax.hypergrad.Hypergradient` with state ``y`` (a pytree like the
      weights); ``weight_grad = beta dL_train/dw (+ lam (w - y))`` at the current point.
    """
    check_nonnegative("beta", beta)
    check_nonnegative("lam", lam)
    check_positive("eta_y", eta_y)

    def init(weights):
        return jax.tree.map(lambda x: x, weights)

    def impl(lt, lv, w, a, bt, bv, ctx):
        y = ctx.state
        t_value, t_aux, (gt_w, gt_a) = grad_wa(lt, w, a, bt)
        (_, _), gy = jax.value_and_grad(lv, argnums=0, has_aux=True)(y, a, bv)
        coupling = jax.tree.map(lambda yi, wi: lam * (yi - wi), y, w)
        y_new = tree_axpy(-eta_y, jax.tree.map(jax.numpy.add, gy, coupling), y)
        (v_value, v_aux), gv_a = jax.value_and_grad(lv, argnums=1, has_aux=True)(y_new, a, bv)
        d_arch = tree_axpy(beta, gt_a, gv_a)
        weight_grad = jax.tree.map(lambda g: beta * g, gt_w)
        if couple_weights:
            weight_grad = tree_axpy(-1.0, coupling, weight_grad)
        return HypergradResult(d_arch=d_arch, weight_grad=weight_grad, train_loss=t_value,
                               train_aux=t_aux, val_loss=v_value, val_aux=v_aux, state=y_new)

    return Hypergradient("rarts", impl, init=init, options=(("beta", beta), ("lam", lam), ("eta_y", eta_y),
                                                            ("couple_weights", couple_weights)))
