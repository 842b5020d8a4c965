"""Search objectives: what the two losses of a search step are, as a pair of pure functions.

Most methods only change the validation (architecture) loss additively, which
``standard(loss_fn, regularizer)`` covers. Some do not: FBNet multiplies the cross-entropy by a
latency term, ProxylessNAS / Single-Path NAS combine the cross-entropy with an expected cost of
the mixing weights, and SD-DARTS distils the supernet from its own earlier snapshots, which needs
state carried from step to step and a forward pass of other weights on the same batch. An
:class:`Objective` covers all of them without special cases in the step, in the style of an optax
gradient transformation:

- ``init(weights, model_state) -> objective_state`` (``()`` when stateless);
- ``loss(ctx) -> scalar`` given a :class:`LossContext` (logits, labels, input, arch, mix, step,
  the objective state, which split — ``"train"`` or ``"val"`` — and an eval-mode ``forward``);
- ``update(objective_state, weights, model_state, step) -> objective_state`` after the weight step.

The objective state lives in ``SearchState.objective_state``, so the whole step stays one pure,
jit- and vmap-compatible function.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .._checks import check_choice, check_int_in_range

PyTree = Any

__all__ = ["LossContext", "Objective", "cross_entropy", "standard", "cost_aware", "with_self_distillation",
           "SPLITS"]

SPLITS = ("train", "val")


class LossContext(NamedTuple):
    """What an objective sees for one batch.

    Attributes:
      logits: (B, K) supernet outputs under ``mix`` (train mode).
      labels: (B,) integer labels.
      x: the input batch.
      arch: raw architecture parameters (a pytree; differentiate through it).
      mix: the relaxation's mixing weights for this loss (structure of ``arch``).
      step: int32 scalar, the search step.
      state: the objective's state (``SearchState.objective_state``).
      split: ``"train"`` (the weight loss) or ``"val"`` (the architecture loss); a Python string.
      forward: ``forward(weights, model_state, mix, x) -> logits`` in eval mode, for objectives
        that evaluate other weights (teachers) on the same batch.
    """

    logits: jax.Array
    labels: jax.Array
    x: jax.Array
    arch: PyTree
    mix: PyTree
    step: jax.Array
    state: PyTree
    split: str
    forward: Callable[..., jax.Array]


class Objective(NamedTuple):
    """A search objective as pure functions (see the module docstring)."""

    init: Callable[[PyTree, PyTree], PyTree]
    loss: Callable[[LossContext], jax.Array]
    update: Callable[[PyTree, PyTree, PyTree, jax.Array], PyTree]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels: logits (B, K), labels (B,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _no_state(weights, model_state):
    return ()


def _keep(state, weights, model_state, step):
    return state


def standard(loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
             regularizer: Callable[[PyTree, PyTree, Any], jax.Array] | None = None) -> Objective:
    """``loss_fn(logits, labels)`` on both splits, plus ``regularizer(arch, mix, step)`` on the
    validation split (DARTS and every method whose extra term is additive in the arch loss).

    Liu et al., "DARTS", ICLR 2019, Eq. 3-4.
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable (logits, labels) -> scalar, got {type(loss_fn).__name__}")
    if regularizer is not None and not callable(regularizer):
        raise TypeError(f"`regularizer` must be callable (arch, mix, step) -> scalar, got {type(regularizer).__name__}")

    def loss(ctx: LossContext) -> jax.Array:
        value = loss_fn(ctx.logits, ctx.labels)
        if regularizer is not None and ctx.split == "val":
            value = value + regularizer(ctx.arch, ctx.mix, ctx.step)
        return value

    return Objective(_no_state, loss, _keep)


def cost_aware(combine: Callable[[jax.Array, jax.Array], jax.Array], cost_fn: Callable[[PyTree], jax.Array],
               loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy) -> Objective:
    """Resource-aware architecture loss ``combine(ce, cost_fn(mix))`` on the validation split.

    ``combine`` is one of :func:`diffnas_jax.regularizers.fbnet_loss` (``CE * a * log(LAT)^b``, Wu
    et al., CVPR 2019), :func:`~diffnas_jax.regularizers.proxyless_loss` (``CE + lambda E[LAT]``, Cai
    et al., ICLR 2019) or :func:`~diffnas_jax.regularizers.single_path_loss` (``CE + lambda log R``,
    Stamoulis et al., 2019); ``cost_fn(mix)`` a differentiable expected cost, e.g.
    ``lambda mix: diffnas_jax.cost.expected_cost_of_mix(mix, table)``. The weight loss stays the
    plain cross-entropy, as in those papers.
    """
    if not callable(combine):
        raise TypeError(f"`combine` must be callable (ce, cost) -> scalar, got {type(combine).__name__}")
    if not callable(cost_fn):
        raise TypeError(f"`cost_fn` must be callable mix -> scalar, got {type(cost_fn).__name__}")

    def loss(ctx: LossContext) -> jax.Array:
        ce = loss_fn(ctx.logits, ctx.labels)
        if ctx.split != "val":
            return ce
        return combine(ce, cost_fn(ctx.mix))

    return Objective(_no_state, loss, _keep)


def with_self_distillation(distillation: Any, base: Objective | None = None, *, every: int = 1,
                           splits: tuple[str, ...] = ("train",)) -> Objective:
    """Add SD-DARTS self-distillation (Zhu et al., "Improving Differentiable Architecture Search
    via Self-Distillation", Neural Networks 2023) to ``base`` (default :func:`standard`).

    The state is a ring buffer of the supernet's last ``K`` snapshots (``distillation`` from
    :func:`diffnas_jax.regularizers.self_distillation`), pushed after every ``every``-th weight step
    (1: the previous K steps, the paper's "previous steps of the supernet"). On the chosen
    ``splits`` the loss gains ``weight * T^2 KL(voted teachers || student)``, the teachers
    evaluated in eval mode on the same batch and under the same mixing weights, with ``vmap``
    over the snapshots. Before the first push the term is zero (no teacher votes).
    """
    for name in ("init", "push", "teacher_probs", "loss"):
        if not hasattr(distillation, name):
            raise TypeError("`distillation` must come from diffnas_jax.regularizers.self_distillation, "
                            f"got {type(distillation).__name__}")
    check_int_in_range("every", every, 1, 10**9)
    splits = tuple(splits)
    if not splits:
        raise ValueError("`splits` must name at least one of 'train', 'val'")
    for s in splits:
        check_choice("splits", s, SPLITS)
    base = standard() if base is None else base

    def init(weights, model_state):
        return {"base": base.init(weights, model_state), "snapshots": distillation.init(weights, model_state)}

    def loss(ctx: LossContext) -> jax.Array:
        value = base.loss(ctx._replace(state=ctx.state["base"]))
        if ctx.split in splits:
            snaps = ctx.state["snapshots"]
            teacher = distillation.teacher_probs(ctx.forward, snaps, ctx.mix, ctx.x)
            # no teacher before the first push: a uniform "teacher" would pull towards maximum entropy
            value = value + jnp.where(snaps.count > 0, distillation.loss(ctx.logits, teacher), 0.0)
        return value

    def update(state, weights, model_state, step):
        snaps = state["snapshots"]
        pushed = distillation.push(snaps, weights, model_state)
        due = (step + 1) % every == 0
        snaps = jax.tree.map(lambda new, old: jnp.where(due, new, old), pushed, snaps)
        return {"base": base.update(state["base"], weights, model_state, step), "snapshots": snaps}

    return Objective(init, loss, update)
