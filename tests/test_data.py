"""diffnas_jax.data: loaders (digits, both CIFAR-10 layouts, npz), validation, batching, augmentation."""
from __future__ import annotations

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffnas_jax.data import (carve_split, cutout, epoch_batches, load_cifar10, load_dataset, load_digits_splits,
                              load_npz, num_batches, random_crop_flip, synthetic)


def test_digits_splits_disjoint_and_deterministic():
    a, b = load_digits_splits(0), load_digits_splits(0)
    assert a.x_train.shape[1:] == (8, 8, 1) and a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    assert len(a.y_train) + len(a.y_val) + len(a.y_test) == 1797
    np.testing.assert_array_equal(a.x_val, b.x_val)
    # standardised with train statistics
    assert abs(a.x_train.mean()) < 1e-4 and abs(a.x_train.std() - 1) < 1e-3
    # no image appears in two splits (digits has a few exact duplicates; compare index sets instead)
    rows = lambda x: {r.tobytes() for r in x.reshape(len(x), -1)}  # noqa: E731
    assert len(rows(a.x_test) & rows(a.x_train)) < 5
    c = load_digits_splits(1)
    assert not np.array_equal(a.y_test, c.y_test)


def test_carve_split_partitions():
    x = np.arange(10)[:, None]
    y = np.arange(10)
    xa, ya, xb, yb = carve_split(x, y, 0.3, 0)
    assert len(yb) == 3 and sorted(np.concatenate([ya, yb]).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="fraction"):
        carve_split(x, y, 1.0, 0)


def _fake_cifar(n, rng):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8), rng.integers(0, 10, size=n).astype(np.int64)


def _write_bin(folder, n=6):
    rng = np.random.default_rng(0)
    expect = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, labels = _fake_cifar(n, rng)
        rec = np.concatenate([labels.astype(np.uint8)[:, None], data], axis=1)
        rec.tofile(folder / f"{name}.bin")
        expect[name] = (data, labels)
    return expect


def _write_py(folder, n=6):
    rng = np.random.default_rng(1)
    expect = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, labels = _fake_cifar(n, rng)
        with open(folder / name, "wb") as f:
            # the official files are python-2 pickles with bytes keys and a list of labels
            pickle.dump({b"batch_label": b"x", b"labels": labels.tolist(), b"data": data,
                         b"filenames": [b"a.png"] * n}, f, protocol=2)
        expect[name] = (data, labels)
    return expect


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_cifar_layouts(tmp_path, layout):
    sub = tmp_path / ("cifar-10-batches-bin" if layout == "bin" else "cifar-10-batches-py")
    sub.mkdir()
    expect = (_write_bin if layout == "bin" else _write_py)(sub)
    ds = load_cifar10(tmp_path, val_fraction=0.5, standardized=False)
    assert ds.x_test.shape == (6, 32, 32, 3) and len(ds.y_train) + len(ds.y_val) == 30
    data, labels = expect["test_batch"]
    # pixel (row 0, col 1) of channel G is byte 1024 + 1 of the record (CHW planes)
    np.testing.assert_allclose(ds.x_test[:, 0, 1, 1], data[:, 1024 + 1] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, labels)
    all_train = np.sort(np.concatenate([ds.y_train, ds.y_val]))
    np.testing.assert_array_equal(all_train, np.sort(np.concatenate([expect[f"data_batch_{i}"][1]
                                                                     for i in range(1, 6)])))


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_cifar_missing_file_is_named(tmp_path, layout):
    (_write_bin if layout == "bin" else _write_py)(tmp_path)
    missing = "data_batch_3.bin" if layout == "bin" else "test_batch"
    os.remove(tmp_path / missing)
    with pytest.raises(FileNotFoundError, match=missing):
        load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        (tmp_path / "empty").mkdir()
        load_cifar10(tmp_path / "empty")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_malicious_pickle_refused(tmp_path):
    _write_py(tmp_path)
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f)
    with pytest.raises(ValueError, match="data_batch_2"):
        load_cifar10(tmp_path)


def _npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


def _good(n=20, k=3):
    rng = np.random.default_rng(0)
    y = np.arange(n) % k
    return dict(x_train=rng.normal(size=(n, 6, 6)).astype(np.float32), y_train=y,
                x_test=rng.normal(size=(8, 6, 6)).astype(np.float32), y_test=np.arange(8) % k)


def test_npz_nhw_gets_channel_and_val_split(tmp_path):
    ds = load_npz(_npz(tmp_path, **_good()))
    assert ds.x_train.shape[1:] == (6, 6, 1) and ds.num_classes == 3
    assert len(ds.y_train) == 10 and len(ds.y_val) == 10
    via_registry = load_dataset(str(_npz(tmp_path, **_good())))
    np.testing.assert_array_equal(via_registry.y_val, ds.y_val)


def test_npz_with_val(tmp_path):
    g = _good()
    g.update(x_val=g["x_test"][..., None].repeat(2, -1), y_val=g["y_test"], x_train=g["x_train"][..., None].repeat(2, -1),
             x_test=g["x_test"][..., None].repeat(2, -1))
    ds = load_npz(_npz(tmp_path, **g))
    assert ds.x_val.shape == (8, 6, 6, 2) and len(ds.y_train) == 20


