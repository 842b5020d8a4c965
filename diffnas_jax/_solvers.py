"""The one door to jaxopt: linear solvers and ``custom_root`` for implicit differentiation.

Every estimator that needs a linear solve takes one of these ``solve(matvec, b, ...) -> x``
functions (pytrees in, pytrees out), so jaxopt can be replaced (lineax, a hand-written CG)
by editing this module only. jaxopt is imported lazily: importing diffnas_jax does not import
it, and its deprecation notice is silenced here once rather than in every caller.

References: Blondel et al., "Efficient and Modular Implicit Differentiation", NeurIPS 2022
(jaxopt); Lorraine, Vicol & Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
Differentiation", AISTATS 2020 (the Neumann-series inverse-Hessian-vector product).
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from optax.tree_utils import tree_vdot

from ._checks import check_int_in_range, check_nonnegative, check_positive

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

__all__ = ["solve_cg", "solve_normal_cg", "solve_gmres", "solve_neumann", "custom_root",
           "SOLVERS", "get_solver", "CGState", "cg_start", "cg_active", "cg_iterate"]


@functools.lru_cache(maxsize=None)
def _jaxopt():
    with warnings.catch_warnings():
        # jaxopt announces its end of maintenance on import; that is why this module exists.
        warnings.simplefilter("ignore", DeprecationWarning)
        import jaxopt.implicit_diff
        import jaxopt.linear_solve
    return jaxopt


def _check_common(tol: Any, maxiter: Any, ridge: Any) -> None:
    check_positive("tol", tol)
    if maxiter is not None:
        check_int_in_range("maxiter", maxiter, 1, 10**9)
    if ridge is not None:
        check_nonnegative("ridge", ridge)


def solve_cg(matvec: MatVec, b: PyTree, *, ridge: float | None = None, init: PyTree | None = None,
             tol: float = 1e-5, maxiter: int | None = None) -> PyTree:
    """Solve ``(A + ridge I) x = b`` by conjugate gradient; ``A`` symmetric positive definite.

    Args:
      matvec: ``v -> A v`` on pytrees shaped like ``b``.
      b: right-hand side pytree.
      ridge: optional Tikhonov damping added to ``A``.
      init: optional initial guess (defaults to zeros).
      tol: relative residual tolerance; maxiter: iteration cap (``None``: jax's default).
    Returns:
      ``x``, a pytree like ``b``.
    """
    _check_common(tol, maxiter, ridge)
    if init is not None:
        return _jaxopt().linear_solve.solve_cg(matvec, b, ridge=ridge, init=init, tol=tol,
                                               maxiter=maxiter)
    return _cg_from_zero(matvec, b, ridge=ridge, tol=tol, maxiter=maxiter)


def _cg_from_zero(matvec: MatVec, b: PyTree, *, ridge: float | None, tol: float,
                  maxiter: int | None) -> PyTree:
    """``jax.scipy.sparse.linalg.cg`` from ``x0 = 0`` (what jaxopt's ``solve_cg`` runs without
    ``init``), with the first residual taken as ``b`` instead of ``b - A 0``.

    Same iteration, stopping rule (``|r|^2 <= tol^2 |b|^2``), default ``maxiter`` (10 times the
    size of ``b``) and implicit differentiation (``lax.custom_linear_solve``, symmetric), so the
    result equals jaxopt's wherever ``A 0 = 0``; but the program holds one ``matvec`` fewer.  For
    the implicit hypergradient ``matvec`` is a Hessian-vector product of the training loss: the
    ``A 0`` outside the loop was a third copy of it (with the loop body and the final mixed
    product) in the compiled search step, about a third of its compile time.
    """
    if ridge is not None:
        plain = matvec
        matvec = lambda v: jax.tree.map(lambda av, x: av + ridge * x, plain(v), v)  # noqa: E731
    if maxiter is None:
        maxiter = 10 * sum(jnp.size(leaf) for leaf in jax.tree.leaves(b))

    def solve(a_matvec, rhs):
        dtype = jnp.result_type(*jax.tree.leaves(rhs))
        atol2 = jnp.square(tol) * tree_vdot(rhs, rhs)

        def cond(carry):
            _, _, gamma, _, k = carry
            return (gamma > atol2) & (k < maxiter)

        def body(carry):
            x, r, gamma, p, k = carry
            return _cg_update(x, r, gamma, p, k, a_matvec(p), dtype)[:5]

        x0 = jax.tree.map(jnp.zeros_like, rhs)
        gamma0 = tree_vdot(rhs, rhs).astype(dtype)
        return jax.lax.while_loop(cond, body, (x0, rhs, gamma0, rhs, 0))[0]

    return jax.lax.custom_linear_solve(matvec, b, solve=solve, transpose_solve=solve, symmetric=True)


def _cg_update(x, r, gamma, p, k, ap, dtype):
    """One CG iteration given ``ap = A p``: ``(x, r, gamma, p, k, alpha)`` after it (the body of
    :func:`solve_cg`'s loop and of :func:`cg_iterate`)."""
    alpha = gamma / tree_vdot(p, ap).astype(dtype)
    x = jax.tree.map(lambda xi, pi: xi + alpha * pi, x, p)
    r = jax.tree.map(lambda ri, api: ri - alpha * api, r, ap)
    gamma_new = tree_vdot(r, r).astype(dtype)
    beta = gamma_new / gamma
    p = jax.tree.map(lambda ri, pi: ri + beta * pi, r, p)
    return x, r, gamma_new, p, k + 1, alpha


class CGState(NamedTuple):
    """The carry of :func:`solve_cg`'s iteration from ``x0 = 0``, for a loop driven from outside.

    ``x`` the iterate, ``r`` the residual, ``gamma = <r, r>``, ``p`` the search direction, ``k``
    the iterations done, ``atol2`` the squared absolute stopping tolerance ``tol^2 <b, b>``.
    """

    x: PyTree
    r: PyTree
    gamma: jax.Array
    p: PyTree
    k: jax.Array
    atol2: jax.Array


def cg_start(b: PyTree, *, tol: float = 1e-5) -> CGState:
    """The state :func:`solve_cg` (without ``init``) starts its loop from: ``x = 0``, ``r = p = b``."""
    check_positive("tol", tol)
    dtype = jnp.result_type(*jax.tree.leaves(b))
    gamma = tree_vdot(b, b).astype(dtype)
    return CGState(jax.tree.map(jnp.zeros_like, b), b, gamma, b, jnp.zeros((), jnp.int32),
                   jnp.square(tol) * tree_vdot(b, b))


def cg_active(state: CGState, maxiter: int) -> jax.Array:
    """``True`` while :func:`solve_cg`'s ``while_loop`` would run another iteration."""
    return (state.gamma > state.atol2) & (state.k < maxiter)


def cg_iterate(state: CGState, ap: PyTree, *, maxiter: int, ridge: float | None = None
               ) -> tuple[CGState, jax.Array]:
    """One iteration of :func:`solve_cg` given ``ap = A p`` (without the ridge), for a host loop
    that computes the product in a program of its own (no product inside a ``while_loop``).

    Same arithmetic as the fused loop's body; once :func:`cg_active` is false the state comes
    back unchanged, so ``maxiter`` calls equal the fused solve with its stopping rule.

    Returns:
      ``(state, alpha)``: the new state and the step length taken (``0`` when inactive), so
      that a caller can accumulate ``B x = sum_k alpha_k B p_k`` for another linear map ``B``.
    """
    active = cg_active(state, maxiter)
    x, r, gamma, p, k, atol2 = state
    dtype = jnp.result_type(*jax.tree.leaves(r))
    if ridge is not None:
        ap = jax.tree.map(lambda av, pi: av + ridge * pi, ap, p)
    *updated, alpha = _cg_update(x, r, gamma, p, k, ap, dtype)
    new = CGState(*updated, atol2)
    keep = lambda n, o: jnp.where(active, n, o)  # noqa: E731
    return jax.tree.map(keep, new, state), jnp.where(active, alpha, jnp.zeros_like(alpha))


def solve_normal_cg(matvec: MatVec, b: PyTree, *, ridge: float | None = None, init: PyTree | None = None,
                    tol: float = 1e-5, maxiter: int | None = None) -> PyTree:
    """Solve ``A x = b`` through the normal equations ``(A^T A + ridge I) x = A^T b`` by CG.

    Works for any nonsingular (also indefinite) square ``A``; ``matvec`` must be linear and
    transposable by ``jax.linear_transpose`` (true for JVPs and linearized functions).
    """
    _check_common(tol, maxiter, ridge)
    return _jaxopt().linear_solve.solve_normal_cg(matvec, b, ridge=ridge, init=init, tol=tol,
                                                  maxiter=maxiter)


def solve_gmres(matvec: MatVec, b: PyTree, *, ridge: float | None = None, init: PyTree | None = None,
                tol: float = 1e-5, maxiter: int | None = None, restart: int = 20) -> PyTree:
    """Solve ``(A + ridge I) x = b`` by restarted GMRES (any nonsingular ``A``)."""
    _check_common(tol, maxiter, ridge)
    check_int_in_range("restart", restart, 1, 10**6)
    return _jaxopt().linear_solve.solve_gmres(matvec, b, ridge=ridge, init=init, tol=tol,
                                              maxiter=maxiter, restart=restart)


def solve_neumann(matvec: MatVec, b: PyTree, *, ridge: float | None = None, init: PyTree | None = None,
                  tol: float = 1e-5, maxiter: int | None = 20, alpha: float = 1.0) -> PyTree:
    """Truncated Neumann series ``x = alpha sum_{i=0}^{maxiter} (I - alpha A)^i b``.

    Approximates ``A^{-1} b`` when the spectral radius of ``I - alpha A`` is below one, i.e.
    ``0 < alpha < 2 / lambda_max(A)`` for symmetric positive definite ``A`` (Lorraine et al. 2020,
    Algorithm 3). ``maxiter`` is the number of terms after the first; the error decays like
    ``rho^maxiter``. ``tol`` and ``init`` are accepted for a uniform solver signature and unused:
    the number of terms is fixed so the cost is known in advance and the loop is a ``fori_loop``.
    """
    del init
    _check_common(tol, maxiter, ridge)
    check_positive("alpha", alpha)
    n = 20 if maxiter is None else int(maxiter)
    if ridge is not None:
        base = matvec
        matvec = lambda v: jax.tree.map(lambda av, vv: av + ridge * vv, base(v), v)  # noqa: E731

    p0 = jax.tree.map(lambda x: alpha * x, b)

    def body(_, carry):
        p, acc = carry
        ap = matvec(p)
        p = jax.tree.map(lambda pi, api: pi - alpha * api, p, ap)
        return p, jax.tree.map(jnp.add, acc, p)

    _, x = jax.lax.fori_loop(0, n, body, (p0, p0))
    return x


def custom_root(optimality_fun: Callable, has_aux: bool = False, solve: Callable | None = None):
    """``jaxopt.implicit_diff.custom_root``: replace a solver's derivative by the IFT one.

    ``solve`` defaults to :func:`solve_normal_cg` (as in jaxopt). See jaxopt for the protocol.
    """
    solve = solve_normal_cg if solve is None else solve
    return _jaxopt().implicit_diff.custom_root(optimality_fun, has_aux=has_aux, solve=solve)


SOLVERS: dict[str, Callable[..., PyTree]] = {
    "cg": solve_cg,
    "normal_cg": solve_normal_cg,
    "gmres": solve_gmres,
    "neumann": solve_neumann,
}


def get_solver(name: str) -> Callable[..., PyTree]:
    """The solver registered under ``name`` (``ValueError`` naming ``solver`` otherwise)."""
    from ._checks import check_choice

    return SOLVERS[check_choice("solver", name, SOLVERS)]
