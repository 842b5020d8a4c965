"""A restricted unpickler: data files only, never code.

``pickle.load`` on a user's file can run arbitrary code (any global can be called by REDUCE).
Files we read (CIFAR-10 python batches, NAS-Bench-Graph tables) contain only containers,
strings, numbers and numpy arrays, so everything else is refused.
"""
from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO

# numpy needs a handful of globals to rebuild arrays and scalars; nothing here executes
# user-controlled code.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a pickle asks for a global outside the data allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits only dicts, lists, tuples, strings, bytes, numbers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to unpickle global {module}.{name}: only plain data (dicts, lists, strings, "
            "bytes, numbers, numpy arrays) is allowed")


def safe_load(file: BinaryIO | bytes, *, encoding: str = "ASCII") -> Any:
    """Load a pickle of plain data; raise :class:`UnsafePickleError` on anything else."""
    if isinstance(file, (bytes, bytearray)):
        file = io.BytesIO(file)
    return RestrictedUnpickler(file, encoding=encoding).load()
