"""Datasets by name: the files they need, how they are read, and the transforms every part of the toolkit uses.

Registered datasets (:func:`dataset_names`):

- ``digits``: scikit-learn's 8x8 handwritten digits, embedded, always available offline (the default); a fixed,
  seeded, stratified split of the 1797 images into 1437 train / 360 val.
- ``synthetic``: class prototypes plus Gaussian noise, generated from a seed; any size, channels, classes and
  count. For tests and benchmarks.
- ``mnist``: the official IDX files ``train-images-idx3-ubyte.gz`` ... under ``<root>/mnist/`` (or torchvision's
  ``<root>/MNIST/raw/``; uncompressed IDX files are accepted too).
- ``fashion-mnist``: the same four IDX file names under ``<root>/fashion-mnist/`` (or ``<root>/FashionMNIST/raw/``).
- ``cifar10``: the official python-pickle folder ``cifar-10-batches-py/`` or ``cifar-10-python.tar.gz`` (read
  straight from the archive), in ``<root>/cifar10/`` or ``<root>/``.
- ``cifar100``: ``cifar-100-python/`` or ``cifar-100-python.tar.gz`` in ``<root>/cifar100/`` or ``<root>/``
  (the 100 fine labels).
- ``imagefolder``: ImageNet-style ``train/<class>/*`` and ``val/<class>/*`` in the first of
  ``<root>/imagefolder/``, ``<root>/imagenet/`` or ``<root>/`` that has both; read file by file.

``<root>`` is the ``data_dir`` argument (the CLI's ``--data-dir``) or else the environment variable
``LANDSCAPE_DATA_DIR``. Nothing is downloaded unless asked: :func:`download_dataset` (the command line
``landscape datasets --download NAME``) or ``download=True`` fetch the official files and check their md5.
The "val" split of MNIST, Fashion-MNIST and CIFAR is their official test set.

CIFAR batches are Python pickles; they are read by an unpickler that builds no Python or numpy object beyond
plain containers, strings and numbers, and accepts only the official layout (see :class:`_ArrayUnpickler`).

Small datasets live in memory as ``uint8`` arrays of shape ``(N, H, W, C)`` with ``int64`` labels ``(N,)``
(:func:`load_arrays`). Per-example transforms take PIL images (mode ``"L"`` for one channel, ``"RGB"`` for
three) so that timm's training transforms apply unchanged; :func:`to_eval_tensor` applies the evaluation
transform to a whole ``uint8`` batch at once, with the same numbers as :func:`create_eval_transform` applied
image by image. :func:`analysis_subset` is the fixed evaluation set every analysis measures on.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from landscape.io import atomic_write
from landscape.errors import DataError

ENV_VAR = "LANDSCAPE_DATA_DIR"
SPLITS = ("train", "val")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is and where its files come from.

    ``img_size`` is the native (square) image side; ``mean``/``std`` have one entry per channel and are used by
    every transform. ``num_classes`` is ``None`` only for ``imagefolder`` before its folder is read.
    ``folders`` are the places under the data root that are searched, in order (the first is where a download
    goes); ``files`` names what must be there. ``hflip`` and ``train_scale`` are the training augmentation's
    defaults: no horizontal flip where mirroring changes the class (digits), a random-resized-crop area range
    that keeps small images recognisable.
    """

    name: str
    num_classes: int | None
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
    files: tuple[str, ...] = ()
    source: str = ""
    folders: tuple[str, ...] = ()
    train_size: int | None = None
    val_size: int | None = None
    hflip: bool = False
    train_scale: tuple[float, float] = (0.08, 1.0)
    interpolation: str = "bilinear"
    in_memory: bool = True

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image at the native size."""
        return (self.in_chans, self.img_size, self.img_size)


_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_CIFAR_SOURCE = "www.cs.toronto.edu/~kriz/cifar.html"

_REGISTRY: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            "digits", 10, 1, 8, (0.3059,), (0.3764,),
            "scikit-learn's 8x8 handwritten digits (UCI optdigits test set), embedded",
            source="embedded in scikit-learn (sklearn.datasets.load_digits)",
            train_size=1437, val_size=360, hflip=False, train_scale=(0.6, 1.0),
        ),
        DatasetInfo(
            "synthetic", 10, 1, 8, (0.5,), (0.5,),
            "seeded class prototypes plus Gaussian noise; size, channels, classes and count are options",
            source="generated from a seed",
            train_size=1024, val_size=256, hflip=False, train_scale=(0.6, 1.0),
        ),
        DatasetInfo(
            "mnist", 10, 1, 28, (0.1307,), (0.3081,),
            "MNIST handwritten digits, 28x28 grayscale",
            files=_MNIST_FILES, source="yann.lecun.com/exdb/mnist/",
            folders=("mnist", "MNIST/raw"), train_size=60000, val_size=10000, hflip=False, train_scale=(0.6, 1.0),
        ),
        DatasetInfo(
            "fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,),
            "Fashion-MNIST clothing images, 28x28 grayscale",
            files=_MNIST_FILES, source="github.com/zalandoresearch/fashion-mnist (data/fashion/)",
            folders=("fashion-mnist", "FashionMNIST/raw"), train_size=60000, val_size=10000, hflip=True,
            train_scale=(0.6, 1.0),
        ),
        DatasetInfo(
            "cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
            "CIFAR-10 natural images, 32x32 RGB",
            files=("cifar-10-batches-py/ (data_batch_1..5, test_batch)", "cifar-10-python.tar.gz"),
            source=_CIFAR_SOURCE, folders=("cifar10", "."), train_size=50000, val_size=10000, hflip=True,
            train_scale=(0.35, 1.0),
        ),
        DatasetInfo(
            "cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
            "CIFAR-100 natural images, 32x32 RGB, 100 fine labels",
            files=("cifar-100-python/ (train, test)", "cifar-100-python.tar.gz"),
            source=_CIFAR_SOURCE, folders=("cifar100", "."), train_size=50000, val_size=10000, hflip=True,
            train_scale=(0.35, 1.0),
        ),
        DatasetInfo(
            "imagefolder", None, 3, 224, IMAGENET_MEAN, IMAGENET_STD,
            "ImageNet-style class folders, read file by file",
            files=("train/<class>/<images>", "val/<class>/<images>"),
            source="your own copy of the images (ImageNet: image-net.org)",
            folders=("imagefolder", "imagenet", "."), hflip=True, interpolation="bicubic", in_memory=False,
        ),
    ]
}

_SYNTHETIC_DEFAULTS = dict(img_size=8, in_chans=1, num_classes=10, count=1024, val_count=None, data_seed=0, noise=0.5)

# Official files and their md5 checksums (the ones the authors publish), for download=True only.
_DOWNLOADS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "mnist": (
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": (
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "cifar10": (("https://www.cs.toronto.edu/~kriz/",), {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}),
    "cifar100": (("https://www.cs.toronto.edu/~kriz/",), {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"}),
}


# -- registry -------------------------------------------------------------------------------------------------
def dataset_names() -> list[str]:
    """The registered dataset names, the embedded default first."""
    return list(_REGISTRY)


def get_dataset_info(name: str, **options: Any) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; ``synthetic`` takes its options (``img_size``, ``in_chans``,
    ``num_classes``, ...) and reports the matching shape, class count and per-channel mean/std."""
    info = _lookup(name)
    if name == "synthetic":
        opts = _synthetic_options(options)
        c = opts["in_chans"]
        return dataclasses.replace(
            info, img_size=opts["img_size"], in_chans=c, num_classes=opts["num_classes"],
            mean=(0.5,) * c, std=(0.5,) * c, train_size=opts["count"], val_size=opts["val_count"],
        )
    _no_options(name, options)
    return info


