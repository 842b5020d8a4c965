"""Compile time, step time and memory of the supernet programs, jitted, side by side with the
original PyTorch code on the same CPU in the same run.

    python benchmarks/bench_supernet.py --torch-ref /work/refcode/darts/cnn \\
        --nb201-ref /work/refcode/autodl [--space darts|nb201|both|none] [--second-order [--hvp exact|finite_difference|both]]
        [--implicit] [--eval-net] [--full] [--C 8] [--layers 3] [--N 1] [--batch 16] [--size 16]
        [--steps 3] [--formulation default|grouped|shifted|hybrid|ffi] [--cell default|scan|groups|all]
        [--barrier default|dot|none|all] [--profile] [--host-memory huge-pages|off]
        [--torch-host-memory default|huge-pages] [--torch-device cpu|cuda]

Rows (each behind a flag; the defaults are reduced sizes that run in minutes on 2 cores, ``--full``
sets the issue's sizes: C=16, 8 layers, N=5, batch 32, 32x32, evaluation network C=36, 20 cells):

- ``--space darts|nb201|both``: one first-order SGD weight step of the DARTS / NB201 supernet
  (quark0/darts ``cnn/model_search.Network``; AutoDL-Projects ``TinyNetworkDarts``).
- ``--second-order``: the full DARTS search step (architecture step with the second-order
  hypergradient + weight step, ``search.make_step``) against the reference ``Architect.step(...,
  unrolled=True)`` + weight step, each also in units of its own weight step. ``--hvp`` picks its
  Hessian-vector product: ``exact`` (default), ``finite_difference`` (the reference's), ``both``.
- ``--implicit``: the DARTS search step with ``hypergrad.implicit("cg", maxiter=10)`` (no
  PyTorch reference), in weight steps.
- ``--eval-net``: one training step (SGD, cross-entropy + 0.4 auxiliary, drop-path 0.2) of the
  DARTS_V2 evaluation network (``model.NetworkCIFAR``; reduced default C=16, 8 cells, batch 16,
  32x32: the auxiliary head needs 32x32 inputs).

References (fetched at run time, never committed): ``--torch-ref`` quark0/darts ``cnn/``,
``--nb201-ref`` AutoDL-Projects (``xautodl/models`` suffices).  Per row it prints the cold lower
and compile times (``jit(step).lower(...)`` and ``.compile()``, timed separately), the compiled
peak (``memory_analysis``: arguments + outputs + temporaries), the StableHLO size, the median
step time, the PyTorch median step time and the growth of its process's peak RSS over the first
step, and ``ratio torch/jax`` (>= 1: JAX is faster).  Weights are drawn on the host with PyTorch's
default init bounds (no init compile is timed).  ``--formulation`` overrides the
depthwise-convolution choice of ``diffnas_jax.spaces.kernels`` for this process only (a benchmark
switch), to compare formulations in separate runs.  ``--cell`` picks how a DARTS search cell runs
its edges (``darts.default_cell_formulation``: one ``lax.scan`` over the edges per cell and
stride, or one ``vmap`` per source state); ``all`` prints the DARTS rows for each, in one run.
``--barrier`` sets ``$DIFFNAS_COTANGENT_BARRIER`` (``layers.cotangent_barrier`` on the search
cells' states) for the NB201 rows (``all``: the NB201 row once with ``dot`` and once with
``none``, in one run, to compare the two programs under the same load); for the DARTS rows set
the variable in the environment.
``--profile`` prints, after each weight-step row, its time per XLA kernel kind (``jax.profiler``),
then the convolution kernels' time by what they compute (read from the optimised HLO: depthwise
forward, input gradient, kernel gradient, other).
``--per-op`` prints the forward + backward time of each DARTS candidate op's edge group (4 edges)
at the first normal cell's and the first reduction cell's shapes, JAX and PyTorch side by side.  A diverged step exits non-zero.
``--host-memory`` (default ``huge-pages``): the script restarts itself with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, as the ``diffnas`` command does (``search.host_memory``:
glibc maps each step's large temporary buffer on 2 MiB pages instead of faulting it in 4 KiB at a
time); ``off`` measures glibc's defaults. ``--torch-host-memory huge-pages`` gives the PyTorch
process the same tunable; by default it runs as its users run it.
``--torch-device cuda`` runs the PyTorch rows on the GPU (synchronised around each step; memory is
then the allocator's peak growth over the first step), to compare with JAX on the same GPU; the
``--per-op`` table stays on the CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffnas_jax.search import host_memory

TORCH_COMMON = textwrap.dedent("""
    import sys, time, json, statistics, resource, types
    import torch, torch.nn as nn
    ref, steps, threads, C, depth, batch, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
        int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
    dev = torch.device(sys.argv[8] if len(sys.argv) > 8 else "cpu")
    if dev.type == "cpu":  # the reference code calls .cuda() where it builds tensors
        torch.Tensor.cuda = lambda self, *a, **k: self
        nn.Module.cuda = lambda self, *a, **k: self
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
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

