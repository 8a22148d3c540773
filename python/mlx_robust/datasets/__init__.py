"""Small embedded dataset and safe array loaders.

The embedded dataset is the UCI ML hand-written digits data set
(E. Alpaydin and C. Kaynak, "Optical Recognition of Handwritten Digits",
UCI Machine Learning Repository, 1998, https://doi.org/10.24432/C50P49,
licensed CC BY 4.0), as distributed by scikit-learn's
``sklearn.datasets.load_digits``. It holds 1,797 grey-scale 8x8 images with
pixel values 0..16 and labels 0..9. It is stored in ``digits.npz`` next to
this module as uint8 arrays together with a fixed train/test split
(1,437 train / 360 test, stratified by class, made once with seed 0), so the
split never changes between runs or versions. See ``LICENSE-digits.txt``.

All loaders open files with ``allow_pickle=False`` (or parse raw bytes), so
loading a file never executes code from it. Malformed input raises
``ValueError`` with a message naming the file.
"""

from __future__ import annotations

import gzip
import os
import zipfile
import zlib
from pathlib import Path
from typing import Union

import mlx.core as mx
import numpy as np

__all__ = ["load_digits", "load_npz", "load_mnist_idx"]

PathLike = Union[str, os.PathLike]

_DIGITS_PATH = Path(__file__).with_name("digits.npz")
_DIGITS_CACHE: dict[str, np.ndarray] = {}

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_INT32_MAX = np.iinfo(np.int32).max


def _digits_arrays() -> dict[str, np.ndarray]:
    """Read (once) and sanity-check the embedded digits file."""
    if not _DIGITS_CACHE:
        with np.load(_DIGITS_PATH, allow_pickle=False) as f:
            images = np.asarray(f["images"])
            labels = np.asarray(f["labels"])
            split = np.asarray(f["split"])
        n = labels.shape[0]
        if (
            images.shape != (n, 8, 8)
            or images.dtype != np.uint8
            or labels.dtype != np.uint8
            or split.shape != (n,)
            or images.max() > 16
            or labels.max() > 9
            or not np.isin(split, (0, 1)).all()
        ):
            raise RuntimeError(f"embedded dataset {_DIGITS_PATH} is damaged")
        _DIGITS_CACHE.update(images=images, labels=labels, split=split)
    return _DIGITS_CACHE


