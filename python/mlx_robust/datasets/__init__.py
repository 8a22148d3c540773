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

All loaders parse headers and raw bytes themselves (no pickle), so loading
a file never executes code from it. Sizes are checked from the headers
before anything is allocated and capped by ``max_bytes`` (default 2 GiB of
decompressed data per array), so a small compressed file cannot exhaust
memory. Malformed input raises ``ValueError`` with a message naming the
file.
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO, Union

import mlx.core as mx
import numpy as np

__all__ = ["load_digits", "load_npz", "load_mnist_idx"]

PathLike = Union[str, os.PathLike]

_DIGITS_PATH = Path(__file__).with_name("digits.npz")
_DIGITS_CACHE: dict[str, np.ndarray] = {}

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801
_INT32_MAX = np.iinfo(np.int32).max

#: Default cap on the decompressed payload of one array/file (2 GiB).
DEFAULT_MAX_BYTES = 2 * 1024**3
_CHUNK = 1 << 20  # bytes per read while streaming a payload into its buffer


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


def _check_max_bytes(max_bytes: int) -> int:
    if (
        isinstance(max_bytes, (bool, np.bool_))
        or not isinstance(max_bytes, (int, np.integer))
        or max_bytes < 1
    ):
        raise ValueError(
            f"[datasets] max_bytes must be an integer >= 1, got {max_bytes!r}"
        )
    return int(max_bytes)


def _check_size(where: str, what: str, nbytes: int, max_bytes: int) -> None:
    if nbytes > max_bytes:
        raise ValueError(
            f"{where}: {what} declares {nbytes} bytes of data, more than "
            f"max_bytes={max_bytes}; pass a larger max_bytes to load it"
        )


def _read_payload(
    fh: BinaryIO, nbytes: int, where: str, what: str
) -> np.ndarray:
    """Read exactly ``nbytes`` from ``fh`` into one preallocated buffer.

    The stream is read in chunks straight into the buffer (no whole-file
    read, no extra copy); a stream shorter than ``nbytes`` or with anything
    after them raises ValueError naming the file.
    """
    buf = np.empty(nbytes, dtype=np.uint8)
    view = memoryview(buf)
    pos = 0
    while pos < nbytes:
        got = fh.readinto(view[pos : pos + _CHUNK])
        if not got:
            raise ValueError(
                f"{where}: truncated {what} (header says {nbytes} bytes of "
                f"data, found {pos})"
            )
        pos += got
    if fh.read(1):
        raise ValueError(
            f"{where}: {what} has unexpected trailing bytes after its "
            f"{nbytes} bytes of data"
        )
    return buf


_STREAM_ERRORS = (
    zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError,
    NotImplementedError,
)


def _npy_member(
    archive: zipfile.ZipFile, where: str, key: str, keys: list[str]
) -> tuple[str, tuple[int, ...], bool, np.dtype]:
    """Find ``key`` in the archive and read its ``.npy`` header only."""
    name = key + ".npy" if key + ".npy" in archive.namelist() else key
    if key not in keys or name not in archive.namelist():
        raise ValueError(
            f"{where}: missing key {key!r} (keys in file: {keys})"
        )
    try:
        with archive.open(name) as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
    except ValueError as e:
        raise ValueError(f"{where}: {key!r} is not a valid .npy array ({e})") from e
    except _STREAM_ERRORS as e:
        raise ValueError(f"{where}: cannot read {key!r} ({e})") from e
    if dtype.hasobject:
        raise ValueError(
            f"{where}: {key!r} holds Python objects, which are refused "
            f"(allow_pickle=False)"
        )
    if any(d < 0 for d in shape):
        raise ValueError(f"{where}: {key!r} has a bad shape {shape}")
    return name, tuple(int(d) for d in shape), bool(fortran), dtype


