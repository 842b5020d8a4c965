"""Where the compile time of the DARTS second-order and implicit search steps goes (issue #20).

Compiles ONE program per process (the programs are large; keep runs apart) at a reduced size and
prints a JSON line: cold lower and compile time, the CPU time of the compile (single-threaded
when it is close to the wall time), StableHLO lines, optimised HLO instructions per opcode,
XLA fusions (kernels), and the median run time. Like the ``diffnas`` command, the script restarts
itself with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (``search.host_memory``;
``DIFFNAS_HOST_MEMORY=off`` keeps glibc's defaults).

    PYTHONPATH=. python benchmarks/bench_hypergrad_compile.py PROGRAM [--C 8 --layers 3 --batch 16 --size 16]

PROGRAM (one DARTS supernet loss: softmax mixing, cross-entropy, train-mode BatchNorm):

- ``wstep``: first-order SGD weight step (``value_and_grad`` w.r.t. the weights + update);
- ``gwa``: ``value_and_grad`` w.r.t. weights and architecture (the training / validation
  gradient of the second-order step);
- ``hvp_fr``: the mixed product ``H_aw v`` by forward-over-reverse (``jvp`` of ``grad_a``);
  ``hvp_rr``: reverse-over-reverse (``grad_a <grad_w L, v>``); ``hvp_rf``: reverse-over-forward
  (``grad_a`` of the directional derivative along ``v``);
- ``so_fused``: ``search.make_step`` with ``hypergrad.unrolled(hvp="exact")`` (one program);
- ``imp_fused``: ``search.make_step`` with ``hypergrad.implicit("cg", maxiter=10, damping=1e-2)``;
- ``so_split``: the second-order hypergradient as separately compiled programs: the gradient
  program (serves the training gradient and the validation gradient at ``w'``), the virtual
  step, and the forward-over-reverse mixed product (its primal pass recomputed); prints the sum
  of their lower + compile times and the time of the composed step;
- ``imp_split``: the implicit CG-10 hypergradient with the linearisation's residuals returned by
  one program, the tangent ``v -> (H_ww v, H_aw v)`` compiled alone (outside any loop), the
  validation gradient, one CG update program, and the 10 CG iterations driven from Python.
- ``imp_split_jvp``: as ``imp_split`` but no residuals cross programs: the gradient program serves
  the training and the validation gradient, and the tangent program is ``jax.jvp`` of the
  gradient (its primal pass recomputed at every call; ``H_aw x`` accumulated from the ``H_aw p``
  of the iterations, so no final product);
- ``imp_staged``: the implicit CG-10 search step as the library runs it by default:
  ``driver.make_jitted_step`` on ``make_step(...).stages`` (three programs: gradients, one CG
  iteration, update; chained on the host), compiled by the driver's ``_compile``; prints each
  program's lower / compile time and fusions, the sum, and the step time. ``imp_fused_driver``:
  the same through the driver with ``staged_step=False`` (the one fused program);
  ``wstep_driver``: the first-order search step through the driver (``hypergrad.first_order``,
  one program), the unit of "weight steps" that the step time is divided by.
- ``residual_bytes``: no compile; ``jax.eval_shape`` of ``imp_split``'s linearisation: the number
  and size of the residuals it would ship between programs at the given size.

``XLA_FLAGS`` / ``TF_CPP_VMODULE=hlo_pass_pipeline=1,cpu_compiler=1`` (with
``TF_CPP_MIN_LOG_LEVEL=0``) give XLA's own time per HLO pass and the backend phases. Timing
figures need an idle machine or back-to-back A/B runs; the prototypes here are not exact
reproductions of the estimators' stopping rules (the split CG runs all 10 iterations).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_supernet import SGD, _data, _host_init, _weight_opt  # noqa: E402

PROGRAMS = ("wstep", "gwa", "hvp_fr", "hvp_rr", "hvp_rf", "so_fused", "imp_fused", "so_split", "imp_split",
            "imp_split_jvp", "residual_bytes", "imp_staged", "imp_fused_driver", "wstep_driver")



def _opcodes(hlo: str) -> tuple[collections.Counter, int]:
    ops = collections.Counter(re.findall(r" = [^=]*? ([a-z][a-z0-9\-]*)\(", hlo))
    return ops, ops.get("fusion", 0)


def _compile(name: str, f, *args) -> tuple:
    """Cold lower + compile of ``jit(f)``; prints one line; returns (compiled, seconds, record)."""
    t = time.perf_counter()
    lowered = jax.jit(f).lower(*args)
    lower_s = time.perf_counter() - t
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    ops, fusions = _opcodes(compiled.as_text())
    rec = {"program": name, "lower_s": round(lower_s, 1), "compile_s": round(compile_s, 1),
           "compile_cpu_s": round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 1),
           "stablehlo_lines": lowered.as_text().count("\n"), "hlo_instructions": sum(ops.values()),
           "fusions": fusions, "opcodes": dict(ops.most_common(20))}
    print(f"  {name}: lower {lower_s:.1f} s, compile {compile_s:.1f} s, {fusions} fusions", flush=True)
    return compiled, lower_s + compile_s, rec


def _median_time(fn, runs: int = 3) -> float:
    """Median over ``runs`` runs after the first (``runs=1``: that one run; for full-size steps)."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:] if runs > 1 else times))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("program", choices=PROGRAMS)
    ap.add_argument("--C", type=int, default=8)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3, help="runs of the compiled step; the first is dropped")
    ap.add_argument("--max-temp-gib", type=float, default=None,
                    help="driver modes: do not run the step if a program's compiled temporary memory is larger")
    args = ap.parse_args(argv)
    if argv is None:  # as the diffnas command: glibc.malloc.hugetlb=1 (DIFFNAS_HOST_MEMORY=off: not)
        from diffnas_jax.search.host_memory import restart_with_huge_pages

        restart_with_huge_pages()

    from diffnas_jax import hypergrad, mixing
    from diffnas_jax.hypergrad._core import tree_axpy, tree_vdot
    from diffnas_jax.search import init_search_state, make_step
    from diffnas_jax.spaces import darts

    sp = darts.search_space(C=args.C, layers=args.layers)
    bt, bv = _data(args.batch, args.size), _data(args.batch, args.size, seed=7)
    w_shapes, s_shapes = jax.eval_shape(sp.init, jax.random.key(2), bt[0])
    w, s = _host_init(w_shapes), _host_init(s_shapes)
    arch = sp.init_arch(jax.random.key(3))
    key = jax.random.key(4)
    v = jax.tree.map(lambda t: 0.01 * jnp.ones_like(t), w)

    def loss(w, a, batch, s=s):
        x, y = batch
        mix = jax.tree.map(lambda t: jax.nn.softmax(t, -1), a)
        logits, ns = sp.apply(w, s, mix, x, True, rng=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), ns

    def grads(w, a, batch):
        (value, ns), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(w, a, batch)
        return g, (value, ns)

    def hvp_fr(w, a, batch, v):
        ga = lambda w_: jax.grad(lambda w__, a_: loss(w__, a_, batch)[0], argnums=1)(w_, a)
        return jax.jvp(ga, (w,), (v,))[1]

    out: dict = {"program": args.program, "size": vars(args)}
    p = args.program
    if p in ("wstep", "gwa", "hvp_fr", "hvp_rr", "hvp_rf"):
        if p == "wstep":
            tx = _weight_opt()

            def f(w, s, opt, a, x, y):
                (value, ns), g = jax.value_and_grad(lambda w_: loss(w_, a, (x, y), s), has_aux=True)(w)
                upd, opt = tx.update(g, opt, w)
                return optax.apply_updates(w, upd), ns, opt, value
            fargs = (w, s, tx.init(w), arch, *bt)
        elif p == "gwa":
            def f(w, a, x, y):
                return grads(w, a, (x, y))
            fargs = (w, arch, *bt)
        elif p == "hvp_fr":
            def f(w, a, x, y, v):
                return hvp_fr(w, a, (x, y), v)
            fargs = (w, arch, *bt, v)
        elif p == "hvp_rr":
            def f(w, a, x, y, v):
                def inner(a_):
                    gw = jax.grad(lambda w_: loss(w_, a_, (x, y))[0])(w)
                    return tree_vdot(gw, v)
                return jax.grad(inner)(a)
            fargs = (w, arch, *bt, v)
        else:
            def f(w, a, x, y, v):
                return jax.grad(lambda a_: jax.jvp(lambda w_: loss(w_, a_, (x, y))[0], (w,), (v,))[1])(a)
            fargs = (w, arch, *bt, v)
        compiled, _, rec = _compile(p, f, *fargs)
        out.update(rec, step_s=round(_median_time(lambda: compiled(*fargs), args.runs), 3))
    elif p in ("so_fused", "imp_fused"):
        est = (hypergrad.unrolled(SGD["lr"], weight_decay=SGD["weight_decay"], momentum=SGD["momentum"], hvp="exact")
               if p == "so_fused" else hypergrad.implicit("cg", maxiter=10, damping=1e-2))
        w_opt = _weight_opt(clip=False)
        a_opt = optax.chain(optax.add_decayed_weights(1e-3), optax.adam(3e-4, b1=0.5, b2=0.999))
        state = init_search_state(jax.random.key(2), sp, bt[0], w_opt, a_opt, est)
        step = make_step(sp, mixing.softmax(), est, w_opt, a_opt)
        fargs = (state, bt, bv, key)
        compiled, _, rec = _compile(p, step, *fargs)
        out.update(rec, step_s=round(_median_time(lambda: compiled(*fargs), args.runs), 3))
    elif p == "so_split":
        eta, wd = SGD["lr"], SGD["weight_decay"]
        c_g, t_g, r_g = _compile("gradient (train at w, val at w')", grads, w, arch, bt)
        (gw, ga), _ = c_g(w, arch, bt)
        c_v, t_v, _ = _compile("virtual step", lambda w_, g_: tree_axpy(-eta, tree_axpy(wd, w_, g_), w_), w, gw)
        c_h, t_h, r_h = _compile("mixed product (forward-over-reverse)", hvp_fr, w, arch, bt, v)
        c_c, t_c, _ = _compile("combine", lambda g_, m_: tree_axpy(-eta, m_, g_), ga, ga)

        def step():
            (gw, _), _ = c_g(w, arch, bt)
            (vw, va), _ = c_g(c_v(w, gw), arch, bv)
            return c_c(va, c_h(w, arch, bt, vw)), gw
        out.update(total_lower_compile_s=round(t_g + t_v + t_h + t_c, 1), pieces=[r_g, r_h],
                   step_s=round(_median_time(step, args.runs), 3))
    elif p in ("imp_staged", "imp_fused_driver", "wstep_driver"):
        import types

        from diffnas_jax.search.driver import StagedStep, _compile as driver_compile, make_jitted_step

        est = (hypergrad.first_order() if p == "wstep_driver"
               else hypergrad.implicit("cg", maxiter=10, damping=1e-2))
        w_opt = _weight_opt(clip=False)
        a_opt = optax.chain(optax.add_decayed_weights(1e-3), optax.adam(3e-4, b1=0.5, b2=0.999))
        state = init_search_state(jax.random.key(2), sp, bt[0], w_opt, a_opt, est)
        setup = types.SimpleNamespace(step_fn=make_step(sp, mixing.softmax(), est, w_opt, a_opt),
                                      config=types.SimpleNamespace(staged_step=p == "imp_staged", vmapped=False))
        jstep = make_jitted_step(setup)
        fargs = (state, bt, bv, key, jnp.asarray(False))
        t = time.perf_counter()
        compiled, times = driver_compile(jstep, fargs)
        out.update(total_lower_compile_s=round(time.perf_counter() - t, 1), driver=times)
        progs = ((("prepare", compiled.prepare), ("iterate", compiled.iterate), ("finish", compiled.finish))
                 if isinstance(compiled, StagedStep) else (("step", compiled),))
        out["fusions"] = {name: _opcodes(c.as_text())[1] for name, c in progs}
        peaks = {}
        for name, c in progs:
            try:
                peaks[name] = round(c.memory_analysis().temp_size_in_bytes / 2**20)
            except Exception:  # noqa: BLE001 - not every backend reports it
                pass
        out["temp_MiB"] = peaks
        if args.max_temp_gib is not None and max(peaks.values(), default=0) > 1024 * args.max_temp_gib:
            out["skipped_run"] = f"compiled temporary memory over {args.max_temp_gib} GiB"
            print(json.dumps(out), flush=True)
            return 0
        st = [state]

        def run():
            # the step donates its state: feed each run the previous one's
            st[0], m = compiled(st[0], bt, bv, key, jnp.asarray(False))
            return m["train_loss"]
        out.update(step_s=round(_median_time(run, args.runs), 3), rss_MiB=round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    elif p == "residual_bytes":
        def linearize(w, a, batch):
            _, lin, _ = jax.linearize(lambda w_: grads(w_, a, batch), w, has_aux=True)
            return jax.tree.leaves(lin)
        leaves = jax.eval_shape(linearize, w, arch, bt)
        out["residuals"] = {"arrays": len(leaves),
                            "MiB": round(sum(x.size * x.dtype.itemsize for x in leaves) / 2**20)}
    elif p == "imp_split_jvp":
        ridge = 1e-2

        def tangent(w, a, batch, v):
            return jax.jvp(lambda w_: grads(w_, a, batch)[0], (w,), (v,))[1]

        def cg_update(x, r, p_, rs, hx, ap, hp):
            ap = tree_axpy(ridge, p_, ap)
            alpha = rs / tree_vdot(p_, ap)
            x, r, hx = tree_axpy(alpha, p_, x), tree_axpy(-alpha, ap, r), tree_axpy(alpha, hp, hx)
            rs_new = tree_vdot(r, r)
            return x, r, tree_axpy(rs_new / rs, p_, r), rs_new, hx

        c_g, t_g, r_g = _compile("gradient (train at w, val at w)", grads, w, arch, bt)
        c_t, t_t, r_t = _compile("tangent (H_ww v, H_aw v), primal recomputed", tangent, w, arch, bt, v)
        zeros = jax.tree.map(jnp.zeros_like, w)
        c_u, t_u, _ = _compile("CG update", cg_update, zeros, v, v, jnp.float32(1.0), arch, v, arch)

        def step():
            (gw, _), _ = c_g(w, arch, bt)
            (gvw, gva), _ = c_g(w, arch, bv)
            x, r, p_, rs, hx = zeros, gvw, gvw, tree_vdot(gvw, gvw), jax.tree.map(jnp.zeros_like, arch)
            for _ in range(10):
                ap, hp = c_t(w, arch, bt, p_)
                x, r, p_, rs, hx = c_u(x, r, p_, rs, hx, ap, hp)
            return tree_axpy(-1.0, hx, gva), gw
        out.update(total_lower_compile_s=round(t_g + t_t + t_u, 1), pieces=[r_g, r_t],
                   step_s=round(_median_time(step, args.runs), 3),
                   tangent_s=round(_median_time(lambda: c_t(w, arch, bt, v), args.runs), 3))
    else:  # imp_split
        ridge = 1e-2
        treedef = {}

        def linearize(w, a, batch):
            g, lin, aux = jax.linearize(lambda w_: grads(w_, a, batch), w, has_aux=True)
            leaves, treedef["lin"] = jax.tree.flatten(lin)
            return g, aux, leaves

        def tangent(leaves, v):
            return jax.tree.unflatten(treedef["lin"], leaves)(v)

        def cg_update(x, r, p_, rs, ap):
            ap = tree_axpy(ridge, p_, ap)
            alpha = rs / tree_vdot(p_, ap)
            x, r = tree_axpy(alpha, p_, x), tree_axpy(-alpha, ap, r)
            rs_new = tree_vdot(r, r)
            return x, r, tree_axpy(rs_new / rs, p_, r), rs_new

        c_l, t_l, r_l = _compile("linearisation (training gradient + residuals)", linearize, w, arch, bt)
        _, _, leaves = c_l(w, arch, bt)
        out["residuals"] = {"arrays": len(leaves), "MiB": round(sum(x.size * x.dtype.itemsize for x in leaves) / 2**20)}
        c_g, t_g, r_g = _compile("validation gradient", grads, w, arch, bv)
        c_t, t_t, r_t = _compile("tangent (H_ww v, H_aw v)", tangent, leaves, v)
        zeros = jax.tree.map(jnp.zeros_like, w)
        c_u, t_u, _ = _compile("CG update", cg_update, zeros, v, v, jnp.float32(1.0), v)

        def step():
            _, _, leaves = c_l(w, arch, bt)
            (gvw, gva), _ = c_g(w, arch, bv)
            x, r, p_, rs = zeros, gvw, gvw, tree_vdot(gvw, gvw)
            for _ in range(10):
                x, r, p_, rs = c_u(x, r, p_, rs, c_t(leaves, p_)[0])
            return tree_axpy(-1.0, c_t(leaves, x)[1], gva)
        out.update(total_lower_compile_s=round(t_l + t_g + t_t + t_u, 1), pieces=[r_l, r_g, r_t],
                   step_s=round(_median_time(step, args.runs), 3),
                   tangent_s=round(_median_time(lambda: c_t(leaves, v), args.runs), 3))
    out["load"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
