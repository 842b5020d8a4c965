"""Diagnostics of the architecture landscape.

``dominant_eigenvalue``: the dominant eigenvalue of the Hessian of L_val w.r.t. the architecture
parameters, the signal RobustDARTS uses to detect the collapse of DARTS (Zela et al.,
"Understanding and Robustifying Differentiable Architecture Search", ICLR 2020, Sec. 4), by
power iteration on exact Hessian-vector products (forward-over-reverse, linearized once).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from .._checks import check_int_in_range
from ._core import tree_norm, tree_vdot, with_aux

__all__ = ["dominant_eigenvalue"]


def dominant_eigenvalue(loss_val: Callable, weights: Any, arch: Any, batch: Any, num_iters: int = 20,
                        key: jax.Array | None = None, *, has_aux: bool = False) -> jax.Array:
    """Eigenvalue of largest magnitude of d^2 L_val / d arch^2 at ``(weights, arch)``.

    Args:
      loss_val: ``(weights, arch, batch) -> scalar`` (or ``(scalar, aux)`` with ``has_aux``).
      weights, arch, batch: where the Hessian is taken (``arch``: any pytree; its Hessian is
        over all leaves jointly).
      num_iters: power iterations (each one exact Hessian-vector product).
      key: PRNG key of the random start vector (required).
    Returns:
      A scalar (the Rayleigh quotient of the last iterate), in ``arch``'s dtype. Jit-compiled
      once per ``(loss_val, num_iters, has_aux)`` and input shapes.
    """
    num_iters = check_int_in_range("num_iters", num_iters, 1, 10**7)
    if key is None:
        raise ValueError("`key` is required: the power iteration starts from a random vector")
    return _dominant(loss_val, weights, arch, batch, key, num_iters, has_aux)


@functools.partial(jax.jit, static_argnames=("loss_val", "num_iters", "has_aux"))
def _dominant(loss_val, weights, arch, batch, key, num_iters, has_aux):
    lv = with_aux(loss_val, has_aux)
    _, hvp = jax.linearize(jax.grad(lambda a: lv(weights, a, batch)[0]), arch)
    leaves, treedef = jax.tree.flatten(arch)
    keys = jax.random.split(key, len(leaves))
    v0 = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])

    def normalise(v):
        n = tree_norm(v)
        return jax.tree.map(lambda x: x / jnp.where(n > 0, n, 1.0), v)

    def body(_, v):
        return normalise(hvp(v))

    v = jax.lax.fori_loop(0, num_iters, body, normalise(v0))
    return tree_vdot(v, hvp(v))
