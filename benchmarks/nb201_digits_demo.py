"""Zero-cost proxies and discrete search strategies on digits with the NB201 space.

    python benchmarks/nb201_digits_demo.py [--archs 30] [--epochs 4] [--budget 20] [--seeds 3]

1. ``--archs`` random NB201 cells are scored by every zero-cost proxy at initialisation and then
   trained from scratch; the script prints Kendall tau / Spearman rho of each proxy with the
   trained test accuracy.
2. Random search, local search and regularised evolution, each with ``--budget`` trained
   architectures (objective: validation accuracy), over ``--seeds`` seeds; the script prints the
   test accuracy of each strategy's best-by-validation architecture.

Training a discrete cell here uses the NB201 supernet with the cell's one-hot mixing weights:
the function computed is exactly the discrete network's (ops with mix 0 contribute nothing and
receive no gradient), and since the mix is a run-time input the training step compiles once for
all architectures instead of once per cell.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffnas_jax.baselines import local_search, nb201_codec, random_search, regularized_evolution
from diffnas_jax.data import load_dataset
from diffnas_jax.proxies import PROXIES, get_proxy, kendall_tau, spearman_rho
from diffnas_jax.spaces import nb201


def make_trainer(space, ds, epochs: int, batch_size: int = 64, lr: float = 0.05):
    x_tr, y_tr = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    steps_per_epoch = len(y_tr) // batch_size
    sched = optax.cosine_decay_schedule(lr, epochs * steps_per_epoch)
    opt = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(sched, momentum=0.9))

    def xent(w, s, mix, x, y):
        logits, s = space.apply(w, s, mix, x, True)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1)), s

    @jax.jit
    def train(mix, key):
        w, s = space.init(jax.random.PRNGKey(0), x_tr[:2])
        o = opt.init(w)

        def step(carry, idx):
            w, s, o = carry
            (_, s), g = jax.value_and_grad(xent, has_aux=True)(w, s, mix, x_tr[idx], y_tr[idx])
            u, o = opt.update(g, o, w)
            return (optax.apply_updates(w, u), s, o), None

        perms = jax.vmap(lambda k: jax.random.permutation(k, len(y_tr))[: steps_per_epoch * batch_size])(
            jax.random.split(key, epochs)).reshape(-1, batch_size)
        (w, s, _), _ = jax.lax.scan(step, (w, s, o), perms)
        return w, s

    @jax.jit
    def accuracy(w, s, mix, x, y):
        return jnp.mean(jnp.argmax(space.apply(w, s, mix, x, False)[0], -1) == y)

    return train, accuracy


def onehot_mix(space, genotype):
    arch = space.arch_from_genotype(genotype)
    return jax.tree_util.tree_map(lambda a: jax.nn.one_hot(jnp.argmax(a, -1), a.shape[-1]), arch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", type=int, default=30)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--budget", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    ds = load_dataset("digits", seed=0)
    space = nb201.search_space(C=8, N=1, num_classes=ds.num_classes)
    codec = nb201_codec()
    train, accuracy = make_trainer(space, ds, args.epochs)

    @functools.lru_cache(maxsize=None)
    def evaluate(genotype: str) -> dict:
        mix = onehot_mix(space, genotype)
        w, s = train(mix, jax.random.PRNGKey(1))
        return {"val_accuracy": float(accuracy(w, s, mix, jnp.asarray(ds.x_val), jnp.asarray(ds.y_val))),
                "test_accuracy": float(accuracy(w, s, mix, jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)))}

    # 1. proxies vs trained accuracy
    rng = np.random.default_rng(0)
    genotypes = [codec.decode(codec.random(rng)) for _ in range(args.archs)]
    xb, yb = jnp.asarray(ds.x_train[:64]), jnp.asarray(ds.y_train[:64])
    w0, s0 = space.init(jax.random.PRNGKey(0), xb[:2])
    scores = {n: [] for n in PROXIES}
    t0 = time.perf_counter()
    for g in genotypes:
        mix = onehot_mix(space, g)
        apply_fn = lambda w, x, mix=mix: space.apply(w, s0, mix, x, True)[0]  # noqa: E731
        for n in PROXIES:
            scores[n].append(float(get_proxy(n)(apply_fn, w0, (xb, yb))))
    acc = [evaluate(g)["test_accuracy"] for g in genotypes]
    print(f"{args.archs} random NB201 cells on digits ({args.epochs} epochs each, {time.perf_counter() - t0:.0f} s); "
          f"test accuracy mean {np.mean(acc):.3f}, min {np.min(acc):.3f}, max {np.max(acc):.3f}")
    print(f"{'proxy':10s} {'kendall':>8s} {'spearman':>9s}")
    for n in PROXIES:
        s = np.nan_to_num(np.asarray(scores[n]), neginf=-1e300, posinf=1e300)
        print(f"{n:10s} {kendall_tau(s, acc):8.3f} {spearman_rho(s, acc):9.3f}")

    # 2. strategies at equal budget
    print(f"\nstrategies, budget {args.budget} trained cells, {args.seeds} seeds (test accuracy of best-by-val)")
    for name, fn in (("random", random_search), ("local_search", local_search), ("evolution", regularized_evolution)):
        kw = {"num_init": 5} if name == "local_search" else {"population_size": 8, "sample_size": 3} if name == "evolution" else {}
        tests = []
        for seed in range(args.seeds):
            h = fn(codec, evaluate, args.budget, jax.random.PRNGKey(seed), metric="val_accuracy", **kw)
            tests.append(h.best[1]["test_accuracy"])
        print(f"{name:13s} mean {np.mean(tests):.4f}  per seed {[round(t, 4) for t in tests]}")


if __name__ == "__main__":
    main()
