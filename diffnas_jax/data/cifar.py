"""CIFAR-10 from a local directory, in either standard layout (no download).

- binary: ``data_batch_1.bin`` ... ``data_batch_5.bin``, ``test_batch.bin``; each record is one
  label byte followed by 3072 pixel bytes (R, G, B planes of 32x32).
- python pickle: ``data_batch_1`` ... ``data_batch_5``, ``test_batch``; each a dict with ``data``
  ``(N, 3072)`` uint8 and ``labels`` (a list). These are read with a restricted unpickler
  (:mod:`diffnas_jax._safe_pickle`) that admits only plain data, so a crafted file cannot run code.

Either set of files may sit in ``data_dir`` itself or in its ``cifar-10-batches-bin`` /
``cifar-10-batches-py`` sub-directory (the archives' own folder names).

Reference: Krizhevsky, Learning Multiple Layers of Features from Tiny Images, 2009.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

from .dataset import Dataset, carve_split, standardize

_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_TEST = "test_batch"
_RECORD = 1 + 32 * 32 * 3


def _find_layout(data_dir: pathlib.Path) -> tuple[str, pathlib.Path]:
    candidates = [(data_dir, "bin"), (data_dir / "cifar-10-batches-bin", "bin"),
                  (data_dir, "py"), (data_dir / "cifar-10-batches-py", "py")]
    for folder, kind in candidates:
        first = folder / (_TRAIN[0] + (".bin" if kind == "bin" else ""))
        if first.is_file():
            return kind, folder
    tried = ", ".join(str(f / (_TRAIN[0] + (".bin" if k == "bin" else ""))) for f, k in candidates)
    raise FileNotFoundError(
        f"no CIFAR-10 batches found under {data_dir}: looked for {tried}. Download and extract "
        "cifar-10-binary.tar.gz or cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html")


def _read_bin(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 file missing: {path}")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _RECORD:
        raise ValueError(f"{path}: size {raw.size} bytes is not a multiple of the {_RECORD}-byte CIFAR-10 record")
    raw = raw.reshape(-1, _RECORD)
    return raw[:, 1:].reshape(-1, 3, 32, 32), raw[:, 0].astype(np.int32)


def _read_py(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    from diffnas_jax._safe_pickle import safe_load

    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 file missing: {path}")
    with open(path, "rb") as f:
        try:
            d = safe_load(f, encoding="bytes")
        except Exception as e:
            raise ValueError(f"{path}: not a readable CIFAR-10 python batch ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a dict, got {type(d).__name__}")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(f"{path}: missing 'data' or 'labels' (keys: {sorted(map(str, d))})")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d["labels"], dtype=np.int32)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path}: data shape {data.shape} / labels {labels.shape} is not CIFAR-10's (N, 3072) / (N,)")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir: str | os.PathLike, *, val_fraction: float = 0.5, seed: int = 0,
                 standardized: bool = True) -> Dataset:
    """CIFAR-10 as ``(N, 32, 32, 3)`` float32 images with a validation split carved from train.

    Args:
      data_dir: folder holding either layout (or its extracted archive folder).
      val_fraction: part of the 50,000 training images used as the validation split (DARTS
        searches on two halves, Liu et al. 2019).
      seed: seed of the train/val permutation.
      standardized: per-channel standardisation with training statistics.

    Raises:
      FileNotFoundError: naming the first missing file.
      ValueError: a malformed file (named), or a pickle that asks for code.
    """
    data_dir = pathlib.Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"`data_dir` {data_dir} is not a directory")
    kind, folder = _find_layout(data_dir)
    suffix, reader = (".bin", _read_bin) if kind == "bin" else ("", _read_py)
    for name in _TRAIN + [_TEST]:
        if not (folder / (name + suffix)).is_file():
            raise FileNotFoundError(f"CIFAR-10 file missing: {folder / (name + suffix)}")
    parts = [reader(folder / (n + suffix)) for n in _TRAIN]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    x_test, y_test = reader(folder / (_TEST + suffix))
    for arr, name in ((y, "training labels"), (y_test, "test labels")):
        if arr.min() < 0 or arr.max() > 9:
            raise ValueError(f"CIFAR-10 {name} outside 0..9 in {folder}")
    to_nhwc = lambda a: (a.transpose(0, 2, 3, 1).astype(np.float32) / 255.0)  # noqa: E731
    x_train, y_train, x_val, y_val = carve_split(to_nhwc(x), y, val_fraction, seed)
    arrays = dict(x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, x_test=to_nhwc(x_test), y_test=y_test)
    if standardized:
        arrays = standardize(arrays)
    return Dataset(**arrays, num_classes=10, name="cifar10", flip=True)