def check_data_fits(
    name: str,
    *,
    model_in_chans: int | None,
    model_img_size: int | None,
    model_classes: int | None,
    img_size: int | None = None,
    options: dict[str, Any] | None = None,
    data_dir: str | os.PathLike | None = None,
) -> None:
    """Refuse, in one sentence naming what would fit, data whose images or classes the model cannot take.

    The images reach the model with ``img_size`` (default: the dataset's native size) and the dataset's
    channels; the labels must be the model's classes (an image folder's classes are its class folders, counted
    when they are found). A ``None`` model fact is not checked.
    """
    options = dict(options or {})
    info = get_dataset_info(name, **_transform_options(name, img_size, options))
    size = img_size or info.img_size
    classes = info.num_classes
    if classes is None and name == "imagefolder":
        folder = _find_imagefolder(data_root(data_dir))
        classes = len(_class_folders(folder / "train")) if folder is not None else None
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
        fitting = [n for n, i in _REGISTRY.items() if n not in ("synthetic", "imagefolder")
                   and (model_in_chans is None or i.in_chans == model_in_chans)
                   and (model_classes is None or i.num_classes == model_classes)]
        if model_in_chans in (None, 3):
            fitting.append(f"imagefolder with {model_classes} class folders" if model_classes else "imagefolder")
        synthetic = "--data synthetic (takes the model's shape)" if name != "synthetic" else \
            "--data synthetic without --classes"
        fixes.append(f"{' or '.join(f'--data {f}' for f in fitting)} or {synthetic}" if fitting else synthetic)
    raise DataError(
        f"The model takes {shape(model_in_chans, model_img_size, model_classes)}, but {name} gives "
        f"{shape(info.in_chans, size, classes)}; to fit, use {' and '.join(fixes)}."
    )


def _lookup(name: str) -> DatasetInfo:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise DataError(f"Unknown dataset {name!r}; known datasets are {', '.join(_REGISTRY)}.") from None


def _no_options(name: str, options: dict[str, Any]) -> None:
    if options:
        raise DataError(
            f"Dataset {name!r} takes no options (got {', '.join(sorted(options))}); only 'synthetic' does."
        )


