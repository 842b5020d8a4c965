"""Numpy batch iteration whose order is a pure function of ``(seed, epoch)``."""
from __future__ import annotations

from typing import Iterator

import numpy as np


def num_batches(n: int, batch_size: int, drop_last: bool = True) -> int:
    """Number of batches of an epoch over ``n`` examples."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def epoch_batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                  shuffle: bool = True, drop_last: bool = True, start: int = 0
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(x_batch, y_batch)`` numpy pairs for one epoch.

    The permutation depends only on ``(seed, epoch)`` — never on how many batches were drawn
    before — so a search resumed mid-epoch (``start`` = index of the first batch to yield)
    sees exactly the batches of an uninterrupted run.
    """
    n = len(y)
    if len(x) != n:
        raise ValueError(f"`x` has {len(x)} examples but `y` has {n}")
    if batch_size > n and drop_last:
        raise ValueError(f"`batch_size` {batch_size} exceeds the {n} examples of the split")
    idx = (np.random.default_rng([int(seed), int(epoch)]).permutation(n) if shuffle else np.arange(n))
    for b in range(start, num_batches(n, batch_size, drop_last)):
        sel = idx[b * batch_size:(b + 1) * batch_size]
        yield x[sel], y[sel]
