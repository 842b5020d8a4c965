"""The two pool-adjacent-violators solvers of ``relax/sorting.py`` give the same blocks.

``_pav_l2`` / ``_pav_kl`` pick the sequential stack PAV when JAX's default backend is the CPU
and the parallel pooling rounds otherwise; the tests of the public functions run whichever the test
machine picks, so this file pins the other one to it: on the same inputs both must return the
same block starts (the blocks decide the outputs and the VJPs).  One compilation per method and
shape: the cases go through one jitted call as rows of one batch.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffnas_jax.relax import sorting


def _cases(n, dtype):
    """Rows that exercise the pooling: random at several scales, long pooling chains (values
    nearly as close as the strength), ties, a constant row, huge magnitudes, an outlier."""
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(n) * n / 4, rng.standard_normal(n) * n / 40, rng.standard_normal(n),
            np.round(rng.standard_normal(n) * 2) / 2, np.full(n, 3.0), rng.standard_normal(n) * 1e8,
            np.arange(n) * 1.0 + rng.standard_normal(n) * 0.1, np.r_[1e30, rng.standard_normal(n - 1)]]
    return np.stack(rows).astype(dtype)


def _starts(first):
    """Block starts from each element's block-first index."""
    first = np.asarray(first)
    return first == np.arange(first.shape[-1])


def _problem(kind, x, eps):
    """The sorted (p, q, eps) that soft_sort / soft_rank hand to the solver."""
    perm = sorting._argsort_descending(x)
    s = sorting._take(x, perm)
    rho = sorting._rho(s.shape, s.dtype)
    if kind == "sort_l2":
        c = sorting._row_scale(s)
        return rho, s / c, eps * c
    if kind == "rank_l2":
        return s, rho, eps
    if kind == "sort_kl":
        return rho, s, eps
    return s, jnp.log(rho), eps


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_sequential_and_parallel_pav_find_the_same_blocks(reg, dtype):
    pav = sorting._pav_l2 if reg == "l2" else sorting._pav_kl
    x = _cases(200, dtype)
    eps = jnp.asarray([[0.1], [1.0], [10.0], [1.0], [1.0], [1e6], [0.5], [1.0]], dtype)  # per row
    # the soft_sort and soft_rank problems as rows of one batch: one compilation per method
    problems = zip(_problem("sort_" + reg, x, eps), _problem("rank_" + reg, x, eps))
    p, q, e = (jnp.concatenate(parts) for parts in problems)
    solve = jax.jit(pav, static_argnums=3)
    # The test process selects XLA:CPU's legacy fusion emitters (conftest.py), which take ~50 s
    # to compile the parallel kl rounds; this program gets the default emitters back.
    parallel = jax.jit(functools.partial(pav, method="parallel")).lower(p, q, e).compile(
        compiler_options={"xla_cpu_use_fusion_emitters": True})
    par_blocks, par_stats = parallel(p, q, e)
    par = _starts(par_blocks.first)
    # kl: the general (log-domain) stack solver and the one for sorted rows (linear domain;
    # float64 only, where the blocks must match exactly: one compilation less)
    sequential = [solve(p, q, e, "sequential")]
    if reg == "kl" and dtype == np.float64:
        sequential.append(jax.jit(functools.partial(pav, method="sequential", sorted_rows=True))(p, q, e))
    for seq_blocks, seq_stats in sequential:
        seq = _starts(seq_blocks.first)
        assert seq.shape[0] < seq.sum() < seq.size  # pooled and free blocks
        if dtype == np.float64:
            np.testing.assert_array_equal(seq, par)
            # the block sizes and the statistics the stack kept equal the parallel path's segment sums
            np.testing.assert_array_equal(seq_blocks.size, par_blocks.size)
            for s, t in zip(seq_stats, par_stats):
                np.testing.assert_allclose(s, t, rtol=1e-9, atol=1e-9 * np.max(np.abs(t)))
        else:  # a float32 near-tie may be pooled by one and not the other, with the same values
            assert np.mean(seq != par) < 1e-2
        assert np.all(seq[:, 0])  # every row starts a block: no pooling across rows