def _synthetic_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_SYNTHETIC_DEFAULTS))
    if unknown:
        raise DataError(
            f"Unknown synthetic option(s) {', '.join(unknown)}; accepted are {', '.join(_SYNTHETIC_DEFAULTS)}."
        )
    opts = {**_SYNTHETIC_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    for key in ("img_size", "in_chans", "num_classes", "count"):
        if not isinstance(opts[key], (int, np.integer)) or opts[key] < 1:
            raise DataError(f"Synthetic option {key} must be a positive integer, not {opts[key]!r}.")
    if opts["val_count"] is None:
        opts["val_count"] = max(1, opts["count"] // 4)
    if not isinstance(opts["noise"], (int, float)) or opts["noise"] < 0:
        raise DataError(f"Synthetic option noise must be a non-negative number, not {opts['noise']!r}.")
    return opts


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"Unknown split {split!r}; accepted splits are {', '.join(SPLITS)}.")


def data_root(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data root: ``data_dir`` if given, else ``$LANDSCAPE_DATA_DIR``, else ``None``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR, "")
    return Path(env).expanduser() if env else None


def download_command(name: str) -> str:
    """The command line that fetches the official files of ``name`` (it calls :func:`download_dataset`)."""
    return f"landscape datasets --download {name}"


def _missing(info: DatasetInfo, root: Path | None) -> DataError:
    """The one-sentence error for a dataset whose files are not where they are looked for."""
    if info.name == "imagefolder":
        needs = "train/<class>/ and val/<class>/ image folders"
    elif info.name.startswith("cifar"):
        needs = " or ".join(info.files)
    else:
        needs = ", ".join(info.files[:-1]) + " and " + info.files[-1]
    if root is None:
        where = f"a data folder given by --data-dir or {ENV_VAR} (looked for in <data-dir>/{info.folders[0]}/)"
    else:
        where = " or ".join(str(root / f) if f != "." else str(root) for f in info.folders)
    if info.name in _DOWNLOADS:
        origin = f"from the official source {info.source}; run '{download_command(info.name)}' to fetch them"
    else:
        origin = f"from {info.source}"
    return DataError(f"Dataset {info.name!r} needs {needs} in {where}, {origin}.")


# -- building datasets ----------------------------------------------------------------------------------------
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
    _check_split(split)
    generator_options = _transform_options(name, img_size, options)
    info = get_dataset_info(name, **generator_options)
    if transform is None:
        transform = create_eval_transform(name, img_size, **options)
    if not info.in_memory:
        return _build_imagefolder(split, data_root(data_dir), transform, download)
    images, labels = _arrays(name, split, data_root(data_dir), download, generator_options)
    return ArrayDataset(images, labels, info, transform)


def load_arrays(
    name: str, split: str = "train", *, data_dir: str | os.PathLike | None = None, download: bool = False, **options
) -> tuple[np.ndarray, np.ndarray]:
    """The whole split as ``(images uint8 (N, H, W, C), labels int64 (N,))``, fresh writable copies.

    The fast route for code that transforms whole tensors (see :func:`to_eval_tensor`). Not available for
    ``imagefolder``, which is read file by file.
    """
    _check_split(split)
    info = get_dataset_info(name, **options)
    if not info.in_memory:
        raise DataError(f"Dataset {name!r} is read file by file; use build_dataset instead of load_arrays.")
    images, labels = _arrays(name, split, data_root(data_dir), download, options)
    return images.copy(), labels.copy()


def _arrays(name: str, split: str, root: Path | None, download: bool, options: dict) -> tuple[np.ndarray, np.ndarray]:
    """Shared read-only arrays of an in-memory dataset, cached by the identity of the files they came from."""
    if name == "digits":
        return _digits(split)
    if name == "synthetic":
        opts = _synthetic_options(options)
        return _synthetic(split, **opts)
    info = _lookup(name)
    if name in ("mnist", "fashion-mnist"):
        folder = _find_idx_folder(info, root)
        if folder is None and download:
            folder = download_dataset(name, root)
        if folder is None:
            partial = _partial_idx_folder(info, root)
            if partial is not None:
                raise DataError(
                    f"Dataset {name!r} is incomplete in {partial[0]}: {', '.join(partial[1])} "
                    f"{'is' if len(partial[1]) == 1 else 'are'} missing; run '{download_command(name)}' to fetch "
                    f"the official files from {info.source}."
                )
            raise _missing(info, root)
        stems = _IDX_STEMS[split]
        paths = tuple(_idx_path(folder, s) for s in stems)
        return _cached(_load_idx_pair, name, paths, paths)
    location = _find_cifar(name, root)
    if location is None and download:
        download_dataset(name, root)
        location = _find_cifar(name, root)
    if location is None:
        raise _missing(info, root)
    watch = sorted(location.iterdir()) if location.is_dir() else [location]
    return _cached(_load_cifar, name, (location, split), watch)


def _cached(loader: Callable, name: str, args: tuple, watch: Sequence[Path]) -> tuple[np.ndarray, np.ndarray]:
    """``loader(name, *args)``, remembered until one of the ``watch`` files changes (path, mtime or size)."""
    signature = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in watch)
    return _cached_load(loader, name, args, signature)


