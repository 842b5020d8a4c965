"""One first-order weight step of the DARTS supernet (C=16, 8 layers, batch 32, 32x32), jitted,
against the original PyTorch code (quark0/darts ``cnn/model_search.py``) on the same CPU.

    python benchmarks/bench_supernet.py --torch-ref /work/refcode/darts/cnn [--steps 3]

Prints step times, ``ratio torch/jax = R`` and, when ``diffnas_jax.spaces.nb201`` exists, the
NB201 supernet (C=16, N=5) step time and its compiled peak temporary memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import optax

TORCH_SCRIPT = textwrap.dedent("""
    import sys, time, json, statistics
    import torch, torch.nn as nn
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    sys.path.insert(0, sys.argv[1])
    from model_search import Network
    torch.set_num_threads(int(sys.argv[3]))
    torch.manual_seed(0)
    crit = nn.CrossEntropyLoss()
    model = Network(16, 10, 8, crit)
    opt = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    x = torch.randn(32, 3, 32, 32); y = torch.randint(0, 10, (32,))
    times = []
    for _ in range(int(sys.argv[2]) + 1):
        t = time.perf_counter()
        opt.zero_grad(); loss = model._loss(x, y); loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0); opt.step()
        times.append(time.perf_counter() - t)
    print(json.dumps({"median": statistics.median(times[1:])}))
""")


def jax_darts_step(steps: int):
    from diffnas_jax.spaces import darts

    sp = darts.search_space(C=16, layers=8)
    x = jax.random.normal(jax.random.key(0), (32, 32, 32, 3), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (32,), 0, 10)
    w, s = sp.init(jax.random.key(2), x)
    arch = sp.init_arch(jax.random.key(3))
    return _time_step(sp, w, s, arch, x, y, steps)


def _time_step(sp, w, s, arch, x, y, steps):
    tx = optax.chain(optax.clip_by_global_norm(5.0), optax.add_decayed_weights(3e-4), optax.sgd(0.025, 0.9))
    opt = tx.init(w)

    def step(w, s, opt, arch, x, y):
        mix = jax.tree_util.tree_map(lambda a: jax.nn.softmax(a, -1), arch)

        def loss_fn(w):
            logits, ns = sp.apply(w, s, mix, x, True)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y]), ns

        (loss, ns), g = jax.value_and_grad(loss_fn, has_aux=True)(w)
        upd, opt = tx.update(g, opt, w)
        return optax.apply_updates(w, upd), ns, opt, loss

    t = time.perf_counter()
    compiled = jax.jit(step).lower(w, s, opt, arch, x, y).compile()
    compile_s = time.perf_counter() - t
    try:
        mem = compiled.memory_analysis()
        peak = getattr(mem, "temp_size_in_bytes", 0) + getattr(mem, "argument_size_in_bytes", 0)
    except Exception:  # pragma: no cover - backend dependent
        peak = -1
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        w, s, opt, loss = compiled(w, s, opt, arch, x, y)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    return {"compile_s": compile_s, "median": statistics.median(times), "peak_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--torch-ref", required=False, help="directory holding quark0/darts cnn/ (model_search.py)")
    ap.add_argument("--torch-python", default="/work/benchvenv/bin/python")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    print(f"device: {jax.devices()[0].device_kind}, cpus: {os.cpu_count()}")
    res = jax_darts_step(args.steps)
    print(f"jax DARTS weight step: {res['median']:.3f} s (compile {res['compile_s']:.1f} s, "
          f"peak {res['peak_bytes'] / 2**20:.0f} MiB)")
    if args.torch_ref:
        ref = args.torch_ref
        if os.path.isdir(os.path.join(ref, "cnn")):
            ref = os.path.join(ref, "cnn")
        out = subprocess.run([args.torch_python, "-c", TORCH_SCRIPT, ref, str(args.steps), str(os.cpu_count())],
                             capture_output=True, text=True, check=True)
        t = json.loads(out.stdout.strip().splitlines()[-1])["median"]
        print(f"torch DARTS weight step: {t:.3f} s")
        print(f"ratio torch/jax = {t / res['median']:.2f}")
    try:
        from diffnas_jax.spaces import nb201
    except ImportError:
        print("nb201 space not available")
        return
    sp = nb201.search_space(C=16, N=5)
    x = jax.random.normal(jax.random.key(0), (32, 32, 32, 3), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (32,), 0, 10)
    w, s = sp.init(jax.random.key(2), x)
    r = _time_step(sp, w, s, sp.init_arch(jax.random.key(3)), x, y, args.steps)
    print(f"jax NB201 (C=16, N=5) weight step: {r['median']:.3f} s (compile {r['compile_s']:.1f} s, "
          f"peak {r['peak_bytes'] / 2**20:.0f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
