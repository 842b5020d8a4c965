"""Argument validation shared by every public function.

Errors name the offending argument so a researcher sees at once which call was wrong.
Checks on values only run when the value is a concrete Python number: traced values
(inside ``jit``/``grad``) cannot be inspected and are passed through.
"""
from __future__ import annotations

import numbers
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _concrete_values(value: Any):
    """The values of a Python number or of a concrete (non-traced) numpy / JAX array, else None."""
    if is_concrete_number(value):
        return np.asarray(value)
    if isinstance(value, jax.core.Tracer) or not isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return None
    try:
        arr = np.asarray(value)
    except Exception:  # an array that cannot be read on the host: treat it like a traced one
        return None
    return arr if arr.dtype.kind in "iuf" else None


def check_positive(name: str, value: Any) -> None:
    """Raise ``ValueError`` when ``value`` is a concrete number or array that is not all > 0."""
    arr = _concrete_values(value)
    if arr is not None and not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
        raise ValueError(f"`{name}` must be a positive finite number, got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    arr = _concrete_values(value)
    if arr is not None and not (np.all(np.isfinite(arr)) and np.all(arr >= 0)):
        raise ValueError(f"`{name}` must be a non-negative finite number, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a string, one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"unknown `{name}` {value!r}; expected one of {choices}")
    return value


def check_int_in_range(name: str, value: Any, low: int, high: int) -> int:
    """``low <= value <= high`` for a Python int (inclusive bounds)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"`{name}` must be in [{low}, {high}], got {value}")
    return int(value)


def as_float_array(name: str, x: Any, min_ndim: int = 0):
    """Convert to a JAX array, keep floating dtypes, promote ints/bools to the default float."""
    try:
        arr = jnp.asarray(x)
    except TypeError as e:  # pragma: no cover - message clarity only
        raise TypeError(f"`{name}` must be an array, got {type(x).__name__}") from e
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.result_type(float))
    if arr.ndim < min_ndim:
        raise ValueError(f"`{name}` must have at least {min_ndim} dimension(s), got shape {arr.shape}")
    return arr


def check_axis(name: str, axis: int, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {type(axis).__name__} {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"`{name}`={axis} is out of range for an array of rank {ndim}")
    return axis % ndim


def backend_default(variable: str, choices: Iterable[str], backend: Any, default: str) -> str:
    """A per-backend implementation choice: ``$variable`` (one of ``choices``) when set, else
    ``default``; ``backend`` (a platform name) is validated for callers that will specialise."""
    if not isinstance(backend, str):
        raise TypeError(f"`backend` must be a platform name such as 'cpu', got {backend!r}")
    chosen = os.environ.get(variable, "").strip()
    if chosen:
        if chosen not in tuple(choices):
            raise ValueError(f"{variable} must be one of {tuple(choices)}, got {chosen!r}")
        return chosen
    return default
