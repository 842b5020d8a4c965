"""A small synthetic image-classification task with a known answer."""
from __future__ import annotations

import numpy as np

from .dataset import Dataset


def synthetic(seed: int = 0, *, num_train: int = 512, num_val: int = 512, num_test: int = 256,
              image_size: int = 8, channels: int = 1, num_classes: int = 4, noise: float = 0.5) -> Dataset:
    """Class-prototype images plus Gaussian noise, ``(N, image_size, image_size, channels)`` float32.

    Each class has a fixed random smooth prototype; an example is its prototype shifted by up
    to one pixel plus ``noise`` times white noise, so convolutions beat a linear model but the
    task is learnable in a few epochs. All arrays are a pure function of ``seed``.
    """
    for name, v in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test),
                    ("image_size", image_size), ("channels", channels)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an int >= 2, got {num_classes!r}")
    if not noise >= 0:
        raise ValueError(f"`noise` must be >= 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(num_classes, image_size + 2, image_size + 2, channels))
    # a 3x3 box blur makes prototypes spatially smooth (local structure for convolutions)
    proto = sum(raw[:, i:i + image_size, j:j + image_size] for i in range(3) for j in range(3)) / 3.0

    def make(n):
        y = rng.integers(num_classes, size=n).astype(np.int32)
        shifts = rng.integers(-1, 2, size=(n, 2))
        x = np.stack([np.roll(proto[c], tuple(s), axis=(0, 1)) for c, s in zip(y, shifts)])
        x = x + noise * rng.normal(size=x.shape)
        return x.astype(np.float32), y

    x_train, y_train = make(num_train)
    x_val, y_val = make(num_val)
    x_test, y_test = make(num_test)
    return Dataset(x_train, y_train, x_val, y_val, x_test, y_test, num_classes=int(num_classes),
                   name="synthetic", flip=False)