@functools.lru_cache(maxsize=6)
def _cached_load(loader: Callable, name: str, args: tuple, signature: tuple) -> tuple[np.ndarray, np.ndarray]:
    images, labels = loader(name, *args)
    return _read_only(images), _read_only(labels)


def _read_only(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


# -- digits ---------------------------------------------------------------------------------------------------
DIGITS_VAL_SIZE = 360
DIGITS_SPLIT_SEED = 0


@functools.lru_cache(maxsize=2)
def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are counts 0..16 of set bits in 4x4 blocks; spread them over 0..255.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, :, :, None]
    labels = bunch.target.astype(np.int64)
    val = digits_val_indices(labels)
    mask = np.zeros(len(labels), dtype=bool)
    mask[val] = True
    keep = np.flatnonzero(mask) if split == "val" else np.flatnonzero(~mask)
    return _read_only(images[keep]), _read_only(labels[keep])


def digits_val_indices(labels: np.ndarray, val_size: int = DIGITS_VAL_SIZE, seed: int = DIGITS_SPLIT_SEED) -> np.ndarray:
    """Indices (sorted) of the stratified validation split of the digits.

    Each class contributes its share ``val_size * n_c / N`` of the validation set, rounded by largest remainder
    (ties to the lower class) so that the shares sum to ``val_size``; within a class the examples are taken in
    the order of ``RandomState(seed).permutation``, whose stream NumPy keeps fixed across versions.
    """
    classes, counts = np.unique(labels, return_counts=True)
    exact = val_size * counts / counts.sum()
    take = np.floor(exact).astype(int)
    short = val_size - take.sum()
    take[np.argsort(-(exact - take), kind="stable")[:short]] += 1
    rng = np.random.RandomState(seed)
    chosen = []
    for c, k in zip(classes, take):
        members = np.flatnonzero(labels == c)
        chosen.append(members[rng.permutation(len(members))[:k]])
    return np.sort(np.concatenate(chosen))


# -- synthetic ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _synthetic(
    split: str, *, img_size: int, in_chans: int, num_classes: int, count: int, val_count: int, data_seed: int,
    noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Images :math:`x = \mathrm{clip}(p_y + \sigma \varepsilon, 0, 1)`, stored as ``uint8``.

    The prototypes :math:`p_c \sim U(0, 1)^{H \times W \times C}` come from ``data_seed``; train and val draw
    labels (balanced, shuffled) and noise :math:`\varepsilon \sim N(0, I)` from two different seeds derived
    from it, so they are independent samples of the same classes.
    """
    prototypes = np.random.RandomState(data_seed).uniform(0.0, 1.0, (num_classes, img_size, img_size, in_chans))
    n = count if split == "train" else val_count
    rng = np.random.RandomState([data_seed, 1 if split == "train" else 2])
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    x = prototypes[labels] + float(noise) * rng.standard_normal((n, img_size, img_size, in_chans))
    images = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    return _read_only(images), _read_only(labels)


# -- MNIST / Fashion-MNIST (IDX) ------------------------------------------------------------------------------
_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_path(folder: Path, stem: str) -> Path:
    gz = folder / f"{stem}.gz"
    return gz if gz.is_file() else folder / stem


def _find_idx_folder(info: DatasetInfo, root: Path | None) -> Path | None:
    if root is None:
        return None
    for sub in info.folders:
        folder = root / sub
        stems = _IDX_STEMS["train"] + _IDX_STEMS["val"]
        if all(_idx_path(folder, s).is_file() for s in stems):
            return folder
    return None


def _partial_idx_folder(info: DatasetInfo, root: Path | None) -> tuple[Path, list[str]] | None:
    """The first searched folder holding some but not all four IDX files, with the names of the missing ones."""
    if root is None:
        return None
    stems = _IDX_STEMS["train"] + _IDX_STEMS["val"]
    for sub in info.folders:
        folder = root / sub
        missing = [f"{s}.gz" for s in stems if not _idx_path(folder, s).is_file()]
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


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzip-compressed when its name ends in ``.gz``) as a ``uint8`` array of its declared shape.

    A wrong magic number, a truncated or over-long file, or a broken gzip stream is a :class:`DataError` naming
    the file.
    """
    path = Path(path)
    try:
        with _open_idx(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} could not be read as an IDX file ({e.__class__.__name__}: {e}).") from None
    dims, offset = _idx_header(data, path)
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DataError(
            f"{path} holds {len(data) - offset} bytes of data where its IDX header announces {expected} "
            f"(shape {'x'.join(map(str, dims))}); the file is truncated or corrupt."
        )
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


