"""Gradient-based search of a categorical architecture distribution against a table.

A table is not differentiable in the architecture, so the distribution's logits get the
score-function (REINFORCE) gradient with a moving-average baseline (Williams 1992; as used for
NAS by ENAS, Pham et al. 2018, and for the architecture distribution of SNAS / ProxylessNAS when
the objective is non-differentiable). Queries count distinct architectures, as for the discrete
strategies, so the result is a :class:`~diffnas_jax.baselines.History` comparable with them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffnas_jax._checks import check_choice, check_int_in_range, check_positive
from diffnas_jax.baselines.codec import CategoricalCodec
from diffnas_jax.baselines.strategies import Evaluator, History, _Queries


def reinforce_search(codec: CategoricalCodec, evaluate: Evaluator, budget: int, key: jax.Array, *,
                     metric: str = "accuracy", mode: str = "max", learning_rate: float = 0.2,
                     batch_size: int = 4, baseline_decay: float = 0.9, max_samples: int | None = None) -> History:
    """Optimise independent categorical logits (one per decision) by REINFORCE against ``evaluate``.

    Each round samples ``batch_size`` architectures from ``softmax(logits)``, queries them
    (cached repeats are free), and takes an Adam step on ``-E[(value - baseline) log p(arch)]``.
    Stops after ``budget`` distinct queries (or ``max_samples`` draws, default ``50 * budget``).
    """
    check_int_in_range("budget", budget, 1, 10**9)
    check_int_in_range("batch_size", batch_size, 1, 10**6)
    check_positive("learning_rate", learning_rate)
    check_choice("mode", mode, ("max", "min"))
    ev = _Queries(codec, evaluate, budget, metric, mode)
    width = max(codec.cardinalities)
    # one padded (D, width) logit table; impossible options masked to -inf
    valid = np.arange(width)[None, :] < np.asarray(codec.cardinalities)[:, None]
    logits = jnp.zeros((len(codec.cardinalities), width))
    mask = jnp.where(jnp.asarray(valid), 0.0, -jnp.inf)
    opt = optax.adam(learning_rate)
    opt_state = opt.init(logits)

    @jax.jit
    def sample(k, logits):
        return jax.random.categorical(k, logits + mask, axis=-1, shape=(batch_size, logits.shape[0]))

    @jax.jit
    def update(logits, opt_state, points, advantages):
        def loss(l):
            logp = jax.nn.log_softmax(l + mask, axis=-1)
            lp = jnp.take_along_axis(logp[None], points[..., None], axis=-1)[..., 0].sum(-1)
            return -jnp.mean(advantages * lp)

        g = jax.grad(loss)(logits)
        u, opt_state = opt.update(g, opt_state, logits)
        return optax.apply_updates(logits, u), opt_state

    baseline = None
    draws, limit = 0, max_samples if max_samples is not None else 50 * budget
    step = 0
    while not ev.exhausted and draws < limit:
        pts = np.asarray(sample(jax.random.fold_in(key, step), logits))
        vals = []
        for p in pts:
            vals.append(ev(tuple(int(v) for v in p)))
            if ev.exhausted:
                break
        pts, vals = pts[: len(vals)], np.asarray(vals, np.float64)
        draws += len(vals)
        finite = np.isfinite(vals)
        vals = np.where(finite, vals, np.min(vals[finite]) if finite.any() else 0.0)
        if baseline is None:
            baseline, scale = vals.mean(), vals.std() + 1e-8
        baseline = baseline_decay * baseline + (1 - baseline_decay) * vals.mean()
        scale = baseline_decay * scale + (1 - baseline_decay) * (vals.std() + 1e-8)
        # normalised advantages: the step size does not depend on the metric's units
        adv = jnp.asarray((vals - baseline) / scale, jnp.float32)
        logits, opt_state = update(logits, opt_state, jnp.asarray(pts), adv)
        step += 1
    return ev.history
