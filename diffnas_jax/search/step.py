"""One pure, jit-compilable bilevel search step (DARTS order: architecture, then weights).

``make_step(space, relaxation, hypergradient, weight_opt, arch_opt)`` closes over the four
components (space, relaxation, estimator, optimizers) and returns
``step(search_state, batch_train, batch_val, key=None) -> (search_state, metrics)``. Any space,
relaxation and estimator plug in without special cases (Liu et al., "DARTS", ICLR 2019, Alg. 1).

Randomness: the step key is split into a relaxation key and a network key for each of the two
losses. The training loss uses the same keys inside the estimator and in the weight step, so
that the training gradient an estimator already computed at the current weights is exactly the
gradient the weight step would compute at the *pre-update* architecture; with
``reuse_train_grad=True`` (default) the weight step uses it and skips a forward-backward pass.
This evaluates the weight gradient at the architecture before its update (a Jacobi instead of
Gauss-Seidel sweep, a difference of order ``arch_lr``); ``reuse_train_grad=False`` recomputes
it at the updated architecture exactly as the DARTS reference code does.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .._checks import check_positive
from ..hypergrad import Hypergradient
from ..hypergrad._core import grad_w
from ..spaces.base import SearchSpace, choice_leaves
from .objective import LossContext, Objective, cross_entropy, standard
from .state import SearchState

PyTree = Any
Batch = tuple[jax.Array, jax.Array]

__all__ = ["make_step", "StepStages", "cross_entropy", "arch_entropy"]


class StepStages(NamedTuple):
    """The search step as stages, when its estimator has a staged form (``step.stages``).

    ``step(ss, bt, bv, key)`` equals (up to rounding) ``carry = prepare(ss, bt, bv, key)``, then
    ``carry = iterate(ss, bt, bv, key, carry)`` ``max_iterations`` times (or until
    ``converged(carry)``: later calls return the carry unchanged), then ``finish(ss, bt, bv, key,
    carry) -> (search_state, metrics)``. Each stage rebuilds the losses from the state and key;
    only the carry (a pytree of arrays) passes between them, so each can be its own compiled
    program (vmapped over seeds like the step) chained by a host loop: that keeps the solver's
    products out of a compiled ``while_loop`` (XLA:CPU's slow path; see
    :attr:`diffnas_jax.hypergrad.Hypergradient.staged`).
    """

    prepare: Callable[..., PyTree]
    iterate: Callable[..., PyTree]
    finish: Callable[..., tuple[SearchState, dict[str, jax.Array]]]
    converged: Callable[[PyTree], jax.Array]
    max_iterations: int


class _LossAux(NamedTuple):
    model_state: PyTree
    accuracy: jax.Array


def arch_entropy(arch: PyTree) -> jax.Array:
    """Mean over edges (rows of every categorical leaf) of the entropy of ``softmax(arch)``.

    The ``"beta"`` subtree (edge-normalisation logits) is not a categorical choice and is skipped.
    """
    ents = []
    for leaf in choice_leaves(arch):
        logp = jax.nn.log_softmax(leaf, axis=-1)
        ents.append(-jnp.sum(jnp.exp(logp) * logp, axis=-1).reshape(-1))
    if not ents:
        return jnp.zeros(())
    return jnp.mean(jnp.concatenate(ents))


def _momentum_buffer(opt_state: PyTree) -> PyTree | None:
    """The optax ``trace`` (SGD momentum buffer) of the weight optimizer, if it has exactly one."""
    try:
        return optax.tree_utils.tree_get(opt_state, "trace", default=None)
    except KeyError:  # several traces: ambiguous, the virtual step then uses none
        return None


def _temperature(relaxation: Any, step: jax.Array) -> jax.Array | None:
    t = getattr(relaxation, "temperature", None)
    if callable(t):
        t = t(step)
    # relaxations without a temperature (sparsemax, DrNAS, FairDARTS, ...) report None
    return None if t is None else jnp.asarray(t)


def _global_norm(g: PyTree) -> jax.Array:
    # optax.global_norm is deprecated from optax 0.2.5 on; older releases lack optax.tree.norm
    return optax.tree.norm(g) if hasattr(optax, "tree") and hasattr(optax.tree, "norm") else optax.global_norm(g)


def _clip_by_global_norm(g: PyTree, max_norm: float | None) -> tuple[PyTree, jax.Array]:
    norm = _global_norm(g)
    if max_norm is None:
        return g, norm
    # torch.nn.utils.clip_grad_norm_ semantics, as the DARTS reference uses (max_norm 5).
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda x: (x * coef).astype(x.dtype), g), norm


def make_step(space: SearchSpace, relaxation: Callable[[PyTree, jax.Array, Any], PyTree],
              hypergradient: Hypergradient, weight_opt: optax.GradientTransformation,
              arch_opt: optax.GradientTransformation, *,
              objective: Objective | None = None,
              weight_grad_clip: float | None = 5.0, reuse_train_grad: bool = True,
              loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
              regularizer: Callable[[PyTree, PyTree, Any], jax.Array] | None = None,
              ) -> Callable[..., tuple[SearchState, dict[str, jax.Array]]]:
    """Build the pure search step for one combination of the four axes.

    Args:
      space: a search space (``apply(weights, state, mix, x, train, *, rng) -> (logits, state)``).
      relaxation: ``relaxation(arch, key, step) -> mix``; if it has a ``temperature`` attribute
        (a number or ``step -> number``), it is reported in the metrics.
      hypergradient: an estimator from :mod:`diffnas_jax.hypergrad`.
      weight_opt, arch_opt: optax optimizers (DARTS: SGD momentum 0.9 + weight decay 3e-4 with a
        cosine schedule; Adam 3e-4, betas (0.5, 0.999), weight decay 1e-3).
      weight_grad_clip: global-norm clip of the weight gradient (DARTS: 5); ``None`` disables.
      reuse_train_grad: reuse the estimator's training gradient for the weight step (see the
        module docstring).
      objective: the two losses, a :class:`~diffnas_jax.search.objective.Objective` (default
        :func:`~diffnas_jax.search.objective.standard`: mean cross-entropy; ``standard(loss_fn,
        regularizer)`` adds a regulariser to the architecture loss; FBNet's multiplicative
        latency loss, SD-DARTS self-distillation, ... are objectives too); its state lives in
        ``SearchState.objective_state`` (give the same objective to ``init_search_state``).
      loss_fn, regularizer: deprecated (one release): ``objective=standard(loss_fn, regularizer)``.
    Returns:
      ``step(search_state, batch_train, batch_val, key=None) -> (search_state, metrics)``;
      batches are ``(x, labels)`` tuples; ``key=None`` uses and advances ``search_state.key``.
      ``metrics``: ``train_loss``, ``train_acc`` (training batch at the current weights),
      ``val_loss``, ``val_acc`` (where the estimator evaluated L_val: the current weights, or the
      virtual weights of ``unrolled``), ``arch_entropy`` (after the update), ``arch_grad_norm``,
      ``weight_grad_norm`` (before clipping) and ``temperature`` when the relaxation has one.
      Pure: wrap it in ``jax.jit``; ``jax.vmap`` over a leading seed axis of the state (and key).
      ``step.stages`` is a :class:`StepStages` when the estimator has a staged form (``None``
      otherwise): the same step as separately compilable programs.
    """
    if not isinstance(hypergradient, Hypergradient):
        raise TypeError("`hypergradient` must be a diffnas_jax.hypergrad estimator, got "
                        f"{type(hypergradient).__name__}")
    for name, opt in (("weight_opt", weight_opt), ("arch_opt", arch_opt)):
        if not (hasattr(opt, "init") and hasattr(opt, "update")):
            raise TypeError(f"`{name}` must be an optax GradientTransformation, got {type(opt).__name__}")
    if not callable(relaxation):
        raise TypeError(f"`relaxation` must be callable (arch, key, step) -> mix, got {type(relaxation).__name__}")
    if weight_grad_clip is not None:
        check_positive("weight_grad_clip", weight_grad_clip)
    if loss_fn is not None or regularizer is not None:
        if objective is not None:
            raise ValueError("give either `objective` or `loss_fn` / `regularizer`, not both "
                             "(build the objective from them: diffnas_jax.search.objective.standard)")
        warnings.warn("make_step(loss_fn=..., regularizer=...) is deprecated: pass "
                      "objective=diffnas_jax.search.objective.standard(loss_fn, regularizer)",
                      DeprecationWarning, stacklevel=2)
        objective = standard(loss_fn or cross_entropy, regularizer)
    elif objective is None:
        objective = standard(cross_entropy)
    elif not isinstance(objective, Objective):
        raise TypeError(f"`objective` must be a diffnas_jax.search.objective.Objective, got {type(objective).__name__}")

    def losses(ss: SearchState, key: jax.Array | None):
        """The two loss closures of the step, and the state's next key (same in every stage)."""
        if key is None:
            key, next_key = jax.random.split(ss.key)
        else:
            next_key = ss.key
        k_relax_t, k_net_t, k_relax_v, k_net_v = jax.random.split(key, 4)

        expected = jax.tree_util.tree_structure(jax.eval_shape(objective.init, ss.weights, ss.model_state))
        if jax.tree_util.tree_structure(ss.objective_state) != expected:
            raise ValueError("`search_state.objective_state` does not match the step's objective: pass the "
                             "same `objective=` to init_search_state")

        def make_loss(k_relax, k_net, split):
            def forward(w, s, mix, x):
                return space.apply(w, s, mix, x, False, rng=k_net)[0]

            def loss(w, a, batch):
                x, labels = batch
                mix = relaxation(a, k_relax, ss.step)
                logits, new_state = space.apply(w, ss.model_state, mix, x, True, rng=k_net)
                value = objective.loss(LossContext(logits, labels, x, a, mix, ss.step, ss.objective_state,
                                                   split, forward))
                acc = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype))
                return value, _LossAux(new_state, acc)
            return loss

        return make_loss(k_relax_t, k_net_t, "train"), make_loss(k_relax_v, k_net_v, "val"), next_key

    def estimator_args(ss, batch_train, batch_val, loss_train, loss_val):
        return ((loss_train, loss_val, ss.weights, ss.arch, batch_train, batch_val),
                dict(has_aux=True, state=ss.hyper_state, momentum_buffer=_momentum_buffer(ss.weight_opt_state),
                     step=ss.step))

    def apply_result(ss, res, batch_train, batch_val, loss_train, loss_val, next_key):
        # Architecture step.
        a_updates, arch_opt_state = arch_opt.update(res.d_arch, ss.arch_opt_state, ss.arch)
        arch = optax.apply_updates(ss.arch, a_updates)

        # Weight step.
        if reuse_train_grad and res.weight_grad is not None:
            g, t_loss, t_aux = res.weight_grad, res.train_loss, res.train_aux
        else:
            t_loss, t_aux, g = grad_w(loss_train, ss.weights, arch, batch_train)
        g, g_norm = _clip_by_global_norm(g, weight_grad_clip)
        w_updates, weight_opt_state = weight_opt.update(g, ss.weight_opt_state, ss.weights)
        weights = optax.apply_updates(ss.weights, w_updates)

        if res.val_loss is None:  # single-level: report the validation batch all the same
            v_loss, v_aux = loss_val(ss.weights, ss.arch, batch_val)
        else:
            v_loss, v_aux = res.val_loss, res.val_aux

        metrics = {
            "train_loss": t_loss, "train_acc": t_aux.accuracy,
            "val_loss": v_loss, "val_acc": v_aux.accuracy,
            "arch_entropy": arch_entropy(arch),
            "arch_grad_norm": _global_norm(res.d_arch),
            "weight_grad_norm": g_norm,
        }
        temperature = _temperature(relaxation, ss.step)
        if temperature is not None:
            metrics["temperature"] = temperature

        objective_state = objective.update(ss.objective_state, weights, t_aux.model_state, ss.step)
        new_ss = SearchState(weights=weights, model_state=t_aux.model_state, arch=arch,
                             weight_opt_state=weight_opt_state, arch_opt_state=arch_opt_state,
                             hyper_state=res.state, step=ss.step + 1, key=next_key,
                             objective_state=objective_state)
        return new_ss, metrics

    def step(ss: SearchState, batch_train: Batch, batch_val: Batch,
             key: jax.Array | None = None) -> tuple[SearchState, dict[str, jax.Array]]:
        loss_train, loss_val, next_key = losses(ss, key)
        args, kwargs = estimator_args(ss, batch_train, batch_val, loss_train, loss_val)
        res = hypergradient.compute(*args, **kwargs)
        return apply_result(ss, res, batch_train, batch_val, loss_train, loss_val, next_key)

    step.stages = None
    staged = hypergradient.staged
    if staged is not None:
        def problem(ss, batch_train, batch_val, key):
            loss_train, loss_val, next_key = losses(ss, key)
            args, kwargs = estimator_args(ss, batch_train, batch_val, loss_train, loss_val)
            return hypergradient.bind(*args, **kwargs), next_key

        def prepare(ss: SearchState, batch_train: Batch, batch_val: Batch, key: jax.Array | None = None) -> PyTree:
            return staged.prepare(problem(ss, batch_train, batch_val, key)[0])

        def iterate(ss: SearchState, batch_train: Batch, batch_val: Batch, key: jax.Array | None,
                    carry: PyTree) -> PyTree:
            return staged.iterate(problem(ss, batch_train, batch_val, key)[0], carry)

        def finish(ss: SearchState, batch_train: Batch, batch_val: Batch, key: jax.Array | None,
                   carry: PyTree) -> tuple[SearchState, dict[str, jax.Array]]:
            pr, next_key = problem(ss, batch_train, batch_val, key)
            res = staged.finish(pr, carry)
            return apply_result(ss, res, batch_train, batch_val, pr.loss_train, pr.loss_val, next_key)

        step.stages = StepStages(prepare, iterate, finish, staged.converged, staged.max_iterations)
    return step