# quark0/darts predates torch 1.5: Tensor.add_/sub_/sub(scalar, tensor) become (tensor, alpha=scalar)
TORCH_LEGACY = textwrap.dedent("""
    for _name in ("add_", "sub_", "sub"):
        def _legacy(self, *a, _f=getattr(torch.Tensor, _name), **k):
            if len(a) == 2 and not torch.is_tensor(a[0]):
                return _f(self, a[1], alpha=a[0])
            return _f(self, *a, **k)
        setattr(torch.Tensor, _name, _legacy)
""")

TORCH_SECOND_ORDER = TORCH_DARTS + TORCH_LEGACY + textwrap.dedent("""
    from architect import Architect
    _args = types.SimpleNamespace(momentum=0.9, weight_decay=3e-4, arch_learning_rate=3e-4, arch_weight_decay=1e-3)
    architect = Architect(model, _args)
    xv = torch.randn(batch, 3, size, size).to(dev); yv = torch.randint(0, 10, (batch,)).to(dev)
    _weight_step = loss_fn
    def arch_then_weight(x, y):
        architect.step(x, y, xv, yv, 0.025, opt, True)
        return _weight_step(x, y)
    loss_fn = arch_then_weight
""")

TORCH_EVAL = TORCH_COMMON + textwrap.dedent("""
    sys.path.insert(0, ref)
    # utils imports torchvision for its data transforms only; the model needs drop_path
    for _m in ("torchvision", "torchvision.transforms"):
        sys.modules.setdefault(_m, types.ModuleType(_m))
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    import utils
    if dev.type == "cpu":  # drop_path draws its mask with torch.cuda.FloatTensor
        utils.torch.cuda.FloatTensor = lambda *s: torch.empty(*s)
    from model import NetworkCIFAR
    import genotypes
    model = NetworkCIFAR(C, 10, depth, True, genotypes.DARTS_V2)
    model.drop_path_prob = 0.2
    model.train()
    crit = nn.CrossEntropyLoss()
    def loss_fn(x, y):
        logits, aux = model(x)
        return crit(logits, y) + 0.4 * crit(aux, y)
""")

