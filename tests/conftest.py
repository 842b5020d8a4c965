"""Shared test set-up.

Tests run in float64 (reference fixtures are float64); dtype-preservation tests pass explicit
float32/bfloat16 inputs.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

# Tests check values, not speed, and most of the suite's time is XLA compiling search steps:
# LLVM at -O0 compiles them much faster (the CLI's search and evaluate tests: 55 s -> 34 s).
# Must be set before JAX starts its backend; subprocesses inherit it. DIFFNAS_TEST_XLA_OPT=1
# keeps the default optimisation (e.g. to rule the flag out when a numerical test fails).
if os.environ.get("DIFFNAS_TEST_XLA_OPT") != "1" and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # The legacy (non-MLIR) CPU fusion emitters: kernel emission is the largest compile phase
    # of a DARTS supernet (BUILD_NOTES section 13); the fixture program compiled 7-30 % faster
    # with them in three back-to-back pairs, same run time, same values (1.1e-14 to the fixture).
    # They expand scatters into loops: a program where that hurts passes
    # compiler_options={"xla_cpu_use_fusion_emitters": True} (test_relax_pav's parallel PAV).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                               " --xla_llvm_disable_expensive_passes=true"
                               " --xla_cpu_use_fusion_emitters=false").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("DIFFNAS_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"


@pytest.fixture(scope="session", autouse=True)
def _no_user_compile_cache(tmp_path_factory):
    """The driver and CLI cache compiled programs on disk; tests never write to the user's ~/.cache."""
    old = os.environ.get("DIFFNAS_COMPILE_CACHE")
    os.environ["DIFFNAS_COMPILE_CACHE"] = str(tmp_path_factory.mktemp("diffnas_xla_cache"))
    yield
    if old is None:
        os.environ.pop("DIFFNAS_COMPILE_CACHE", None)
    else:
        os.environ["DIFFNAS_COMPILE_CACHE"] = old


@pytest.fixture(scope="module")
def float32_module():
    """x64 off for a whole module (``pytestmark = pytest.mark.usefixtures("float32_module")``):
    for tests of what users run in JAX's default float32 (the CLI, the examples, the README).
    The x64 switched on above is for the float64 fixtures; it would also make Flax init and
    supernet compiles much slower."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", old)


def load_fixture(name: str):
    """Load ``../shared/fixtures/<name>``, skipping the test with a clear message when absent."""
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} not found (../shared is absent); skipping conformance test")
    return np.load(path, allow_pickle=False)


def rel_err(ours, ref, floor: float = 0.0) -> float:
    """max|ours - ref| / max(max|ref|, floor) as in shared/fixtures/README.md."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = max(float(np.max(np.abs(ref))) if ref.size else 0.0, floor, 1e-300)
    return float(np.max(np.abs(ours - ref))) / denom if ref.size else 0.0


def assert_same_derivatives(f, g, args: tuple, direction, hvp_argnums, grad_tol=(1e-10, 1e-12),
                            hvp_tol=(1e-9, 1e-11)) -> None:
    """Two formulations of one scalar function of ``args`` (jitted): equal gradients in every
    argument, and equal forward-over-reverse products (the second-order estimators' tangent of
    the gradient in ``hvp_argnums``) along ``direction`` in ``args[0]``. Tolerances (rtol, atol)."""
    argnums = tuple(range(len(args)))
    for u, t in zip(jax.tree_util.tree_leaves(jax.jit(jax.grad(f, argnums))(*args)),
                    jax.tree_util.tree_leaves(jax.jit(jax.grad(g, argnums))(*args))):
        np.testing.assert_allclose(u, t, rtol=grad_tol[0], atol=grad_tol[1])

    def hvp(h):
        return jax.jit(lambda p: jax.jvp(lambda p: jax.grad(h, hvp_argnums)(p, *args[1:]), (p,), (direction,))[1])

    for u, t in zip(jax.tree_util.tree_leaves(hvp(f)(args[0])), jax.tree_util.tree_leaves(hvp(g)(args[0]))):
        np.testing.assert_allclose(u, t, rtol=hvp_tol[0], atol=hvp_tol[1])


def load_script(path: pathlib.Path, name: str):
    """Import a script that is not in a package (``examples/``, ``benchmarks/``) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # dataclasses (Flax modules) resolve string annotations through sys.modules
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fixture_loader():
    return load_fixture
