"""The optional CPU kernels: the sequential PAV (``diffnas_jax/relax/_pav_cpu.cc``) and the depthwise
convolution (``diffnas_jax/spaces/_dwconv_cpu.cc``).

Everything else about the package is in ``pyproject.toml``.  The extensions are optional: without
a C++17 compiler (or jaxlib's XLA FFI headers) the install still succeeds and the pure-XLA
forms run instead (``diffnas_jax.relax._pav_ffi.available()``, ``diffnas_jax.spaces._dwconv.available()``).
"""
from __future__ import annotations

import importlib.util
import os

from setuptools import Extension, setup


def _ffi_include_dir() -> str:
    # jax.ffi.include_dir() is jaxlib/include; find it without importing jax (a build
    # environment needs only jaxlib, see [build-system] requires)
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return ""
    return os.path.join(list(spec.submodule_search_locations)[0], "include")


def _kernel_wanted() -> bool:
    # DIFFNAS_BUILD_KERNEL=0 builds a pure-Python (py3-none-any) wheel, e.g. one built on a laptop
    # for Colab: a platform wheel would only install on the OS and Python it was built with
    return os.environ.get("DIFFNAS_BUILD_KERNEL", "1") != "0"


def _kernel(name: str, source: str) -> Extension:
    return Extension(
        name,
        sources=[source],
        # diffnas_jax/ for _native/ffi_module.h, the kernels' shared CPython module and FP mode
        include_dirs=[_ffi_include_dir(), "diffnas_jax"],
        depends=["diffnas_jax/_native/ffi_module.h"],
        language="c++",
        # -ffp-contract=off: no fused multiply-adds, so the kernels round where XLA does (the PAV
        # decides near-ties alike); no -march=native: the wheel must run on any x86-64
        extra_compile_args=["-std=c++17", "-O3", "-g0", "-ffp-contract=off", "-fvisibility=hidden"],
        optional=True,
    )


setup(
    ext_modules=[] if not _kernel_wanted() else [
        _kernel("diffnas_jax.relax._pav_cpu", "diffnas_jax/relax/_pav_cpu.cc"),
        _kernel("diffnas_jax.spaces._dwconv_cpu", "diffnas_jax/spaces/_dwconv_cpu.cc"),
    ],
)
