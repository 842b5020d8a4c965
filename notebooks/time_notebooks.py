"""Runs each notebook of this folder top to bottom in a fresh kernel and prints its wall time.

    python notebooks/time_notebooks.py [NAME.ipynb ...]

The figures go into MEASURED in build_notebooks.py (they are what the install cell states).
Each notebook runs in a temporary folder with its own kernel, so JAX's compile cache is cold
unless the environment sets one.
"""
from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

import nbclient
import nbformat

HERE = pathlib.Path(__file__).resolve().parent


def time_notebook(path: pathlib.Path) -> float:
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        client = nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                                         resources={"metadata": {"path": tmp}})
        t0 = time.perf_counter()
        client.execute()
        return time.perf_counter() - t0


def main(names: list[str]) -> None:
    # the kernel runs `python` from PATH: make it this interpreter
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    paths = [HERE / n for n in names] if names else sorted(HERE.glob("*.ipynb"))
    print(f"{'notebook':36s} {'wall s':>7s}   ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at start)")
    for p in paths:
        print(f"{p.name:36s} {time_notebook(p):7.0f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
