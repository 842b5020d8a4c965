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