def _while_bodies(hlo: str) -> list[str]:
    """Bodies of the compiled program's ``lax.while_loop``s; XLA's own loops (e.g. a scatter
    expanded into a loop, as the legacy CPU emitters the test process selects do) are left out."""
    names = re.findall(r"\bwhile\(.*?body=(%[\w.-]+).*?op_name=\"[^\"]*/while\"", hlo)
    comps = {m.group(1): m.group(2) for m in re.finditer(r"^(%[\w.-]+) .*?\{\n(.*?)^\}", hlo, re.S | re.M)}
    return [comps[name] for name in names]


def test_sequential_pav_runs_in_place():
    """The stack must update in place: a copy of it per step made the loop O(n^2) (see
    ``_stack_pav``).  The optimised HLO's while body must not copy an array of the stack's size."""
    n = 1000
    p = jnp.arange(n, 0, -1, dtype=jnp.float32)[None]
    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, n)) * 100, jnp.float32)
    for pav in (sorting._pav_l2_sequential, sorting._pav_kl_sequential, sorting._pav_kl_sorted_sequential):
        hlo = jax.jit(lambda a, b: pav(a, b, 1.0)).lower(p, q).compile().as_text()
        bodies = _while_bodies(hlo)
        assert len(bodies) == 1
        copies = [line for line in bodies[0].splitlines() if f"[{n + 1}]" in line and " copy(" in line]
        assert not copies, copies


@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_sequential_pav_vmap_folds_into_the_batch(reg):
    """jax.vmap (over the values, the strength, or nested) gives the blocks of separate calls;
    the vmap rule folds the vmapped axis into the batch of one loop."""
    pav = sorting._pav_l2_sequential if reg == "l2" else sorting._pav_kl_sequential
    x = _cases(40, np.float64)[:6].reshape(2, 3, 40)
    p, q = jnp.sort(x, axis=-1)[..., ::-1], jnp.broadcast_to(jnp.arange(40.0, 0, -1), x.shape)
    eps = jnp.asarray([0.3, 3.0])
    each = [jax.jit(pav)(p[i], q[i], eps[i]) for i in range(2)]  # jit: one compilation, not op by op
    each = jax.tree.map(lambda *xs: np.stack(xs), *each)
    jax.tree.map(np.testing.assert_array_equal, jax.jit(jax.vmap(pav))(p, q, eps), each)
    nested = jax.jit(jax.vmap(jax.vmap(pav, (0, 0, None)), (0, 0, 0)))(p[..., None, :], q[..., None, :], eps)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[..., 0, :], b), nested, each)
    # one loop over the folded batch (6 rows of 40), its stack updated in place: the default
    # vmap rule selected over the whole stack on every step
    (body,) = _while_bodies(jax.jit(jax.vmap(pav)).lower(p, q, eps).compile().as_text())
    assert not [line for line in body.splitlines() if "[241]" in line and " copy(" in line]


def test_inclusive_count_is_exact():
    """The block slots come from a cumulative count done as triangular matmuls per chunk of 32,
    recursively over the chunk totals (faster than XLA:CPU's scan): exact across chunk
    boundaries and recursion levels, and its matmuls ask for full precision (a GPU's default
    TF32 matmul would round counts past 2**11; the CPU ignores the setting, hence the HLO check)."""
    rng = np.random.default_rng(0)
    for total in (1, 32, 33, 1025, 70000):
        mask = rng.random(total) < 0.7
        with jax.default_matmul_precision("bfloat16"):
            got = jax.jit(sorting._inclusive_count)(jnp.asarray(mask))
        np.testing.assert_array_equal(got, np.cumsum(mask))
    hlo = jax.jit(sorting._inclusive_count).lower(jnp.zeros(100, bool)).as_text()
    dots = re.findall(r"dot_general.*", hlo)
    assert dots and all("precision = [HIGHEST, HIGHEST]" in d for d in dots)


# ----------------------------------------------------------------------------------------------
# The lane stack (rows side by side in one loop) against the sequential stack.

