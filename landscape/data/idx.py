"""MNIST and Fashion-MNIST: the IDX file format, where the four files are looked for, and their status."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from landscape.data.registry import DatasetInfo, lookup
from landscape.errors import DataError


IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_path(folder: Path, stem: str) -> Path:
    gz = folder / f"{stem}.gz"
    return gz if gz.is_file() else folder / stem


def find_idx_folder(info: DatasetInfo, root: Path | None) -> Path | None:
    if root is None:
        return None
    for sub in info.folders:
        folder = root / sub
        stems = IDX_STEMS["train"] + IDX_STEMS["val"]
        if all(idx_path(folder, s).is_file() for s in stems):
            return folder
    return None


def partial_idx_folder(info: DatasetInfo, root: Path | None) -> tuple[Path, list[str]] | None:
    """The first searched folder holding some but not all four IDX files, with the names of the missing ones."""
    if root is None:
        return None
    stems = IDX_STEMS["train"] + IDX_STEMS["val"]
    for sub in info.folders:
        folder = root / sub
        missing = [f"{s}.gz" for s in stems if not idx_path(folder, s).is_file()]
        if 0 < len(missing) < len(stems):
            return folder, missing
    return None


def _open_idx(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _idx_header(data: bytes, path: Path) -> tuple[tuple[int, ...], int]:
    """``(dims, offset)`` of an IDX file of unsigned bytes: magic ``00 00 08 ndim``, then ``ndim`` big-endian
    uint32 sizes, then the data."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        magic = data[:4].hex() or "nothing"
        raise DataError(f"{path} is not an unsigned-byte IDX file (magic number {magic}, expected 000008 then 01..04).")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated inside its IDX header.")
    return struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim]), 4 + 4 * ndim


MAX_IDX_BYTES = 4 << 30
"""The most data an IDX file may announce (MNIST's training images are 47 MB, EMNIST's largest 550 MB)."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzip-compressed when its name ends in ``.gz``) as a ``uint8`` array of its declared shape.

    A wrong magic number, a truncated or over-long file, or a broken gzip stream is a :class:`DataError` naming
    the file.
    """
    path = Path(path)
    try:
        with _open_idx(path) as f:  # no more than the header announces (and one byte to tell an over-long file):
            data = f.read(4)        # a small gzip file can expand to gigabytes
            if len(data) == 4 and 1 <= data[3] <= 4:
                data += f.read(4 * data[3])
            dims, offset = _idx_header(data, path)
            expected = int(np.prod(dims, dtype=np.int64))
            if expected > MAX_IDX_BYTES:
                raise DataError(f"{path} announces {expected:,} bytes of data (shape {'x'.join(map(str, dims))}), more "
                                "than any IDX dataset holds; the file is corrupt.")
            data += f.read(expected + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} could not be read as an IDX file ({e.__class__.__name__}: {e}).") from None
    if len(data) - offset != expected:
        held = "more than that" if len(data) - offset > expected else f"{len(data) - offset} bytes"
        raise DataError(f"{path} holds {held} where its IDX header announces {expected} bytes of data (shape "
                        f"{'x'.join(map(str, dims))}); the file is truncated or corrupt.")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def read_idx_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """The shape an IDX file declares, from its header alone (quick, even for a large compressed file)."""
    path = Path(path)
    try:
        with _open_idx(path) as f:
            head = f.read(4 + 4 * 4)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} could not be read as an IDX file ({e.__class__.__name__}: {e}).") from None
    return _idx_header(head, path)[0]


def load_idx_pair(name: str, images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{images_path} must hold N x H x W images and {labels_path} N labels.")
    if len(images) == 0:
        raise DataError(f"{images_path} holds no images; give the official files.")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels.")
    if labels.size and labels.max() >= lookup(name).num_classes:
        raise DataError(f"{labels_path} holds label {labels.max()}, outside 0..{lookup(name).num_classes - 1}.")
    side = lookup(name).img_size
    if side and images.shape[1:3] != (side, side):
        raise DataError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} images, but {name} images are "
                        f"{side}x{side}; give the official files.")
    return images[:, :, :, None].copy(), labels.astype(np.int64)


def idx_status(info: DatasetInfo, root: Path) -> dict[str, Any]:
    folder = find_idx_folder(info, root)
    if folder is None:
        partial = partial_idx_folder(info, root)
        return {} if partial is None else {"location": f"{partial[0]} lacks {', '.join(partial[1])}"}
    sizes = {}
    try:
        for split, (images, labels) in IDX_STEMS.items():
            shape = read_idx_shape(idx_path(folder, images))
            if read_idx_shape(idx_path(folder, labels))[0] != shape[0]:
                raise DataError(f"{labels} does not match {images}")
            sizes[split] = shape
    except DataError:
        return {"location": f"{folder} (unreadable files)"}
    h, w = sizes["train"][1:3]
    if info.img_size and any(tuple(shape[1:3]) != (info.img_size, info.img_size) for shape in sizes.values()):
        odd = next(tuple(shape[1:3]) for shape in sizes.values() if tuple(shape[1:3]) != (info.img_size,) * 2)
        return {"location": f"{folder} ({odd[0]}x{odd[1]} images, not {info.img_size}x{info.img_size})"}
    return dict(found="yes", train=sizes["train"][0], val=sizes["val"][0], shape=f"1x{h}x{w}", location=str(folder))