def _load_idx_pair(name: str, images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{images_path} must hold N x H x W images and {labels_path} N labels.")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels.")
    if labels.size and labels.max() >= _lookup(name).num_classes:
        raise DataError(f"{labels_path} holds label {labels.max()}, outside 0..{_lookup(name).num_classes - 1}.")
    return images[:, :, :, None].copy(), labels.astype(np.int64)


# -- CIFAR (python pickles, restricted) ------------------------------------------------------------------------
_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "val": ("test_batch",)}, "labels"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", {"train": ("train",), "val": ("test",)}, "fine_labels"),
}


def _find_cifar(name: str, root: Path | None) -> Path | None:
    """The batch folder or the ``.tar.gz`` of a CIFAR dataset, whichever is found first."""
    if root is None:
        return None
    folder_name, tar_name, members, _ = _CIFAR_LAYOUT[name]
    for sub in _lookup(name).folders:
        base = root / sub
        folder = base / folder_name
        if all((folder / m).is_file() for ms in members.values() for m in ms):
            return folder
        if (base / tar_name).is_file():
            return base / tar_name
    return None


class RefusedPickle(pickle.UnpicklingError):
    """A pickle referred to something other than plain numpy arrays."""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"); nothing else is allowed.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise RefusedPickle(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _plain_int(value: Any) -> bool:
    return type(value) is int


class _NdarrayName:
    """Stands for ``numpy.ndarray`` in a pickle: the first argument of ``_reconstruct``, never called."""

    def __call__(self, *args, **kwargs):
        raise RefusedPickle("a call of numpy.ndarray")


_NDARRAY = _NdarrayName()


class _DtypeRecord:
    """What a pickle says about a ``numpy.dtype``: its type string and the state tuple of its BUILD, nothing built.

    numpy pickles a dtype as ``dtype(spec, align, copy)`` followed by the state
    ``(version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])``.
    """

    __slots__ = ("spec", "state")

    def __init__(self, spec: Any, align: Any = False, copy: Any = False):
        if not isinstance(spec, str):
            raise RefusedPickle(f"a numpy.dtype described by a {type(spec).__name__}")
        self.spec, self.state = spec, None

    def __setstate__(self, state: Any) -> None:
        if self.state is not None:
            raise RefusedPickle("a second state for one numpy.dtype")
        if not isinstance(state, tuple) or not all(v is None or type(v) in (int, str) for v in state):
            raise RefusedPickle("a numpy.dtype state other than plain numbers and strings")
        self.state = state

    @property
    def is_uint8(self) -> bool:
        """Whether this is the plain ``|u1`` of the official files: no subarray, fields or flags."""
        s = self.state
        return (
            self.spec == "u1" and s is not None and len(s) in (8, 9) and s[0] in (3, 4) and s[1] in ("|", "=", "<", ">")
            and s[2:5] == (None, None, None) and s[7] == 0
        )

    def __str__(self) -> str:
        byteorder = self.state[1] if self.state and len(self.state) > 1 and isinstance(self.state[1], str) else ""
        return byteorder + self.spec + ("" if self.is_uint8 or self.state is None else " with fields or flags")


class _ArrayRecord:
    """What a pickle says about a numpy array: shape, dtype record, order and raw bytes; no array is built.

    numpy pickles an array as ``_reconstruct(ndarray, (0,), b"b")`` followed by the state
    ``(1, shape, dtype, is_fortran, raw bytes)``.
    """

    __slots__ = ("shape", "dtype", "fortran", "raw")

    def __init__(self):
        self.shape = self.dtype = self.fortran = self.raw = None

    def __setstate__(self, state: Any) -> None:
        if self.raw is not None:
            raise RefusedPickle("a second state for one numpy array")
        if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise RefusedPickle("a numpy array state of an unknown layout")
        _, shape, dtype, fortran, raw = state
        if not isinstance(shape, tuple) or not all(_plain_int(n) and n >= 0 for n in shape):
            raise RefusedPickle("a numpy array with a shape other than non-negative integers")
        if not isinstance(dtype, _DtypeRecord):
            raise RefusedPickle("a numpy array without a numpy.dtype")
        if isinstance(raw, str):  # a Python 2 str, decoded as latin-1 by the unpickler
            try:
                raw = raw.encode("latin1")
            except UnicodeEncodeError:
                raise RefusedPickle("a numpy array whose data is text") from None
        if not isinstance(raw, (bytes, bytearray)):
            raise RefusedPickle("a numpy array whose data are Python objects, not raw bytes")
        self.shape, self.dtype, self.fortran, self.raw = shape, dtype, bool(fortran), bytes(raw)


def _reconstruct(cls: Any, shape: Any = None, typecode: Any = None) -> _ArrayRecord:
    if cls is not _NDARRAY:
        raise RefusedPickle("numpy's _reconstruct of something other than numpy.ndarray")
    return _ArrayRecord()


