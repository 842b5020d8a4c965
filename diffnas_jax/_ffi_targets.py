"""Registration of the optional C++ kernels' XLA FFI handlers (``relax/_pav_cpu.cc``,
``spaces/_dwconv_cpu.cc``): each extension module's ``targets()`` returns ``{name: PyCapsule}``
(``_native/ffi_module.h``)."""
from __future__ import annotations

import importlib

import jax

__all__ = ["register"]


def register(module: str) -> tuple[str, ...] | None:
    """Import the extension ``module`` and register its handlers with XLA for the CPU; the
    target names, or None when it was not built (or this jax has no ``jax.ffi``).  Callers cache
    the result: XLA must see each target once."""
    if not hasattr(jax, "ffi"):
        return None
    try:
        extension = importlib.import_module(module)
    except ImportError:
        return None
    names = []
    for name, capsule in extension.targets().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
        names.append(name)
    return tuple(names)
