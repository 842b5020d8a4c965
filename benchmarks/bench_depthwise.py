"""The depthwise convolution alone at the DARTS supernet's shapes: forward, input gradient and
kernel gradient timed separately, each JAX formulation against PyTorch's
``conv2d(groups=C)`` (2 threads) in the same process.

    python benchmarks/bench_depthwise.py [--sizes full|reduced] [--forms grouped,hybrid,...]
        [--reps 5] [--only 3x3,5x5d2,...] [--rows 0,2] [--no-torch]

A row is one edge group as the search cell runs it: ``E=4`` edges ``vmap``-ed over their kernels
with the state broadcast (``kernels.prefers_batched_input``), x (E, N, H, W, C).  ``--sizes full``
takes the issue's supernet (C=16, 8 layers, batch 32, 32x32): C=16 at 32x32, 32 at 16x16, 64 at
8x8 (stride 1) and the reduction cells' stride-2 edges 32x32 -> 16x16 (C=32) and 16x16 -> 8x8
(C=64); ``reduced`` the bench_supernet default (C=8, 3 layers, batch 16, 16x16).  Kernels: 3x3 and
5x5 (SepConv, padding k//2), 3x3 and 5x5 dilation 2 (DilConv, padding k-1).

Per formulation it prints the cold lower + compile time of the three programs together and the
median run time of each (ms); ``t/j`` is PyTorch's time over JAX's (>= 1: JAX is faster).  PyTorch
runs NCHW (its native layout, as the reference code), its gradients through
``aten.convolution_backward`` with one output selected.  Timings alternate between the programs
(one pass over all of them per repetition) so that load changes hit every column alike.

``--forms`` takes the library's formulations (``kernels.FORMULATIONS``) and the candidates of
:data:`CANDIDATES`, defined here because none was taken into the library (BUILD_NOTES section 5, round 6).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from diffnas_jax.spaces import kernels, layers  # noqa: E402

KERNELS = {"3x3": (3, 1, 1), "5x5": (5, 2, 1), "3x3d2": (3, 2, 2), "5x5d2": (5, 4, 2)}  # k, padding, dilation
E = 4


def shapes(sizes: str):
    """(label, N, H, W, C, stride) of the edge groups' depthwise inputs (per edge C)."""
    if sizes == "full":
        return [("normal C16 32x32", 32, 32, 32, 16, 1), ("normal C32 16x16", 32, 16, 16, 32, 1),
                ("normal C64 8x8", 32, 8, 8, 64, 1), ("reduce C32 32->16", 32, 32, 32, 32, 2),
                ("reduce C64 16->8", 32, 16, 16, 64, 2)]
    return [("normal C8 16x16", 16, 16, 16, 8, 1), ("normal C16 8x8", 16, 8, 8, 16, 1),
            ("reduce C16 16->8", 16, 16, 16, 16, 2)]


