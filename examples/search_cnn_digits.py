"""Searching kernel sizes and widths of a small CNN on digits (user-defined search space).

A three-layer CNN written as an ordinary Flax module, where each conv layer is a
``Choice`` among 3x3, 5x5 and 1x1 kernels and each layer's width is a ``WidthChoice`` over
{8, 16, 32}. ``spaces.from_module`` turns it into a search space; the search runs GDAS
(Gumbel hard straight-through, single-path execution: only the sampled kernel is computed per
step) or DARTS, with first-order or implicit hypergradients; ``fix`` then builds the discrete
CNN with only the chosen layers' parameters, which is retrained and tested.

Expected output: a genotype naming one kernel and one width per layer, the discrete model's
parameter count, and test accuracy above 0.9, e.g.
``{"genotype": {"Layer_0/WidthChoice_0": 8, "Layer_0/WidthChoice_0/Choice_0": "conv5x5", ...}, "params": 11698, "test_accuracy": 0.97}``.

    python examples/search_cnn_digits.py [--method gdas|darts] [--hypergrad first_order|implicit]
"""
from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
from _common import digits  # noqa: E402

from diffnas_jax import hypergrad, mixing  # noqa: E402
from diffnas_jax.nn import Choice, WidthChoice  # noqa: E402
from diffnas_jax.search import init_search_state, make_step  # noqa: E402
from diffnas_jax.spaces import from_module  # noqa: E402

WIDTHS = (8, 16, 32)


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x):
        # the width choice owns the conv choice: the supernet builds every kernel at the widest
        # width and masks channels; the fixed model builds only the chosen kernel at the chosen width
        def conv_choice(width):
            return Choice([nn.Conv(width, (3, 3)), nn.Conv(width, (5, 5)), nn.Conv(width, (1, 1))],
                          names=["conv3x3", "conv5x5", "conv1x1"])
        return jax.nn.relu(WidthChoice(WIDTHS, layer=conv_choice)(x))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            x = Layer()(x)
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def main(quick: bool = False, method: str = "gdas", estimator: str = "first_order") -> dict:
    (xtr, ytr), (xte, yte) = digits()
    xtr, xte = jnp.asarray(xtr[..., None]), jnp.asarray(xte[..., None])
    ytr, yte = jnp.asarray(ytr), jnp.asarray(yte)
    n_val = len(xtr) // 2
    (xs, ys), (xv, yv) = (xtr[n_val:], ytr[n_val:]), (xtr[:n_val], ytr[:n_val])
    # quick (the CI test) only has to show the pipeline works: a few search steps and a short
    # retrain at half the batch still give > 0.9 test accuracy on digits
    search_steps, train_steps, batch = (4, 150, 32) if quick else (300, 800, 64)
    space = from_module(CNN(), xs[:2], hard=(method == "gdas"))
    relax = mixing.gdas(total_steps=search_steps) if method == "gdas" else mixing.softmax()
    est = hypergrad.first_order() if estimator == "first_order" else hypergrad.implicit(solver="cg", maxiter=5)
    w_opt, a_opt = optax.adam(3e-3), optax.adam(3e-2)
    step = jax.jit(make_step(space, relax, est, w_opt, a_opt))
    state = init_search_state(jax.random.PRNGKey(0), space, xs[:2], w_opt, a_opt, est)
    for i in range(search_steps):
        k = jax.random.fold_in(jax.random.PRNGKey(1), i)
        it = jax.random.randint(k, (batch,), 0, xs.shape[0])
        iv = jax.random.randint(jax.random.fold_in(k, 1), (batch,), 0, xv.shape[0])
        state, _ = step(state, (xs[it], ys[it]), (xv[iv], yv[iv]))
    genotype = space.genotype(state.arch)

    fixed = space.fix(genotype)
    weights, mstate = fixed.init(jax.random.PRNGKey(2), xtr[:2])
    opt = optax.adam(3e-3)
    ostate = opt.init(weights)

    def xent(w, idx):
        logits = fixed.apply(w, mstate, xtr[idx])[0]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ytr[idx][:, None], -1))

    @jax.jit
    def train(w, s, idx):
        u, s = opt.update(jax.grad(xent)(w, idx), s, w)
        return optax.apply_updates(w, u), s

    for i in range(train_steps):
        weights, ostate = train(weights, ostate, jax.random.randint(jax.random.PRNGKey(10 + i), (batch,), 0, xtr.shape[0]))
    acc = jnp.mean(jnp.argmax(fixed.apply(weights, mstate, xte)[0], -1) == yte)
    params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(weights))
    return {"genotype": genotype, "params": params, "test_accuracy": float(acc)}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="gdas", choices=["gdas", "darts"])
    p.add_argument("--hypergrad", default="first_order", choices=["first_order", "implicit"])
    a = p.parse_args()
    print(main(method=a.method, estimator=a.hypergrad))
