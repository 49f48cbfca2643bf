"""Datasets built by name: torch ``Dataset``s, whole splits as arrays, whether data fits a model, and the status
of every registered dataset.

Small datasets live in memory as ``uint8`` arrays of shape ``(N, H, W, C)`` with ``int64`` labels ``(N,)``
(:func:`load_arrays`), shared read-only and cached by the identity of the files they were read from.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from landscape.data.cifar import find_cifar, load_cifar
from landscape.data.generated import digits_arrays, synthetic_arrays
from landscape.data.idx import IDX_STEMS, find_idx_folder, idx_path, idx_status, load_idx_pair, partial_idx_folder
from landscape.data.imagefolder import build_imagefolder, class_folders, find_imagefolder, imagefolder_status
from landscape.data.registry import (
    ENV_VAR,
    REGISTRY,
    DatasetInfo,
    check_split,
    data_root,
    dataset_options,
    download_command,
    download_dataset,
    get_dataset_info,
    lookup,
    missing_files_error,
    read_only,
    synthetic_options,
)
from landscape.data.transforms import create_eval_transform
from landscape.errors import DataError


def check_data_fits(
    name: str,
    *,
    model_in_chans: int | None,
    model_img_size: int | None,
    model_classes: int | None,
    img_size: int | None = None,
    options: dict[str, Any] | None = None,
    data_dir: str | os.PathLike | None = None,
    training: bool = False,
) -> None:
    """Refuse, in one sentence naming what would fit, data whose images or classes the model cannot take.

    The images reach the model with ``img_size`` (default: the dataset's native size) and the dataset's
    channels; the labels must be the model's classes (an image folder's classes are its class folders, counted
    when they are found). A ``None`` model fact is not checked.
    """
    options = dict(options or {})
    info = get_dataset_info(name, **dataset_options(name, img_size, options))
    size = img_size or info.img_size
    classes = info.num_classes
    if classes is None and name == "imagefolder":
        folder = find_imagefolder(data_root(data_dir))
        classes = len(class_folders(folder / "train")) if folder is not None else None
    wrong_chans = model_in_chans is not None and info.in_chans != model_in_chans
    wrong_size = model_img_size is not None and size != model_img_size
    wrong_classes = model_classes is not None and classes is not None and classes != model_classes
    if not (wrong_chans or wrong_size or wrong_classes):
        return

    def shape(chans, side, k) -> str:
        parts = [f"{chans}-channel" if chans is not None else "", f"{side}x{side}" if side else ""]
        return " ".join(p for p in parts if p) + " images" + (f" of {k} classes" if k is not None else "")

    fixes = []
    if wrong_size:
        fixes.append(f"--img-size {model_img_size} (resizes the images)")
    if wrong_chans or wrong_classes:
        fitting = [n for n, i in REGISTRY.items() if n not in ("synthetic", "imagefolder")
                   and (model_in_chans is None or i.in_chans == model_in_chans)
                   and (model_classes is None or i.num_classes == model_classes)]
        if model_in_chans in (None, 3):
            fitting.append(f"imagefolder with {model_classes} class folders" if model_classes else "imagefolder")
        if training:  # synthetic training data is shaped by its options, not by the model
            shaped = " ".join(f"--set data.options.{k}={v}" for k, v in (("in_chans", model_in_chans),
                                                                       ("num_classes", model_classes),
                                                                       ("img_size", model_img_size)) if v is not None)
            synthetic = f"--data synthetic {shaped}"
        else:
            synthetic = "--data synthetic (takes the model's shape)" if name != "synthetic" else \
                "--data synthetic without --classes"
        fixes.append(f"{' or '.join(f'--data {f}' for f in fitting)} or {synthetic}" if fitting else synthetic)
    raise DataError(
        f"The model takes {shape(model_in_chans, model_img_size, model_classes)}, but {name} gives "
        f"{shape(info.in_chans, size, classes)}; to fit, use {' and '.join(fixes)}."
    )


class ArrayDataset(torch.utils.data.Dataset):
    """In-memory images served one at a time as ``(transform(PIL image), label)``.

    ``images`` is ``uint8`` of shape ``(N, H, W, C)``, ``labels`` ``int64`` of shape ``(N,)``; both are shared,
    read-only arrays. One-channel images become PIL mode ``"L"``, three-channel ones ``"RGB"``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, info: DatasetInfo, transform: Callable | None):
        self.images = images
        self.labels = labels
        self.info = info
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        image = self.images[index]
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        return (self.transform(pil) if self.transform is not None else pil), int(self.labels[index])