def load_digits(split: str = "train") -> tuple[mx.array, mx.array]:
    """Load the embedded UCI hand-written digits data set.

    Args:
        split: ``"train"`` (1,437 samples), ``"test"`` (360 samples) or
            ``"all"`` (1,797 samples, in the original order). The train/test
            split is fixed and stored with the data; it is stratified by
            class, so all ten digits appear in both parts.

    Returns:
        A tuple ``(x, y)``: ``x`` is a float32 array of shape ``(N, 8, 8, 1)``
        (NHWC) with values in ``[0, 1]`` (raw values 0..16 divided by 16),
        ``y`` is an int32 array of shape ``(N,)`` with labels 0..9. Samples
        keep their original relative order within each split.

    Raises:
        ValueError: If ``split`` is not one of ``"train"``, ``"test"``,
            ``"all"``.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(
            f"split must be 'train', 'test' or 'all', got {split!r}"
        )
    d = _digits_arrays()
    if split == "all":
        keep = np.ones(d["labels"].shape[0], dtype=bool)
    else:
        keep = d["split"] == (1 if split == "test" else 0)
    x = d["images"][keep].astype(np.float32)[..., None] / np.float32(16.0)
    y = d["labels"][keep].astype(np.int32)
    return mx.array(x), mx.array(y)


def load_npz(
    path: PathLike, x_key: str = "x", y_key: str = "y"
) -> tuple[mx.array, mx.array]:
    """Load a user data set ``(x, y)`` from a ``.npz`` file, safely.

    The file is opened with ``allow_pickle=False``: object arrays are refused
    and nothing in the file is executed.

    Args:
        path: Path of a ``.npz`` archive (as written by ``np.savez`` or
            ``np.savez_compressed``).
        x_key: Name of the inputs array in the archive. Its first axis is the
            sample axis; it must hold at least one sample and have a float or
            integer dtype. Integer inputs are taken as 8-bit images: their
            values must lie in 0..255 and are scaled to ``[0, 1]``. Float
            inputs are kept (as float32) and must be finite.
        y_key: Name of the labels array: integer dtype, shape ``(N,)`` with
            ``N`` equal to the number of inputs, values in ``0..2**31-1``.

    Returns:
        A tuple ``(x, y)``: ``x`` float32 with the stored shape, ``y`` int32
        of shape ``(N,)``.

    Raises:
        ValueError: If the file cannot be read as an ``.npz`` archive, a key
            is missing, an array holds Python objects, or a dtype, shape or
            value range is not as described above. The message names the
            file.
    """
    where = os.fspath(path)
    try:
        loaded = np.load(where, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{where}: cannot load as .npz ({e})") from e
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{where}: not an .npz archive")
    with loaded as archive:
        keys = list(archive.files)
        for key in (x_key, y_key):
            if key not in keys:
                raise ValueError(
                    f"{where}: missing key {key!r} (keys in file: {keys})"
                )
        try:
            x = np.asarray(archive[x_key])
            y = np.asarray(archive[y_key])
        except (
            zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError
        ) as e:
            raise ValueError(f"{where}: cannot read arrays ({e})") from e

    if x.dtype.kind not in "fiu":
        raise ValueError(
            f"{where}: {x_key!r} must have a float or integer dtype, "
            f"got {x.dtype}"
        )
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(
            f"{where}: {x_key!r} must have at least one sample along axis 0, "
            f"got shape {x.shape}"
        )
    n = x.shape[0]
    if y.dtype.kind not in "iu":
        raise ValueError(
            f"{where}: {y_key!r} must have an integer dtype, got {y.dtype}"
        )
    if y.shape != (n,):
        raise ValueError(
            f"{where}: {y_key!r} must have shape ({n},) to match {x_key!r} "
            f"{x.shape}, got {y.shape}"
        )
    if y.min() < 0 or y.max() > _INT32_MAX:
        raise ValueError(
            f"{where}: {y_key!r} values must lie in 0..{_INT32_MAX}, got "
            f"range {y.min()}..{y.max()}"
        )

    if x.dtype.kind == "f":
        x32 = x.astype(np.float32)
        if not np.isfinite(x32).all():
            raise ValueError(
                f"{where}: {x_key!r} contains NaN or infinite values "
                f"(after conversion to float32)"
            )
    else:
        if x.min() < 0 or x.max() > 255:
            raise ValueError(
                f"{where}: integer {x_key!r} is taken as 8-bit images and "
                f"must lie in 0..255, got range {x.min()}..{x.max()}; "
                f"store it as float to keep other values"
            )
        x32 = x.astype(np.float32) / np.float32(255.0)
    return mx.array(x32), mx.array(y.astype(np.int32))


def _read_idx(path: PathLike, magic: int, ndim: int) -> np.ndarray:
    """Read one idx file of unsigned bytes with ``ndim`` dimensions."""
    where = os.fspath(path)
    try:
        with open(where, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise ValueError(f"{where}: cannot read ({e})") from e
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{where}: bad gzip data ({e})") from e
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{where}: truncated idx file ({len(data)} bytes, header needs "
            f"{header})"
        )
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise ValueError(
            f"{where}: bad idx magic number 0x{got:08x}, expected "
            f"0x{magic:08x}"
        )
    dims = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    if min(dims) < 1:
        raise ValueError(f"{where}: idx dimensions must be >= 1, got {dims}")
    size = int(np.prod(dims, dtype=np.int64))
    if len(data) - header < size:
        raise ValueError(
            f"{where}: truncated idx file (header says {dims} = {size} bytes "
            f"of data, found {len(data) - header})"
        )
    if len(data) - header > size:
        raise ValueError(
            f"{where}: idx file has {len(data) - header - size} unexpected "
            f"trailing bytes after {dims} data"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist_idx(
    images_path: PathLike, labels_path: PathLike
) -> tuple[mx.array, mx.array]:
    """Load an MNIST-style data set from a pair of idx files.

    Both files may be gzip-compressed (detected by the gzip magic bytes
    ``1f 8b``, whatever the file name).

    Args:
        images_path: idx3-ubyte file: magic ``0x00000803``, then big-endian
            uint32 ``N``, ``rows``, ``cols``, then ``N*rows*cols`` uint8
            pixels.
        labels_path: idx1-ubyte file: magic ``0x00000801``, then big-endian
            uint32 ``N``, then ``N`` uint8 labels.

    Returns:
        A tuple ``(x, y)``: ``x`` float32 of shape ``(N, rows, cols, 1)``
        (NHWC) with values in ``[0, 1]`` (pixels divided by 255), ``y`` int32
        of shape ``(N,)``.

    Raises:
        ValueError: If a file cannot be read or decompressed, has the wrong
            magic number, is truncated or has trailing bytes, or if the
            number of images and labels differ. The message names the file.
    """
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, 1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{os.fspath(images_path)} has {images.shape[0]} images but "
            f"{os.fspath(labels_path)} has {labels.shape[0]} labels"
        )
    x = images.astype(np.float32)[..., None] / np.float32(255.0)
    return mx.array(x), mx.array(labels.astype(np.int32))
