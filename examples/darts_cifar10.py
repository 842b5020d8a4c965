"""A DARTS search on local CIFAR-10 (not downloaded: point --data-dir at your copy).

The DARTS cell space (Liu et al., ICLR 2019) with the DARTS relaxation and the second-order
(unrolled) hypergradient, on CIFAR-10 read from a local folder in either standard layout
(``data_batch_1.bin`` ... or the python-pickle ``data_batch_1`` ..., read without ``pickle``'s
code execution). Without the data it prints a clear message and exits with status 0 (skipped).

Expected output with data: a ``Genotype(normal=[...], reduce=[...])`` and the search metrics;
a CPU only affords a tiny setting (``--quick``), a GPU the paper's.

    python examples/darts_cifar10.py --data-dir ~/data/cifar-10-batches-py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys


def main(data_dir: str | None, quick: bool = False, out: str = "runs/darts_cifar10") -> dict | None:
    from diffnas_jax.data import load_dataset

    data_dir = data_dir or os.environ.get("CIFAR10_DIR")
    if not data_dir or not os.path.isdir(data_dir):
        print(f"CIFAR-10 directory not found ({data_dir!r}); pass --data-dir or set CIFAR10_DIR. Skipping.")
        return None
    from diffnas_jax.search.driver import SearchConfig, run_search

    dataset = load_dataset("cifar10", data_dir=data_dir, seed=0)
    config = SearchConfig(space="darts", method="darts_2nd", dataset="cifar10", data_dir=data_dir,
                          epochs=1 if quick else 50, batch_size=16 if quick else 64,
                          channels=8 if quick else 16, layers=5 if quick else 8, augment=True, out=out,
                          max_steps=20 if quick else None)
    result = run_search(config, dataset=dataset)
    print(result.get("genotype"))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="runs/darts_cifar10")
    a = p.parse_args()
    main(a.data_dir, a.quick, a.out)
    sys.exit(0)
