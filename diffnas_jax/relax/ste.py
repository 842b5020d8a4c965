"""Straight-through estimators: the value of a hard function, the gradient of a soft one.

Bengio, Léonard & Courville, "Estimating or Propagating Gradients Through Stochastic Neurons for
Conditional Computation", 2013; Hinton's lectures (2012); Courbariaux et al., "BinaryConnect",
NeurIPS 2015 (``ste_sign``).

``straight_through(hard, soft)`` is a ``jax.custom_jvp`` whose primal output is *exactly*
``hard`` (the familiar ``soft + stop_gradient(hard - soft)`` rounds, so a one-hot is not exactly
one-hot, and is NaN when ``soft`` is infinite) and whose tangent is the tangent of ``soft``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from diffnas_jax._checks import as_float_array

__all__ = ["straight_through", "ste_round", "ste_sign", "ste_ceil"]


@jax.custom_jvp
def _st(hard: jax.Array, soft: jax.Array) -> jax.Array:
    return hard


@_st.defjvp
def _st_jvp(primals, tangents):
    hard, _ = primals
    _, soft_dot = tangents
    return hard, soft_dot


def straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
    """Value of ``hard``, gradient of ``soft`` (straight-through estimator).

    Bengio et al. 2013. ``hard`` receives no gradient.

    Args:
      hard: array broadcastable with ``soft``; any dtype (cast to the dtype of ``soft``).
      soft: floating array.

    Returns:
      An array of the broadcast shape and the dtype of ``soft`` equal to ``hard`` in value;
      its derivative with respect to ``soft`` is the identity.
    """
    soft = as_float_array("soft", soft)
    hard = jnp.asarray(hard)
    try:
        shape = jnp.broadcast_shapes(hard.shape, soft.shape)
    except ValueError as e:
        raise ValueError(f"`hard` with shape {hard.shape} does not broadcast with `soft` with shape "
                         f"{soft.shape}") from e
    hard = jax.lax.stop_gradient(jnp.broadcast_to(hard.astype(soft.dtype), shape))
    return _st(hard, jnp.broadcast_to(soft, shape))


def ste_round(x: jax.Array) -> jax.Array:
    """``round(x)`` (half to even) with the identity gradient (Bengio et al. 2013).

    Args:
      x: floating array of any shape. Returns the same shape and dtype.
    """
    x = as_float_array("x", x)
    return straight_through(jnp.round(x), x)


def ste_sign(x: jax.Array) -> jax.Array:
    """``sign(x)`` (0 at 0) with the identity gradient (BinaryConnect, Courbariaux et al. 2015).

    Args:
      x: floating array of any shape. Returns the same shape and dtype.
    """
    x = as_float_array("x", x)
    return straight_through(jnp.sign(x), x)


def ste_ceil(x: jax.Array) -> jax.Array:
    """``ceil(x)`` with the identity gradient (Bengio et al. 2013).

    Args:
      x: floating array of any shape. Returns the same shape and dtype.
    """
    x = as_float_array("x", x)
    return straight_through(jnp.ceil(x), x)
