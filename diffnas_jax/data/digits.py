"""scikit-learn's handwritten digits (8x8 grey images, 10 classes; ships with scikit-learn)."""
from __future__ import annotations

import numpy as np

from .dataset import Dataset, carve_split, standardize


def load_digits_splits(seed: int = 0, *, test_fraction: float = 0.2, val_fraction: float = 0.5,
                       standardized: bool = True) -> Dataset:
    """The 1797 digits as ``(N, 8, 8, 1)`` float32 images, split into train / val / test.

    Pixels (0..16) are scaled to [0, 1] and, when ``standardized``, standardised with the
    training split's mean and std. ``test_fraction`` of the data is held out for testing, then
    ``val_fraction`` of the rest becomes the validation (architecture) split, as DARTS halves the
    CIFAR-10 training set for search (Liu et al. 2019, Sec. 3.1). Splits are stratified-free
    random permutations, a pure function of ``seed``.

    Reference: Alpaydin & Kaynak, Optical Recognition of Handwritten Digits, UCI 1998.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    y = d.target.astype(np.int32)
    x_rest, y_rest, x_test, y_test = carve_split(x, y, test_fraction, seed)
    x_train, y_train, x_val, y_val = carve_split(x_rest, y_rest, val_fraction, seed + 1)
    arrays = dict(x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, x_test=x_test, y_test=y_test)
    if standardized:
        arrays = standardize(arrays)
    return Dataset(**arrays, num_classes=10, name="digits", flip=False)
