"""The sequential stack PAV as an XLA FFI kernel on the CPU (``_pav_cpu.cc``), when built.

Pool-adjacent-violators for the isotonic problems of soft sorting and ranking (Blondel, Teboul,
Berthet & Djolonga, ICML 2020).  The kernel makes the decisions of the pure-XLA stack solvers
in ``sorting.py`` (same pairs, same order, same differences) and returns what they return:
per element of a (batch, n) problem its block's first index in the row, the block's size and
statistics.  XLA:CPU runs the pure-XLA loop at 25-60 ns a step; the kernel's step costs a few
ns (BUILD_NOTES section 3).  The pure-XLA solvers stay the reference and the fallback: when the
extension was not built (an install without a C++ compiler), on any backend other than the
CPU, and when ``DIFFNAS_PAV=xla``.

Importing this module loads nothing; the extension is imported and its targets registered
with XLA once, at the first trace that uses them.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from diffnas_jax._checks import backend_default
from diffnas_jax._ffi_targets import register

__all__ = ["available", "enabled", "solver"]

PAV_IMPLEMENTATIONS = ("ffi", "xla")


@functools.cache
def _targets() -> tuple[str, ...] | None:
    """Import the extension and register its handlers with XLA (once); None when not built."""
    return register("diffnas_jax.relax._pav_cpu")


def available() -> bool:
    """Whether the CPU kernel was built and its targets are registered."""
    return _targets() is not None


def enabled() -> bool:
    """At trace time: run the FFI kernel for the sequential PAV?  ``DIFFNAS_PAV`` ("ffi" or
    "xla") decides when set, else the kernel runs on the CPU backend when it was built.
    ``DIFFNAS_PAV=ffi`` without the extension is an error rather than a silent fallback."""
    backend = jax.default_backend()
    default = "ffi" if backend == "cpu" and available() else "xla"
    chosen = backend_default("DIFFNAS_PAV", PAV_IMPLEMENTATIONS, backend, default)
    if chosen == "ffi" and not available():
        raise RuntimeError("DIFFNAS_PAV=ffi but the PAV kernel diffnas_jax.relax._pav_cpu is not built "
                           "(reinstall with a C++17 compiler, or set DIFFNAS_PAV=xla)")
    if chosen == "ffi" and backend != "cpu":
        raise RuntimeError(f"DIFFNAS_PAV=ffi: the PAV kernel runs on the CPU only, the default backend "
                           f"is {backend!r}")
    return chosen == "ffi"


def solver(target: str, n_stats: int, finish: Callable = lambda stats: stats):
    """``solve(p, q, scale)`` on (batch, n) rows (``scale`` a scalar or one per row), returning
    (first index in the row (int32), block size, ``finish(stats)``) per element, (batch, n) each,
    the contract of ``sorting._stack_solver``'s solvers.  float32 / float64 only (the callers
    upcast narrower dtypes)."""

    def solve(p: jax.Array, q: jax.Array, scale):
        batch, n = p.shape
        dt = p.dtype
        if batch * n == 0:
            zero = jnp.zeros(p.shape, dt)
            return jnp.zeros(p.shape, jnp.int32), jnp.ones(p.shape, dt), tuple(finish((zero,) * n_stats))
        if _targets() is None:
            raise RuntimeError("the PAV kernel diffnas_jax.relax._pav_cpu is not built")
        p, q, scale = (lax.stop_gradient(x) for x in (p, q, scale))
        row_scale = jnp.broadcast_to(jnp.asarray(scale, dt), (batch, 1)).reshape(batch)
        shape = jax.ShapeDtypeStruct(p.shape, dt)
        # broadcast_all: a vmapped call is one call on the stacked rows (the kernel flattens the
        # leading dimensions); sorting folds vmapped axes into the batch before this anyway
        call = jax.ffi.ffi_call(target, (jax.ShapeDtypeStruct(p.shape, jnp.int32),) + (shape,) * (1 + n_stats),
                                vmap_method="broadcast_all")
        first, size, *stats = call(p, q.astype(dt), row_scale)
        return first, size, tuple(finish(tuple(stats)))

    return solve
