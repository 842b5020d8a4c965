"""soft_sort / soft_rank and sorting_network against the authors' implementations
(../shared/fixtures/relax_reference.npz), plus basic properties."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_fixture
from diffnas_jax.relax import soft_rank, soft_sort, sorting_network

FSS_CASES = [(op, reg, dr, eps) for op in ("sort", "rank") for reg in ("l2", "kl") for dr in ("asc", "desc")
             for eps in ("0.1", "1.0", "10.0")]


def _fss(op, reg, dr, eps):
    d = load_fixture("relax_reference.npz")
    x = d["fss/x_pos"] if (op == "sort" and reg == "kl") else d["fss/x"]
    fn = soft_sort if op == "sort" else soft_rank
    f = lambda v: fn(v, direction="ASCENDING" if dr == "asc" else "DESCENDING",  # noqa: E731
                     regularization_strength=float(eps), regularization=reg)
    out, vjp = jax.vjp(f, jnp.asarray(x))
    key = f"fss/{op}_{reg}_{dr}_{eps}"
    return d, key, out, vjp(jnp.asarray(d["fss/cot"]))[0]


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.mark.parametrize("case", FSS_CASES, ids=lambda c: "_".join(c))
def test_soft_sort_rank_values_match_fast_soft_sort(case):
    d, key, out, _ = _fss(*case)
    assert _rel(out, d[key]) < 1e-6


@pytest.mark.parametrize("case", [c for c in FSS_CASES if not (c[0] == "sort" and c[1] == "kl")], ids=lambda c: "_".join(c))
def test_soft_sort_rank_vjps_match_fast_soft_sort(case):
    d, key, _, g = _fss(*case)
    assert _rel(g, d["fss/vjp_" + key[4:]]) < 1e-6


def _tie_groups(row):
    _, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
    return [np.flatnonzero(inverse == g) for g in np.flatnonzero(counts > 1)]


@pytest.mark.parametrize("case", [c for c in FSS_CASES if c[0] == "sort" and c[1] == "kl"], ids=lambda c: "_".join(c))
def test_kl_soft_sort_reference_vjp_matches_fast_soft_sort(case):
    # The authors' KL sort VJP weights each block by softmax(rho / eps), not by the softmax of the
    # sorted values that the output depends on; kl_vjp="reference" reproduces it.  At a tie the
    # reference's order comes from numpy's unstable argsort, so a tie group is compared by its sum
    # (the part of the VJP that does not depend on how the tie is broken).
    op, reg, dr, eps = case
    d = load_fixture("relax_reference.npz")
    x = d["fss/x_pos"]
    f = lambda v: soft_sort(v, direction="ASCENDING" if dr == "asc" else "DESCENDING",  # noqa: E731
                            regularization_strength=float(eps), regularization="kl", kl_vjp="reference")
    g = np.asarray(jax.vjp(f, jnp.asarray(x))[1](jnp.asarray(d["fss/cot"]))[0])
    ref = d[f"fss/vjp_sort_kl_{dr}_{eps}"]
    scale = np.max(np.abs(ref))
    ties = 0
    for b, row in enumerate(x):
        free = np.ones(row.shape, bool)
        for group in _tie_groups(row):
            ties += 1
            free[group] = False
            assert abs(g[b, group].sum() - ref[b, group].sum()) / scale < 1e-6
        assert np.max(np.abs(g[b, free] - ref[b, free]), initial=0.0) / scale < 1e-6
    assert ties >= 1  # the fixture's tie is exercised


@pytest.mark.parametrize("direction", ["ASCENDING", "DESCENDING"])
@pytest.mark.parametrize("eps", [0.1, 1.0, 10.0])
def test_kl_soft_sort_exact_vjp_is_the_derivative(direction, eps):
    from jax.test_util import check_grads

    x = jnp.asarray(np.random.RandomState(0).rand(3, 7) * 3 + 0.1)
    f = lambda v: soft_sort(v, direction=direction, regularization_strength=eps, regularization="kl")  # noqa: E731
    check_grads(f, (x,), order=1, modes=["rev"])
    # and it differs from the reference VJP wherever a block has more than one element
    if eps == 10.0:
        cot = jnp.asarray(np.random.RandomState(1).randn(3, 7))
        g = jax.vjp(f, x)[1](cot)[0]
        gr = jax.vjp(lambda v: soft_sort(v, direction=direction, regularization_strength=eps,
                                         regularization="kl", kl_vjp="reference"), x)[1](cot)[0]
        assert float(jnp.max(jnp.abs(g - gr))) > 1e-3


def _ds_cases():
    nets = ("odd_even", "bitonic")
    dists = ("cauchy", "logistic", "logistic_phi", "gaussian", "reciprocal", "optimal")
    return [(n, dist) for n in nets for dist in dists]


@pytest.mark.parametrize("case", _ds_cases(), ids=lambda c: "_".join(c))
def test_sorting_network_matches_diffsort(case):
    d = load_fixture("relax_reference.npz")
    net, dist = case
    x = jnp.asarray(d["ds/x"])

    @jax.jit  # the steepness is traced: both fixture steepnesses share one compilation
    def run(v, steep):
        f = lambda u: sorting_network(u, network=net, distribution=dist, steepness=steep)  # noqa: E731
        return f(v), jax.grad(lambda u: jnp.sum(f(u)[0] * d["ds/cot"]))(v)

    for st in ("2.0", "10.0"):
        name = f"ds/{net}_{dist}_{st}"
        (s, p), g = run(x, float(st))
        assert _rel(s, d[name + "/sorted"]) < 1e-6
        assert float(np.max(np.abs(np.asarray(p) - d[name + "/perm"]))) < 1e-6
        assert _rel(g, d[name + "/grad"]) < 1e-6
        np.testing.assert_allclose(jnp.einsum("bi,bij->bj", x, p), s, rtol=1e-10, atol=1e-10)


def test_limits_ties_and_dtypes():
    x = jnp.array([3.0, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(soft_rank(x, regularization_strength=1e-4), [4.0, 1.0, 2.5, 2.5], atol=1e-3)
    np.testing.assert_allclose(soft_sort(x, regularization_strength=1e-4), [1.0, 2.0, 2.0, 3.0], atol=1e-3)
    np.testing.assert_allclose(soft_rank(x, regularization_strength=1e6), [2.5] * 4, atol=1e-3)
    for dtype in (jnp.float32, jnp.bfloat16):
        assert soft_rank(x.astype(dtype)).dtype == dtype
        assert sorting_network(x.astype(dtype))[0].dtype == dtype
    big = jnp.array([1e30, -1e30, 0.0, 5.0])
    for f in (lambda v: soft_rank(v).sum(), lambda v: sorting_network(v)[0].sum()):
        assert np.all(np.isfinite(np.asarray(jax.grad(f)(big))))
    with pytest.raises(ValueError, match="direction"):
        soft_sort(x, direction="UP")
    with pytest.raises(ValueError, match="regularization"):
        soft_rank(x, regularization="l1")
    with pytest.raises(ValueError, match="network"):
        sorting_network(x, network="bubble")
    with pytest.raises(ValueError, match="distribution"):
        sorting_network(x, distribution="laplace")


def _sequential_pav_kl(y, w):
    """Textbook sequential PAV for isotonic KL (non-increasing), block value lse(y) - lse(w)."""
    from scipy.special import logsumexp

    blocks = []
    for i in range(len(y)):
        blocks.append([i, i + 1])
        while len(blocks) > 1:
            (a0, a1), (b0, b1) = blocks[-2], blocks[-1]
            va = logsumexp(y[a0:a1]) - logsumexp(w[a0:a1])
            vb = logsumexp(y[b0:b1]) - logsumexp(w[b0:b1])
            if va > vb:
                break
            blocks[-2:] = [[a0, b1]]
    out = np.empty(len(y))
    for a0, a1 in blocks:
        out[a0:a1] = logsumexp(y[a0:a1]) - logsumexp(w[a0:a1])
    return out


def test_kl_soft_sort_equals_sequential_pav_on_wide_inputs():
    """Regression: the parallel PAV's window pooled far blocks whose exp terms underflowed
    (an exact float "tie"), off by up to 1.9 in float64 on these inputs (found by
    benchmarks/bench_relax.py against torchsort)."""
    from diffnas_jax.relax import soft_sort

    n = 50
    x = np.random.default_rng(0).standard_normal((32, n)) * n / 4
    rho = np.arange(n, 0, -1.0)
    ref = np.stack([-(rho - _sequential_pav_kl(rho, np.sort(-r)[::-1])) for r in x])
    np.testing.assert_allclose(np.asarray(soft_sort(jnp.asarray(x), regularization="kl")), ref, atol=1e-9)
    out32 = np.asarray(soft_sort(jnp.asarray(x, jnp.float32), regularization="kl"))
    np.testing.assert_allclose(out32, ref, atol=1e-3 * np.abs(ref).max())


def _sequential_pav_l2(y):
    """Textbook sequential PAV for isotonic l2 (non-increasing)."""
    sums, sizes = [], []
    for v in y:
        sums.append(v)
        sizes.append(1)
        while len(sums) > 1 and sums[-2] / sizes[-2] <= sums[-1] / sizes[-1]:
            s, c = sums.pop(), sizes.pop()
            sums[-1] += s
            sizes[-1] += c
    return np.concatenate([np.full(c, s / c) for s, c in zip(sums, sizes)])


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_l2_soft_sort_equals_sequential_pav_on_pooling_chains(scale):
    """The long-range PAV step (one segmented scan per pooled block, both ways) against the
    textbook algorithm: wide inputs pool into long chains (scale 1) or one block (1e-3)."""
    from diffnas_jax.relax import soft_sort

    n = 50
    x = np.random.default_rng(1).standard_normal((32, n)) * n / 4 * scale
    rho = np.arange(n, 0, -1.0)
    ref = np.stack([-(rho - _sequential_pav_l2(rho - np.sort(-r)[::-1])) for r in x])
    np.testing.assert_allclose(np.asarray(soft_sort(jnp.asarray(x))), ref, atol=1e-9 * np.abs(ref).max())
