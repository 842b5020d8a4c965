"""A toy search space with the NB201 arch shape that compiles in seconds (shared by tests)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ToyCellSpace:
    """NB201-shaped toy space: a 4-node cell over ``d``-dim features; ops none, skip, linear,
    tanh-linear, neighbour average; a running-mean state updated in train mode."""

    d: int = 8
    num_classes: int = 10
    op_names: tuple = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")

    def init(self, key, x):
        ks = jax.random.split(key, 4)
        n_in = int(np.prod(x.shape[1:]))
        return ({"stem": jax.random.normal(ks[0], (n_in, self.d)) / np.sqrt(n_in),
                 "w1": jax.random.normal(ks[1], (6, self.d, self.d)) / np.sqrt(self.d),
                 "w3": jax.random.normal(ks[2], (6, self.d, self.d)) / np.sqrt(self.d),
                 "head": jax.random.normal(ks[3], (self.d, self.num_classes)) / np.sqrt(self.d)},
                {"mean": jnp.zeros((self.d,))})

    def init_arch(self, key):
        return {"cell": 1e-3 * jax.random.normal(key, (6, 5))}

    def candidate_names(self, leaf):
        return self.op_names

    def topology_groups(self):
        return {}

    def apply(self, weights, state, mix, x, train, *, rng=None):
        m = mix["cell"].astype(x.dtype)
        nodes = [x.reshape(x.shape[0], -1) @ weights["stem"]]
        e = 0
        for i in range(1, 4):
            acc = 0.0
            for j in range(i):
                h = nodes[j]
                ops = (jnp.zeros_like(h), h, h @ weights["w1"][e], jnp.tanh(h @ weights["w3"][e]),
                       0.5 * (h + jnp.roll(h, 1, axis=-1)))
                acc = acc + sum(m[e, k] * o for k, o in enumerate(ops))
                e += 1
            nodes.append(acc)
        out = nodes[-1]
        mean = jnp.mean(out, axis=0) if train else state["mean"]
        new_state = {"mean": 0.9 * state["mean"] + 0.1 * jax.lax.stop_gradient(mean)} if train else state
        return (out - mean) @ weights["head"], new_state

    def genotype(self, arch):
        return tuple(self.op_names[int(i)] for i in np.argmax(np.asarray(arch["cell"]), -1))