def build_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    transform: Callable | None = None,
    img_size: int | None = None,
    download: bool = False,
    **options: Any,
) -> torch.utils.data.Dataset:
    """A torch ``Dataset`` of ``(image, label)`` pairs for ``split`` ("train" or "val").

    ``transform`` is applied to each PIL image; ``None`` means :func:`create_eval_transform` at ``img_size``
    (default: the native size). For ``synthetic``, ``img_size`` is the generated size and ``options`` are its
    generator settings (``in_chans``, ``num_classes``, ``count``, ``val_count``, ``data_seed``, ``noise``).
    The result has an ``info`` attribute (for ``imagefolder`` with ``num_classes`` read from ``train/``).
    """
    check_split(split)
    generator_options = dataset_options(name, img_size, options)
    info = get_dataset_info(name, **generator_options)
    if transform is None:
        transform = create_eval_transform(name, img_size, **options)
    if not info.in_memory:
        return build_imagefolder(split, data_root(data_dir), transform, download)
    images, labels = arrays(name, split, data_root(data_dir), download, generator_options)
    return ArrayDataset(images, labels, info, transform)


def load_arrays(
    name: str, split: str = "train", *, data_dir: str | os.PathLike | None = None, download: bool = False, **options
) -> tuple[np.ndarray, np.ndarray]:
    """The whole split as ``(images uint8 (N, H, W, C), labels int64 (N,))``, fresh writable copies.

    The fast route for code that transforms whole tensors (see :func:`to_eval_tensor`). Not available for
    ``imagefolder``, which is read file by file.
    """
    check_split(split)
    info = get_dataset_info(name, **options)
    if not info.in_memory:
        raise DataError(f"Dataset {name!r} is read file by file; use build_dataset instead of load_arrays.")
    images, labels = arrays(name, split, data_root(data_dir), download, options)
    return images.copy(), labels.copy()


def arrays(name: str, split: str, root: Path | None, download: bool, options: dict) -> tuple[np.ndarray, np.ndarray]:
    """Shared read-only arrays of an in-memory dataset, cached by the identity of the files they came from."""
    if name == "digits":
        return digits_arrays(split)
    if name == "synthetic":
        opts = synthetic_options(options)
        return synthetic_arrays(split, **opts)
    info = lookup(name)
    if name in ("mnist", "fashion-mnist"):
        folder = find_idx_folder(info, root)
        if folder is None and download:
            folder = download_dataset(name, root)
        if folder is None:
            partial = partial_idx_folder(info, root)
            if partial is not None:
                raise DataError(
                    f"Dataset {name!r} is incomplete in {partial[0]}: {', '.join(partial[1])} "
                    f"{'is' if len(partial[1]) == 1 else 'are'} missing; run '{download_command(name)}' to fetch "
                    f"the official files from {info.source}."
                )
            raise missing_files_error(info, root)
        stems = IDX_STEMS[split]
        paths = tuple(idx_path(folder, s) for s in stems)
        return _cached(load_idx_pair, name, paths, paths)
    location = find_cifar(name, root)
    if location is None and download:
        download_dataset(name, root)
        location = find_cifar(name, root)
    if location is None:
        raise missing_files_error(info, root)
    watch = sorted(location.iterdir()) if location.is_dir() else [location]
    return _cached(load_cifar, name, (location, split), watch)


DATA_RECORD_FORMAT = "landscape-data/1"


