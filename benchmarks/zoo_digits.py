"""A short search of every method of the zoo on the NAS-Bench-201 space with the digits data.

Same budget for every method: the same supernet (NB201, C and N below), the same data split
(scikit-learn digits, 8x8 grey images; half of the training part for the weights, half for the
architecture), the same number of steps and batch size, the same seed. Each method uses its
registry defaults (diffnas_jax.methods) except that every architecture learning rate is
multiplied by ``--arch-lr-scale`` (the papers' 3e-4 moves the logits by ~0.1 in a few hundred
steps; the papers take ~20k) and warm-up epochs are scaled to the shorter search.

Prints a markdown table: method, resulting genotype (NB201 arch string), number of
parameter-free ops (skip/pool/none) in the cell, mean softmax weight of skip_connect at the start
and the end (the drift DARTS is known for: Zela et al. 2020, Dong & Yang 2020), supernet
validation accuracy, and the cell's FLOPs/params in the NB201 evaluation network (C=16, N=5, 32x32).

Run:  .venv/bin/python benchmarks/zoo_digits.py [--epochs 30] [--methods darts,gdas]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if "--fast-compile" in sys.argv:
    # XLA's CPU back end at optimisation level 0 compiles the NB201 search step ~2.4x faster
    # (53 s instead of 127 s on the loaded 2-core development machine); steps run slower, but
    # a short search is compile-bound. Must be set before jax is imported.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                               " --xla_llvm_disable_expensive_passes=true").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from diffnas_jax import cost, methods, regularizers, select  # noqa: E402
from diffnas_jax.data.batching import epoch_batches  # noqa: E402
from diffnas_jax.data.digits import load_digits_splits  # noqa: E402
from diffnas_jax.search import init_search_state, loop, make_step  # noqa: E402
from diffnas_jax.spaces import nb201  # noqa: E402

DEFAULT_METHODS = ("darts", "darts_2nd", "gdas", "snas", "fbnet", "drnas", "fairdarts", "sparsemax", "small_temp",
                   "maxw", "proxyless", "rarts", "sddarts", "darts_implicit", "darts_pt")


def _relaxation(m, total_steps, steps_per_epoch):
    """The method's relaxation; schedules get the search length."""
    return m.relaxation(total_steps=total_steps, steps_per_epoch=steps_per_epoch)


def _objective(m, space, input_shape):
    """The method's loss as the search step's objective (FBNet multiplicative, ProxylessNAS
    additive relative cost, FairDARTS zero-one, SD-DARTS teachers) with the space's FLOPs."""
    term = m.regularizer() if m.regularizer.module else None
    return regularizers.as_objective(term, space=space, input_shape=input_shape)


def run_method(name, data, args, space):
    base = "darts" if name == "darts_pt" else name
    m = methods.get_method(base)
    steps_per_epoch = len(data.y_train) // args.batch
    total = args.epochs * steps_per_epoch
    relax = _relaxation(m, total, steps_per_epoch)
    est = m.hypergrad_factory()
    w_opt = m.weight_optimizer(total)
    warm = int(round(total * m.warmup_epochs / m.epochs))
    a_opt = optax.chain(m.arch_optimizer(), optax.scale(args.arch_lr_scale),
                        optax.scale_by_schedule(lambda s: (s >= warm).astype(jnp.float32)))
    objective = _objective(m, space, data.x_train.shape[1:])
    step = jax.jit(loop.with_finiteness_flags(make_step(space, relax, est, w_opt, a_opt, objective=objective)))
    x0 = jnp.asarray(data.x_train[: args.batch])
    ss = init_search_state(jax.random.PRNGKey(args.seed), space, x0, w_opt, a_opt, est, objective)
    skip = space.op_names.index("skip_connect")
    skip_w = lambda a: float(jnp.mean(jax.nn.softmax(a["cell"], -1)[:, skip]))  # noqa: E731
    skip0 = skip_w(ss.arch)
    def batches():
        for epoch in range(args.epochs):
            tr = epoch_batches(data.x_train, data.y_train, args.batch, seed=args.seed, epoch=epoch)
            va = epoch_batches(data.x_val, data.y_val, args.batch, seed=args.seed + 1, epoch=epoch)
            for (xt, yt), (xv, yv) in zip(tr, va):
                yield (jnp.asarray(xt), jnp.asarray(yt)), (jnp.asarray(xv), jnp.asarray(yv))

    t0 = time.time()
    # the library loop: stops with status "diverged" on the first non-finite step
    res = loop.run_search(lambda s, b, i: step(s, *b), ss, batches())
    if res.status != "complete":
        raise RuntimeError(res.divergence.message())
    ss = res.state
    seconds = time.time() - t0
    val_batches = [(jnp.asarray(x), jnp.asarray(y)) for x, y in
                   epoch_batches(data.x_val, data.y_val, 128, seed=0, epoch=0, shuffle=False, drop_last=True)]
    mix = relax(ss.arch, jax.random.PRNGKey(1), ss.step)
    correct = sum(int(jnp.sum(jnp.argmax(space.apply(ss.weights, ss.model_state, mix, x, False)[0], -1) == y))
                  for x, y in val_batches)
    acc = correct / sum(len(y) for _, y in val_batches)
    if name == "darts_pt":
        res = select.perturbation(space, ss.weights, ss.model_state, ss.arch, relax, val_batches,
                                  key=jax.random.PRNGKey(2), edge_order="random")
        genotype = res.genotype
    elif m.selector.name == "threshold":
        genotype = m.selector.bind()(space, ss.arch).genotype
    else:
        genotype = m.selector.bind()(space, ss.arch)
    ops = space.parse_arch_string(genotype)
    free = sum(op in ("none", "skip_connect", "avg_pool_3x3") for op in ops)
    c = cost.network_cost(nb201.search_space(C=16, N=5), genotype, (32, 32, 3))
    return dict(method=name, genotype=genotype, free=free, skip0=skip0, skip1=skip_w(ss.arch), acc=acc,
                mflops=c.flops / 1e6, mparams=c.params / 1e6, seconds=seconds, steps=int(ss.step))


