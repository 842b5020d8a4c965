"""Strict JSON: what the library writes parses with every JSON parser.

Python's ``json`` writes ``NaN`` / ``Infinity`` tokens by default, which strict parsers (JavaScript,
``jq``, Go, Rust's serde) reject. Here non-finite floats become ``null`` and the paths where that
happened are listed under :data:`NON_FINITE_KEY`, so a reader can tell a missing value from a
diverged one. Writes are atomic (temporary file, then ``os.replace``).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Mapping

NON_FINITE_KEY = "non_finite"
"""Key of the note listing the JSON paths (``a/b/0``) whose non-finite numbers were written as null."""

__all__ = ["NON_FINITE_KEY", "to_strict", "dumps", "write_json"]


def _plain(v: Any, path: str, bad: list[str]) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _plain(x, f"{path}/{k}" if path else str(k), bad) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x, f"{path}/{i}" if path else str(i), bad) for i, x in enumerate(v)]
    if hasattr(v, "shape") and hasattr(v, "dtype") or type(v).__module__ == "numpy":
        import numpy as np

        a = np.asarray(v)
        if a.dtype.kind == "f":
            a = a.astype(np.float64)
        return _plain(a.tolist() if a.ndim else a.item(), path, bad)
    if isinstance(v, float) and not math.isfinite(v):
        bad.append(path or "/")
        return None
    return v


def to_strict(obj: Any) -> tuple[Any, list[str]]:
    """``obj`` (nested dicts, lists, numpy/JAX arrays and scalars) as plain JSON values.

    Returns:
      ``(value, paths)``: non-finite floats replaced by ``None`` and the ``/``-joined paths where
      that happened (empty when everything was finite).
    """
    bad: list[str] = []
    return _plain(obj, "", bad), bad


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` with ``allow_nan=False`` after :func:`to_strict`.

    When ``obj`` is a mapping and some value was non-finite, the note ``{NON_FINITE_KEY: [paths]}``
    is added to it (for other top-level values the nulls stand alone).
    """
    value, bad = to_strict(obj)
    if bad and isinstance(value, dict):
        value[NON_FINITE_KEY] = bad
    return json.dumps(value, allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> pathlib.Path:
    """Write ``obj`` as strict JSON to ``path`` atomically (parents created)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = dumps(obj, indent=indent)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
