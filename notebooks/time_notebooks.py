"""Runs each notebook of this folder top to bottom in a fresh kernel and prints its wall time and
the CPU time its kernel used.

    python notebooks/time_notebooks.py [--quick] [--keep DIR] [NAME.ipynb ...]

Without ``--quick`` the notebooks run with their full settings, and the wall times go into
MEASURED in build_notebooks.py (they are what the install cells state). ``--quick`` runs them as
the test suite does (``DIFFNAS_NOTEBOOK_QUICK=1``, XLA's CPU back end at optimisation level 0).
``--keep DIR`` writes the executed notebooks (with outputs) there, to read the results.
Each notebook runs in a temporary folder with its own kernel, so JAX's compile cache is cold
unless the environment sets one. On a loaded machine the wall time grows with the load; the
kernel's CPU time (user + system, all threads) much less so.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import resource
import sys
import tempfile
import time

import nbclient
import nbformat

HERE = pathlib.Path(__file__).resolve().parent
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def time_notebook(path: pathlib.Path, keep: pathlib.Path | None = None) -> tuple[float, float]:
    """``(wall seconds, kernel CPU seconds)`` of one fresh top-to-bottom run."""
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                         resources={"metadata": {"path": tmp}})
        cpu0, t0 = _children_cpu(), time.perf_counter()
        client.execute()  # the kernel is shut down (and waited for) at the end: its CPU time counts
        wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, keep / path.name)
    return wall, cpu


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="notebooks of this folder (default: all)")
    ap.add_argument("--quick", action="store_true", help="the test suite's small settings")
    ap.add_argument("--keep", type=pathlib.Path, default=None, help="write the executed notebooks here")
    args = ap.parse_args(argv)
    # the kernel runs `python` from PATH: make it this interpreter
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    if args.quick:
        os.environ["DIFFNAS_NOTEBOOK_QUICK"] = "1"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + QUICK_XLA_FLAGS).strip()
    else:
        os.environ.pop("DIFFNAS_NOTEBOOK_QUICK", None)
    paths = [HERE / n for n in args.names] if args.names else sorted(HERE.glob("*.ipynb"))
    print(f"{'notebook':36s} {'wall s':>7s} {'CPU s':>7s}   ({os.cpu_count()} CPUs, "
          f"{'quick' if args.quick else 'full'} settings)")
    for p in paths:
        load = os.getloadavg()[0]
        wall, cpu = time_notebook(p, args.keep)
        print(f"{p.name:36s} {wall:7.0f} {cpu:7.0f}   (load {load:.1f} at start, {os.getloadavg()[0]:.1f} at end)",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
