"""A reader for the IDX files MNIST ships in (``train-images-idx3-ubyte`` and friends).

IDX: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D
float32, 0x0E float64), the number of dimensions, then one big-endian uint32 per dimension,
then the data, big-endian, C order. Gzipped files (``.gz``) are read too.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

#: the four MNIST files, by the part of their names that never changes
MNIST_FILES = {
    "train_images": ("train-images", "idx3"),
    "train_labels": ("train-labels", "idx1"),
    "test_images": ("t10k-images", "idx3"),
    "test_labels": ("t10k-labels", "idx1"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array of its native dtype."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[code])
    count = int(np.prod(shape)) if shape else 1
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(f"{path}: {len(data) - header} data bytes, the header "
                         f"{tuple(shape)} asks for {count * dtype.itemsize}")
    arr = np.frombuffer(data, dtype=dtype, offset=header, count=count).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped when ``path`` ends in ``.gz``)."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot hold dtype {array.dtype}")
    body = array.astype(np.dtype(_DTYPES[code])).tobytes()
    head = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(head + body)


def find_mnist(directory: str | os.PathLike) -> dict[str, Path]:
    """The four MNIST files in ``directory``: names like ``train-images-idx3-ubyte``, or
    ``train-images.idx3-ubyte``, optionally ending in ``.gz``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--mnist-dir {directory}: no such directory")
    names = sorted(p.name for p in directory.iterdir())
    found = {}
    for key, (stem, kind) in MNIST_FILES.items():
        hits = [n for n in names if n.startswith(stem) and kind in n]
        if not hits:
            raise FileNotFoundError(f"{directory}: no {stem}*{kind}* file (MNIST IDX files "
                                    f"train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                                    f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)")
        found[key] = directory / hits[0]
    return found


def load_mnist(directory: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) from MNIST IDX files; images
    are uint8 (N, 28, 28), labels int64 (N,)."""
    files = find_mnist(directory)
    out = [read_idx(files[k]) for k in ("train_images", "train_labels", "test_images", "test_labels")]
    for images, labels in ((out[0], out[1]), (out[2], out[3])):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{directory}: images {images.shape} and labels {labels.shape} "
                             f"do not pair up")
    return out[0], out[1].astype(np.int64), out[2], out[3].astype(np.int64)
