"""Differentiable k-nearest neighbours with NeuralSort on digits (Grover et al., ICLR 2019).

An embedding MLP is trained so that, for each query, the relaxed top-k of its candidates
(NeuralSort permutation matrix of the negative distances, first k rows) puts mass on
candidates of the same class. At test time a plain kNN classifier runs in the learned
embedding. Expected output: test accuracy well above chance (10 %), typically above 0.9,
e.g. ``{'knn_accuracy': 0.95, 'chance': 0.1}``.

    python examples/neuralsort_knn_digits.py
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
from _common import digits  # noqa: E402

from diffnas_jax.relax import neural_sort  # noqa: E402


def embed(params, x):
    h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    return h @ params["w2"]


def main(quick: bool = False, k: int = 5) -> dict:
    (xtr, ytr), (xte, yte) = digits()
    steps = 150 if quick else 600
    n_query, n_cand = 32, 64
    key = jax.random.PRNGKey(0)
    k1, k2 = jax.random.split(key)
    params = {"w1": jax.random.normal(k1, (64, 64)) * 0.125, "b1": jnp.zeros(64),
              "w2": jax.random.normal(k2, (64, 16)) * 0.125}
    opt = optax.adam(1e-3)
    state = opt.init(params)
    xtr_j, ytr_j = jnp.asarray(xtr), jnp.asarray(ytr)

    def loss(p, q_idx, c_idx):
        eq, ec = embed(p, xtr_j[q_idx]), embed(p, xtr_j[c_idx])
        dist = jnp.sum((eq[:, None, :] - ec[None, :, :]) ** 2, -1)  # (Q, C)
        perm = neural_sort(-dist, temperature=1.0)  # rows: soft "i-th nearest"
        topk = perm[:, :k, :].sum(1)  # soft membership of each candidate in the k nearest
        same = (ytr_j[q_idx][:, None] == ytr_j[c_idx][None, :]).astype(dist.dtype)
        return -jnp.mean(jnp.sum(topk * same, -1)) / k

    @jax.jit
    def step(p, s, key):
        kq, kc = jax.random.split(key)
        q = jax.random.choice(kq, len(xtr), (n_query,), replace=False)
        c = jax.random.choice(kc, len(xtr), (n_cand,), replace=False)
        g = jax.grad(loss)(p, q, c)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    for i in range(steps):
        params, state = step(params, state, jax.random.fold_in(key, i))
    etr, ete = np.asarray(embed(params, xtr_j)), np.asarray(embed(params, jnp.asarray(xte)))
    d = ((ete[:, None, :] - etr[None, :, :]) ** 2).sum(-1)
    nearest = np.argsort(d, axis=1)[:, :k]
    votes = np.apply_along_axis(lambda r: np.bincount(r, minlength=10).argmax(), 1, ytr[nearest])
    return {"knn_accuracy": float(np.mean(votes == yte)), "chance": 0.1}


if __name__ == "__main__":
    print(main())