@pytest.mark.parametrize("change, exc, match", [
    (lambda g: g.pop("y_test"), ValueError, "y_test"),
    (lambda g: g.update(y_train=g["y_train"][:-1]), ValueError, "y_train"),
    (lambda g: g.update(y_train=g["y_train"] - 1), ValueError, "y_train.*negative"),
    (lambda g: g.update(y_test=g["y_test"] + 5), ValueError, "y_train.*no example"),
    (lambda g: g.update(y_train=g["y_train"] + 0.5), TypeError, "y_train"),
    (lambda g: g.update(x_test=np.full((8, 6, 6), np.nan, np.float32)), ValueError, "x_test.*NaN"),
    (lambda g: g.update(x_test=np.zeros((8, 5, 6), np.float32)), ValueError, "x_test"),
    (lambda g: g.update(x_train=np.zeros((20, 6), np.float32)), ValueError, "x_train"),
    (lambda g: g.update(x_train=np.array(["a"] * 20)), TypeError, "x_train"),
    (lambda g: g.update(x_val=g["x_test"]), ValueError, "x_val"),
])
def test_npz_validation_names_the_array(tmp_path, change, exc, match):
    g = _good()
    change(g)
    with pytest.raises(exc, match=match):
        load_npz(_npz(tmp_path, **g))


def test_synthetic_deterministic_and_learnable_shape():
    a, b = synthetic(3), synthetic(3)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.num_classes == 4 and set(np.unique(a.y_train)) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="num_classes"):
        synthetic(0, num_classes=1)


def test_epoch_batches_pure_function_of_seed_epoch():
    x = np.arange(50)[:, None]
    y = np.arange(50)
    full = [b[1] for b in epoch_batches(x, y, 8, seed=1, epoch=2)]
    assert len(full) == num_batches(50, 8) == 6
    resumed = [b[1] for b in epoch_batches(x, y, 8, seed=1, epoch=2, start=4)]
    np.testing.assert_array_equal(np.stack(full[4:]), np.stack(resumed))
    other = [b[1] for b in epoch_batches(x, y, 8, seed=1, epoch=3)]
    assert not np.array_equal(np.stack(full), np.stack(other))
    assert len(np.unique(np.concatenate(full))) == 48


def test_random_crop_flip_properties():
    x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
    f = jax.jit(random_crop_flip, static_argnums=(2, 3))
    out = f(jax.random.key(0), x, 0, True)
    # with no padding each image is itself or its mirror
    for i in range(2):
        assert np.array_equal(out[i], x[i]) or np.array_equal(out[i], x[i, :, ::-1])
    out = f(jax.random.key(1), x, 1, False)
    assert out.shape == x.shape and out.dtype == x.dtype
    # a crop of a 1-padded image keeps a 3x3 block of the original
    assert all(np.isin(np.asarray(out[i]), np.append(np.asarray(x[i]), 0)).all() for i in range(2))
    assert random_crop_flip(jax.random.key(0), x.astype(jnp.bfloat16), 1).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="x"):
        random_crop_flip(jax.random.key(0), x[0], 1)


def test_cutout_zeroes_a_clipped_square():
    x = jnp.ones((16, 8, 8, 2), jnp.float32)
    out = jax.jit(cutout, static_argnums=2)(jax.random.key(0), x, 4)
    zeros = np.asarray((out == 0).all(-1).sum((1, 2)))
    assert zeros.max() == 16 and zeros.min() >= 4  # full 4x4 inside, at least 2x2 at a corner
    assert np.array_equal(cutout(jax.random.key(0), x, 0), x)
    with pytest.raises(ValueError, match="size"):
        cutout(jax.random.key(0), x, -1)


@pytest.mark.parametrize("dtype, value", [(np.int64, 2**32 + 1), (np.float64, 1e10), (np.int64, 2**31 - 1),
                                          (np.uint64, 2**64 - 1), (np.float32, np.inf)])
def test_npz_out_of_range_labels_named_before_any_cast(tmp_path, dtype, value):
    """Range and integrality are checked in the file's dtype: no wrap to a valid label, no huge K."""
    g = _good()
    y = g["y_train"].astype(dtype)
    y[7] = value
    g["y_train"] = y
    exc = TypeError if not np.isfinite(float(value)) else ValueError
    with pytest.raises(exc, match=r"d\.npz: array `y_train`.*index 7"):
        load_npz(_npz(tmp_path, **g))


def test_npz_label_range_is_bounded_by_train_size(tmp_path):
    g = _good()
    g["y_test"] = g["y_test"].astype(np.int64)
    g["y_test"][2] = len(g["y_train"])
    with pytest.raises(ValueError, match=r"`y_test` has label 20 at index 2.*only 20 examples"):
        load_npz(_npz(tmp_path, **g))


def test_text_file_renamed_npz_is_not_an_npz(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("just some text\n")
    with pytest.raises(ValueError, match=r"notes\.npz: not an npz file") as e:
        load_npz(path)
    assert "pickle" not in str(e.value)
