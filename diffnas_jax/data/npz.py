"""A user's own data set from ``FILE.npz``."""
from __future__ import annotations

import os
import pathlib

import numpy as np

from .dataset import Dataset, carve_split

_REQUIRED = ("x_train", "y_train", "x_test", "y_test")


def _check_images(name: str, x: np.ndarray, path) -> np.ndarray:
    if x.dtype.kind not in "fiub":
        raise TypeError(f"{path}: array `{name}` must be numeric, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"{path}: array `{name}` must be NHWC or NHW images, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{path}: array `{name}` is empty")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{path}: array `{name}` contains NaN or infinite values")
    return x


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _check_labels(name: str, y: np.ndarray, n: int, path, max_classes: int) -> np.ndarray:
    """Integral labels in ``[0, max_classes)``, checked in the file's own dtype before any cast
    (a cast first would wrap 2**32+1 to 1 and turn 1e10 into a negative int32)."""
    if y.ndim != 1:
        raise ValueError(f"{path}: array `{name}` must be 1-D class labels, got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"{path}: array `{name}` has {y.shape[0]} labels but its images have {n} examples")
    if y.dtype.kind not in "fiub":
        raise TypeError(f"{path}: array `{name}` must hold integer labels, got dtype {y.dtype}")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.floor(y))
        if bad.any():
            i = _first_bad(bad)
            raise TypeError(f"{path}: array `{name}` must hold integer labels; index {i} holds {y[i].item()!r}")
    if y.size and (y < 0).any():
        i = _first_bad(y < 0)
        raise ValueError(f"{path}: array `{name}` has a negative label {y[i].item()!r} at index {i}; labels must be 0..K-1")
    # every class must occur in y_train, so K <= len(y_train); this also bounds the int32 cast
    if y.size and (y >= max_classes).any():
        i = _first_bad(y >= max_classes)
        raise ValueError(f"{path}: array `{name}` has label {y[i].item()!r} at index {i}, but `y_train` has only "
                         f"{max_classes} examples, so labels must be below {max_classes} (0..K-1, every class "
                         "present in `y_train`)")
    return y.astype(np.int32)


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def load_npz(path: str | os.PathLike, *, val_fraction: float = 0.5, seed: int = 0) -> Dataset:
    """Load ``x_train, y_train, x_test, y_test`` (and optional ``x_val, y_val``) from an npz file.

    Images may be NHWC or NHW (a channel axis is added); labels are ints ``0..K-1`` with ``K``
    inferred as ``max(label) + 1`` over all splits; every class in ``0..K-1`` must appear in
    ``y_train``. Without ``x_val``/``y_val``, ``val_fraction`` of train is carved off (a pure
    function of ``seed``). Everything is validated here, before anything is compiled, and each
    error names the array. Arrays are loaded with ``allow_pickle=False``.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz data set {path} not found")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic not in _ZIP_MAGIC:
        raise ValueError(f"{path}: not an npz file (an npz is a zip archive of .npy arrays, as written by "
                         "numpy.savez; this file does not start like one)")
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    with f:
        keys = set(f.files)
        missing = [k for k in _REQUIRED if k not in keys]
        if missing:
            raise ValueError(f"{path}: missing array(s) {missing}; required {list(_REQUIRED)}, "
                             f"optional ['x_val', 'y_val'], found {sorted(keys)}")
        if ("x_val" in keys) != ("y_val" in keys):
            raise ValueError(f"{path}: give both `x_val` and `y_val` or neither")
        try:
            arrays = {k: f[k] for k in list(_REQUIRED) + [k for k in ("x_val", "y_val") if k in keys]}
        except ValueError as e:  # object arrays need pickle, which we refuse
            raise ValueError(f"{path}: arrays must be plain numeric arrays ({e})") from e
    out = {}
    max_classes = int(np.shape(arrays["y_train"])[0]) if np.ndim(arrays["y_train"]) else 0
    for split in ("train", "val", "test"):
        if f"x_{split}" not in arrays:
            continue
        x = _check_images(f"x_{split}", arrays[f"x_{split}"], path)
        out[f"x_{split}"] = x
        out[f"y_{split}"] = _check_labels(f"y_{split}", arrays[f"y_{split}"], x.shape[0], path, max_classes)
    shape = out["x_train"].shape[1:]
    for split in ("val", "test"):
        if f"x_{split}" in out and out[f"x_{split}"].shape[1:] != shape:
            raise ValueError(f"{path}: array `x_{split}` has image shape {out[f'x_{split}'].shape[1:]}, "
                             f"but `x_train` has {shape}")
    k = int(max(int(out[f"y_{s}"].max()) for s in ("train", "val", "test") if f"y_{s}" in out)) + 1
    if k < 2:
        raise ValueError(f"{path}: labels must cover at least 2 classes, got K={k}")
    absent = np.setdiff1d(np.arange(k), out["y_train"]).tolist()
    if absent:
        raise ValueError(f"{path}: array `y_train` has no example of class(es) {absent[:10]} "
                         f"(labels must be 0..K-1 with K={k} inferred from the largest label)")
    if "x_val" not in out:
        xt, yt, xv, yv = carve_split(out["x_train"], out["y_train"], val_fraction, seed)
        out.update(x_train=xt, y_train=yt, x_val=xv, y_val=yv)
    return Dataset(**out, num_classes=k, name=path.stem, flip=False)
