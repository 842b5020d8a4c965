"""Perturbed optimizers: differentiable expectations of a discrete solver under random noise.

Berthet, Blondel, Teboul, Cuturi, Vert & Bach, "Learning with Differentiable Perturbed
Optimizers", NeurIPS 2020. For a solver ``y*(theta)`` (argmax, top-k, ...) the perturbed
solver ``y_sigma(theta) = E_Z[y*(theta + sigma Z)]`` is smooth, and its Jacobian is estimated
from solver calls alone: ``d y_sigma / d theta = E[y*(theta + sigma Z) grad nu(Z)^T] / sigma``
(``nu`` the noise's negative log-density). ``sigma -> 0`` gives the hard solver.

Built on :func:`optax.perturbations.make_perturbed_fun` (the Monte-Carlo value and the
score-function derivatives, with the unperturbed solution as a variance-reducing baseline). One
thing is added: the estimator is applied to each row of a batch separately (``vmap`` over
leading dimensions, with a key per row). optax's score sums the log-density over *all* inputs,
so on a batch every row's gradient would carry the noise of every other row — unbiased, but
with a variance growing with the batch size.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from optax import perturbations as _optax_perturbations

from diffnas_jax._checks import as_float_array, check_axis, check_choice, check_int_in_range, check_positive
from diffnas_jax.relax.sinkhorn import _compute_dtype
from diffnas_jax.relax.topk import hard_topk_mask

__all__ = ["perturbed", "perturbed_argmax", "perturbed_topk"]

_NOISES = ("gumbel", "normal")


def _noise(name: str) -> Any:
    check_choice("noise", name, _NOISES)
    return _optax_perturbations.Gumbel() if name == "gumbel" else _optax_perturbations.Normal()


def perturbed(solver: Callable[[jax.Array], jax.Array], num_samples: int = 1000, sigma: float = 0.1,
              noise: str = "gumbel") -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Turn a (non-differentiable) solver on vectors into ``fn(key, values, axis=-1)``, the
    Monte-Carlo perturbed solver of Berthet et al. 2020 (Eq. 1 and Prop. 3.1).

    Args:
      solver: ``solver(theta) -> y`` on one vector ``theta`` (n,), any output shape; e.g. a
        one-hot argmax, a top-k mask, a ranking, a shortest path.
      num_samples: Monte-Carlo samples M (the estimate's standard error falls as 1/sqrt(M)).
      sigma: noise scale > 0 (a Python number).
      noise: "gumbel" (with argmax, the perturbed argmax is exactly ``softmax(theta / sigma)`` in
        expectation) or "normal".
    Returns:
      ``fn(key, values, axis=-1)``: ``values`` (..., n, ...) with the solver applied to every
      1-D slice along ``axis`` and an independent key per slice; output ``(..., *solver_shape)``
      where ``axis`` is replaced by the solver's output dims (for a solver returning (n,), the
      shape of ``values``), in the dtype of ``values``. Its derivatives (any order, through
      ``jax.grad``/``jvp``) are the unbiased Monte-Carlo estimates of the perturbed solver's.
    """
    if not callable(solver):
        raise TypeError(f"`solver` must be callable theta -> y, got {type(solver).__name__}")
    num_samples = check_int_in_range("num_samples", num_samples, 1, 10**8)
    check_positive("sigma", sigma)
    dist = _noise(noise)

    def fn(key: jax.Array, values: jax.Array, axis: int = -1) -> jax.Array:
        if key is None:
            raise ValueError("`key` must be a PRNG key (jax.random.key or PRNGKey), got None")
        values = as_float_array("values", values, min_ndim=1)
        axis = check_axis("axis", axis, values.ndim)
        dtype, cdt = values.dtype, _compute_dtype(values.dtype)
        x = jnp.moveaxis(values.astype(cdt), axis, -1)
        lead = x.shape[:-1]
        rows = x.reshape((math.prod(lead), x.shape[-1]))
        keys = jax.random.split(key, rows.shape[0])
        out = jax.vmap(lambda k, row: _perturbed_row(solver, num_samples, sigma, dist, k, row, cdt))(keys, rows)
        out = out.reshape(lead + out.shape[1:])
        if out.ndim == values.ndim:  # the solver kept the axis: put it back where it was
            out = jnp.moveaxis(out, -1, axis)
        return out.astype(dtype)

    return fn


def _perturbed_row(solver, num_samples, sigma, dist, key, row, cdt):
    """optax's Monte-Carlo estimator on one row. Infinite entries (-inf is the usual way to mask a
    choice) stay fixed: the noise is added to a finite stand-in, since optax recovers the noise as
    ``(perturbed - row) / sigma``, NaN for an infinite entry, and the solver sees the infinity
    again; they get no gradient. A row holding a NaN gives NaN (argmax would hide it)."""
    fixed = jnp.isinf(row)
    const = jax.lax.stop_gradient(row)
    smooth = _optax_perturbations.make_perturbed_fun(
        lambda t: solver(jnp.where(fixed, const, t)).astype(cdt), num_samples, sigma, dist)
    out = smooth(key, jnp.where(fixed, 0, row))
    return jnp.where(jnp.any(jnp.isnan(row)), jnp.nan, out)


def _one_hot_argmax(theta: jax.Array) -> jax.Array:
    return jax.nn.one_hot(jnp.argmax(theta), theta.shape[-1], dtype=theta.dtype)


def perturbed_argmax(key: jax.Array, values: jax.Array, num_samples: int = 1000, sigma: float = 0.1,
                     noise: str = "gumbel", axis: int = -1) -> jax.Array:
    """``E[one_hot(argmax(values + sigma Z))]``, the perturbed argmax (Berthet et al. 2020).

    With Gumbel noise its expectation is ``softmax(values / sigma)`` (the Gumbel-max trick): the
    Monte-Carlo estimate converges to it at rate 1/sqrt(num_samples). ``sigma -> 0`` gives the
    hard one-hot argmax.

    Args:
      key: PRNG key.
      values: (..., n) scores; any leading batch dims (independent noise per row).
      num_samples: Monte-Carlo samples per row.
      sigma: noise scale > 0.
      noise: "gumbel" or "normal".
      axis: the axis of the n choices.
    Returns:
      Array of the shape and dtype of ``values``, on the simplex along ``axis``.
    """
    return perturbed(_one_hot_argmax, num_samples, sigma, noise)(key, values, axis)


def perturbed_topk(key: jax.Array, values: jax.Array, k: int, num_samples: int = 1000, sigma: float = 0.1,
                   noise: str = "normal", axis: int = -1) -> jax.Array:
    """``E[k_hot(top_k(values + sigma Z))]``, the perturbed top-k mask (Berthet et al. 2020,
    as used for differentiable patch selection by Cordonnier et al., CVPR 2021).

    Entries in [0, 1], summing to ``k``; ``sigma -> 0`` gives the hard k-hot mask.

    Args:
      key: PRNG key.
      values: (..., n) scores; any leading batch dims.
      k: 1 <= k <= n (static Python int).
      num_samples, sigma, noise, axis: as in :func:`perturbed_argmax` (default noise "normal").
    Returns:
      Array of the shape and dtype of ``values``.
    """
    values = as_float_array("values", values, min_ndim=1)
    axis = check_axis("axis", axis, values.ndim)
    n = values.shape[axis]
    k = check_int_in_range("k", k, 1, max(n, 1))
    if n == 0:
        raise ValueError("`values` must have at least one entry along `axis` to select k >= 1 of them")

    return perturbed(lambda theta: hard_topk_mask(theta, k), num_samples, sigma, noise)(key, values, axis)
