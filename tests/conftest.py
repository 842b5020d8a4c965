"""Shared test set-up.

Tests run in float64 (reference fixtures are float64); dtype-preservation tests pass explicit
float32/bfloat16 inputs.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import jax
import numpy as np
import pytest

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
