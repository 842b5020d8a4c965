"""Speed of the relaxed sorting operators against their PyTorch references, on CPU.

Times one jit-compiled forward + backward pass (``jax.value_and_grad`` of
``loss = sum(out * weights)`` with fixed random weights, so the backward pass carries a
non-trivial cotangent) of

* ``diffnas_jax.relax.soft_sort`` and ``soft_rank`` (Blondel et al. 2020), regularization "l2" and
  "kl", at (batch, n) = (128, 100), (16, 1000), (1, 10000), against ``torchsort.soft_sort`` /
  ``torchsort.soft_rank`` (its C++ extension) with the same regularization and strength;
* ``diffnas_jax.relax.sorting_network`` (Petersen et al. 2021/2022), odd_even and bitonic,
  Cauchy comparators at steepness 10, batch 128, n = 16 and 64, against ``diffsort.DiffSortNet``
  (the same network, distribution and steepness); the loss weights both the sorted values and
  the (n, n) relaxed permutation matrices, since diffsort always builds the latter,

all in float32 on the same random inputs, in one run.  Each side is warmed up (the first JAX
call compiles; its time is printed as ``compile``), then each repeat is timed with
``time.perf_counter`` (``block_until_ready`` on the JAX result; PyTorch runs eagerly with
``torch.set_num_threads(2)``) and the median is reported.  One line per case ends with
``ratio = reference time / ours`` (>= 1.0: we are faster) and the largest absolute difference of
the two forward outputs (a check that both sides compute the same function).

Soft sort / rank inputs are ``randn(batch, n) * n / 4`` with regularization strength 1, so
neighbouring sorted values are about as far apart as the strength.  The block structure this
gives differs per case (blocks of the PAV solution / elements, measured): soft_sort l2 has no
pooling at all (12800 / 12800, 16000 / 16000, 10000 / 10000: the hard sort), soft_sort kl pools
almost everything (1268 / 12800, 17 / 16000, 1 / 10000), soft_rank l2 pools into ~800 blocks
(786, 803, 553) and soft_rank kl hardly pools (12331, 15928, 9999).  The sequential PAV takes
one step per element plus one per pooling, so kl soft_sort runs about twice the steps of l2.

Run it from the side venv that has the references (torch is not a project dependency)::

    /work/benchvenv/bin/python benchmarks/bench_relax.py            # full sizes
    /work/benchvenv/bin/python benchmarks/bench_relax.py --quick    # small sizes, few repeats

(venv: ``python3 -m venv /work/benchvenv``, then ``pip install`` the CPU torch wheel,
``-e .``, ``diffsort``, and ``torchsort`` with ``--no-build-isolation`` and any ``nvcc`` hidden
from PATH, since its setup builds a CUDA extension whenever ``nvcc`` runs.)  Without torch,
torchsort or diffsort the script says which reference is missing and prints our times only.
Where the CPU kernel of the sequential PAV is built (``diffnas_jax/relax/_pav_cpu.cc``), each
soft sort / rank case is timed twice against the same torchsort time, once through the kernel
(``[ffi]``) and once through the pure-XLA solvers (``[xla]``, ``DIFFNAS_PAV=xla``); ``--pav``
picks one.  The machine is shared and noisy: compare the ratios of one run, not times across runs.  On a
loaded 2-core machine two OpenMP threads make PyTorch's many small ops wait on each other
(diffsort took ~3.6 s instead of ~14 ms per call), so there also run ``--torch-threads 1``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffnas_jax.relax import _pav_ffi, soft_rank, soft_sort, sorting_network

SOFT_SIZES = ((128, 100), (16, 1000), (1, 10000))
SOFT_SIZES_QUICK = ((32, 50), (4, 500))
NET_SIZES = ((128, 16), (128, 64))
NET_SIZES_QUICK = ((16, 8), (16, 16))
STEEPNESS = 10.0
DISTRIBUTION = "cauchy"
EPS = 1.0


# ----------------------------------------------------------------------------------------------
# Optional references, imported lazily so the script runs without torch.


def _load_references(threads: int) -> dict[str, Any]:
    refs: dict[str, Any] = {}
    try:
        import torch
    except ImportError as e:  # the project venv has no torch on purpose
        refs["torch"] = None
        refs["missing"] = {"torchsort": f"torch not importable ({e})", "diffsort": f"torch not importable ({e})"}
        return refs
    torch.set_num_threads(threads)
    refs["torch"] = torch
    refs["missing"] = {}
    for name in ("torchsort", "diffsort"):
        try:
            refs[name] = __import__(name)
        except Exception as e:  # an extension that fails to load is as good as missing
            refs[name] = None
            refs["missing"][name] = f"{name} not importable ({type(e).__name__}: {e})"
    return refs


# ----------------------------------------------------------------------------------------------
# Timing.


def _median_time(step: Callable[[], Any], warmup: int, repeats: int, budget_s: float) -> float:
    for _ in range(warmup):
        step()
    times = []
    start = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        # Slow cases stop early, but never with fewer than 5 samples.
        if len(times) >= 5 and time.perf_counter() - start > budget_s:
            break
    return statistics.median(times)


def _time_jax(fn: Callable, args: tuple, warmup: int, repeats: int, budget_s: float):
    """(compile + first call seconds, median seconds per call, forward outputs)."""
    jitted = jax.jit(fn)
    t0 = time.perf_counter()
    out = jax.block_until_ready(jitted(*args))
    first = time.perf_counter() - t0
    med = _median_time(lambda: jax.block_until_ready(jitted(*args)), warmup, repeats, budget_s)
    return first, med, out


def _time_torch(torch, forward: Callable, x_np: np.ndarray, weights_np: tuple, warmup: int,
                repeats: int, budget_s: float):
    """Median seconds of forward + backward, and the forward outputs as numpy arrays."""
    x = torch.tensor(x_np, requires_grad=True)
    weights = tuple(torch.tensor(w) for w in weights_np)

    def step():
        x.grad = None
        outs = forward(x)
        loss = sum((o * w).sum() for o, w in zip(outs, weights))
        loss.backward()
        return outs

    med = _median_time(step, warmup, repeats, budget_s)
    with torch.no_grad():
        outs = forward(x)
    return med, tuple(o.detach().numpy() for o in outs)


# ----------------------------------------------------------------------------------------------
# Cases.


def _soft_cases(sizes):
    for op in ("soft_sort", "soft_rank"):
        for reg in ("l2", "kl"):
            for batch, n in sizes:
                yield op, reg, batch, n


def _net_cases(sizes):
    for network in ("odd_even", "bitonic"):
        for batch, n in sizes:
            yield network, batch, n


def _ms(t: float | None) -> str:
    return f"{t * 1e3:10.3f}" if t is not None else f"{'-':>10s}"


def _line(name: str, first: float, ours: float, ref: float | None, ref_name: str, diff: float | None,
          missing: str | None) -> str:
    head = f"{name:44s} compile {first:6.2f} s  ours {_ms(ours)} ms  {ref_name:9s} {_ms(ref)} ms"
    if ref is None:
        return f"{head}  ratio    n/a  (reference missing)"
    return f"{head}  ratio {ref / ours:6.2f}  maxdiff {diff:.1e}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke run)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per side (default 30, quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after the first (default 3, quick 1)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per side and case after which repeats stop, if >= 5 done (default 10)")
    p.add_argument("--torch-threads", type=int, default=2,
                   help="torch.set_num_threads (default 2; on a loaded 2-core machine 2 OpenMP threads "
                        "can be 100x slower than 1 on small ops, so check with 1)")
    p.add_argument("--only", default="", help="run only cases whose name contains this text")
    p.add_argument("--pav", default="auto",
                   help="PAV solver(s) for soft_sort / soft_rank, comma-separated: ffi, xla (DIFFNAS_PAV); "
                        "default: both where the CPU kernel is built, else xla")
    args = p.parse_args()
    pavs = (["ffi", "xla"] if _pav_ffi.available() else ["xla"]) if args.pav == "auto" else args.pav.split(",")
    for impl in pavs:
        if impl not in _pav_ffi.PAV_IMPLEMENTATIONS:
            p.error(f"--pav: unknown solver {impl!r}; expected ffi and/or xla")
    repeats = args.repeats or (5 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    budget = args.budget if args.budget is not None else (2.0 if args.quick else 10.0)

    refs = _load_references(args.torch_threads)
    torch = refs["torch"]
    ts, ds = refs.get("torchsort"), refs.get("diffsort")
    print(f"jax {jax.__version__} ({jax.default_backend()}), float32; "
          + (f"torch {torch.__version__}, threads {torch.get_num_threads()}" if torch else "torch: missing"))
    for why in sorted(set(refs["missing"].values())):
        print(f"reference missing: {why}; printing our times only for its cases")
    print(f"median of up to {repeats} repeats after {warmup} warm-up calls; "
          f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    print("ratio = reference time / ours (>= 1.0: diffnas_jax is faster); "
          f"PAV solvers: {', '.join(pavs)} (kernel built: {_pav_ffi.available()})")
    rng = np.random.default_rng(0)

    ours_fns = {"soft_sort": soft_sort, "soft_rank": soft_rank}
    for op, reg, batch, n in _soft_cases(SOFT_SIZES_QUICK if args.quick else SOFT_SIZES):
        name = f"{op} {reg} batch {batch} n {n}"
        if args.only not in name:
            continue
        x_np = (rng.standard_normal((batch, n)) * (n / 4)).astype(np.float32)
        w_np = rng.standard_normal((batch, n)).astype(np.float32)
        fn = ours_fns[op]

        def loss(x, w, fn=fn, reg=reg):
            out = fn(x, regularization_strength=EPS, regularization=reg)
            return jnp.sum(out * w), out

        ref = ref_out = None
        if ts is not None:
            ref_fn = getattr(ts, op)
            ref, (ref_out,) = _time_torch(
                torch, lambda x, f=ref_fn, reg=reg: (f(x, regularization=reg, regularization_strength=EPS),),
                x_np, (w_np,), warmup, repeats, budget)
        for impl in pavs:
            # the solver is chosen at trace time: clear the jit caches so that each path retraces
            os.environ["DIFFNAS_PAV"] = impl
            jax.clear_caches()
            first, ours, ((_, out), _) = _time_jax(jax.value_and_grad(loss, has_aux=True),
                                              (jnp.asarray(x_np), jnp.asarray(w_np)), warmup, repeats, budget)
            diff = None if ref_out is None else float(np.max(np.abs(np.asarray(out) - ref_out)))
            label = f"{name} [{impl}]" if len(pavs) > 1 else name
            missing = refs["missing"].get("torchsort")
            print(_line(label, first, ours, ref, "torchsort", diff, missing), flush=True)
        os.environ.pop("DIFFNAS_PAV", None)
        jax.clear_caches()

    for network, batch, n in _net_cases(NET_SIZES_QUICK if args.quick else NET_SIZES):
        name = f"sorting_network {network} batch {batch} n {n}"
        if args.only not in name:
            continue
        x_np = rng.standard_normal((batch, n)).astype(np.float32)
        wx_np = rng.standard_normal((batch, n)).astype(np.float32)
        wp_np = rng.standard_normal((batch, n, n)).astype(np.float32)

        def loss(x, wx, wp, network=network):
            s, perm = sorting_network(x, network, steepness=STEEPNESS, distribution=DISTRIBUTION)
            return jnp.sum(s * wx) + jnp.sum(perm * wp), (s, perm)

        first, ours, ((_, (s, perm)), _) = _time_jax(
            jax.value_and_grad(loss, has_aux=True),
            (jnp.asarray(x_np), jnp.asarray(wx_np), jnp.asarray(wp_np)), warmup, repeats, budget)
        ref = diff = None
        if ds is not None:
            net = ds.DiffSortNet(network, n, steepness=STEEPNESS, distribution=DISTRIBUTION)
            ref, (ref_s, ref_perm) = _time_torch(torch, net, x_np, (wx_np, wp_np), warmup, repeats, budget)
            diff = max(float(np.max(np.abs(np.asarray(s) - ref_s))),
                       float(np.max(np.abs(np.asarray(perm) - ref_perm))))
        print(_line(name, first, ours, ref, "diffsort", diff, refs["missing"].get("diffsort")), flush=True)


if __name__ == "__main__":
    main()
