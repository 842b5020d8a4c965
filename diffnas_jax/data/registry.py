"""One entry point from a ``--dataset`` string to a :class:`Dataset`."""
from __future__ import annotations

from .dataset import Dataset

DATASETS = ("digits", "cifar10", "synthetic")


def load_dataset(name: str, *, data_dir: str | None = None, seed: int = 0) -> Dataset:
    """``digits`` | ``cifar10`` (needs ``data_dir``) | ``synthetic`` | a path ending in ``.npz``."""
    if not isinstance(name, str):
        raise TypeError(f"`dataset` must be a string, got {type(name).__name__}")
    if name.endswith(".npz"):
        from .npz import load_npz
        return load_npz(name, seed=seed)
    if name == "digits":
        from .digits import load_digits_splits
        return load_digits_splits(seed)
    if name == "cifar10":
        if data_dir is None:
            raise ValueError("`--dataset cifar10` needs `--data-dir DIR` holding the extracted CIFAR-10 batches")
        from .cifar import load_cifar10
        return load_cifar10(data_dir, seed=seed)
    if name == "synthetic":
        from .synthetic import synthetic
        return synthetic(seed)
    raise ValueError(f"unknown `dataset` {name!r}; expected one of {DATASETS} or a path to a FILE.npz")