class _ArrayUnpickler(pickle.Unpickler):
    """Reads the pickled dicts, lists, strings and numbers of a CIFAR batch, and builds no numpy object at all.

    ``find_class`` is the only door through which a pickle reaches callable code. The numpy names a CIFAR
    batch uses (``_reconstruct``, ``ndarray``, ``dtype``, and ``_codecs.encode`` for latin-1 bytes) lead to
    inert records (:class:`_ArrayRecord`, :class:`_DtypeRecord`) that only keep shapes, type strings and
    bytes; every other global is refused. The caller then accepts exactly the official layout and builds the
    array itself with ``np.frombuffer``, so no pickle can forge a numpy object (for instance an object array
    whose "pointers" are bytes of the file).
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _DtypeRecord,
        ("_codecs", "encode"): _latin1_bytes,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise RefusedPickle(f"{module}.{name}") from None


def _unpickle_batch(f, where: str, num_classes: int, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch: ``{"data": uint8 (n, 3072), label_key: [n ints], ...}``, read safely."""
    try:
        batch = _ArrayUnpickler(f, encoding="latin1").load()
    except RefusedPickle as e:
        raise DataError(
            f"{where} refers to {e}, which a CIFAR batch never contains, so it was refused and nothing in it ran."
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OSError, zlib.error, MemoryError, RecursionError, OverflowError) as e:
        raise DataError(f"{where} is not a readable CIFAR batch ({e.__class__.__name__}: {e}).") from None
    if isinstance(batch, dict):
        batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data = batch.get("data") if isinstance(batch, dict) else None
    labels = batch.get(label_key) if isinstance(batch, dict) else None
    if not isinstance(data, _ArrayRecord) or data.raw is None:
        raise DataError(f"{where} is not a CIFAR batch: it needs a 'data' array of uint8 with 3072 columns.")
    if not data.dtype.is_uint8 or len(data.shape) != 2 or data.shape[1] != 3072 or data.fortran:
        order = " in Fortran order" if data.fortran else ""
        raise DataError(
            f"{where} is not a CIFAR batch: its 'data' is a {'x'.join(map(str, data.shape))} array of "
            f"{data.dtype}{order}, where a CIFAR batch has N x 3072 values of |u1 (uint8) in C order."
        )
    n = data.shape[0]
    if len(data.raw) != n * 3072:
        raise DataError(f"{where} holds {len(data.raw)} bytes for a 'data' array of {n} x 3072 bytes.")
    if not isinstance(labels, list) or len(labels) != n or not all(
        _plain_int(v) and 0 <= v < num_classes for v in labels
    ):
        raise DataError(f"{where} needs a list of {n} integer '{label_key}' in 0..{num_classes - 1}.")
    data = np.frombuffer(data.raw, dtype=np.uint8).reshape(n, 3072)
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, np.array(labels, dtype=np.int64)