def _tap_sums_rows(x, kernel_dot, stride, padding, dilation):
    """``kernels._shifted`` with each tap's kernel broadcast along (W, C) first: reverse mode then
    reduces each tap over (N*H) keeping a contiguous (W*C) block, then over W (XLA:CPU folds the
    two reduces of a plain broadcast into one that keeps only C, which ran 2-4x slower)."""
    kh, kw = kernel_dot.shape[0], kernel_dot.shape[1]
    (sh, sw), (dh, dw) = stride, dilation
    n, c = x.shape[0], x.shape[3]
    xp, ho, wo = kernels._padded_input(x, (kh, kw), stride, padding, dilation)
    k = kernel_dot.reshape(kh, kw, c).astype(x.dtype)
    out = None
    for i in range(kh):
        for j in range(kw):
            patch = lax.slice(xp, (0, i * dh, j * dw, 0),
                              (n, i * dh + sh * (ho - 1) + 1, j * dw + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
            kr = lax.broadcast_in_dim(k[i, j], (wo, c), (1,)).reshape(wo * c)
            term = (patch.reshape(n * ho, wo * c) * kr).reshape(patch.shape)
            out = term if out is None else out + term
    return out


# Candidates measured for issue #20 and not taken into the library (BUILD_NOTES section 5, round 6): the kernel
# tangent as unrolled shifted multiplies of x, rematerialised so only x is kept (reverse mode: one
# multiply-reduce per tap instead of XLA:CPU's dense (E*C) x (E*C) kernel-gradient convolution);
# the library's hybrid runs the same taps as one lax.scan (kernels._tap_scan), which compiles as
# one loop body instead of k*k fused copies.
_taps = kernels._make_hybrid(kernels._shifted, kernels._shifted,
                             jax.checkpoint(kernels._shifted, static_argnums=(2, 3, 4)))
_taps_rows = kernels._make_hybrid(kernels._shifted, kernels._shifted,
                                  jax.checkpoint(_tap_sums_rows, static_argnums=(2, 3, 4)))
# hybrid as it was before issue #20's change (kernel tangent: the grouped convolution)
_hybrid_grouped_kgrad = kernels._make_hybrid(kernels._shifted, kernels._shifted, kernels._grouped)
# grouped forward and input gradient, hybrid's scanned kernel tangent: 19 % faster DARTS step at the
# reduced size but 44 % longer compile (90 loops), so not the default (BUILD_NOTES section 5, round 6)
_grouped_scan_taps = kernels._make_hybrid(kernels._grouped, kernels._grouped_unit_stride, kernels._tap_scan)
_grouped_taps = kernels._make_hybrid(kernels._grouped, kernels._grouped_unit_stride,
                                     jax.checkpoint(kernels._shifted, static_argnums=(2, 3, 4)))


def _strided_hybrid(x, kernel, stride, padding, dilation):
    # grouped at unit stride, hybrid where strided (the reduction cells' first depthwise convs)
    if stride == (1, 1):
        return kernels._grouped(x, kernel, stride, padding, dilation)
    return kernels._hybrid(x, kernel, stride, padding, dilation)


CANDIDATES = {"hybrid_grouped_kgrad": _hybrid_grouped_kgrad, "taps": _taps, "taps_rows": _taps_rows,
              "grouped_scan_taps": _grouped_scan_taps, "grouped_taps": _grouped_taps, "strided_hybrid": _strided_hybrid}


def depthwise(form: str):
    """``f(x, kernel, stride, padding, dilation)`` (int arguments) of a library formulation or a candidate."""
    if form in CANDIDATES:
        return lambda x, w, s, p, d: CANDIDATES[form](x, w, (s, s), (p, p), (d, d))
    return lambda x, w, s, p, d: layers.depthwise_conv(x, w, s, p, d, form)


def jax_programs(form: str, stride: int, padding: int, dilation: int):
    f = depthwise(form)
    conv1 = lambda x, w: f(x, w, stride, padding, dilation)  # noqa: E731
    conv = jax.vmap(conv1)
    fwd = jax.jit(conv)
    xgrad = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
    kgrad = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
    return fwd, xgrad, kgrad


def torch_programs(torch, stride, padding, dilation, groups):
    F = torch.nn.functional
    conv_bwd = torch.ops.aten.convolution_backward

    def fwd(x, w, g):
        return F.conv2d(x, w, None, stride, padding, dilation, groups)

    def xgrad(x, w, g):
        return conv_bwd(g, x, w, None, [stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], groups,
                        [True, False, False])[0]

    def kgrad(x, w, g):
        return conv_bwd(g, x, w, None, [stride] * 2, [padding] * 2, [dilation] * 2, False, [0, 0], groups,
                        [False, True, False])[1]

    return fwd, xgrad, kgrad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", choices=("full", "reduced"), default="full")
    ap.add_argument("--forms", default="grouped,hybrid,hybrid_grouped_kgrad",
                    help="comma-separated: " + ",".join(kernels.FORMULATIONS + tuple(CANDIDATES)))
    ap.add_argument("--only", default=",".join(KERNELS), help="kernels to run: " + ",".join(KERNELS))
    ap.add_argument("--rows", default="", help="comma-separated indices of the shape rows to run (default all)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    forms = args.forms.split(",")
    torch = None
    if not args.no_torch:
        import torch
        torch.set_num_threads(2)
    print(f"jax {jax.__version__}, {os.cpu_count()} cpus, torch {torch.__version__ if torch else '-'}, "
          f"E={E} edges per group, load {os.getloadavg()[0]:.1f}", flush=True)
    rows = shapes(args.sizes)
    if args.rows:
        rows = [rows[int(i)] for i in args.rows.split(",")]
    parts = ("fwd", "xgrad", "kgrad")
    for label, n, h, w, c, stride in rows:
        for kname in args.only.split(","):
            k, padding, dilation = KERNELS[kname]
            rng = np.random.default_rng(0)
            x = rng.normal(size=(E, n, h, w, c)).astype(np.float32)
            wt = rng.normal(size=(E, k, k, 1, c)).astype(np.float32)
            ho = kernels.conv_out_size(h, k, stride, padding, dilation)
            wo = kernels.conv_out_size(w, k, stride, padding, dilation)
            g = rng.normal(size=(E, n, ho, wo, c)).astype(np.float32)
            xj, wj, gj = jnp.asarray(x), jnp.asarray(wt), jnp.asarray(g)
            progs, compile_s = {}, {}
            for form in forms:
                t = time.perf_counter()
                ps = [p.lower(xj, wj, gj).compile() if i else p.lower(xj, wj).compile()
                      for i, p in enumerate(jax_programs(form, stride, padding, dilation))]
                compile_s[form] = time.perf_counter() - t
                progs[form] = [lambda p=ps[0]: p(xj, wj), lambda p=ps[1]: p(xj, wj, gj),
                               lambda p=ps[2]: p(xj, wj, gj)]
            if torch is not None:
                # NCHW with the E edges' channels side by side, as one conv2d(groups=E*C)
                xt = torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 4, 2, 3).reshape(n, E * c, h, w)))
                wtt = torch.from_numpy(np.ascontiguousarray(wt.transpose(0, 4, 3, 1, 2).reshape(E * c, 1, k, k)))
                gt = torch.from_numpy(np.ascontiguousarray(g.transpose(1, 0, 4, 2, 3).reshape(n, E * c, ho, wo)))
                fs = torch_programs(torch, stride, padding, dilation, E * c)
                with torch.no_grad():
                    progs["torch"] = [lambda f=f: f(xt, wtt, gt) for f in fs]
            times = {name: [[] for _ in parts] for name in progs}
            for rep in range(args.reps + 1):
                for name, ps in progs.items():
                    for i, p in enumerate(ps):
                        t = time.perf_counter()
                        out = p()
                        if name != "torch":
                            jax.block_until_ready(out)
                        if rep:
                            times[name][i].append(time.perf_counter() - t)
            med = {name: [1e3 * statistics.median(ts) for ts in tt] for name, tt in times.items()}
            head = f"{label} {kname} s{stride} (x {E}x{n}x{h}x{w}x{c})"
            if "torch" in med:
                head += "  torch " + " / ".join(f"{v:.2f}" for v in med["torch"]) + " ms"
            print(head + f"  load {os.getloadavg()[0]:.1f}", flush=True)
            for form in forms:
                cells = []
                for i, part in enumerate(parts):
                    s = f"{part} {med[form][i]:7.2f}"
                    if "torch" in med:
                        s += f" (t/j {med['torch'][i] / med[form][i]:5.2f})"
                    cells.append(s)
                tot = sum(med[form])
                extra = f"  sum {tot:7.2f}" + (f" (t/j {sum(med['torch']) / tot:5.2f})" if "torch" in med else "")
                print(f"    {form:10s} compile {compile_s[form]:5.1f} s  " + "  ".join(cells) + extra, flush=True)


if __name__ == "__main__":
    main()
