"""Compile time, step time and memory of one first-order weight step of the DARTS and NB201
supernets, jitted, side by side with the original PyTorch code on the same CPU in the same run.

    python benchmarks/bench_supernet.py --torch-ref /work/refcode/darts/cnn \\
        --nb201-ref /work/refcode/autodl [--space darts|nb201|both] [--C 16] [--layers 8] [--N 5]
        [--batch 32] [--size 32] [--steps 3] [--formulation default|grouped|shifted]

References (fetched at run time, never committed): quark0/darts ``cnn/model_search.py``
(``Network``) and D-X-Y/AutoDL-Projects ``xautodl/models/cell_searchs/search_model_darts.py``
(``TinyNetworkDarts``).  Per space it prints the cold compile time (``jit(step).lower(...)``
and ``.compile()``, timed separately), the compiled peak (``memory_analysis``: arguments +
outputs + temporaries), the median step time, the PyTorch median step time and its peak-RSS growth
over the first step, and ``ratio torch/jax``.  Weights are drawn on the host with PyTorch's
default init bounds instead of ``space.init`` (whose jitted ``module.init`` would add minutes of
compile that are not the step's).  ``--formulation`` overrides the depthwise-convolution choice of
``diffnas_jax.spaces.kernels`` for this process only (a benchmark switch, patched like
``cost.counting`` patches it), to compare formulations in separate runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

TORCH_COMMON = textwrap.dedent("""
    import sys, time, json, statistics, resource, types
    import torch, torch.nn as nn
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    ref, steps, threads, C, depth, batch, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
        int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
""")

TORCH_DARTS = TORCH_COMMON + textwrap.dedent("""
    sys.path.insert(0, ref)
    from model_search import Network
    crit = nn.CrossEntropyLoss()
    model = Network(C, 10, depth, crit)
    loss_fn = lambda x, y: model._loss(x, y)
""")

TORCH_NB201 = TORCH_COMMON + textwrap.dedent("""
    # Import the model files without running xautodl/__init__ (it pulls the whole training stack).
    for name, sub in (("xautodl", "xautodl"), ("xautodl.models", "xautodl/models"),
                      ("xautodl.models.cell_searchs", "xautodl/models/cell_searchs")):
        m = types.ModuleType(name); m.__path__ = [ref + "/" + sub]; sys.modules[name] = m
    from xautodl.models.cell_searchs.search_model_darts import TinyNetworkDarts
    from xautodl.models.cell_operations import NAS_BENCH_201
    model = TinyNetworkDarts(C, depth, 4, 10, NAS_BENCH_201, False, False)
    crit = nn.CrossEntropyLoss()
    loss_fn = lambda x, y: crit(model(x)[1], y)
""")

TORCH_STEP = textwrap.dedent("""
    opt = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    x = torch.randn(batch, 3, size, size); y = torch.randint(0, 10, (batch,))
    times = []
    # growth of the peak over the resident set before the first step (model and data built)
    rss0 = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 1024
    for i in range(steps + 1):
        t = time.perf_counter()
        opt.zero_grad(); loss = loss_fn(x, y); loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0); opt.step()
        times.append(time.perf_counter() - t)
        if i == 0:
            rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"median": statistics.median(times[1:]), "first": times[0],
                      "rss_growth_bytes": 1024 * (rss1 - rss0)}))