def data_record(name: str, *, data_dir: str | os.PathLike | None = None, **options) -> dict[str, Any] | None:
    """What a run was trained on, to be kept beside it (``RUN/data.json``): the dataset's name and, per split, the
    number of examples and a SHA-256 of their pixels and labels. ``None`` for data generated from the config
    (``digits``, ``synthetic``) and data read file by file (``imagefolder``). An analysis compares it with the
    data it finds (:func:`check_data_record`), so that a ``--data-dir`` or ``LANDSCAPE_DATA_DIR`` pointing at
    other files is not measured silently."""
    if name in ("digits", "synthetic") or not get_dataset_info(name, **options).in_memory:
        return None  # generated from the config alone (nothing found elsewhere), or read file by file
    splits = {}
    for split in ("train", "val"):
        images, labels = arrays(name, split, data_root(data_dir), False, options)
        splits[split] = {"examples": int(len(labels)), "sha256": _fingerprint(images, labels)}
    return {"format": DATA_RECORD_FORMAT, "name": name, "splits": splits}


def check_data_record(record: Any, name: str, split: str, *, where: str, data_dir: str | os.PathLike | None = None,
                      **options) -> None:
    """Refuse, in one sentence, a ``split`` of ``name`` whose examples are not those of ``record`` (see
    :func:`data_record`); a record of another dataset, or none, checks nothing."""
    if not isinstance(record, dict) or record.get("name") != name or not isinstance(record.get("splits"), dict):
        return
    saved = record["splits"].get(split)
    if not isinstance(saved, dict) or not get_dataset_info(name, **options).in_memory:
        return
    images, labels = arrays(name, split, data_root(data_dir), False, options)
    if _fingerprint(images, labels) != saved.get("sha256"):
        found = f"{len(labels):,} examples" + (f", {saved['examples']:,} then" if isinstance(saved.get("examples"), int)
                                               and saved["examples"] != len(labels) else "")
        raise DataError(f"The {split} split of {name} found now ({found}) is not the one {where} was trained on "
                        "(its data.json keeps a fingerprint of it); point --data-dir or LANDSCAPE_DATA_DIR at the data "
                        "it was trained on.")


def _fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of a split's pixels and labels (their dtype and shape included): a tenth of a second for MNIST."""
    import hashlib

    digest = hashlib.sha256()
    for a in (images, labels):
        digest.update(repr((a.dtype.str, a.shape)).encode())
        digest.update(np.ascontiguousarray(a).data)
    return digest.hexdigest()


def _cached(loader: Callable, name: str, args: tuple, watch: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """``loader(name, *args)``, remembered until one of the ``watch`` files changes (path, mtime or size)."""
    signature = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in watch)
    return _cached_load(loader, name, args, signature)


@functools.lru_cache(maxsize=6)
def _cached_load(loader: Callable, name: str, args: tuple, signature: tuple) -> tuple[np.ndarray, np.ndarray]:
    images, labels = loader(name, *args)
    return read_only(images), read_only(labels)


def dataset_status(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One row per registered dataset: whether its files are found, where, split sizes, classes, image shape
    ``C x H x W`` and official source. Quick: IDX sizes come from the headers, CIFAR sizes are the official
    ones, image folders are counted without opening images."""
    root = data_root(data_dir)
    rows = []
    for info in REGISTRY.values():
        row = dict(name=info.name, found="no", train=None, val=None, classes=info.num_classes,
                   shape="x".join(map(str, info.shape)), location=None if root is None else f"not found under {root}",
                   source=info.source)
        if info.name == "digits":
            row.update(found="yes", train=info.train_size, val=info.val_size, location="embedded (scikit-learn)")
        elif info.name == "synthetic":
            row.update(found="yes", train=info.train_size, val=info.val_size, location="generated (any shape)")
        elif root is None:
            row["location"] = f"set --data-dir or {ENV_VAR}"
        elif info.name in ("mnist", "fashion-mnist"):
            row.update(idx_status(info, root))
        elif info.name.startswith("cifar"):
            location = find_cifar(info.name, root)
            if location is not None:
                row.update(found="yes", train=info.train_size, val=info.val_size, location=str(location))
        else:
            row.update(imagefolder_status(root))
        rows.append(row)
    return rows
