"""Data for the search driver: scikit-learn digits, local CIFAR-10, a synthetic task, a user's npz.

Every loader returns a :class:`Dataset` of numpy arrays (images NHWC float32, labels int32) with
train / validation / test splits. Search trains weights on ``train`` and architecture on ``val``
(the bilevel split of DARTS, Liu et al. 2019); evaluation trains a discrete network on
``train + val`` and reports ``test`` accuracy.

Batches are numpy arrays fed to a jitted step (:func:`epoch_batches`, whose order is a pure
function of ``(seed, epoch)`` so a resumed run sees the same data); augmentation
(:func:`random_crop_flip`, :func:`cutout`) is jittable and takes explicit keys.
"""
from __future__ import annotations

from .augment import cutout, random_crop_flip
from .batching import epoch_batches, num_batches
from .cifar import load_cifar10
from .dataset import Dataset, carve_split
from .digits import load_digits_splits
from .npz import load_npz
from .registry import load_dataset
from .synthetic import synthetic

__all__ = [
    "Dataset", "carve_split", "load_digits_splits", "load_cifar10", "synthetic", "load_npz", "load_dataset",
    "epoch_batches", "num_batches", "random_crop_flip", "cutout",
]
