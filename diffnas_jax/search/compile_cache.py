"""The persistent XLA compilation cache of the CLI and the driver.

The search step of a supernet takes tens of seconds to minutes to compile on a CPU; JAX can keep
compiled programs on disk and load them in the next process. The directory is chosen as:

1. an explicit ``DIR`` (``--compile-cache DIR``, ``SearchConfig.compile_cache``), or ``off``;
2. else the environment variable ``DIFFNAS_COMPILE_CACHE`` (a directory, or ``off``);
3. else, when the user already configured JAX's cache (``jax_compilation_cache_dir``), that one;
4. else ``$XDG_CACHE_HOME/diffnas_jax/xla`` (``~/.cache/diffnas_jax/xla``).

Programs that compile in under a second are not stored (JAX's own threshold).
"""
from __future__ import annotations

import os
import pathlib

__all__ = ["ENV_VAR", "default_cache_dir", "resolve_cache_dir", "enable_compile_cache"]

ENV_VAR = "DIFFNAS_COMPILE_CACHE"


def default_cache_dir() -> pathlib.Path:
    """``$XDG_CACHE_HOME/diffnas_jax/xla`` (``~/.cache`` when ``XDG_CACHE_HOME`` is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "diffnas_jax" / "xla"


def resolve_cache_dir(setting: str | None = None) -> pathlib.Path | None:
    """The cache directory for ``setting`` (see the module docstring); ``None`` means off."""
    if setting is None:
        setting = os.environ.get(ENV_VAR) or None
    if setting is None:
        import jax

        current = jax.config.jax_compilation_cache_dir
        return pathlib.Path(current) if current else default_cache_dir()
    if setting.strip().lower() in ("off", "none", "0", "false", ""):
        return None
    return pathlib.Path(setting).expanduser()


def enable_compile_cache(setting: str | None = None) -> pathlib.Path | None:
    """Point JAX's persistent compilation cache at :func:`resolve_cache_dir`; return the directory.

    ``off`` leaves JAX's configuration as it is. An unwritable directory turns the cache off
    with a warning rather than failing the run.
    """
    path = resolve_cache_dir(setting)
    if path is None:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        import warnings

        warnings.warn(f"compilation cache {path} is not writable ({e.strerror}); compiling without it",
                      stacklevel=2)
        return None
    import jax

    if jax.config.jax_compilation_cache_dir != str(path):
        jax.config.update("jax_compilation_cache_dir", str(path))
        try:  # the cache object is created once per process; let it see the new directory
            from jax._src import compilation_cache as _cc

            _cc.reset_cache()
        except Exception:  # pragma: no cover - private API moved; the setting still applies to new processes
            pass
    return path