def _npy_data(
    archive: zipfile.ZipFile,
    where: str,
    key: str,
    member: tuple[str, tuple[int, ...], bool, np.dtype],
) -> np.ndarray:
    """Stream the data of a member whose header :func:`_npy_member` checked."""
    name, shape, fortran, dtype = member
    nbytes = math.prod(shape) * dtype.itemsize
    try:
        with archive.open(name) as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                np.lib.format.read_array_header_1_0(fp)
            else:
                np.lib.format.read_array_header_2_0(fp)
            buf = _read_payload(fp, nbytes, where, f"array {key!r}")
    except ValueError:
        raise
    except _STREAM_ERRORS as e:
        raise ValueError(f"{where}: cannot read {key!r} ({e})") from e
    data = buf.view(dtype)
    if fortran:
        return data.reshape(shape[::-1]).transpose()
    return data.reshape(shape)


def load_npz(
    path: PathLike,
    x_key: str = "x",
    y_key: str = "y",
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[mx.array, mx.array]:
    """Load a user data set ``(x, y)`` from a ``.npz`` file, safely.

    The file is opened without pickle support: object arrays are refused
    and nothing in the file is executed. Only the two arrays asked for are
    read: their ``.npy`` headers are checked first (dtype, shape, size), and
    only then is each array decompressed, streamed into one buffer of the
    declared size, so a small file cannot make the loader allocate more
    than ``max_bytes`` per array, nor more than it declares.

    Args:
        path: Path of a ``.npz`` archive (as written by ``np.savez`` or
            ``np.savez_compressed``).
        x_key: Name of the inputs array in the archive. Its first axis is the
            sample axis; it must have at least two axes (samples and
            features), hold at least one sample and at least one feature
            per sample, and have a float or integer dtype. Integer inputs
            are taken as 8-bit images: their values must lie in 0..255 and
            are scaled to ``[0, 1]``. Float inputs are kept (as float32) and
            must be finite.
        y_key: Name of the labels array: integer dtype, shape ``(N,)`` with
            ``N`` equal to the number of inputs, values in ``0..2**31-1``.
        max_bytes: Largest decompressed payload accepted per array, in
            bytes (default 2 GiB). Raise it to load larger data sets.

    Returns:
        A tuple ``(x, y)``: ``x`` float32 with the stored shape, ``y`` int32
        of shape ``(N,)``.

    Raises:
        ValueError: If the file cannot be read as an ``.npz`` archive, a key
            is missing, an array holds Python objects, an array declares
            more than ``max_bytes`` bytes, its data is shorter or longer than
            its header declares, or a dtype, shape or value range is not as
            described above. The message names the file.
    """
    where = os.fspath(path)
    max_bytes = _check_max_bytes(max_bytes)
    try:
        archive = zipfile.ZipFile(where)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{where}: cannot load as .npz ({e})") from e
    with archive:
        names = archive.namelist()
        keys = [k[: -len(".npy")] if k.endswith(".npy") else k for k in names]
        xm = _npy_member(archive, where, x_key, keys)
        ym = _npy_member(archive, where, y_key, keys)
        (_, xshape, _, xdtype), (_, yshape, _, ydtype) = xm, ym

        if xdtype.kind not in "fiu":
            raise ValueError(
                f"{where}: {x_key!r} must have a float or integer dtype, "
                f"got {xdtype}"
            )
        if len(xshape) < 2 or xshape[0] < 1 or math.prod(xshape[1:]) < 1:
            raise ValueError(
                f"{where}: {x_key!r} must have shape (N, ...) with at least "
                f"one sample and at least one feature per sample, got shape "
                f"{xshape}"
            )
        n = xshape[0]
        if ydtype.kind not in "iu":
            raise ValueError(
                f"{where}: {y_key!r} must have an integer dtype, got {ydtype}"
            )
        if yshape != (n,):
            raise ValueError(
                f"{where}: {y_key!r} must have shape ({n},) to match "
                f"{x_key!r} {xshape}, got {yshape}"
            )
        for key, shape, dtype in ((x_key, xshape, xdtype), (y_key, yshape, ydtype)):
            _check_size(
                where, f"array {key!r} {shape} {dtype}",
                math.prod(shape) * dtype.itemsize, max_bytes,
            )
        x = _npy_data(archive, where, x_key, xm)
        y = _npy_data(archive, where, y_key, ym)

    if y.min() < 0 or y.max() > _INT32_MAX:
        raise ValueError(
            f"{where}: {y_key!r} values must lie in 0..{_INT32_MAX}, got "
            f"range {y.min()}..{y.max()}"
        )

    if x.dtype.kind == "f":
        x32 = x.astype(np.float32, copy=False)  # float32 data: no copy
        del x
        flat = x32.reshape(-1)
        if not all(
            np.isfinite(flat[i : i + _CHUNK]).all()
            for i in range(0, flat.size, _CHUNK)
        ):
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
        x32 = x.astype(np.float32)
        del x
        x32 /= np.float32(255.0)
    return mx.array(x32), mx.array(y.astype(np.int32))


def _read_idx(
    path: PathLike, magic: int, ndim: int, max_bytes: int
) -> np.ndarray:
    """Read one idx file of unsigned bytes with ``ndim`` dimensions.

    The header is read first; the payload is then streamed (decompressed if
    gzip) into one buffer of the size the header declares.
    """
    where = os.fspath(path)
    header = 4 + 4 * ndim
    gz = False
    try:
        with open(where, "rb") as raw:
            gz = raw.peek(2)[:2] == b"\x1f\x8b"
            with (gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw) as fh:
                head = fh.read(header)
                if len(head) < header:
                    raise ValueError(
                        f"{where}: truncated idx file ({len(head)} bytes, "
                        f"header needs {header})"
                    )
                got = int.from_bytes(head[:4], "big")
                if got != magic:
                    raise ValueError(
                        f"{where}: bad idx magic number 0x{got:08x}, "
                        f"expected 0x{magic:08x}"
                    )
                dims = tuple(
                    int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big")
                    for i in range(ndim)
                )
                if min(dims) < 1:
                    raise ValueError(
                        f"{where}: idx dimensions must be >= 1, got {dims}"
                    )
                size = math.prod(dims)
                _check_size(where, f"idx file {dims}", size, max_bytes)
                data = _read_payload(fh, size, where, f"idx file {dims}")
    except ValueError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        what = "bad gzip data" if gz else "cannot read"
        raise ValueError(f"{where}: {what} ({e})") from e
    return data.reshape(dims)


def load_mnist_idx(
    images_path: PathLike,
    labels_path: PathLike,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[mx.array, mx.array]:
    """Load an MNIST-style data set from a pair of idx files.

    Both files may be gzip-compressed (detected by the gzip magic bytes
    ``1f 8b``, whatever the file name). The header is checked before
    anything is allocated, and the payload is streamed (decompressed) into
    one buffer of the declared size: a small file cannot make the loader
    allocate more than ``max_bytes`` per file, nor more than it declares.

    Args:
        images_path: idx3-ubyte file: magic ``0x00000803``, then big-endian
            uint32 ``N``, ``rows``, ``cols``, then ``N*rows*cols`` uint8
            pixels.
        labels_path: idx1-ubyte file: magic ``0x00000801``, then big-endian
            uint32 ``N``, then ``N`` uint8 labels.
        max_bytes: Largest decompressed payload accepted per file, in bytes
            (default 2 GiB; MNIST's training images are 47 MB). Raise it to
            load larger data sets.

    Returns:
        A tuple ``(x, y)``: ``x`` float32 of shape ``(N, rows, cols, 1)``
        (NHWC) with values in ``[0, 1]`` (pixels divided by 255), ``y`` int32
        of shape ``(N,)``.

    Raises:
        ValueError: If a file cannot be read or decompressed, has the wrong
            magic number, is truncated or has trailing bytes, or if the
            number of images and labels differ, or a file declares more than
            ``max_bytes`` bytes of data. The message names the file.
    """
    max_bytes = _check_max_bytes(max_bytes)
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC, 3, max_bytes)
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, 1, max_bytes)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{os.fspath(images_path)} has {images.shape[0]} images but "
            f"{os.fspath(labels_path)} has {labels.shape[0]} labels"
        )
    x = images.astype(np.float32)[..., None]
    del images
    x /= np.float32(255.0)
    return mx.array(x), mx.array(labels.astype(np.int32))
