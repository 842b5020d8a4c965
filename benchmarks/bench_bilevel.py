"""Cost of the bilevel search step per hypergradient estimator, and memory of implicit vs unrolled_k.

On the DARTS supernet (default C=16, 8 layers, batch 32, 32x32 inputs, float32, CPU) it times one
full search step of ``diffnas_jax.search.make_step`` (architecture step + weight step, jitted)
for each estimator, in units of one first-order *weight* step (forward, backward, SGD update) of
the same supernet, measured in the same run. The reference (``../shared/BENCHMARKS.md``): the
original PyTorch DARTS code's second-order architecture step costs 4.7x a weight step, so its
full second-order search step 5.7x; the goal for ``unrolled`` with exact HVP is <= 3.5x.

Memory: the compiled peak temporary buffer size (XLA's ``memory_analysis``, no run needed) of the
architecture hypergradient alone for ``implicit`` (CG) and ``unrolled_k`` with k = 1, 5, 20.
``implicit`` does not depend on any k; ``unrolled_k`` with ``jax.checkpoint`` stores the k
weight/optimizer carries.

    python benchmarks/bench_bilevel.py                      # the issue's configuration (slow compiles)
    python benchmarks/bench_bilevel.py --C 8 --layers 5     # smaller supernet
    python benchmarks/bench_bilevel.py --quick              # C=4, 3 layers, 16x16, batch 8
    python benchmarks/bench_bilevel.py --C 8 --layers 3 --batch 16 --size 16 --memory-only

Prints one line per estimator: compile seconds, median step seconds and the ratio to the weight
step, then the memory table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

from diffnas_jax import hypergrad, relaxations
from diffnas_jax.search import init_search_state, make_step
from diffnas_jax.spaces import darts


#: the original PyTorch DARTS code's full search step in weight-step units (../shared/BENCHMARKS.md:
#: weight step 7.8 s, first-order arch step 7.5 s, second-order arch step 37.2 s)
REFERENCE_RATIOS = {
    "first_order": "(PyTorch DARTS: 1.96x)",
    "unrolled_fd": "(PyTorch DARTS second order: 5.7x)",
    "unrolled_exact": "(goal <= 3.5x; PyTorch DARTS second order: 5.7x)",
}


def _median_time(fn, args, repeats):
    out = fn(*args)
    jax.block_until_ready(out)  # warm-up (after compilation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _compile(fn, *args):
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t


def _peak_bytes(compiled) -> int:
    try:
        mem = compiled.memory_analysis()
        return int(mem.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - backend dependent
        return -1


def estimators(cg_iters: int):
    eta = 0.025
    return {
        "first_order": hypergrad.first_order(),
        "unrolled_fd": hypergrad.unrolled(eta, weight_decay=3e-4, momentum=0.9, hvp="finite_difference"),
        "unrolled_exact": hypergrad.unrolled(eta, weight_decay=3e-4, momentum=0.9, hvp="exact"),
        f"implicit_cg{cg_iters}": hypergrad.implicit("cg", maxiter=cg_iters, damping=1e-2),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--C", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cg-iters", type=int, default=10)
    p.add_argument("--only", default="", help="comma-separated estimator names (default: all)")
    p.add_argument("--ks", default="1,5,20", help="unrolled_k depths for the memory table ('' skips it)")
    p.add_argument("--memory-only", action="store_true", help="print only the memory table")
    p.add_argument("--quick", action="store_true", help="C=4, 3 layers, 16x16, batch 8, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.C, args.layers, args.size, args.batch, args.repeats = 4, 3, 16, 8, 1

    space = darts.search_space(C=args.C, layers=args.layers)
    x = jax.random.normal(jax.random.key(0), (2 * args.batch, args.size, args.size, 3), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (2 * args.batch,), 0, 10)
    bt, bv = (x[: args.batch], y[: args.batch]), (x[args.batch:], y[args.batch:])
    w_opt = optax.chain(optax.clip_by_global_norm(5.0), optax.add_decayed_weights(3e-4), optax.sgd(0.025, 0.9))
    a_opt = optax.adamw(3e-4, b1=0.5, b2=0.999, weight_decay=1e-3)
    relax = relaxations.softmax()
    print(f"# DARTS supernet C={args.C}, {args.layers} layers, batch {args.batch}, {args.size}x{args.size}, "
          f"float32, device {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)

    ss = init_search_state(jax.random.key(2), space, bt[0], w_opt, a_opt)
    if not args.memory_only:
        _timing_rows(args, space, relax, ss, bt, bv, w_opt, a_opt)
    ks = [int(k) for k in args.ks.split(",") if k]
    if ks:
        _memory_table(args, space, relax, ss, bt, bv, ks)
    return 0


def _timing_rows(args, space, relax, ss, bt, bv, w_opt, a_opt):
    # the unit: one first-order weight step of the same supernet
    mix = relax(ss.arch, jax.random.key(3), 0)

    def weight_step(w, s, opt_state, xb, yb):
        def loss(w_):
            logits, ns = space.apply(w_, s, mix, xb, True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), ns

        (l, ns), g = jax.value_and_grad(loss, has_aux=True)(w)
        upd, opt_state = w_opt.update(g, opt_state, w)
        return optax.apply_updates(w, upd), ns, opt_state, l

    compiled, c_s = _compile(weight_step, ss.weights, ss.model_state, ss.weight_opt_state, *bt)
    unit = _median_time(compiled, (ss.weights, ss.model_state, ss.weight_opt_state, *bt), args.repeats)
    print(f"weight step (unit)    compile {c_s:7.1f} s   step {unit:8.3f} s   ratio 1.00", flush=True)

    chosen = [n for n in args.only.split(",") if n] or None
    for name, est in estimators(args.cg_iters).items():
        if chosen and name not in chosen:
            continue
        state = init_search_state(jax.random.key(2), space, bt[0], w_opt, a_opt, est)
        step = make_step(space, relax, est, w_opt, a_opt)
        key = jax.random.key(4)
        compiled, c_s = _compile(step, state, bt, bv, key)
        t = _median_time(compiled, (state, bt, bv, key), args.repeats)
        ref = REFERENCE_RATIOS.get(name.split("_cg")[0], "")
        print(f"{name:20s}  compile {c_s:7.1f} s   step {t:8.3f} s   ratio {t / unit:5.2f}  {ref}", flush=True)
        # the DARTS programs take GBs of host memory each once compiled; keeping them all made
        # the memory table's compiles run out of memory on a 24 GB machine
        del compiled
        jax.clear_caches()


def _memory_table(args, space, relax, ss, bt, bv, ks):
    # memory of the architecture hypergradient alone (no optimizer), compiled, not run
    def loss(w, a, batch):
        m = relax(a, jax.random.key(5), 0)
        logits, _ = space.apply(w, ss.model_state, m, batch[0], True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    print("\n| estimator | compiled peak temporary memory (MiB) | compile s |\n|---|---|---|", flush=True)
    rows = [(f"implicit cg{args.cg_iters}", hypergrad.implicit("cg", maxiter=args.cg_iters, damping=1e-2))]
    rows += [(f"unrolled_k k={k}", hypergrad.unrolled_k(k, optax.sgd(0.025, momentum=0.9))) for k in ks]
    for name, est in rows:
        compiled, c_s = _compile(lambda w, a, b1, b2, e=est: e(loss, loss, w, a, b1, b2), ss.weights, ss.arch, bt, bv)
        print(f"| {name} | {_peak_bytes(compiled) / 2**20:.1f} | {c_s:.0f} |", flush=True)
        del compiled
        jax.clear_caches()


if __name__ == "__main__":
    sys.exit(main())
