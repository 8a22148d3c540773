"""Tests for mlx_robust.datasets: embedded digits and safe loaders."""

import gzip
import os
import pickle
import struct

import mlx.core as mx
import numpy as np
import pytest

from mlx_robust.datasets import load_digits, load_mnist_idx, load_npz

SIZES = {"train": 1437, "test": 360, "all": 1797}


# --------------------------------------------------------------------------
# load_digits


@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_digits_shapes_dtypes_ranges(split):
    x, y = load_digits(split)
    n = SIZES[split]
    assert isinstance(x, mx.array) and isinstance(y, mx.array)
    assert x.shape == (n, 8, 8, 1)
    assert y.shape == (n,)
    assert x.dtype == mx.float32
    assert y.dtype == mx.int32
    xn, yn = np.array(x), np.array(y)
    assert xn.min() == 0.0
    assert xn.max() == 1.0
    # values are k/16 for integer k
    np.testing.assert_array_equal(xn * 16, np.round(xn * 16))
    assert set(np.unique(yn).tolist()) == set(range(10))


def test_digits_default_is_train():
    x, y = load_digits()
    assert x.shape[0] == SIZES["train"]
    xt, yt = load_digits("train")
    np.testing.assert_array_equal(np.array(x), np.array(xt))
    np.testing.assert_array_equal(np.array(y), np.array(yt))


def _rows(x, y):
    xn = (np.array(x) * 16).round().astype(np.uint8).reshape(len(y), -1)
    yn = np.array(y).astype(np.uint8)[:, None]
    return np.concatenate([xn, yn], axis=1)


def test_digits_split_partitions_all():
    tr = _rows(*load_digits("train"))
    te = _rows(*load_digits("test"))
    al = _rows(*load_digits("all"))
    assert len(tr) + len(te) == len(al)
    # together they are exactly the full set (as a multiset of rows)
    both = np.concatenate([tr, te])
    np.testing.assert_array_equal(
        both[np.lexsort(both.T[::-1])], al[np.lexsort(al.T[::-1])]
    )
    # disjoint: no test row occurs in train (all 1,797 images are distinct,
    # so equal rows would mean the same sample)
    tr_set = {r.tobytes() for r in tr}
    assert not any(r.tobytes() in tr_set for r in te)


def test_digits_split_deterministic():
    x1, y1 = load_digits("test")
    x2, y2 = load_digits("test")
    np.testing.assert_array_equal(np.array(x1), np.array(x2))
    np.testing.assert_array_equal(np.array(y1), np.array(y2))
    # pin the split itself: class counts of the stored stratified test part
    counts = np.bincount(np.array(y1), minlength=10)
    assert counts.tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]


def test_digits_classes_balanced_in_both_splits():
    for split in ("train", "test"):
        _, y = load_digits(split)
        counts = np.bincount(np.array(y), minlength=10)
        assert len(counts) == 10
        assert counts.min() > 0
        frac = counts / counts.sum()
        assert np.all(np.abs(frac - 0.1) < 0.02)


def test_digits_bad_split():
    with pytest.raises(ValueError, match="split"):
        load_digits("validation")


# --------------------------------------------------------------------------
# load_npz


def test_npz_roundtrip_float(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4, 4, 3)).astype(np.float64)
    y = np.array([0, 1, 2, 1, 0], dtype=np.int64)
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y)
    xa, ya = load_npz(p)
    assert xa.dtype == mx.float32 and ya.dtype == mx.int32
    assert xa.shape == (5, 4, 4, 3) and ya.shape == (5,)
    np.testing.assert_allclose(np.array(xa), x.astype(np.float32))
    np.testing.assert_array_equal(np.array(ya), y)


def test_npz_roundtrip_uint8_scaled(tmp_path):
    x = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 1) * 15
    x[0, 0, 1, 0] = 255  # index 0 stays 0
    y = np.array([3, 7], dtype=np.uint8)
    p = tmp_path / "img.npz"
    np.savez_compressed(p, images=x, labels=y)
    xa, ya = load_npz(str(p), x_key="images", y_key="labels")
    assert xa.dtype == mx.float32 and ya.dtype == mx.int32
    xn = np.array(xa)
    np.testing.assert_allclose(xn, x.astype(np.float32) / 255.0, rtol=1e-6)
    assert xn.max() == 1.0 and xn.min() == 0.0
    np.testing.assert_array_equal(np.array(ya), [3, 7])


