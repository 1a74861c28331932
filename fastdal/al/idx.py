"""The IDX file format of MNIST and Fashion-MNIST, and those two datasets read from a directory of IDX files.

An IDX file is a 4-byte magic number ``0 0 <type code> <number of dimensions>``, then each dimension as a
big-endian unsigned 32-bit integer, then the values, big-endian, in C order. Files may be gzipped (told apart by
gzip's own two magic bytes, not by the name). The datasets use the standard file names
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each optionally ending in ``.gz``) as the original sites, torchvision's ``raw``
folders and Debian's ``dataset-fashion-mnist`` package ship them.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

# IDX type code -> big-endian numpy dtype
IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"

# Where Debian's dataset-fashion-mnist package puts the files (there is no Debian package of MNIST; the same
# layout is looked for there, e.g. a copy of torchvision's MNIST/raw folder).
DEFAULT_DIRS = {
    "fashion-mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}
INSTALL_HINTS = {
    "fashion-mnist": "install it with `apt-get install -y dataset-fashion-mnist` (as root; Debian/Ubuntu), "
    "or pass data_dir= / --data-dir with a folder holding the four standard IDX files",
    "mnist": "pass data_dir= / --data-dir with a folder holding the four standard IDX files (for instance the "
    "MNIST/raw folder torchvision downloads), or copy them into /usr/share/datasets/mnist",
}
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class IDXError(ValueError):
    """A file that is not a well-formed IDX file."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in the IDX file ``path`` (gzipped or not), in native byte order."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:  # a cut or corrupt gzip stream
            raise IDXError(f"{path}: the gzip stream is damaged ({err})") from err
    return parse_idx(raw, name=str(path))


def parse_idx(raw: bytes, name: str = "<bytes>") -> np.ndarray:
    """The array held by the bytes of an (uncompressed) IDX file; ``name`` goes into the errors."""
    if len(raw) < 4:
        raise IDXError(f"{name}: {len(raw)} bytes, too short for the 4-byte IDX magic number")
    zero, zero2, code, ndim = raw[:4]
    if zero or zero2 or code not in IDX_TYPES or ndim == 0:
        raise IDXError(
            f"{name}: magic number {raw[:4].hex()} is not IDX's (expected 0000, a type code among "
            f"{', '.join(f'{c:02x}' for c in IDX_TYPES)}, and at least one dimension)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXError(f"{name}: truncated header, {len(raw)} bytes for {ndim} dimensions ({header} needed)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_TYPES[code]
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise IDXError(f"{name}: {what}: {len(raw)} bytes for a {dtype} array of shape {shape} ({expected} expected)")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


class IDXDataset(NamedTuple):
    """Images as uint8 ``(N, H, W)`` and labels as int64 ``(N,)``, for the official training and test sets."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def find_file(directory: Path, stem: str) -> Path | None:
    """``directory/stem`` or ``directory/stem.gz`` (the uncompressed one first: it reads faster)."""
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> IDXDataset:
    """The official training and test sets of ``name`` ("fashion-mnist" or "mnist") from the IDX files in
    ``data_dir`` (default: :data:`DEFAULT_DIRS`), checked for matching image and label counts."""
    if name not in DEFAULT_DIRS:
        raise ValueError(f"name must be one of {sorted(DEFAULT_DIRS)}, got {name!r}")
    directory = Path(data_dir) if data_dir is not None else DEFAULT_DIRS[name]
    paths = {key: find_file(directory, stem) for key, stem in FILES.items()}
    missing = [FILES[key] for key, path in paths.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"{name}: {directory} lacks {', '.join(missing)} (or the same with .gz); {INSTALL_HINTS[name]}"
        )
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise IDXError(
                f"{name} in {directory}: {split} images of shape {images.shape} and labels of shape "
                f"{labels.shape}; expected (N, H, W) images and N labels"
            )
    return IDXDataset(
        arrays["train_images"].astype(np.uint8, copy=False),
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"].astype(np.uint8, copy=False),
        arrays["test_labels"].astype(np.int64),
    )
