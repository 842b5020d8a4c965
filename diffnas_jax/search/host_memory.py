"""Large host buffers on transparent huge pages, so an XLA:CPU step does not fault them in 4 KiB at a time.

XLA:CPU allocates each execution's temporary buffer (the compiled peak: 2.4 GiB for the DARTS
C=16 weight step, 9.4 GiB for its second-order search step) with ``posix_memalign`` and frees it
when the step ends. glibc serves a block that large with a fresh ``mmap`` and ``munmap``-s it on
``free``, so every step faults every 4 KiB page of it in again: 620k minor faults per weight step,
2.45M per second-order step, about half of the latter's time on the 2-core machine (BUILD_NOTES
section 5, round 9). glibc 2.35 and later can ask the kernel for transparent huge pages on the
blocks it maps (the tunable ``glibc.malloc.hugetlb=1``; the kernel's THP mode ``madvise`` or
``always``): 2 MiB pages, 512 times fewer faults. glibc reads its tunables when the process starts,
so:

- the ``diffnas`` command starts itself again, once, with the tunable set
  (:func:`restart_with_huge_pages`, before JAX is imported);
- scripts and notebooks get it by starting Python with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
  (:func:`tunables` gives the variable, merged with any tunables already set); the search driver
  prints :func:`advice` once before it compiles when a CPU process was started without it.

``DIFFNAS_HOST_MEMORY=off`` leaves the allocator alone; a ``glibc.malloc.hugetlb`` the user set is
kept as it is. Other C libraries (musl, macOS, Windows) are left alone.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Mapping, Sequence

__all__ = ["ENV_VAR", "TUNABLE", "glibc_version", "tunables", "restart_with_huge_pages", "advice"]

ENV_VAR = "DIFFNAS_HOST_MEMORY"
TUNABLE = "glibc.malloc.hugetlb"
_MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


@functools.lru_cache(maxsize=1)
def glibc_version() -> tuple[int, int] | None:
    """``(major, minor)`` of the process's glibc, or ``None`` when the C library is another one."""
    try:
        get = ctypes.CDLL(None).gnu_get_libc_version
    except (OSError, AttributeError, TypeError):
        return None
    get.restype = ctypes.c_char_p
    try:
        major, minor = get().decode().split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def _enabled(setting: str | None) -> bool:
    if setting is None:
        setting = os.environ.get(ENV_VAR, "huge-pages")
    if not isinstance(setting, str):
        raise TypeError(f"`setting` must be 'huge-pages', 'off' or None, got {type(setting).__name__}")
    value = setting.strip().lower()
    if value in ("off", "0", "false", "no"):
        return False
    if value in ("huge-pages", "on", "1", "true", "yes", ""):
        return True
    raise ValueError(f"`setting` (or ${ENV_VAR}) must be 'huge-pages' or 'off', got {setting!r}")


def tunables(setting: str | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables to add so that a new process maps large blocks on huge pages.

    Args:
      setting: ``"huge-pages"`` or ``"off"``; ``None`` reads ``$DIFFNAS_HOST_MEMORY`` (default
        huge-pages).
      environ: the environment to extend (default ``os.environ``).
    Returns:
      ``{"GLIBC_TUNABLES": ...}`` (the existing tunables with ``glibc.malloc.hugetlb=1`` added), or
      ``{}`` when nothing is to change: turned off, not glibc >= 2.35, or ``glibc.malloc.hugetlb``
      already set.
    """
    if not _enabled(setting):
        return {}
    version = glibc_version()
    if version is None or version < _MIN_GLIBC:
        return {}
    environ = os.environ if environ is None else environ
    current = environ.get("GLIBC_TUNABLES", "")
    if any(item.split("=")[0].strip() == TUNABLE for item in current.split(":")):
        return {}
    return {"GLIBC_TUNABLES": f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"}


def restart_with_huge_pages(argv: Sequence[str] | None = None, setting: str | None = None) -> None:
    """Replace this process by the same command with :func:`tunables` in its environment.

    Returns (does nothing) when there is nothing to add; otherwise does not return. Call it first
    thing in a program's entry point, before any JAX computation (the new process starts over).

    Args:
      argv: the command line to run again (default ``sys.orig_argv``: the interpreter, its
        options, the script or ``-m`` module and the arguments).
      setting: as in :func:`tunables`.
    """
    extra = tunables(setting)
    if not extra:
        return
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, {**os.environ, **extra})


def advice(platform: str, setting: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """A one-line hint for a process about to run XLA:CPU steps without huge pages, else ``None``.

    ``None`` when ``platform`` is not ``"cpu"`` or :func:`tunables` has nothing to add (turned off,
    not glibc >= 2.35, or the tunable already set when the process started).

    Args:
      platform: the JAX backend the steps run on (``jax.default_backend()``).
      setting, environ: as in :func:`tunables`.
    """
    if platform != "cpu":
        return None
    extra = tunables(setting, environ)
    if not extra:
        return None
    return (f"note: start Python with GLIBC_TUNABLES={extra['GLIBC_TUNABLES']} for faster CPU steps: "
            "without it every step faults its XLA buffers in 4 KiB at a time (the `diffnas` command "
            f"sets it itself; {ENV_VAR}=off silences this)")
