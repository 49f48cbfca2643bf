"""ImageNet-style class folders (``train/<class>/*``, ``val/<class>/*``), read file by file through torchvision."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

from landscape.data.registry import ENV_VAR, SPLITS, lookup, missing_files_error
from landscape.errors import DataError


def find_imagefolder(root: Path | None) -> Path | None:
    if root is None:
        return None
    for sub in lookup("imagefolder").folders:
        base = root / sub
        if (base / "train").is_dir() and (base / "val").is_dir():
            return base
    return None


def class_folders(folder: Path) -> list[str]:
    # Every sub-folder is a class, exactly as torchvision's ImageFolder sees it.
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def build_imagefolder(split: str, root: Path | None, transform: Callable | None, download: bool):
    from torchvision.datasets import ImageFolder

    info = lookup("imagefolder")
    base = find_imagefolder(root)
    if base is None and download:
        raise DataError("Dataset 'imagefolder' cannot be downloaded; put train/<class>/ and val/<class>/ folders "
                        f"under --data-dir or {ENV_VAR}.")
    if base is None:
        raise missing_files_error(info, root)
    classes = class_folders(base / "train")
    if not classes:
        raise DataError(f"{base / 'train'} has no class folders; expected train/<class>/<images>.")
    if split == "val":
        extra = sorted(set(class_folders(base / "val")) - set(classes))
        if extra:
            raise DataError(f"{base / 'val'} has class folders not in train/: {', '.join(extra[:5])}.")

    try:
        dataset = ImageFolder(str(base / split), transform=transform, allow_empty=split == "val")
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"{base / split} could not be read as class folders of images ({e}).") from None
    # Index classes by the train folder's list in both splits, so that a label means the same class in each
    # (a val/ lacking some classes would otherwise shift every index after the first missing one).
    index = {c: i for i, c in enumerate(classes)}
    dataset.samples = [(path, index[dataset.classes[t]]) for path, t in dataset.samples]
    dataset.imgs = dataset.samples
    dataset.targets = [t for _, t in dataset.samples]
    dataset.classes, dataset.class_to_idx = list(classes), index
    dataset.info = dataclasses.replace(info, num_classes=len(classes), train_size=None, val_size=None)
    return dataset


def imagefolder_status(root: Path) -> dict[str, Any]:
    base = find_imagefolder(root)
    if base is None:
        return {}
    classes = class_folders(base / "train")
    counts = {}
    for split in SPLITS:
        counts[split] = sum(
            sum(1 for e in os.scandir(base / split / c) if e.is_file())
            for c in classes if (base / split / c).is_dir()
        )
    return dict(found="yes", train=counts["train"], val=counts["val"], classes=len(classes), location=str(base))
