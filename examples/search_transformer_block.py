"""Searching inside a tiny Transformer: attention vs. MLP vs. identity per layer.

A user-defined search space (``diffnas_jax.nn.Choice`` + ``spaces.from_module``): a 2-layer
residual Transformer over sequences of 8 tokens where every layer is a choice among
self-attention, a position-wise MLP and the identity. The synthetic task needs information to
move between positions: the label of every position is the token at position 0 ("broadcast the
first token"). Position-wise MLPs cannot do that, so a working search must put attention in at
least one layer. DARTS (softmax relaxation, first-order hypergradient) on a train/val split,
then the discrete model is built with ``fix`` and retrained from scratch.

Expected output: at least one layer chooses ``attention`` and the retrained discrete model
reaches high accuracy (> 0.9; chance is 1/16), e.g.
``{'genotype': {'Block_0/Choice_0': 'attention', 'Block_1/Choice_0': 'mlp'}, 'test_accuracy': 0.99}``.

    python examples/search_transformer_block.py
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diffnas_jax import hypergrad, mixing
from diffnas_jax.nn import Choice
from diffnas_jax.search import init_search_state, make_step
from diffnas_jax.search.objective import standard
from diffnas_jax.spaces import from_module

VOCAB, LENGTH, DIM = 16, 8, 32


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=DIM)(x, x)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(DIM)(jax.nn.gelu(nn.Dense(2 * DIM)(x)))


def identity(x):
    return jnp.zeros_like(x)  # the residual branch adds nothing: the layer is skipped


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        return x + Choice([Attention(), MLP(), identity], names=["attention", "mlp", "identity"])(h)


class TinyTransformer(nn.Module):
    layers: int = 2

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCAB, DIM)(tokens) + self.param("pos", nn.initializers.normal(0.02), (LENGTH, DIM))
        for _ in range(self.layers):
            x = Block()(x)
        return nn.Dense(VOCAB)(nn.LayerNorm()(x))  # (batch, length, vocab)


def make_data(key, n):
    tokens = jax.random.randint(key, (n, LENGTH), 0, VOCAB)
    return tokens, jnp.repeat(tokens[:, :1], LENGTH, axis=1)


def seq_xent(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))


def main(quick: bool = False) -> dict:
    search_steps, train_steps, batch = (80, 150, 32) if quick else (400, 800, 64)
    (xtr, ytr), (xva, yva), (xte, yte) = (make_data(jax.random.PRNGKey(i), n) for i, n in enumerate((2048, 2048, 512)))
    model = TinyTransformer()
    space = from_module(model, xtr[:2])
    w_opt, a_opt = optax.adam(3e-3), optax.adam(3e-2)
    est = hypergrad.first_order()
    step = jax.jit(make_step(space, mixing.softmax(), est, w_opt, a_opt, objective=standard(seq_xent)))
    state = init_search_state(jax.random.PRNGKey(0), space, xtr[:2], w_opt, a_opt, est)
    for i in range(search_steps):
        k = jax.random.fold_in(jax.random.PRNGKey(1), i)
        it = jax.random.randint(k, (batch,), 0, xtr.shape[0])
        iv = jax.random.randint(jax.random.fold_in(k, 1), (batch,), 0, xva.shape[0])
        state, _ = step(state, (xtr[it], ytr[it]), (xva[iv], yva[iv]))
    genotype = space.genotype(state.arch)

    fixed = space.fix(genotype)
    weights, mstate = fixed.init(jax.random.PRNGKey(2), xtr[:2])
    opt = optax.adam(3e-3)
    ostate = opt.init(weights)

    @jax.jit
    def train(w, s, idx):
        g = jax.grad(lambda w_: seq_xent(fixed.apply(w_, mstate, xtr[idx])[0], ytr[idx]))(w)
        u, s = opt.update(g, s, w)
        return optax.apply_updates(w, u), s

    for i in range(train_steps):
        weights, ostate = train(weights, ostate, jax.random.randint(jax.random.PRNGKey(10 + i), (batch,), 0, xtr.shape[0]))
    acc = jnp.mean(jnp.argmax(fixed.apply(weights, mstate, xte)[0], -1) == yte)
    return {"genotype": genotype, "test_accuracy": float(acc)}


if __name__ == "__main__":
    print(main())
