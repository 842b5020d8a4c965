"""Small helpers shared by the example scripts (data loading only)."""
from __future__ import annotations

import numpy as np


def digits(seed: int = 0, test_fraction: float = 0.3):
    """scikit-learn's 8x8 handwritten digits (ships with scikit-learn), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    n_test = int(len(x) * test_fraction)
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])