def test_npz_missing_key(tmp_path):
    p = tmp_path / "m.npz"
    np.savez(p, x=np.zeros((2, 3), np.float32), labels=np.zeros(2, np.int32))
    with pytest.raises(ValueError) as ei:
        load_npz(p)
    msg = str(ei.value)
    assert "'y'" in msg and str(p) in msg


class _Canary:
    """Unpickling this creates a directory: proof that a pickle was run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_npz_object_array_refused(tmp_path):
    p = tmp_path / "obj.npz"
    canary = tmp_path / "unpickled"
    obj = np.empty(2, dtype=object)
    obj[0], obj[1] = _Canary(canary), [1, 2]
    np.savez(p, x=obj, y=np.array([0, 1]), allow_pickle=True)
    with pytest.raises(ValueError) as ei:
        load_npz(p)
    assert str(p) in str(ei.value)
    assert not canary.exists()
    # same with the object array under the label key
    np.savez(p, x=np.zeros((2, 2)), y=obj, allow_pickle=True)
    with pytest.raises(ValueError):
        load_npz(p)
    assert not canary.exists()


def test_npz_pickle_file_refused(tmp_path):
    p = tmp_path / "evil.npz"
    canary = tmp_path / "unpickled"
    p.write_bytes(pickle.dumps(_Canary(canary)))
    with pytest.raises(ValueError) as ei:
        load_npz(p)
    assert str(p) in str(ei.value)
    assert not canary.exists()


def test_npz_corrupt_file(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.int32))
    data = good.read_bytes()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as ei:
        load_npz(bad)
    assert str(bad) in str(ei.value)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 this is not a zip archive at all")
    with pytest.raises(ValueError, match="junk.npz"):
        load_npz(junk)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.npz"):
        load_npz(empty)
    with pytest.raises(ValueError, match="nonexistent.npz"):
        load_npz(tmp_path / "nonexistent.npz")


def test_npz_plain_npy_refused(tmp_path):
    p = tmp_path / "a.npy"
    np.save(p, np.zeros(3))
    with pytest.raises(ValueError, match="a.npy"):
        load_npz(p)


@pytest.mark.parametrize(
    "x, y, pattern",
    [
        (np.array(["a", "b"]), np.array([0, 1]), "dtype"),
        (np.zeros((2, 2), bool), np.array([0, 1]), "dtype"),
        (np.zeros((2, 2), np.complex64), np.array([0, 1]), "dtype"),
        (np.zeros((0, 3), np.float32), np.zeros(0, np.int32), "at least one"),
        (np.float32(1.0), np.array([0]), "at least one"),
        (np.zeros((2, 3), np.float32), np.array([0.0, 1.0]), "integer"),
        (np.zeros((2, 3), np.float32), np.array([0, 1, 2]), "shape"),
        (np.zeros((2, 3), np.float32), np.array([[0], [1]]), "shape"),
        (np.zeros((2, 3), np.float32), np.array([0, -1]), "0.."),
        (np.array([[0.0, np.nan]]), np.array([0]), "NaN"),
        (np.array([[0, 300]], np.int16), np.array([0]), "0..255"),
        (np.array([[0, -1]], np.int8), np.array([0]), "0..255"),
    ],
)
def test_npz_bad_arrays(tmp_path, x, y, pattern):
    p = tmp_path / "bad_arrays.npz"
    np.savez(p, x=x, y=y)
    with pytest.raises(ValueError, match=pattern) as ei:
        load_npz(p)
    assert str(p) in str(ei.value)


# --------------------------------------------------------------------------
# load_mnist_idx


def _idx_images(arr, magic=0x00000803):
    n, r, c = arr.shape
    header = struct.pack(">IIII", magic, n, r, c)
    return header + arr.astype(np.uint8).tobytes()


def _idx_labels(arr, magic=0x00000801):
    return struct.pack(">II", magic, len(arr)) + arr.astype(np.uint8).tobytes()


def _sample(n=6, r=5, c=4):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(n, r, c), dtype=np.uint8)
    imgs[0, 0, 0], imgs[0, 0, 1] = 0, 255
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return imgs, labels


@pytest.mark.parametrize("compress", [False, True])
def test_idx_roundtrip(tmp_path, compress):
    imgs, labels = _sample()
    ib, lb = _idx_images(imgs), _idx_labels(labels)
    if compress:
        ib, lb = gzip.compress(ib), gzip.compress(lb)
        assert ib[:2] == b"\x1f\x8b"
    ip, lp = tmp_path / "img-idx3-ubyte", tmp_path / "lab-idx1-ubyte"
    ip.write_bytes(ib)
    lp.write_bytes(lb)
    x, y = load_mnist_idx(ip, str(lp))
    assert x.shape == (6, 5, 4, 1) and y.shape == (6,)
    assert x.dtype == mx.float32 and y.dtype == mx.int32
    xn = np.array(x)
    np.testing.assert_allclose(xn[..., 0], imgs / 255.0, rtol=1e-6)
    assert xn.min() == 0.0 and xn.max() == 1.0
    np.testing.assert_array_equal(np.array(y), labels)


def test_idx_mixed_gzip(tmp_path):
    imgs, labels = _sample(n=3)
    ip, lp = tmp_path / "i.gz", tmp_path / "l"
    ip.write_bytes(gzip.compress(_idx_images(imgs)))
    lp.write_bytes(_idx_labels(labels))
    x, y = load_mnist_idx(ip, lp)
    np.testing.assert_array_equal(np.array(y), labels)
    assert x.shape == (3, 5, 4, 1)


def test_idx_bad_magic(tmp_path):
    imgs, labels = _sample()
    ip, lp = tmp_path / "i", tmp_path / "l"
    # swapped: labels file given as images and vice versa
    ip.write_bytes(_idx_images(imgs))
    lp.write_bytes(_idx_labels(labels))
    with pytest.raises(ValueError, match="magic") as ei:
        load_mnist_idx(lp, ip)
    assert str(lp) in str(ei.value)
    bad = tmp_path / "bad"
    bad.write_bytes(_idx_images(imgs, magic=0x00000c03))
    with pytest.raises(ValueError, match="magic"):
        load_mnist_idx(bad, lp)
    badl = tmp_path / "badl"
    badl.write_bytes(_idx_labels(labels, magic=0x08010000))
    with pytest.raises(ValueError, match="magic") as ei:
        load_mnist_idx(ip, badl)
    assert str(badl) in str(ei.value)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_truncated(tmp_path, compress):
    imgs, labels = _sample()
    ib = _idx_images(imgs)[:-7]
    lb = _idx_labels(labels)
    if compress:
        ib = gzip.compress(ib)
    ip, lp = tmp_path / "i", tmp_path / "l"
    ip.write_bytes(ib)
    lp.write_bytes(lb)
    with pytest.raises(ValueError, match="truncated") as ei:
        load_mnist_idx(ip, lp)
    assert str(ip) in str(ei.value)
    # header itself cut short
    ip.write_bytes(_idx_images(imgs)[:9])
    with pytest.raises(ValueError, match="truncated"):
        load_mnist_idx(ip, lp)
    # truncated labels
    ip.write_bytes(_idx_images(imgs))
    lp.write_bytes(_idx_labels(labels)[:-1])
    with pytest.raises(ValueError, match="truncated") as ei:
        load_mnist_idx(ip, lp)
    assert str(lp) in str(ei.value)


def test_idx_truncated_gzip_stream(tmp_path):
    imgs, labels = _sample()
    ip, lp = tmp_path / "i.gz", tmp_path / "l"
    gz = gzip.compress(_idx_images(imgs))
    ip.write_bytes(gz[: len(gz) // 2])
    lp.write_bytes(_idx_labels(labels))
    with pytest.raises(ValueError, match="i.gz"):
        load_mnist_idx(ip, lp)


def test_idx_trailing_bytes(tmp_path):
    imgs, labels = _sample()
    ip, lp = tmp_path / "i", tmp_path / "l"
    ip.write_bytes(_idx_images(imgs) + b"\x00\x00")
    lp.write_bytes(_idx_labels(labels))
    with pytest.raises(ValueError, match="trailing"):
        load_mnist_idx(ip, lp)


def test_idx_count_mismatch(tmp_path):
    imgs, labels = _sample(n=6)
    ip, lp = tmp_path / "i", tmp_path / "l"
    ip.write_bytes(_idx_images(imgs))
    lp.write_bytes(_idx_labels(labels[:5]))
    with pytest.raises(ValueError, match="6 images but .* 5 labels"):
        load_mnist_idx(ip, lp)


def test_idx_missing_file(tmp_path):
    imgs, _ = _sample()
    ip = tmp_path / "i"
    ip.write_bytes(_idx_images(imgs))
    with pytest.raises(ValueError, match="nope"):
        load_mnist_idx(ip, tmp_path / "nope")
