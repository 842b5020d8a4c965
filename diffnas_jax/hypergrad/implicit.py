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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .. import _solvers
from .._checks import check_choice, check_int_in_range, check_nonnegative, check_positive
from ._core import (Hypergradient, HypergradResult, Problem, Staged, grad_and_tangent, linearize_grad,
                    tree_axpy)

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
      current ``(weights, arch)`` (the primal of the linearization). For ``"cg"`` and
      ``"neumann"`` its ``staged`` form runs one Hessian-vector product per ``iterate`` (primal
      recomputed: ``jax.jvp`` of the gradient, no residuals kept between programs; the first
      one's primal is the training gradient), takes ``H_aw u`` as the sum of the iterations'
      ``H_aw p`` weighted as ``u`` sums the ``p`` (no final product), and leaves ``prepare``
      only the validation gradient; it equals the fused estimator up to rounding.

    >>> import jax.numpy as jnp
    >>> from diffnas_jax import hypergrad
    >>> lt = lambda w, a, b: jnp.sum((w - a) ** 2) + 0.1 * jnp.sum(w ** 2)
    >>> lv = lambda w, a, b: jnp.sum((w - 1.0) ** 2)
    >>> est = hypergrad.implicit("cg", maxiter=5)
    >>> w, a = jnp.zeros(3), jnp.ones(3)
    >>> bool(jnp.allclose(est(lt, lv, w, a, None, None), est.compute_staged(lt, lv, w, a, None, None).d_arch))
    True
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

    staged = None
    if solver == "cg":
        staged = _staged_cg(tol, maxiter, damping)
    elif solver == "neumann":
        staged = _staged_neumann(maxiter, damping, neumann_alpha)
    return Hypergradient("implicit", impl, options=(("solver", solver), ("maxiter", maxiter), ("tol", tol),
                                                    ("damping", damping), ("neumann_alpha", neumann_alpha)),
                         staged=staged)


class _Gradients(NamedTuple):
    """What the stages compute once and ``finish`` reports (the carry passes it through): the
    validation gradient from ``prepare``, the training gradient from every ``iterate`` (the
    primal of its Hessian-vector product: the same values at every call, so overwriting them is
    a no-op after the first, and no program computes them twice)."""

    weight_grad: Any  # flat, like the solver's vectors
    train_loss: Any
    train_aux: Any
    val_loss: Any
    val_aux: Any
    val_grad_arch: Any
    have_train: jax.Array  # the training half is filled in (after the first iterate)


class _CGCarry(NamedTuple):
    grads: _Gradients
    solver: _solvers.CGState
    h_aw_x: Any  # sum_k alpha_k H_aw p_k = H_aw x by linearity


class _NeumannCarry(NamedTuple):
    grads: _Gradients
    p: Any
    acc: Any
    h_aw_acc: Any
    k: jax.Array


def _where(cond: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(cond, n, o), new, old)


# The solver's vectors (and the training gradient) live in the carry as one flat vector each: a
# pytree of a supernet's ~200-1000 weight leaves made every CG update, select and dot product one
# XLA:CPU kernel per leaf, about a quarter of the iterate program's kernels (and compile time).
def _flat(tree: Any) -> jax.Array:
    return ravel_pytree(tree)[0]


def _unflat(problem: Problem, vec: jax.Array) -> Any:
    return ravel_pytree(problem.weights)[1](vec)


def _prepare(problem: Problem) -> tuple[_Gradients, jax.Array]:
    lt, lv, w, a, bt, bv, _ = problem
    (v_value, v_aux), (gv_w, gv_a) = jax.value_and_grad(lv, argnums=(0, 1), has_aux=True)(w, a, bv)
    # placeholders of the training half, shaped as the first iterate will return it
    t_value, t_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(lt, w, a, bt))
    gv_w = _flat(gv_w)
    return _Gradients(jnp.zeros_like(gv_w), t_value, t_aux, v_value, v_aux, gv_a, jnp.zeros((), bool)), gv_w


def _products(problem: Problem, grads: _Gradients, v: jax.Array) -> tuple[jax.Array, Any, _Gradients]:
    """``H_ww v`` (flat), ``H_aw v``, and ``grads`` with the training half (the primal) filled in."""
    value, aux, g_w, (ap, hp) = grad_and_tangent(problem.loss_train, problem.weights, problem.arch,
                                                 problem.batch_train, _unflat(problem, v))
    grads = grads._replace(weight_grad=_flat(g_w), train_loss=value, train_aux=aux, have_train=jnp.ones((), bool))
    return _flat(ap), hp, grads


def _result(problem: Problem, g: _Gradients, h_aw_u: Any) -> HypergradResult:
    return HypergradResult(d_arch=tree_axpy(-1.0, h_aw_u, g.val_grad_arch),
                           weight_grad=_unflat(problem, g.weight_grad), train_loss=g.train_loss,
                           train_aux=g.train_aux, val_loss=g.val_loss, val_aux=g.val_aux, state=problem.ctx.state)


def _staged_cg(tol: float, maxiter: int, damping: float) -> Staged:
    ridge = damping if damping else None

    def prepare(problem):
        grads, gv_w = _prepare(problem)
        return _CGCarry(grads, _solvers.cg_start(gv_w, tol=tol), jax.tree.map(jnp.zeros_like, problem.arch))

    def iterate(problem, carry):
        active = _solvers.cg_active(carry.solver, maxiter)
        ap, hp, grads = _products(problem, carry.grads, carry.solver.p)
        solver, alpha = _solvers.cg_iterate(carry.solver, ap, maxiter=maxiter, ridge=ridge)
        return _CGCarry(grads, solver, _where(active, tree_axpy(alpha, hp, carry.h_aw_x), carry.h_aw_x))

    def finish(problem, carry):
        return _result(problem, carry.grads, carry.h_aw_x)

    def converged(carry):
        return carry.grads.have_train & ~_solvers.cg_active(carry.solver, maxiter)

    return Staged(prepare, iterate, finish, converged, maxiter)


def _staged_neumann(maxiter: int, damping: float, alpha: float) -> Staged:
    # solve_neumann: p_0 = alpha b, p_{i+1} = p_i - alpha (A + ridge) p_i, u = sum_{i <= n} p_i;
    # iteration i <= n adds H_aw p_i, and i < n also takes the series step (n + 1 products, as the
    # fused form's n in its loop and one H_aw u after it)
    def prepare(problem):
        grads, gv_w = _prepare(problem)
        p0 = alpha * gv_w
        return _NeumannCarry(grads, p0, p0, jax.tree.map(jnp.zeros_like, problem.arch), jnp.zeros((), jnp.int32))

    def iterate(problem, carry):
        ap, hp, grads = _products(problem, carry.grads, carry.p)
        if damping:
            ap = ap + damping * carry.p
        p = carry.p - alpha * ap
        step, sum_in = carry.k < maxiter, carry.k <= maxiter
        return _NeumannCarry(grads, _where(step, p, carry.p), _where(step, carry.acc + p, carry.acc),
                             _where(sum_in, jax.tree.map(jnp.add, carry.h_aw_acc, hp), carry.h_aw_acc),
                             jnp.where(sum_in, carry.k + 1, carry.k))

    def finish(problem, carry):
        return _result(problem, carry.grads, carry.h_aw_acc)

    def converged(carry):
        return carry.k > maxiter  # the first iterate (k = 0 -> 1) filled the training half

    return Staged(prepare, iterate, finish, converged, maxiter + 1)
