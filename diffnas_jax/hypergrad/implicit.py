"""Implicit-function-theorem hypergradient (Pedregosa, "Hyperparameter optimization with
approximate gradient", ICML 2016; Lorraine, Vicol & Duvenaud, AISTATS 2020; for NAS: Zhang et
al., "iDARTS: Differentiable Architecture Search with Stochastic Implicit Gradients", ICML 2021).

At an inner optimum ``dL_train/dw (w*, arch) = 0`` the implicit function theorem gives

    d L_val(w*(arch), arch) / d arch = dL_val/d arch - H_aw u,   H_ww u = dL_val/dw,

with ``H_ww = d^2 L_train / dw^2`` and ``H_aw u = d/d arch <dL_train/dw, u>``. Both products come
from one forward-over-reverse linearization of the training gradient at the current weights
(the shared core in :mod:`diffnas_jax.hypergrad._core`); the solve is any solver of
:mod:`diffnas_jax._solvers` (jaxopt's CG / normal CG / GMRES, or a truncated Neumann series).
The current weights are taken as the inner solution: away from it the result is the usual
approximation of iDARTS / Lorraine et al.
"""
from __future__ import annotations

from typing import Any

import jax

from .. import _solvers
from .._checks import check_choice, check_int_in_range, check_nonnegative, check_positive
from ._core import Hypergradient, HypergradResult, linearize_grad, tree_axpy

__all__ = ["implicit"]


def implicit(solver: str = "cg", maxiter: int = 10, tol: float = 1e-5, damping: float = 0.0,
             neumann_alpha: float = 1.0) -> Hypergradient:
    """IFT hypergradient with a linear solve against the training Hessian.

    Args:
      solver: ``"cg"`` (H_ww symmetric positive definite), ``"normal_cg"`` (any nonsingular
        H_ww, via H^T H), ``"gmres"``, or ``"neumann"`` (``maxiter`` terms of the Neumann
        series of ``(neumann_alpha H_ww)^{-1}``).
      maxiter: solver iterations (Neumann: number of series terms after the first).
      tol: relative residual tolerance of the Krylov solvers (unused by Neumann).
      damping: ridge added to H_ww (``H_ww + damping I``); makes CG safe on the indefinite
        Hessians of non-convex networks, at the price of bias.
      neumann_alpha: step of the Neumann series; needs ``0 < alpha < 2 / lambda_max(H_ww)``.
    Returns:
      A :class:`~diffnas_jax.hypergrad.Hypergradient`; ``weight_grad`` is dL_train/dw at the
      current ``(weights, arch)`` (the primal of the linearization).
    """
    check_choice("solver", solver, _solvers.SOLVERS)
    maxiter = check_int_in_range("maxiter", maxiter, 1, 10**9)
    check_positive("tol", tol)
    check_nonnegative("damping", damping)
    check_positive("neumann_alpha", neumann_alpha)
    solve = _solvers.get_solver(solver)
    extra: dict[str, Any] = {"alpha": neumann_alpha} if solver == "neumann" else {}

    def impl(lt, lv, w, a, bt, bv, ctx):
        lin = linearize_grad(lt, w, a, bt)
        (v_value, v_aux), (gv_w, gv_a) = jax.value_and_grad(lv, argnums=(0, 1), has_aux=True)(w, a, bv)
        u = solve(lambda v: lin.tangent(v)[0], gv_w, ridge=damping if damping else None,
                  tol=tol, maxiter=maxiter, **extra)
        d_arch = tree_axpy(-1.0, lin.tangent(u)[1], gv_a)
        return HypergradResult(d_arch=d_arch, weight_grad=lin.grad_w, train_loss=lin.value,
                               train_aux=lin.aux, val_loss=v_value, val_aux=v_aux, state=ctx.state)

    return Hypergradient("implicit", impl, options=(("solver", solver), ("maxiter", maxiter), ("tol", tol),
                                                    ("damping", damping), ("neumann_alpha", neumann_alpha)))