""")


def _host_init(shapes, seed: int = 0):
    """PyTorch-like weights for an ``eval_shape`` tree: U(+-1/sqrt(fan_in)) kernels, BN scale 1."""
    rng = np.random.default_rng(seed)

    def one(path, s):
        leaf = str(getattr(path[-1], "key", path[-1]))
        if leaf == "scale" or leaf == "var":
            return jnp.ones(s.shape, s.dtype)
        if leaf in ("mean", "num_batches_tracked") or (leaf == "bias" and len(s.shape) == 1 and "bn" in str(path)):
            return jnp.zeros(s.shape, s.dtype)
        fan_in = int(np.prod(s.shape[-4:-1])) if len(s.shape) >= 4 else int(s.shape[0]) if s.shape else 1
        bound = 1.0 / math.sqrt(max(fan_in, 1))
        return jnp.asarray(rng.uniform(-bound, bound, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(one, shapes)


def time_weight_step(sp, batch: int, size: int, steps: int) -> dict:
    """Cold compile and median run time of one SGD weight step of space ``sp`` (float32)."""
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
    w_shapes, s_shapes = jax.eval_shape(sp.init, jax.random.key(2), x)
    w, s = _host_init(w_shapes), _host_init(s_shapes)
    arch = sp.init_arch(jax.random.key(3))
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
    lowered = jax.jit(step).lower(w, s, opt, arch, x, y)
    lower_s = time.perf_counter() - t
    hlo_lines = lowered.as_text().count("\n")
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    peak = None if mem is None else (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                     + mem.output_size_in_bytes)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        w, s, opt, loss = compiled(w, s, opt, arch, x, y)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    if not bool(jnp.isfinite(loss)):
        raise SystemExit(f"the benchmarked step diverged (loss {float(loss)})")
    return {"lower_s": lower_s, "compile_s": compile_s, "median": statistics.median(times[1:]),
            "peak_bytes": peak, "stablehlo_lines": hlo_lines}


def time_torch(script: str, ref: str, args, depth: int) -> dict:
    out = subprocess.run([args.torch_python, "-c", script + TORCH_STEP, ref, str(args.steps), str(os.cpu_count()),
                          str(args.C), str(depth), str(args.batch), str(args.size)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the PyTorch reference failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _report(name: str, r: dict, t: dict | None) -> None:
    peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f} MiB"
    print(f"jax {name} weight step: {r['median']:.3f} s (lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s, "
          f"compiled peak {peak}, {r['stablehlo_lines']} StableHLO lines)", flush=True)
    if t is not None:
        print(f"torch {name} weight step: {t['median']:.3f} s (first step {t['first']:.3f} s, "
              f"peak RSS growth {t['rss_growth_bytes'] / 2**20:.0f} MiB)")
        print(f"{name} ratio torch/jax = {t['median'] / r['median']:.2f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", choices=("darts", "nb201", "both"), default="both")
    ap.add_argument("--torch-ref", help="directory holding quark0/darts cnn/ (model_search.py)")
    ap.add_argument("--nb201-ref", help="directory holding AutoDL-Projects' xautodl/ (the models folder suffices)")
    ap.add_argument("--torch-python", default="/work/benchvenv/bin/python")
    ap.add_argument("--C", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8, help="DARTS cells")
    ap.add_argument("--N", type=int, default=5, help="NB201 cells per stage")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--formulation", choices=("default", "grouped", "shifted"), default="default")
    args = ap.parse_args(argv)
    from diffnas_jax.spaces import darts, kernels, nb201

    if args.formulation != "default":
        form = args.formulation
        kernels.default_formulation = lambda backend=None: form
    print(f"device: {jax.devices()[0].device_kind}, cpus: {os.cpu_count()}, depthwise: "
          f"{kernels.default_formulation()}, C={args.C} batch={args.batch} {args.size}x{args.size}", flush=True)
    if args.space in ("darts", "both"):
        r = time_weight_step(darts.search_space(C=args.C, layers=args.layers), args.batch, args.size, args.steps)
        t = None
        if args.torch_ref:
            ref = args.torch_ref
            if os.path.isdir(os.path.join(ref, "cnn")):
                ref = os.path.join(ref, "cnn")
            t = time_torch(TORCH_DARTS, ref, args, args.layers)
        _report(f"DARTS (layers={args.layers})", r, t)
    if args.space in ("nb201", "both"):
        r = time_weight_step(nb201.search_space(C=args.C, N=args.N), args.batch, args.size, args.steps)
        t = time_torch(TORCH_NB201, args.nb201_ref, args, args.N) if args.nb201_ref else None
        _report(f"NB201 (N={args.N})", r, t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
