"""Regularisers, cost losses and schedules of differentiable NAS methods (formerly
``diffnas_jax.objectives``, a deprecated alias for one release: "objective" now only means the
search step's loss protocol, :mod:`diffnas_jax.search.objective`).

- SD-DARTS self-distillation from supernet snapshots ("voting teachers"): Zhu et al.,
  "Improving Differentiable Architecture Search via Self-Distillation", Neural Networks 2023.
- FairDARTS zero-one loss: Chu et al., "Fair DARTS", ECCV 2020.
- Cosine Power Annealing as an optax schedule: Hundt et al., "sharpDARTS", 2019.
- Resource-aware losses given a differentiable expected cost (:mod:`diffnas_jax.cost`):
  FBNet multiplicative ``CE * a * log(LAT)^b`` (Wu et al., CVPR 2019), ProxylessNAS additive
  ``CE + lambda * E[LAT]`` (Cai et al., ICLR 2019), Single-Path NAS ``CE + lambda * log R``
  (Stamoulis et al., ECML-PKDD 2019), and a hard budget (hinge penalty, or the exact
  KL projection of the mixing weights onto ``{E[cost] <= target}``).

Loss constructors follow optax's style: ``fbnet_loss(alpha, beta)`` returns a pure function
``loss(ce, cost) -> scalar``; they compose with ``jit``, ``vmap`` and ``grad``.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffnas_jax._checks import check_int_in_range, check_nonnegative, check_positive
from diffnas_jax.spaces.base import SearchSpace, choice_leaves, replace_choice_leaves

__all__ = [
    "CostLoss", "as_objective", "cosine_power_annealing", "fbnet_loss", "proxyless_loss", "single_path_loss", "budget_penalty",
    "project_to_budget", "zero_one_loss", "fairdarts_zero_one_loss", "self_distillation",
    "self_distillation_loss", "Snapshots", "SelfDistillation",
]

PyTree = Any


# ---------------------------------------------------------------------------------------------
# Cosine Power Annealing (sharpDARTS)
# ---------------------------------------------------------------------------------------------
def cosine_power_annealing(max_lr: float, min_lr: float, total_steps: int, power: float = 10.0,
                           warmup_steps: int = 0) -> optax.Schedule:
    """Cosine Power Annealing (Hundt, Jain & Hager, "sharpDARTS", 2019, Sec. 3.3).

    With ``c(t) = (1 + cos(pi t / T)) / 2`` the learning rate is
    ``min_lr + (max_lr - min_lr) * (power**c(t) - 1) / (power - 1)`` (plain cosine annealing for
    ``power == 1``), after an optional linear warm-up of ``warmup_steps`` steps from
    ``max_lr / warmup_steps`` to ``max_lr``. The larger ``power``, the faster the early decay.

    Args:
      max_lr: initial (peak) learning rate, > 0.
      min_lr: final learning rate, ``0 <= min_lr <= max_lr``.
      total_steps: ``T``, number of steps including the warm-up.
      power: exponent base, >= 1 (sharpDARTS uses 10).
      warmup_steps: linear warm-up steps, ``0 <= warmup_steps < total_steps``.

    Returns:
      An optax schedule ``step -> lr`` (float32 scalar, jit-compatible); ``step`` beyond
      ``total_steps`` gives ``min_lr``.
    """
    check_positive("max_lr", max_lr)
    check_nonnegative("min_lr", min_lr)
    if min_lr > max_lr:
        raise ValueError(f"`min_lr` ({min_lr}) must not exceed `max_lr` ({max_lr})")
    check_int_in_range("total_steps", total_steps, 1, 2**62)
    check_int_in_range("warmup_steps", warmup_steps, 0, total_steps - 1)
    check_positive("power", power)
    if power < 1:
        raise ValueError(f"`power` must be >= 1, got {power}")
    decay_steps = total_steps - warmup_steps

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        t = jnp.clip(step - warmup_steps, 0.0, decay_steps) / decay_steps
        c = 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        frac = c if power == 1 else jnp.expm1(c * jnp.log(power)) / (power - 1.0)
        lr = min_lr + (max_lr - min_lr) * frac
        if warmup_steps:
            lr = jnp.where(step < warmup_steps, max_lr * (step + 1.0) / warmup_steps, lr)
        return lr

    return schedule


# ---------------------------------------------------------------------------------------------
# Resource-aware losses
# ---------------------------------------------------------------------------------------------
def _log_cost(cost):
    # log(cost) must stay positive for the FBNet power and finite for Single-Path: costs
    # are expected in units where they exceed 1 (ms, MFLOPs); below that the log is floored
    # at the float's tiny value rather than returning NaN.
    cost = jnp.asarray(cost)
    dtype = cost.dtype if jnp.issubdtype(cost.dtype, jnp.floating) else jnp.result_type(float)
    cost = cost.astype(dtype)
    return jnp.log(jnp.maximum(cost, jnp.finfo(dtype).tiny))


class CostLoss(NamedTuple):
    """A resource-aware loss ``combine(ce, cost) -> scalar``, callable like the function it wraps.

    ``relative``: :func:`as_objective` feeds the expected cost divided by the cost of the uniform
    mix (scale-free, for the additive forms); otherwise in units where the uniform mix costs
    :data:`ABSOLUTE_COST_AT_UNIFORM` (above 1, as FBNet's ``log(LAT)^beta`` needs). Tagging the
    loss lets :func:`as_objective` build the search objective for it without inspecting closures.
    """

    combine: Callable[[jax.Array, jax.Array], jax.Array]
    relative: bool

    def __call__(self, ce: jax.Array, cost: jax.Array) -> jax.Array:
        return self.combine(ce, cost)


def fbnet_loss(alpha: float = 0.2, beta: float = 0.6) -> CostLoss:
    """FBNet multiplicative latency loss ``CE * alpha * log(LAT)^beta`` (Wu et al., CVPR 2019, Eq. 2).

    Returns ``loss(ce, cost)``: ``ce`` the cross-entropy (any shape), ``cost`` the expected
    latency (``diffnas_jax.cost.expected_latency``) in units where it exceeds 1 (ms in the paper;
    ``log`` is clamped at 0 below 1 so the power stays finite). Paper defaults alpha 0.2, beta 0.6.
    """
    check_positive("alpha", alpha)
    check_positive("beta", beta)

    def loss(ce, cost):
        lc = jnp.maximum(_log_cost(cost), 0.0)
        # (0)^beta has an infinite derivative; a floor keeps grad finite when cost <= 1
        lc = jnp.maximum(lc, jnp.finfo(lc.dtype).eps)
        return ce * alpha * lc ** beta

    return CostLoss(loss, relative=False)


def proxyless_loss(lam: float = 0.1, reference: float = 1.0) -> CostLoss:
    """ProxylessNAS additive latency loss ``CE + lam * E[LAT] / reference`` (Cai et al., ICLR 2019, Eq. 7).

    Returns ``loss(ce, cost)``; ``reference`` normalises the expected latency (the target device's
    reference latency in the authors' code).
    """
    check_nonnegative("lam", lam)
    check_positive("reference", reference)
    return CostLoss(lambda ce, cost: ce + lam * jnp.asarray(cost) / reference, relative=True)


def single_path_loss(lam: float = 0.02) -> CostLoss:
    """Single-Path NAS runtime loss ``CE + lam * log(R)`` (Stamoulis et al., ECML-PKDD 2019, Eq. 6).

    Returns ``loss(ce, runtime)``; ``runtime`` is the differentiable expected runtime.
    """
    check_nonnegative("lam", lam)
    # relative=False: log R of a relative cost would be negative around the uniform mix
    return CostLoss(lambda ce, runtime: ce + lam * _log_cost(runtime), relative=False)


def budget_penalty(target: float, weight: float = 10.0, power: float = 2.0) -> Callable[[jax.Array], jax.Array]:
    """Soft hard-budget: ``weight * max(0, cost / target - 1) ** power``.

    Zero while the expected cost is within ``target``, growing once it exceeds it (the
    hinge-style constraint used by budgeted searches such as TF-NAS and FBNetV2). Returns
    ``penalty(cost)``.
    """
    check_positive("target", target)
    check_nonnegative("weight", weight)
    check_positive("power", power)
    if power < 1:
        raise ValueError(f"`power` must be >= 1 so the penalty is differentiable at the target, got {power}")

    def penalty(cost):
        return weight * jnp.maximum(jnp.asarray(cost) / target - 1.0, 0.0) ** power

    return penalty


def project_to_budget(mix: PyTree, table: Any, target: float, num_iters: int = 64) -> PyTree:
    """The KL (information) projection of the mixing weights onto ``{E[cost] <= target}``.

    Every decision's row ``p`` becomes ``p * exp(-lam * c) / Z`` (``c`` its candidates' costs, ``Z``
    keeping the row's sum), with one ``lam >= 0`` shared by all decisions, found by bisection so
    that the expected cost equals ``target`` when the budget binds; ``lam = 0`` (``mix`` unchanged)
    when it does not. This is the minimiser of ``sum_rows KL(p' || p)`` under the budget, so it
    moves mass from expensive to cheap candidates as little as possible. When no mixture meets
    the target, the result approaches the cheapest candidates (lam at its bracket's top).

    Args:
      mix: mixing weights with the structure of the space's arch (``"beta"`` copied unchanged).
      table: a :class:`diffnas_jax.cost.CostTable` (``per_choice`` costs of each candidate and a
        ``constant`` part).
      target: the budget in the table's unit.
      num_iters: bisection steps on ``log lam`` (64 gives ~1e-16 relative precision of ``lam``).

    Returns:
      Mixing weights of the same structure and dtypes; differentiable in ``mix`` (``lam`` is
      treated as a constant, i.e. a straight projection step).
    """
    check_positive("target", target)
    check_int_in_range("num_iters", num_iters, 1, 10_000)
    mix_leaves = choice_leaves(mix)
    cost_leaves = choice_leaves(table.per_choice)
    if len(mix_leaves) != len(cost_leaves):
        raise ValueError(f"`mix` has {len(mix_leaves)} choice leaves but `table` has {len(cost_leaves)}")
    new_leaves = _project(mix_leaves, cost_leaves, table.constant, target, num_iters)
    return replace_choice_leaves(mix, new_leaves)


@functools.partial(jax.jit, static_argnums=(4,))
def _project(mix_leaves, cost_leaves, constant, target, num_iters):
    # lam is searched on a scale-free grid: costs may be in MACs (1e9) or in ms (1e-1)
    scale = jax.lax.stop_gradient(jnp.max(jnp.stack([jnp.max(jnp.abs(c)) for c in cost_leaves])))
    scale = jnp.where(scale > 0, scale, 1.0)

    def tilt(log_lam):
        lam = jnp.exp(log_lam) / scale
        out = []
        for p, c in zip(mix_leaves, cost_leaves):
            c = c.astype(p.dtype)
            w = p * jnp.exp(-lam * (c - jnp.min(c, axis=-1, keepdims=True)))
            s = jnp.sum(p, axis=-1, keepdims=True)
            out.append(w * s / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), jnp.finfo(p.dtype).tiny))
        return out

    def cost_of(leaves):
        return sum(jnp.sum(p * c.astype(p.dtype)) for p, c in zip(leaves, cost_leaves)) + constant

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        over = cost_of(tilt(mid)) > target
        return jnp.where(over, mid, lo), jnp.where(over, hi, mid)

    _, hi = jax.lax.fori_loop(0, num_iters, body, (jnp.asarray(-20.0), jnp.asarray(60.0)))
    log_lam = jax.lax.stop_gradient(hi)
    binds = jax.lax.stop_gradient(cost_of(mix_leaves) > target)
    return [jnp.where(binds, q, p) for p, q in zip(mix_leaves, tilt(log_lam))]


# ---------------------------------------------------------------------------------------------
# FairDARTS zero-one loss
# ---------------------------------------------------------------------------------------------
def fairdarts_zero_one_loss(arch: PyTree) -> jax.Array:
    """FairDARTS zero-one loss ``-mean((sigmoid(alpha) - 0.5)^2)`` over every architecture logit
    (Chu et al., ECCV 2020, Eq. 5): pushes each independent sigmoid weight towards 0 or 1.

    ``"beta"`` logits are not included. Returns a scalar in the arch dtype.
    """
    leaves = choice_leaves(arch)
    if not leaves:
        raise ValueError("`arch` has no architecture logits")
    total = sum(jnp.sum((jax.nn.sigmoid(a) - 0.5) ** 2) for a in leaves)
    count = sum(a.size for a in leaves)
    return -total / count


def zero_one_loss(weight: float = 10.0) -> Callable[..., jax.Array]:
    """``(arch, mix=None, step=None) -> weight * L_01(arch)``, the FairDARTS zero-one loss (paper
    weight 10); the signature of a ``make_step`` regulariser.

    """
    check_nonnegative("weight", weight)
    def regularizer(arch, mix=None, step=None):
        return weight * fairdarts_zero_one_loss(arch)

    return regularizer


# ---------------------------------------------------------------------------------------------
# SD-DARTS: self-distillation from supernet snapshots
# ---------------------------------------------------------------------------------------------
class Snapshots(NamedTuple):
    """A ring buffer of the last ``K`` supernet weight snapshots (the voting teachers).

    Attributes:
      weights: the weights pytree with a leading axis ``K`` on every leaf.
      state: the BatchNorm state pytree, leading axis ``K``.
      count: how many snapshots were pushed (int32 scalar); slots ``>= count`` are empty.
    """

    weights: PyTree
    state: PyTree
    count: jax.Array


def self_distillation_loss(student_logits: jax.Array, teacher_probs: jax.Array,
                           temperature: float = 4.0) -> jax.Array:
    """``T^2 * mean_batch KL(teacher || softmax(student / T))`` (Hinton et al. 2015 scaling).

    Args:
      student_logits: ``(..., C)``.
      teacher_probs: ``(..., C)`` softened teacher probabilities (already at temperature ``T``);
        treated as constants (no gradient flows into the teachers).
      temperature: ``T > 0``.

    Returns:
      A scalar in the student's dtype.
    """
    check_positive("temperature", temperature)
    t = jax.lax.stop_gradient(teacher_probs).astype(student_logits.dtype)
    log_s = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    # xlogy: teacher zeros contribute 0, not NaN
    kl = jnp.sum(jax.scipy.special.xlogy(t, t) - t * log_s, axis=-1)
    return temperature ** 2 * jnp.mean(kl)


class SelfDistillation(NamedTuple):
    """SD-DARTS voting-teacher regulariser as pure functions (see :func:`self_distillation`)."""

    init: Callable[[PyTree, PyTree], Snapshots]
    push: Callable[[Snapshots, PyTree, PyTree], Snapshots]
    teacher_probs: Callable[..., jax.Array]
    loss: Callable[[jax.Array, jax.Array], jax.Array]
    weight: float


def self_distillation(num_teachers: int = 2, temperature: float = 4.0, weight: float = 1.0) -> SelfDistillation:
    """SD-DARTS self-distillation with voting teachers (Zhu et al., Neural Networks 2023).

    The teachers are the supernet at its last ``K = num_teachers`` snapshots (pushed e.g. once per
    epoch or every N steps); their softened predictions ``softmax(logits / T)`` are averaged
    ("voting") and the current supernet is pulled towards them with
    ``weight * T^2 * KL(teacher || student)``, which smooths the loss landscape seen by the
    architecture and reduces DARTS's sharp-minimum collapse.

    Returns a :class:`SelfDistillation` of pure (jit-able) functions:

    - ``init(weights, state) -> Snapshots``: an empty buffer shaped like ``K`` copies.
    - ``push(snaps, weights, state) -> Snapshots``: store a snapshot (oldest overwritten).
    - ``teacher_probs(apply_fn, snaps, mix, x) -> (B, C)``: ``apply_fn(weights, state, mix, x)``
      returning logits (e.g. ``lambda w, s, m, x: space.apply(w, s, m, x, False)[0]``), evaluated
      with ``vmap`` over the stored snapshots; empty slots get no vote (before the first push the
      result is uniform: skip the loss then, as ``search.objective.with_self_distillation`` does).
    - ``loss(student_logits, teacher_probs) -> scalar``: the weighted distillation term.
    """
    check_int_in_range("num_teachers", num_teachers, 1, 1024)
    check_positive("temperature", temperature)
    check_nonnegative("weight", weight)
    k = num_teachers

    def init(weights, state):
        stack = lambda t: jax.tree_util.tree_map(lambda a: jnp.zeros((k,) + jnp.shape(a), jnp.asarray(a).dtype), t)
        return Snapshots(stack(weights), stack(state), jnp.zeros((), jnp.int32))

    def push(snaps, weights, state):
        slot = snaps.count % k
        put = lambda buf, new: jax.tree_util.tree_map(lambda b, a: b.at[slot].set(jnp.asarray(a, b.dtype)), buf, new)
        return Snapshots(put(snaps.weights, weights), put(snaps.state, state), snaps.count + 1)

    def teacher_probs(apply_fn, snaps, mix, x):
        logits = jax.vmap(lambda w, s: apply_fn(w, s, mix, x))(snaps.weights, snaps.state)
        logits = jax.lax.stop_gradient(logits)
        probs = jax.nn.softmax(logits / temperature, axis=-1)
        valid = (jnp.arange(k) < snaps.count).astype(probs.dtype)
        n = jnp.sum(valid)
        uniform = jnp.full(probs.shape[1:], 1.0 / probs.shape[-1], probs.dtype)
        voted = jnp.tensordot(valid, probs, axes=1) / jnp.maximum(n, 1.0)
        return jnp.where(n > 0, voted, uniform)

    def loss(student_logits, teacher_p):
        return weight * self_distillation_loss(student_logits, teacher_p, temperature)

    return SelfDistillation(init, push, teacher_probs, loss, weight)


# ---------------------------------------------------------------------------------------------
# From a method's regulariser to the search step's objective
# ---------------------------------------------------------------------------------------------
#: The unit of an absolute cost (FBNet's ``log(LAT)^beta``) is set so that the uniform mix costs this
#: much: FBNet's alpha, beta were tuned on latencies of ~20-30 ms; the unit matters for that form only
#: (Single-Path's ``log R`` shifts by a constant), and MFLOPs of a small supernet are below 1, where
#: ``log`` is negative and FBNet's loss is clamped flat.
ABSOLUTE_COST_AT_UNIFORM = 25.0


def as_objective(term: Any, *, space: SearchSpace | None = None, input_shape: Any = None, metric: str = "flops",
                 table: Any = None) -> Any:
    """The :class:`~diffnas_jax.search.objective.Objective` that puts ``term`` into a search step.

    ``term`` is what a method's ``regularizer`` factory returns:

    - ``None`` -> ``None`` (plain cross-entropy);
    - an ``Objective`` -> itself;
    - a :class:`SelfDistillation` -> SD-DARTS on the weight loss, teachers from the previous steps;
    - a :class:`CostLoss` (FBNet, ProxylessNAS, Single-Path NAS) -> the resource-aware
      architecture loss with the space's analytic cost (``metric`` "flops" or "params",
      :func:`diffnas_jax.cost.cost_table` at ``input_shape``), relative to the uniform mix for
      the additive forms (ProxylessNAS), and in units where the uniform mix costs
      :data:`ABSOLUTE_COST_AT_UNIFORM` otherwise; needs ``space`` and ``input_shape`` (H, W, C),
      or a ready ``table`` (a :class:`~diffnas_jax.cost.CostTable`, e.g. a latency table from
      :func:`diffnas_jax.cost.profile_latency` / ``diffnas profile``);
    - any other callable -> an additive regulariser ``term(arch, mix, step)`` on the arch loss.
    """
    from diffnas_jax.search import objective as so

    if term is None or isinstance(term, so.Objective):
        return term
    if isinstance(term, SelfDistillation):
        return so.with_self_distillation(term)
    if isinstance(term, CostLoss):
        from diffnas_jax import cost

        if table is None:
            if space is None or input_shape is None:
                raise ValueError("a resource-aware loss needs `space` and `input_shape` (or a cost `table`)")
            table = cost.cost_table(space, tuple(input_shape), metric)
        uniform = jax.tree_util.tree_map(lambda t: jnp.full(np.shape(t), 1.0 / np.shape(t)[-1]), table.per_choice)
        scale = float(cost.expected_cost_of_mix(uniform, table))
        if not term.relative:
            scale /= ABSOLUTE_COST_AT_UNIFORM
        return so.cost_aware(term, lambda mix: cost.expected_cost_of_mix(mix, table) / scale)
    if callable(term):
        return so.standard(regularizer=term)
    raise TypeError(f"cannot turn a {type(term).__name__} into a search objective")