def _load_cifar(name: str, location: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    folder_name, _, members, label_key = _CIFAR_LAYOUT[name]
    num_classes = _lookup(name).num_classes
    wanted = members[split]
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if location.is_dir():
        for m in wanted:
            with open(location / m, "rb") as f:
                batches[m] = _unpickle_batch(f, str(location / m), num_classes, label_key)
    else:
        try:
            with tarfile.open(location, "r:gz") as tar:
                targets = {f"{folder_name}/{m}": m for m in wanted}
                # One pass in archive order: seeking backwards in a gzip stream means decompressing again.
                for member in tar:
                    member_name = member.name.removeprefix("./")
                    if member.isfile() and member_name in targets:
                        with tar.extractfile(member) as f:
                            where = f"{location}:{member_name}"
                            batches[targets[member_name]] = _unpickle_batch(f, where, num_classes, label_key)
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DataError(f"{location} is not a readable .tar.gz archive ({e.__class__.__name__}: {e}).") from None
        absent = [m for m in wanted if m not in batches]
        if absent:
            raise DataError(f"{location} lacks {', '.join(f'{folder_name}/{m}' for m in absent)}.")
    images = np.concatenate([batches[m][0] for m in wanted])
    labels = np.concatenate([batches[m][1] for m in wanted])
    return images, labels


# -- imagefolder ----------------------------------------------------------------------------------------------
def _find_imagefolder(root: Path | None) -> Path | None:
    if root is None:
        return None
    for sub in _lookup("imagefolder").folders:
        base = root / sub
        if (base / "train").is_dir() and (base / "val").is_dir():
            return base
    return None


def _class_folders(folder: Path) -> list[str]:
    # Every sub-folder is a class, exactly as torchvision's ImageFolder sees it.
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def _build_imagefolder(split: str, root: Path | None, transform: Callable | None, download: bool):
    from torchvision.datasets import ImageFolder

    info = _lookup("imagefolder")
    base = _find_imagefolder(root)
    if base is None and download:
        raise DataError("Dataset 'imagefolder' cannot be downloaded; put train/<class>/ and val/<class>/ folders "
                        f"under --data-dir or {ENV_VAR}.")
    if base is None:
        raise _missing(info, root)
    classes = _class_folders(base / "train")
    if not classes:
        raise DataError(f"{base / 'train'} has no class folders; expected train/<class>/<images>.")
    if split == "val":
        extra = sorted(set(_class_folders(base / "val")) - set(classes))
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


# -- transforms -----------------------------------------------------------------------------------------------
def create_train_transform(
    name: str,
    img_size: int | None = None,
    *,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    re_mode: str = "pixel",
    hflip: bool | float | None = None,
    scale: Sequence[float] | None = None,
    ratio: Sequence[float] | None = None,
    color_jitter: float | None = 0.4,
    interpolation: str | None = None,
    **options: Any,
) -> Callable:
    """timm's training transform (``timm.data.create_transform(is_training=True)``) for a dataset.

    Random-resized crop to ``img_size`` (area range ``scale``, default the dataset's ``train_scale``), horizontal
    flip with probability 0.5 where the dataset allows it (``hflip=None``; off for digits and MNIST, where a
    mirror image can be another digit; ``True``/``False`` or a probability overrides), then ``auto_augment``
    (a timm string such as ``"rand-m9-mstd0.5-inc1"``) or colour jitter, tensor conversion, normalisation with
    the dataset's mean/std and random erasing with probability ``re_prob``. Input: a PIL image (mode ``"L"``
    for one channel; every timm RandAugment/AutoAugment/AugMix operation works on it directly). Output:
    ``float32`` tensor ``(C, img_size, img_size)``.
    """
    from timm.data import create_transform

    info = get_dataset_info(name, **_transform_options(name, img_size, options))
    size = img_size or info.img_size
    if hflip is None:
        flip = 0.5 if info.hflip else 0.0
    else:
        flip = float(hflip) if not isinstance(hflip, bool) else (0.5 if hflip else 0.0)
    transform = create_transform(
        size,
        is_training=True,
        scale=tuple(scale or info.train_scale),
        ratio=tuple(ratio) if ratio else None,
        hflip=flip,
        color_jitter=color_jitter,
        auto_augment=auto_augment,
        interpolation=interpolation or info.interpolation,
        mean=info.mean,
        std=info.std,
        re_prob=re_prob,
        re_mode=re_mode,
    )
    _allow_zero_bit_posterize(transform)
    return transform


def _transform_options(name: str, img_size: int | None, options: dict[str, Any]) -> dict[str, Any]:
    # For synthetic data the requested size is the generated size, so there is nothing to resize.
    if name == "synthetic" and img_size is not None:
        return {**options, "img_size": img_size}
    return options


def _posterize(img, bits_to_keep, **_):
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        # Keeping 0 bits is a black image; recent Pillow refuses bits=0 instead of producing it.
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _allow_zero_bit_posterize(transform: Any) -> None:
    """Make timm's posterize operations accept 0 bits, as the "-inc1" RandAugment levels ask at magnitude 10."""
    from timm.data import auto_augment as aa

    stack = list(getattr(transform, "transforms", []))
    while stack:
        t = stack.pop()
        ops = list(getattr(t, "ops", []) or [])
        for sub in getattr(t, "policy", []) or []:
            ops.extend(sub)
        for op in ops:
            if getattr(op, "aug_fn", None) is aa.posterize:
                op.aug_fn = _posterize
        stack.extend(getattr(t, "transforms", []) or [])


def create_eval_transform(name: str, img_size: int | None = None, **options: Any) -> Callable:
    r"""The evaluation transform: PIL image -> ``float32`` tensor ``(C, img_size, img_size)``.

    In-memory datasets: to ``[0, 1]``, bilinear (antialiased) resize when ``img_size`` differs from the native
    size, normalisation :math:`(x - \mu_c)/\sigma_c`. ``imagefolder``: timm's evaluation transform (resize to
    ``img_size / 0.875``, centre crop, normalise).
    """
    from torchvision import transforms

    info = get_dataset_info(name, **_transform_options(name, img_size, options))
    size = img_size or info.img_size
    if not info.in_memory:
        from timm.data import create_transform

        return create_transform(size, is_training=False, interpolation=info.interpolation, mean=info.mean,
                                std=info.std)
    steps: list[Callable] = [transforms.ToTensor()]
    if size != info.img_size:
        steps.append(transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BILINEAR,
                                       antialias=True))
    steps.append(transforms.Normalize(info.mean, info.std))
    return transforms.Compose(steps)


