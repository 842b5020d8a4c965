"""The CPU kernel of the sequential PAV (``relax/_pav_cpu.cc`` through ``relax/_pav_ffi``) against
the pure-XLA stack solvers it replaces on the CPU (``sorting._pav_*_sequential``, the reference).

The kernel transcribes the XLA rules operation for operation, so on the same differences it
must make the same decisions: the blocks (first index and size per element) are compared with
``array_equal`` in float64 and in float32.  The block statistics are compared to rounding: the
kl rules call glibc's exp / log1p where XLA has its own polynomial approximations (an ulp apart
here and there), and whether XLA fuses a multiply-add depends on its optimisation level (the
tests run XLA at -O0, conftest.py).  A last-ulp difference of a statistic could in principle
flip a later near-tie decision; on these inputs it does not, and the outputs through the shared
post-solver code agree to rounding.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from diffnas_jax.relax import _pav_ffi, isotonic_kl, isotonic_l2, soft_rank, soft_sort
from diffnas_jax.relax import sorting

pytestmark = pytest.mark.skipif(
    not _pav_ffi.available(),
    reason="the optional PAV kernel diffnas_jax.relax._pav_cpu is not built (pip install -e . with a C++17 "
           "compiler); the pure-XLA solvers run instead",
)

# (kernel, pure-XLA reference) per problem
SOLVERS = {
    "sort_l2": (sorting._pav_l2_ffi, sorting._pav_l2_sequential),
    "rank_l2": (sorting._pav_l2_ffi, sorting._pav_l2_sequential),
    "sort_kl": (sorting._pav_kl_sorted_ffi, sorting._pav_kl_sorted_sequential),
    "rank_kl": (sorting._pav_kl_rank_ffi, sorting._pav_kl_rank_sequential),
    "iso_kl": (sorting._pav_kl_ffi, sorting._pav_kl_sequential),
}


def _rows(n: int, dtype) -> np.ndarray:
    """Random rows at several scales, ties, a constant row, 1e-30 and 1e30 magnitudes, -inf
    entries and a NaN (the solvers see NaN only if a caller forgets to mask it; both must then
    decide alike: ``_diff`` maps NaN to 0)."""
    rng = np.random.default_rng(n)
    rows = [rng.standard_normal(n) * s for s in (1.0, n / 4, 1e-3, 1e6)]
    rows.append(np.round(rng.standard_normal(n) * 2))  # many ties
    rows.append(np.full(n, 3.0))
    rows.append(rng.standard_normal(n) * 1e-30)
    rows.append(rng.standard_normal(n) * 1e30)
    mixed = rng.standard_normal(n) * 10.0 ** rng.integers(-30, 31, n)
    rows.append(mixed)
    masked = rng.standard_normal(n)
    masked[rng.random(n) < 0.3] = -np.inf
    rows.append(masked)
    nan = rng.standard_normal(n)
    nan[n // 2] = np.nan
    rows.append(nan)
    return np.stack(rows).astype(dtype)


def _problem(kind: str, x: jax.Array, eps: jax.Array):
    """The (p, q, eps) that soft_sort / soft_rank / isotonic_kl hand to the solver."""
    if kind == "iso_kl":
        w = jnp.flip(jnp.sort(x, axis=-1), axis=-1) * 0.5 + 1.0
        return x, w, jnp.ones_like(eps)
    perm = sorting._argsort_descending(jnp.where(jnp.isnan(x), 0, x))
    s = sorting._take(x, perm)
    rho = sorting._rho(s.shape, s.dtype)
    if kind == "sort_l2":
        c = sorting._row_scale(s)
        return rho, s / c, eps * c
    if kind == "rank_l2":
        return s, rho, eps
    if kind == "sort_kl":
        return rho, s, eps
    return s, rho, eps  # rank_kl solves on rho itself


def _assert_same_solution(ffi_out, ref_out):
    """Blocks equal; statistics to rounding (see the module docstring)."""
    (f_first, f_size, f_stats), (r_first, r_size, r_stats) = ffi_out, ref_out
    np.testing.assert_array_equal(f_first, r_first)
    np.testing.assert_array_equal(f_size, r_size)
    dtype = np.asarray(r_size).dtype
    assert f_first.dtype == jnp.int32 and f_size.dtype == dtype
    for a, b in zip(f_stats, r_stats):
        assert a.dtype == dtype
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b))
        ok = np.isfinite(b)
        # stats are sums relative to the block's first element: scale the tolerance by the
        # block size (an l2 sum of n terms, a kl log-sum of up to n exps)
        tol = (1e-13 if dtype == np.float64 else 2e-5) * np.maximum(np.abs(b[ok]), np.asarray(r_size)[ok])
        assert np.all(np.abs(a[ok] - b[ok]) <= tol), float(np.max(np.abs(a[ok] - b[ok])))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", list(SOLVERS))
@pytest.mark.parametrize("n", [1, 7, 300])
def test_kernel_finds_the_blocks_of_the_xla_solver(kind, dtype, n):
    x = jnp.asarray(_rows(n, dtype))
    scales = np.array([0.1, 1.0, 10.0, 1.0, 1.0, 1e6, 1e-3, 1.0, 0.5, 1.0, 2.0])
    eps = jnp.asarray(scales[: x.shape[0], None], dtype)
    p, q, e = _problem(kind, x, eps)
    ffi, ref = SOLVERS[kind]
    _assert_same_solution(jax.jit(ffi)(p, q, e), jax.jit(ref)(p, q, e))


def test_kernel_scalar_strength_and_empty_rows():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 50)))
    p, q, _ = _problem("rank_l2", x, jnp.ones((3, 1)))
    for e in (jnp.asarray(0.5), jnp.full((3, 1), 0.5)):
        _assert_same_solution(sorting._pav_l2_ffi(p, q, e), sorting._pav_l2_sequential(p, q, e))
    first, size, (a,) = sorting._pav_l2_ffi(jnp.zeros((0, 4)), jnp.zeros((0, 4)), 1.0)
    assert first.shape == size.shape == a.shape == (0, 4)


def test_kernel_under_vmap_of_the_unfolded_solver():
    """``vmap_method="broadcast_all"``: a vmapped call (not folded by sorting's custom_vmap) is
    one call on the stacked rows, with a per-row strength."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((4, 3, 40)))
    eps = jnp.asarray(rng.uniform(0.1, 2.0, (4, 1)))
    solve = _pav_ffi.solver("diffnas_pav_l2", 1)
    got = jax.vmap(solve)(x, jnp.flip(jnp.sort(x, axis=-1), -1), eps)
    want = sorting._pav_l2_sequential_2d(x.reshape(12, 40), jnp.flip(jnp.sort(x, axis=-1), -1).reshape(12, 40),
                                         jnp.repeat(eps, 3, axis=0))
    _assert_same_solution(jax.tree.map(lambda a: a.reshape(12, 40), got), want)


# ----------------------------------------------------------------------------------------------
# The public ops through the kernel against the same ops with DIFFNAS_PAV=xla.


def _ops():
    return {
        "soft_sort_l2": lambda x: soft_sort(x, regularization_strength=0.7),
        "soft_rank_l2": lambda x: soft_rank(x, regularization_strength=0.7),
        "soft_sort_kl": lambda x: soft_sort(x, regularization_strength=0.7, regularization="kl"),
        "soft_rank_kl": lambda x: soft_rank(x, "DESCENDING", 0.7, "kl"),
        "isotonic_l2": lambda x: isotonic_l2(x),
        "isotonic_kl": lambda x: isotonic_kl(x),
    }


def _with(impl: str, fn):
    """Run ``fn`` with ``DIFFNAS_PAV=impl`` (whatever the environment of the test run says), the
    jit caches cleared so that the choice, made at trace time, is made again."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIFFNAS_PAV", impl)
        jax.clear_caches()
        try:
            return fn()
        finally:
            jax.clear_caches()


def test_choice_of_implementation(monkeypatch):
    x = jnp.ones((2, 5))
    jaxpr = lambda: str(jax.make_jaxpr(lambda v: soft_sort(v))(x))  # noqa: E731
    assert "diffnas_pav_l2" in _with("ffi", jaxpr)
    assert "diffnas_pav" not in _with("xla", jaxpr)
    monkeypatch.delenv("DIFFNAS_PAV", raising=False)
    jax.clear_caches()
    assert ("diffnas_pav_l2" in jaxpr()) == (jax.default_backend() == "cpu")  # the default: the kernel
    jax.clear_caches()
    monkeypatch.setenv("DIFFNAS_PAV", "cuda")
    with pytest.raises(ValueError, match="DIFFNAS_PAV"):
        _pav_ffi.enabled()


@pytest.mark.parametrize("name", list(_ops()))
def test_ops_through_the_kernel_equal_the_xla_path(name):
    """Values, VJPs under jit, vmap over a leading axis, and forward-over-reverse
    (``jax.jvp(jax.grad(...))``, what the hypergradients use), float64."""
    op = _ops()[name]
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 3, 64)) * 4)
    w = jnp.asarray(rng.standard_normal((2, 3, 64)))
    v = jnp.asarray(rng.standard_normal((2, 3, 64)))

    def run():
        loss = lambda u: jnp.sum(op(u) * w)  # noqa: E731
        value = jax.jit(op)(x)
        grad = jax.jit(jax.grad(loss))(x)
        vmapped = jax.vmap(op)(x)
        fwd_rev = jax.jvp(jax.grad(loss), (x,), (v,))[1]
        return value, grad, vmapped, fwd_rev

    ours, ref = _with("ffi", run), _with("xla", run)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours[2], ours[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(_ops()))
def test_ops_through_the_kernel_check_grads(name):
    op = _ops()[name]
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 9)) * 3)
    _with("ffi", lambda: check_grads(op, (x,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ops_through_the_kernel_keep_narrow_dtypes(dtype):
    """float32 runs the kernel in float32; bfloat16 is upcast to float32 in Python, as on the
    XLA path."""
    x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 33)), dtype)

    def run():
        for name, op in _ops().items():
            out = op(x)
            assert out.dtype == dtype, name
            ref = op(x.astype(jnp.float64))
            tol = 1e-4 if dtype == jnp.float32 else 5e-2
            np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=tol, atol=tol * 10, err_msg=name)

    _with("ffi", run)


def test_nan_rows_and_masks_through_the_kernel():
    x = np.random.default_rng(6).standard_normal((3, 20))
    x[1, 4] = np.nan
    x[2, :5] = -np.inf
    x = jnp.asarray(x)

    def run():
        return [op(x) for op in _ops().values()]

    ours, ref = _with("ffi", run), _with("xla", run)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        assert np.all(np.isnan(a[1]))
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_environment_variable_is_read_at_trace_time(monkeypatch):
    monkeypatch.delenv("DIFFNAS_PAV", raising=False)
    assert _pav_ffi.enabled() == (jax.default_backend() == "cpu")
    monkeypatch.setenv("DIFFNAS_PAV", "xla")
    assert not _pav_ffi.enabled()
    assert os.environ["DIFFNAS_PAV"] == "xla"