TORCH_STEP = textwrap.dedent("""
    model.to(dev)  # in place: the architect's optimiser keeps its parameters
    opt = torch.optim.SGD(model.parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    x = torch.randn(batch, 3, size, size).to(dev); y = torch.randint(0, 10, (batch,)).to(dev)
    times = []
    # growth of the peak over what is resident before the first step (model and data built):
    # the process's resident set on the CPU, the allocator's device memory on a GPU
    if dev.type == "cuda":
        sync(); torch.cuda.reset_peak_memory_stats(); mem0 = torch.cuda.memory_allocated()
    else:
        mem0 = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
    for i in range(steps + 1):
        sync(); t = time.perf_counter()
        opt.zero_grad(); loss = loss_fn(x, y); loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0); opt.step()
        sync(); times.append(time.perf_counter() - t)
        if i == 0 and dev.type == "cuda":
            mem1 = torch.cuda.max_memory_allocated()
        elif i == 0:
            # VmHWM: this process's own peak (ru_maxrss also counts the parent's peak at fork,
            # which made the figure wrong after a large JAX program had run in the parent)
            mem1 = 1024 * next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(json.dumps({"median": statistics.median(times[1:]), "first": times[0],
                      "peak_growth_bytes": mem1 - mem0,
                      "memory": "device memory" if dev.type == "cuda" else "RSS"}))
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


SGD = dict(lr=0.025, momentum=0.9, weight_decay=3e-4, clip=5.0)
HVP_ROWS = {"exact": ("exact",), "finite_difference": ("finite_difference",),
            "both": ("exact", "finite_difference")}


def _weight_opt(clip: bool = True):
    tx = [optax.add_decayed_weights(SGD["weight_decay"]), optax.sgd(SGD["lr"], SGD["momentum"])]
    return optax.chain(optax.clip_by_global_norm(SGD["clip"]), *tx) if clip else optax.chain(*tx)


def _ce(logits, y):
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])


def _data(batch: int, size: int, seed: int = 0):
    x = jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)
    return x, jax.random.randint(jax.random.key(seed + 1), (batch,), 0, 10)


def print_profile(compiled, args, runs: int = 2, top: int = 15) -> None:
    """Run ``compiled(*args)`` ``runs`` times under ``jax.profiler`` and print where the time goes:
    per XLA kernel kind (the fusion's name without its number: ``pad_add_fusion``, ``ynn_fusion``
    for the XNNPACK/YNNPACK convolutions, dots and reductions, ``wrapped_reduce-window``, ...),
    milliseconds per run summed over both threads and the number of kernels."""
    import collections
    import glob
    import gzip
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(runs):
                jax.block_until_ready(compiled(*args))
        trace = json.load(gzip.open(glob.glob(os.path.join(d, "plugins/profile/*/perfetto_trace.json.gz"))[0]))
    ms, names = collections.defaultdict(float), collections.defaultdict(set)
    for e in trace["traceEvents"]:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith(("Thunk", "$", "Pjit", "end:")) or name[:1].isupper():
            continue
        kind = re.sub(r"\.\d+$", "", name)
        ms[kind] += e.get("dur", 0) / 1e3 / runs
        names[kind].add(name)
    total = sum(ms.values())
    print(f"  profile: {total:.0f} ms of XLA kernels per run (both threads)", flush=True)
    for kind, t in sorted(ms.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {t:8.1f} ms {100 * t / total:5.1f} %  {len(names[kind]):5d} x {kind}")
    conv_ms, conv_n = collections.defaultdict(float), collections.Counter()
    kinds = _convolution_kinds(compiled.as_text())
    for e in trace["traceEvents"]:
        kind = kinds.get(e.get("name", "")) if e.get("ph") == "X" else None
        if kind is not None:
            conv_ms[kind] += e.get("dur", 0) / 1e3 / runs
            conv_n[kind] += 1
    print("  convolution kernels by what they compute:", flush=True)
    for kind, t in sorted(conv_ms.items(), key=lambda kv: -kv[1]):
        print(f"    {t:8.1f} ms {100 * t / total:5.1f} %  {conv_n[kind] // runs:5d} x {kind}")


def _convolution_kinds(hlo: str) -> dict[str, str]:
    """The kernels (fusion or instruction names) of the optimised HLO ``hlo`` that run a
    convolution, each labelled: a grouped convolution (``feature_group_count``: a depthwise forward
    pass, or its input gradient when the metadata says reverse mode), a kernel gradient that XLA:CPU
    expanded into a dense (E*C) x (E*C) convolution (output ``[E*C, k, k, E*C]``: a depthwise
    kernel gradient whose diagonal is then taken), or another (dense) convolution."""
    computations, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = computations.setdefault(head.group(1), [])
        elif current is not None and line.startswith("  "):
            current.append(line)
    def label(line):
        if "feature_group_count" in line:
            # reverse mode's ops carry transpose(...) in their metadata
            return "grouped depthwise, input gradient" if "transpose(" in line else "grouped depthwise, forward"
        shape = re.search(r"= f32\[([\d,]+)\]", line)
        dims = shape.group(1).split(",") if shape else []
        if len(dims) == 4 and dims[0] == dims[3] and dims[1] == dims[2] and int(dims[1]) <= 7:
            return "depthwise kernel gradient (dense (E*C)x(E*C) convolution)"
        return "other convolution"

    kinds = {}
    for name, body in computations.items():
        for line in body:
            m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .* (fusion|convolution)\(", line)
            if not m:
                continue
            if m.group(2) == "convolution":
                kinds[m.group(1)] = label(line)
                continue
            called = re.search(r"calls=%?([\w.\-]+)", line)
            convs = [c for c in computations.get(called.group(1), []) if " convolution(" in c] if called else []
            if convs:
                kinds[m.group(1)] = label(convs[0])
    return kinds


def time_program(step, args, steps: int, feed, loss_of, profile: bool = False) -> dict:
    """Cold lower + compile of ``jit(step)`` at ``args``, compiled peak, and the median of ``steps``
    runs after one warm-up; ``feed(args, out)`` gives the next call's arguments. ``profile``:
    then print :func:`print_profile` of the program."""
    t = time.perf_counter()
    lowered = jax.jit(step).lower(*args)
    lower_s = time.perf_counter() - t
    hlo_lines = lowered.as_text().count("\n")
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    # printed at once: a large program's steps can outlast the run's time limit
    print(f"  (lowered in {lower_s:.1f} s, {hlo_lines} StableHLO lines; compiled in {compile_s:.1f} s)", flush=True)
    mem = compiled.memory_analysis()
    peak = None if mem is None else (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                                     + mem.output_size_in_bytes)
    times, cpu = [], []
    for _ in range(steps + 1):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append((r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, r1.ru_minflt - r0.ru_minflt))
        args = feed(args, out)
    # where a step's wall time went: a step far above (user + sys) / cores waited (other jobs on
    # the machine); a large sys share is the kernel faulting in memory (see --host-memory)
    user, sys_, faults = (statistics.median(c[i] for c in cpu[1:]) for i in range(3))
    print(f"  (steps {', '.join(f'{x:.3f}' for x in times[1:])} s; per step user {user:.2f} s, "
          f"sys {sys_:.2f} s, {faults:.0f} page faults; first call {times[0]:.3f} s)", flush=True)
    if profile:
        print_profile(compiled, args)
    loss = loss_of(out)
    if not bool(jnp.isfinite(loss)):
        raise SystemExit(f"the benchmarked step diverged (loss {float(loss)})")
    return {"lower_s": lower_s, "compile_s": compile_s, "median": statistics.median(times[1:]),
            "peak_bytes": peak, "stablehlo_lines": hlo_lines}


def time_weight_step(sp, batch: int, size: int, steps: int, profile: bool = False) -> dict:
    """One first-order SGD weight step of space ``sp`` (float32), as the reference training loop."""
    x, y = _data(batch, size)
    w_shapes, s_shapes = jax.eval_shape(sp.init, jax.random.key(2), x)
    w, s = _host_init(w_shapes), _host_init(s_shapes)
    arch = sp.init_arch(jax.random.key(3))
    tx = _weight_opt()

    def step(w, s, opt, arch, x, y):
        mix = jax.tree_util.tree_map(lambda a: jax.nn.softmax(a, -1), arch)

        def loss_fn(w):
            logits, ns = sp.apply(w, s, mix, x, True)
            return _ce(logits, y), ns

        (loss, ns), g = jax.value_and_grad(loss_fn, has_aux=True)(w)
        upd, opt = tx.update(g, opt, w)
        return optax.apply_updates(w, upd), ns, opt, loss

    return time_program(step, (w, s, tx.init(w), arch, x, y), steps,
                        lambda a, o: (o[0], o[1], o[2]) + a[3:], lambda o: o[3], profile)


def time_search_step(sp, estimator, batch: int, size: int, steps: int, profile: bool = False) -> dict:
    """The full DARTS search step of ``search.make_step`` (architecture step with ``estimator``,
    then the weight step; softmax mixing; DARTS optimisers) on separate train / val batches."""
    from diffnas_jax import mixing
    from diffnas_jax.search import init_search_state, make_step

    bt, bv = _data(batch, size), _data(batch, size, seed=7)
    w_opt = _weight_opt(clip=False)  # make_step clips the weight gradient (norm 5) itself
    a_opt = optax.chain(optax.add_decayed_weights(1e-3), optax.adam(3e-4, b1=0.5, b2=0.999))
    state = init_search_state(jax.random.key(2), sp, bt[0], w_opt, a_opt, estimator)
    step = make_step(sp, mixing.softmax(), estimator, w_opt, a_opt)
    key = jax.random.key(4)
    return time_program(step, (state, bt, bv, key), steps, lambda a, o: (o[0],) + a[1:],
                        lambda o: o[1]["train_loss"], profile)


def time_eval_step(net, batch: int, size: int, steps: int) -> dict:
    """One training step of a DARTS evaluation network: CE + 0.4 auxiliary CE, drop-path, SGD."""
    x, y = _data(batch, size)
    w_shapes, s_shapes = jax.eval_shape(net.init, jax.random.key(2), x)
    w, s = _host_init(w_shapes), _host_init(s_shapes)
    tx = _weight_opt()

    def step(w, s, opt, x, y, key):
        def loss_fn(w):
            (logits, aux), ns = net.apply(w, s, None, x, True, rng=key)
            return _ce(logits, y) + 0.4 * _ce(aux, y), ns

        (loss, ns), g = jax.value_and_grad(loss_fn, has_aux=True)(w)
        upd, opt = tx.update(g, opt, w)
        return optax.apply_updates(w, upd), ns, opt, loss

    return time_program(step, (w, s, tx.init(w), x, y, jax.random.key(5)), steps,
                        lambda a, o: (o[0], o[1], o[2]) + a[3:], lambda o: o[3])


def _without_hugetlb(environ) -> dict:
    """``environ`` without ``glibc.malloc.hugetlb`` in its ``GLIBC_TUNABLES``."""
    env = dict(environ)
    kept = [t for t in env.pop("GLIBC_TUNABLES", "").split(":") if t and t.split("=")[0] != host_memory.TUNABLE]
    if kept:
        env["GLIBC_TUNABLES"] = ":".join(kept)
    return env


def _restart_for(setting: str) -> None:
    """Start this script again with ``glibc.malloc.hugetlb=1`` (``huge-pages``) or without it (``off``)
    unless the environment already says so."""
    if setting == "huge-pages":
        host_memory.restart_with_huge_pages(setting="huge-pages")
    elif _without_hugetlb(os.environ) != dict(os.environ):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, _without_hugetlb(os.environ))


def time_torch(script: str, ref: str, args, C: int, depth: int, batch: int, size: int) -> dict:
    env = _without_hugetlb(os.environ)
    if args.torch_host_memory == "huge-pages":
        env.update(host_memory.tunables("huge-pages", environ=env))
    out = subprocess.run([args.torch_python, "-c", script + TORCH_STEP, ref, str(args.steps), str(os.cpu_count()),
                          str(C), str(depth), str(batch), str(size), args.torch_device],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"the PyTorch reference failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _report(name: str, r: dict, t: dict | None, unit: tuple[float, float | None] | None = None) -> None:
    """One row: JAX compile / step / memory, PyTorch step / memory, ratio; ``unit``: the (jax, torch)
    weight-step times to express a search step in weight steps."""
    peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f} MiB"
    extra = f", {r['median'] / unit[0]:.2f} weight steps" if unit else ""
    print(f"jax {name}: {r['median']:.3f} s{extra} (lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s, "
          f"compiled peak {peak}, {r['stablehlo_lines']} StableHLO lines)", flush=True)
    if t is not None:
        extra = f", {t['median'] / unit[1]:.2f} weight steps" if unit and unit[1] else ""
        print(f"torch {name}: {t['median']:.3f} s{extra} (first step {t['first']:.3f} s, "
              f"peak {t['memory']} growth {t['peak_growth_bytes'] / 2**20:.0f} MiB)")
        print(f"{name} ratio torch/jax = {t['median'] / r['median']:.2f}", flush=True)


def _darts_ref(path: str) -> str:
    return os.path.join(path, "cnn") if os.path.isdir(os.path.join(path, "cnn")) else path


TORCH_PER_OP = TORCH_COMMON + textwrap.dedent("""
    sys.path.insert(0, ref)
    from operations import OPS
    from genotypes import PRIMITIVES
    stride = depth
    rows = {}
    for name in [p for p in PRIMITIVES if p != "none"]:
        ops = [OPS[name](C, stride, False) for _ in range(4)]
        ops = [nn.Sequential(o, nn.BatchNorm2d(C, affine=False)) if "pool" in name else o for o in ops]
        params = [p for o in ops for p in o.parameters()]
        x = torch.randn(batch, C, size, size, requires_grad=True)
        ts = []
        for i in range(steps + 2):
            t = time.perf_counter()
            y = sum(torch.sin(o(x)).sum() for o in ops)
            torch.autograd.grad(y, [x] + params)
            ts.append(time.perf_counter() - t)
        rows[name] = statistics.median(ts[2:])
    print(json.dumps(rows))
""")


def per_op_table(args) -> None:
    """Forward + backward (d/d weights and input of sum(sin(y))) of one edge group of 4 edges per
    candidate op, JAX (the search cell's vmapped ``MixedOp`` with that op alone) and PyTorch."""
    import flax.linen as nn
    from diffnas_jax.spaces import darts
    from diffnas_jax.spaces.genotypes import PRIMITIVES

    E = 4
    for C, stride in ((args.C, 1), (2 * args.C, 2)):
        torch_rows = {}
        if args.torch_ref:
            out = subprocess.run([args.torch_python, "-c", TORCH_PER_OP, _darts_ref(args.torch_ref), str(args.steps),
                                  str(os.cpu_count()), str(C), str(stride), str(args.batch), str(args.size)],
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"the PyTorch per-op reference failed:\n{out.stderr[-2000:]}")
            torch_rows = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"\n| op (edge group of {E}, C={C}, stride {stride}, batch {args.batch}, {args.size}x{args.size}) "
              "| jax compile | jax fwd+bwd | torch fwd+bwd | ratio torch/jax |\n|---|---|---|---|---|", flush=True)
        for name in [p for p in PRIMITIVES if p != "none"]:
            group = nn.vmap(darts.MixedOp, in_axes=(0, 0), out_axes=0, variable_axes={"params": 0, "batch_stats": 0},
                            split_rngs={"params": True})(C, stride, ("none", name), 1, True)
            x, _ = _data(args.batch, args.size)
            x = jnp.tile(x[..., :1], (1, 1, 1, C))
            w = jnp.full((E, 2), 0.5)
            v = _host_init(jax.eval_shape(group.init, jax.random.key(0), jnp.broadcast_to(x, (E,) + x.shape), w))

            def loss(p, x):
                y, ns = group.apply({"params": p, "batch_stats": v.get("batch_stats", {})},
                                    jnp.broadcast_to(x, (E,) + x.shape), w, mutable=["batch_stats"])
                return jnp.sum(jnp.sin(y)), ns

            r = time_program(jax.value_and_grad(loss, (0, 1), has_aux=True), (v.get("params", {}), x), args.steps,
                             lambda a, o: a, lambda o: o[0][0])
            tt = torch_rows.get(name)
            print(f"| {name} | {r['compile_s']:.2f} s | {1e3 * r['median']:.1f} ms | "
                  + (f"{1e3 * tt:.1f} ms | {tt / r['median']:.2f} |" if tt else "- | - |"), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", choices=("darts", "nb201", "both", "none"), default="both",
                    help="first-order weight-step rows")
    ap.add_argument("--second-order", action="store_true", help="DARTS search step, second-order hypergradient")
    ap.add_argument("--hvp", choices=tuple(HVP_ROWS), default="exact",
                    help="--second-order's Hessian-vector product: exact (forward-over-reverse), "
                         "finite_difference (the reference's), or both rows in one run")
    ap.add_argument("--implicit", action="store_true", help="DARTS search step, implicit CG-10 hypergradient")
    ap.add_argument("--eval-net", action="store_true", help="DARTS_V2 evaluation network training step")
    ap.add_argument("--per-op", action="store_true", help="per-op forward + backward table of one DARTS edge group")
    ap.add_argument("--full", action="store_true", help="the issue's sizes (C=16, 8 layers, N=5, batch 32, 32x32; "
                    "evaluation network C=36, 20 cells, batch 32)")
    ap.add_argument("--torch-ref", help="directory holding quark0/darts cnn/ (model_search.py)")
    ap.add_argument("--nb201-ref", help="directory holding AutoDL-Projects' xautodl/ (the models folder suffices)")
    ap.add_argument("--torch-python", default="/work/benchvenv/bin/python")
    ap.add_argument("--torch-device", choices=("cpu", "cuda"), default="cpu",
                    help="where the PyTorch reference runs (cuda: compare against JAX on a GPU; "
                         "its memory is then the allocator's peak device memory growth)")
    ap.add_argument("--C", type=int, default=8)
    ap.add_argument("--layers", type=int, default=3, help="DARTS cells")
    ap.add_argument("--N", type=int, default=1, help="NB201 cells per stage")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--eval-C", type=int, default=16)
    ap.add_argument("--eval-layers", type=int, default=8)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cg-iters", type=int, default=10)
    ap.add_argument("--formulation", choices=("default", "grouped", "shifted", "hybrid", "ffi"), default="default")
    ap.add_argument("--cell", choices=("default", "scan", "groups", "all"), default="default",
                    help="DARTS search cell formulation ($DIFFNAS_DARTS_CELL); all: each in turn")
    ap.add_argument("--profile", action="store_true",
                    help="print where the weight steps' time goes, per XLA kernel kind (jax.profiler)")
    ap.add_argument("--host-memory", choices=("huge-pages", "off"), default="huge-pages",
                    help="glibc.malloc.hugetlb=1 for this process, as the diffnas command sets it (default), "
                         "or glibc's default allocator (search.host_memory; the script restarts itself)")
    ap.add_argument("--torch-host-memory", choices=("default", "huge-pages"), default="default",
                    help="the PyTorch process with glibc's default allocator (as its users run it, default) "
                         "or with glibc.malloc.hugetlb=1 too")
    ap.add_argument("--barrier", choices=("default", "dot", "none", "all"), default="default",
                    help="$DIFFNAS_COTANGENT_BARRIER for the NB201 rows; all: dot then none, in one run")
    args = ap.parse_args(argv)
    if argv is None:  # before the first JAX computation: glibc reads its tunables at start
        _restart_for(args.host_memory)
    if args.full:
        args.C, args.layers, args.N, args.batch, args.size = 16, 8, 5, 32, 32
        args.eval_C, args.eval_layers, args.eval_batch = 36, 20, 32
    from diffnas_jax import hypergrad
    from diffnas_jax.spaces import darts, kernels, layers, nb201

    if args.formulation != "default":
        form = args.formulation
        kernels.default_formulation = lambda backend=None: form
    print(f"device: {jax.devices()[0].device_kind}, cpus: {os.cpu_count()}, jax {jax.__version__}, depthwise: "
          f"{kernels.default_formulation()}, C={args.C} layers={args.layers} N={args.N} batch={args.batch} "
          f"{args.size}x{args.size}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, "
          f"PyTorch allocator: {args.torch_host_memory}",
          flush=True)
    if args.per_op:
        per_op_table(args)
    ref = _darts_ref(args.torch_ref) if args.torch_ref else None
    sp = darts.search_space(C=args.C, layers=args.layers)
    cells = darts.CELL_FORMULATIONS if args.cell == "all" else (args.cell,)
    torch_rows: dict[str, dict | None] = {}
    for cell in cells:
        if cell != "default":
            os.environ["DIFFNAS_DARTS_CELL"] = cell
        tag = f"{darts.default_cell_formulation()} cell"
        unit = None
        if args.space in ("darts", "both") or args.second_order or args.implicit:
            r = time_weight_step(sp, args.batch, args.size, args.steps, args.profile)
            if "weight" not in torch_rows:
                torch_rows["weight"] = time_torch(TORCH_DARTS, ref, args, args.C, args.layers, args.batch,
                                                  args.size) if ref else None
            t = torch_rows["weight"]
            _report(f"DARTS weight step (C={args.C}, layers={args.layers}, {tag})", r, t)
            unit = (r["median"], t["median"] if t else None)
        for hvp in (HVP_ROWS[args.hvp] if args.second_order else ()):
            est = hypergrad.unrolled(SGD["lr"], weight_decay=SGD["weight_decay"], momentum=SGD["momentum"],
                                     hvp=hvp)
            r = time_search_step(sp, est, args.batch, args.size, args.steps, args.profile)
            if "second" not in torch_rows:
                torch_rows["second"] = time_torch(TORCH_SECOND_ORDER, ref, args, args.C, args.layers, args.batch,
                                                  args.size) if ref else None
            _report(f"DARTS second-order search step (JAX {hvp} HVP; torch finite differences; {tag})", r,
                    torch_rows["second"], unit)
        if args.implicit:
            est = hypergrad.implicit("cg", maxiter=args.cg_iters, damping=1e-2)
            r = time_search_step(sp, est, args.batch, args.size, args.steps)
            _report(f"DARTS implicit CG-{args.cg_iters} search step ({tag})", r, None, unit)
    if args.space in ("nb201", "both"):
        t = None
        for barrier in layers.COTANGENT_BARRIERS if args.barrier == "all" else (args.barrier,):
            if barrier != "default":
                os.environ["DIFFNAS_COTANGENT_BARRIER"] = barrier
            r = time_weight_step(nb201.search_space(C=args.C, N=args.N), args.batch, args.size, args.steps,
                                 args.profile)
            if t is None and args.nb201_ref:
                t = time_torch(TORCH_NB201, args.nb201_ref, args, args.C, args.N, args.batch, args.size)
            _report(f"NB201 weight step (C={args.C}, N={args.N}, cotangent barrier "
                    f"{layers.default_cotangent_barrier()})", r, t)
    if args.eval_net:
        net = darts.eval_network("DARTS_V2", C=args.eval_C, layers=args.eval_layers, auxiliary=True)
        r = time_eval_step(net, args.eval_batch, 32, args.steps)
        t = time_torch(TORCH_EVAL, ref, args, args.eval_C, args.eval_layers, args.eval_batch, 32) if ref else None
        _report(f"DARTS_V2 evaluation network train step (C={args.eval_C}, {args.eval_layers} cells, "
                f"batch {args.eval_batch}, 32x32)", r, t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