def methods_table() -> str:
    """The registry as a markdown table (name, relaxation, estimator, optimisers, extras, paper)."""
    rows = ["| method | relaxation | hypergradient | arch Adam lr / betas / wd | weight SGD lr / wd | "
            "extras | paper |", "|---|---|---|---|---|---|---|"]
    for name in methods.list_methods():
        m = methods.get_method(name)
        extras = []
        if m.default_space != "darts":
            extras.append(f"{m.default_space} space")
        if m.space_kwargs:
            extras.append(", ".join(f"{k}={v}" for k, v in m.space_kwargs.items()))
        if m.warmup_epochs:
            extras.append(f"warm-up {m.warmup_epochs} ep")
        if m.regularizer.module:
            extras.append(repr(m.regularizer))
        if m.selector.name != "argmax":
            extras.append(f"select {m.selector!r}")
        if m.weight_schedule_power > 1:
            extras.append(f"cosine power annealing p={m.weight_schedule_power:g}")
        extras.append(f"{m.epochs} ep, batch {m.batch_size}")
        rows.append(f"| {name} | {m.relaxation_factory!r} | {m.hypergrad_factory!r} | "
                    f"{m.arch_lr:g} / {tuple(m.arch_betas)} / {m.arch_weight_decay:g} | "
                    f"{m.weight_lr:g} / {m.weight_weight_decay:g} | {'; '.join(extras)} | {m.paper} |")
    return "\n".join(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--C", type=int, default=8)
    p.add_argument("--N", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch-lr-scale", type=float, default=10.0)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--table-only", action="store_true", help="print the method registry table and exit")
    p.add_argument("--fast-compile", action="store_true", help="XLA CPU optimisation level 0 (faster compiles)")
    args = p.parse_args()
    if args.table_only:
        print(methods_table())
        return
    data = load_digits_splits(args.seed)
    space = nb201.search_space(C=args.C, N=args.N, num_classes=10)
    print(f"# NB201 C={args.C} N={args.N} on digits ({len(data.y_train)} train / {len(data.y_val)} val), "
          f"{args.epochs} epochs x {len(data.y_train) // args.batch} steps, batch {args.batch}, "
          f"arch lr x{args.arch_lr_scale}, seed {args.seed}, device {jax.devices()[0].platform}")
    print("| method | genotype | param-free ops | skip weight start -> end | supernet val acc | "
          "MFLOPs / M params (C=16, N=5, 32x32) | search s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.methods.split(","):
        try:
            r = run_method(name.strip(), data, args, space)
        except Exception as e:  # noqa: BLE001 - report and go on with the other methods
            print(f"| {name} | failed: {type(e).__name__}: {str(e)[:120]} | | | | | |", flush=True)
            continue
        print(f"| {r['method']} | `{r['genotype']}` | {r['free']}/6 | {r['skip0']:.3f} -> {r['skip1']:.3f} | "
              f"{r['acc']:.3f} | {r['mflops']:.1f} / {r['mparams']:.3f} | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