_KL_SORTED_SEQUENTIAL = sorting._stack_solver(sorting._kl_sorted_stack_step, (1.0, 1.0),
                                              lambda sums: tuple(jnp.log(a) for a in sums))


_KL_RANK_SEQUENTIAL = sorting._stack_solver(functools.partial(sorting._kl_sorted_stack_step, linear_w=True),
                                            (1.0, 1.0), lambda sums: tuple(jnp.log(a) for a in sums))


def _lanes(p, q, eps, linear_w=False):
    """The lane runner on any number of rows (the solver uses it from _LANE_MIN_ROWS rows on)."""
    e = jnp.broadcast_to(eps, (p.shape[0], 1)).reshape(-1).astype(p.dtype)
    rule = sorting._kl_sorted_rule(p.shape[1], linear_w)
    first, size, sums = sorting._lane_stack_pav(p, q, e, (1.0, 1.0), rule)
    return first, size.astype(p.dtype), tuple(jnp.log(a) for a in sums)


def _kl_sorted_problems(dtype):
    """soft_sort and soft_rank kl problems on rows with ties, a constant row, huge magnitudes,
    an outlier, -inf entries, a row of zeros (what a NaN row is solved as) at eight scales and
    strengths from 1e-3 to 1e6, one per row: 160 rows."""
    x = _cases(64, dtype)
    x = np.concatenate([x, np.zeros((1, 64), dtype), x[:1]])
    x[-1, ::7] = -np.inf
    x = np.concatenate([x * scale for scale in (1.0, 1e-2, 30.0, 1e4, 0.3, 3.0, 1e-4, 300.0)]).astype(dtype)
    eps = jnp.asarray(np.geomspace(1e-3, 1e6, x.shape[0])[:, None], dtype)
    problems = zip(_problem("sort_kl", jnp.asarray(x), eps), _problem("rank_kl", jnp.asarray(x), eps))
    return tuple(jnp.concatenate(parts) for parts in problems)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lane_stack_equals_sequential_stack(dtype):
    """Same blocks, sizes and block statistics, bit for bit (one rule, ``_kl_sorted_rule``), on
    many rows and on one row; the solver picks the lanes from ``_LANE_MIN_ROWS`` rows on."""
    p, q, e = _kl_sorted_problems(dtype)
    seq = jax.jit(_KL_SORTED_SEQUENTIAL)(p, q, e)
    starts = _starts(seq[0])
    assert p.shape[0] < starts.sum() < starts.size  # pooled and free blocks
    assert np.isfinite(np.asarray(seq[2][0])).all()
    lanes = jax.jit(_lanes)
    jax.tree.map(np.testing.assert_array_equal, lanes(p, q, e), seq)
    one = jax.tree.map(lambda a: a[3:4], seq)  # the tie row, alone
    jax.tree.map(np.testing.assert_array_equal, lanes(p[3:4], q[3:4], e[3:4]), one)
    assert p.shape[0] >= sorting._LANE_MIN_ROWS  # so the solver itself runs the lanes here
    jax.tree.map(np.testing.assert_array_equal, jax.jit(sorting._pav_kl_sorted_sequential)(p, q, e), seq)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_lane_stack_equals_sequential_stack_for_rank_rule(dtype):
    """The same for soft_rank's rule on rho itself (``linear_w``): bit for bit, and the blocks
    are those of the log(rho) problem (float64; float32 may differ at near-ties, issue 19)."""
    p, q, e = _problem("rank_kl", jnp.asarray(_cases(64, dtype)), jnp.asarray(np.geomspace(1e-2, 1e2, 8)[:, None], dtype))
    q_lin = sorting._rho(p.shape, p.dtype)
    seq = jax.jit(_KL_RANK_SEQUENTIAL)(p, q_lin, e)
    jax.tree.map(np.testing.assert_array_equal, jax.jit(functools.partial(_lanes, linear_w=True))(p, q_lin, e), seq)
    if dtype == np.float64:
        ref = jax.jit(_KL_SORTED_SEQUENTIAL)(p, q, e)
        np.testing.assert_array_equal(seq[0], ref[0])
        np.testing.assert_allclose(np.stack(seq[2]), np.stack(ref[2]), rtol=1e-12, atol=1e-12)


