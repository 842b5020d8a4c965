"""The :class:`Dataset` container and split helpers."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train / validation / test splits as numpy arrays.

    Attributes:
      x_train, x_val, x_test: images ``(N, H, W, C)`` float32.
      y_train, y_val, y_test: labels ``(N,)`` int32 in ``[0, num_classes)``.
      num_classes: ``K``.
      name: a readable name recorded in results.
      flip: whether horizontal flips are a valid augmentation (not for digits or text-like data).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str = "dataset"
    flip: bool = True

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    def summary(self) -> dict:
        return {"name": self.name, "image_shape": list(self.image_shape), "num_classes": int(self.num_classes),
                "train": int(len(self.y_train)), "val": int(len(self.y_val)), "test": int(len(self.y_test))}

    def train_plus_val(self) -> tuple[np.ndarray, np.ndarray]:
        """Both search splits joined (the training set of a from-scratch evaluation)."""
        return (np.concatenate([self.x_train, self.x_val]), np.concatenate([self.y_train, self.y_val]))


def carve_split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """Split ``(x, y)`` into ``(x_a, y_a, x_b, y_b)`` with ``round(fraction * N)`` examples in ``b``.

    The permutation is a pure function of ``seed``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"`fraction` must be in (0, 1), got {fraction!r}")
    n = len(y)
    n_b = int(round(fraction * n))
    if n_b < 1 or n_b >= n:
        raise ValueError(f"cannot carve a split of fraction {fraction} from {n} examples")
    perm = np.random.default_rng(seed).permutation(n)
    a, b = np.sort(perm[n_b:]), np.sort(perm[:n_b])
    return x[a], y[a], x[b], y[b]


def standardize(ds_arrays: dict, eps: float = 1e-6) -> dict:
    """Per-channel standardisation with statistics of the training split only."""
    x = ds_arrays["x_train"]
    mean = x.mean(axis=(0, 1, 2), keepdims=True)
    std = x.std(axis=(0, 1, 2), keepdims=True) + eps
    out = dict(ds_arrays)
    for k in ("x_train", "x_val", "x_test"):
        out[k] = ((ds_arrays[k] - mean) / std).astype(np.float32)
    return out
