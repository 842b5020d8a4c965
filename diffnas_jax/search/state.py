"""``SearchState``: everything one architecture search carries from step to step, as one pytree.

Following Flax's ``TrainState`` pattern: the state is an immutable pytree, the step function
returns a new one, so the whole search step jit-compiles once and ``jax.vmap`` over a leading
seed axis runs independent searches in one program.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ..hypergrad import Hypergradient
from ..spaces.base import SearchSpace

PyTree = Any

__all__ = ["SearchState", "init_search_state"]


@flax.struct.dataclass
class SearchState:
    """State of one differentiable architecture search.

    Attributes:
      weights: supernet weights (Flax "params").
      model_state: non-trained network state (BatchNorm "batch_stats").
      arch: architecture logits (a dict pytree, see :mod:`diffnas_jax.spaces.base`).
      weight_opt_state, arch_opt_state: optax states of the two optimizers.
      hyper_state: the hypergradient estimator's state (RARTS' second weight copy; ``()``).
      step: int32 scalar, number of completed search steps.
      key: PRNG key used when the step is called without an explicit key.
      objective_state: the search objective's state (SD-DARTS teacher snapshots; ``()``).
    """

    weights: PyTree
    model_state: PyTree
    arch: PyTree
    weight_opt_state: PyTree
    arch_opt_state: PyTree
    hyper_state: PyTree
    step: jax.Array
    key: jax.Array
    objective_state: PyTree = ()


def init_search_state(key: jax.Array, space: SearchSpace, x: jax.Array, weight_opt: optax.GradientTransformation,
                      arch_opt: optax.GradientTransformation,
                      hypergradient: Hypergradient | None = None, objective: Any = None) -> SearchState:
    """Initialise weights, BN state and architecture of ``space`` and both optimizer states.

    Args:
      key: PRNG key (split into weight, architecture and run keys).
      space: a search space (:class:`diffnas_jax.spaces.base.SearchSpace`).
      x: an example input batch (NHWC for image spaces), used for shapes only.
      weight_opt, arch_opt: optax optimizers of the weights and the architecture.
      hypergradient: the estimator, for its state (``est.init(weights)``); ``None``: no state.
      objective: the step's :class:`~diffnas_jax.search.objective.Objective`, for its state;
        ``None``: no state.
    Returns:
      A :class:`SearchState` at step 0. Under ``jax.vmap`` over ``key`` it gives one state per seed.
    """
    k_w, k_a, k_run = jax.random.split(key, 3)
    weights, model_state = space.init(k_w, x)
    arch = space.init_arch(k_a)
    hyper_state = hypergradient.init(weights) if hypergradient is not None else ()
    return SearchState(weights=weights, model_state=model_state, arch=arch,
                       weight_opt_state=weight_opt.init(weights), arch_opt_state=arch_opt.init(arch),
                       hyper_state=hyper_state, step=jnp.zeros((), jnp.int32), key=k_run,
                       objective_state=objective.init(weights, model_state) if objective is not None else ())