def test_lane_stack_under_vmap():
    """jax.vmap folds the mapped axis into the rows: 2 x 80 rows run as one lane stack of 160,
    separate calls of 80 rows as the sequential stack; the blocks must agree."""
    p, q, e = (a.reshape((2, 80) + a.shape[1:]) for a in _kl_sorted_problems(np.float64))
    assert 80 < sorting._LANE_MIN_ROWS <= 160
    pav = sorting._pav_kl_sorted_sequential
    each = jax.tree.map(lambda *xs: np.stack(xs), *[jax.jit(pav)(p[i], q[i], e[i]) for i in range(2)])
    jax.tree.map(np.testing.assert_array_equal, jax.jit(jax.vmap(pav))(p, q, e), each)


def test_lane_stack_runs_in_place():
    """The lane loop's stack must update in place (one scatter per step): no copy of a
    (rows, n + 1) array in the optimised while body."""
    rows, n = 64, 300
    p = jnp.broadcast_to(jnp.arange(n, 0, -1, dtype=jnp.float32), (rows, n))
    q = jnp.asarray(np.sort(np.random.default_rng(0).standard_normal((rows, n)) * 100)[:, ::-1], jnp.float32)
    (body,) = _while_bodies(jax.jit(_lanes).lower(p, q, 1.0).compile().as_text())
    copies = [line for line in body.splitlines() if f"[{rows},{n + 1}]" in line and " copy(" in line]
    assert not copies, copies


# The compile options of a user's program (conftest.py selects faster-compiling ones for the tests).
_DEFAULT_COMPILE = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False,
                    "xla_cpu_use_fusion_emitters": True}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sequential_pav_loop_is_one_kernel(dtype):
    """XLA:CPU compiles a while loop that accesses under 1024 bytes per iteration into a single
    kernel (``xla_cpu_small_while_loop_byte_threshold``, the "small call"); otherwise each of the
    body's ~15 fusions runs as its own task at ~0.1-0.2 us, and a 25 ns step becomes ~2 us (a
    second row interleaved in the kl step, 1100-1300 bytes, ran 30-50x slower). Every sequential
    solver's loop must stay under the budget, in float32 and float64."""
    n = 100
    p = jnp.zeros((4, n), dtype)
    for pav in (sorting._pav_l2_sequential, sorting._pav_kl_sequential, sorting._pav_kl_sorted_sequential,
                sorting._pav_kl_rank_sequential):
        hlo = jax.jit(lambda a, b, pav=pav: pav(a, b, 1.0)).lower(p, p).compile(_DEFAULT_COMPILE).as_text()
        assert "xla_cpu_small_call" in hlo


@pytest.mark.parametrize("op", ["soft_sort", "soft_rank"])
def test_kl_ops_on_lanes_equal_the_sequential_stack(op):
    """End to end: soft_sort / soft_rank kl of 128 rows (the lane stack) give the values and
    gradients (w.r.t. the values and a traced strength) of the same rows in two calls of 64 (the
    sequential stack), float64, to rounding."""
    fn = getattr(sorting, op)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((128, 30)) * np.geomspace(0.1, 100, 128)[:, None]
    assert 64 < sorting._LANE_MIN_ROWS <= 128
    x[5] = np.round(x[5])  # ties
    w = rng.standard_normal(x.shape)

    def loss(x, eps, w):
        out = fn(x, regularization="kl", regularization_strength=eps)
        return jnp.sum(out * w), out

    run = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
    (_, out), (gx, ge) = run(x, 0.7, w)
    halves = [run(x[i:i + 64], 0.7, w[i:i + 64]) for i in (0, 64)]
    np.testing.assert_allclose(out, np.concatenate([h[0][1] for h in halves]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gx, np.concatenate([h[1][0] for h in halves]), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ge, sum(h[1][1] for h in halves), rtol=1e-10)