def to_eval_tensor(images: np.ndarray | torch.Tensor, name: str, img_size: int | None = None, **options) -> torch.Tensor:
    """The evaluation transform applied to a whole batch: ``uint8 (N, H, W, C)`` -> ``float32 (N, C, S, S)``.

    Gives the same numbers as :func:`create_eval_transform` applied image by image, without PIL.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    info = get_dataset_info(name, **_transform_options(name, img_size, options))
    size = img_size or info.img_size
    x = torch.as_tensor(np.array(images, copy=True)) if isinstance(images, np.ndarray) else images.clone()
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise DataError(f"to_eval_tensor needs uint8 images of shape (N, H, W, C), got {x.dtype} {tuple(x.shape)}.")
    x = x.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    if size != info.img_size:
        x = TF.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.normalize(x, info.mean, info.std)


# -- the analysis subset --------------------------------------------------------------------------------------
def analysis_subset(
    name: str,
    n: int,
    *,
    seed: int = 0,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    img_size: int | None = None,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed evaluation set of the analyses: ``(x float32 (n, C, S, S), y int64 (n,))``.

    The examples are the first ``n`` of ``RandomState(seed).permutation(len(split))``, in that order, passed
    through the evaluation transform (no augmentation). The same arguments give bitwise the same tensors, and a
    smaller ``n`` gives a prefix of a larger one. When ``n`` exceeds the split, the whole split is returned (in
    the permuted order); check ``len(y)``.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"The analysis subset size must be a positive integer, not {n!r}.")
    _check_split(split)
    generator_options = _transform_options(name, img_size, options)
    info = get_dataset_info(name, **generator_options)
    if info.in_memory:
        images, labels = _arrays(name, split, data_root(data_dir), False, generator_options)
        order = np.random.RandomState(seed).permutation(len(labels))[:n]
        x = to_eval_tensor(images[order], name, img_size, **options)
        return x, torch.from_numpy(labels[order].copy())
    dataset = build_dataset(name, split, data_dir=data_dir, img_size=img_size, **options)
    order = np.random.RandomState(seed).permutation(len(dataset))[:n]
    pairs = [dataset[int(i)] for i in order]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs], dtype=torch.int64)


# -- status ---------------------------------------------------------------------------------------------------
def dataset_status(data_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """One row per registered dataset: whether its files are found, where, split sizes, classes, image shape
    ``C x H x W`` and official source. Quick: IDX sizes come from the headers, CIFAR sizes are the official
    ones, image folders are counted without opening images."""
    root = data_root(data_dir)
    rows = []
    for info in _REGISTRY.values():
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
            row.update(_idx_status(info, root))
        elif info.name.startswith("cifar"):
            location = _find_cifar(info.name, root)
            if location is not None:
                row.update(found="yes", train=info.train_size, val=info.val_size, location=str(location))
        else:
            row.update(_imagefolder_status(root))
        rows.append(row)
    return rows


def _idx_status(info: DatasetInfo, root: Path) -> dict[str, Any]:
    folder = _find_idx_folder(info, root)
    if folder is None:
        partial = _partial_idx_folder(info, root)
        return {} if partial is None else {"location": f"{partial[0]} lacks {', '.join(partial[1])}"}
    sizes = {}
    try:
        for split, (images, labels) in _IDX_STEMS.items():
            shape = read_idx_shape(_idx_path(folder, images))
            if read_idx_shape(_idx_path(folder, labels))[0] != shape[0]:
                raise DataError(f"{labels} does not match {images}")
            sizes[split] = shape
    except DataError:
        return {"location": f"{folder} (unreadable files)"}
    h, w = sizes["train"][1:3]
    return dict(found="yes", train=sizes["train"][0], val=sizes["val"][0], shape=f"1x{h}x{w}", location=str(folder))


def _imagefolder_status(root: Path) -> dict[str, Any]:
    base = _find_imagefolder(root)
    if base is None:
        return {}
    classes = _class_folders(base / "train")
    counts = {}
    for split in SPLITS:
        counts[split] = sum(
            sum(1 for e in os.scandir(base / split / c) if e.is_file())
            for c in classes if (base / split / c).is_dir()
        )
    return dict(found="yes", train=counts["train"], val=counts["val"], classes=len(classes), location=str(base))


# -- download -------------------------------------------------------------------------------------------------
def download_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Fetch the official files of ``name`` into ``<root>/<name's first folder>/``, checking each md5.

    Files already there are kept. Each file is written atomically: a failed or mismatching download leaves
    nothing behind. Returns the folder.
    """
    info = _lookup(name)
    if name not in _DOWNLOADS:
        raise DataError(f"Dataset {name!r} cannot be downloaded; downloadable are {', '.join(_DOWNLOADS)}.")
    root = data_root(data_dir)
    if root is None:
        raise DataError(f"Downloading {name!r} needs a data folder: pass --data-dir or set {ENV_VAR}.")
    folder = root / info.folders[0]
    mirrors, files = _DOWNLOADS[name]
    for file_name, md5 in files.items():
        if not (folder / file_name).is_file():
            _fetch([m + file_name for m in mirrors], folder / file_name, md5)
    return folder


def _fetch(urls: list[str], dest: Path, md5: str) -> None:
    failures = []
    for url in urls:
        def write(tmp: Path) -> None:
            digest = hashlib.md5(usedforsecurity=False)
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
            if digest.hexdigest() != md5:
                raise DataError(f"md5 {digest.hexdigest()} instead of the official {md5}")

        try:
            atomic_write(dest, write)
            return
        except (OSError, urllib.error.URLError, DataError) as e:
            failures.append(f"{url} ({e})")
    raise DataError(f"Could not download {dest.name}: {'; '.join(failures)}.")
