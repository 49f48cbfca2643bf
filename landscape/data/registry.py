"""The registered datasets: what each is, where its files are looked for, and where they come from.

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
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from landscape.errors import DataError
from landscape.io import atomic_write


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

REGISTRY: dict[str, DatasetInfo] = {
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
DOWNLOADS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
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
    return list(REGISTRY)


def get_dataset_info(name: str, **options: Any) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; ``synthetic`` takes its options (``img_size``, ``in_chans``,
    ``num_classes``, ...) and reports the matching shape, class count and per-channel mean/std."""
    info = lookup(name)
    if name == "synthetic":
        opts = synthetic_options(options)
        c = opts["in_chans"]
        return dataclasses.replace(
            info, img_size=opts["img_size"], in_chans=c, num_classes=opts["num_classes"],
            mean=(0.5,) * c, std=(0.5,) * c, train_size=opts["count"], val_size=opts["val_count"],
        )
    _no_options(name, options)
    return info


def lookup(name: str) -> DatasetInfo:
    """The registered :class:`DatasetInfo` of ``name`` as declared (``synthetic`` at its defaults)."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise DataError(f"Unknown dataset {name!r}; known datasets are {', '.join(REGISTRY)}.") from None


def _no_options(name: str, options: dict[str, Any]) -> None:
    if options:
        raise DataError(
            f"Dataset {name!r} takes no options (got {', '.join(sorted(options))}); only 'synthetic' does."
        )


def synthetic_options(options: dict[str, Any]) -> dict[str, Any]:
    """The synthetic generator's settings: ``options`` over the defaults, each checked."""
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


def check_split(split: str) -> None:
    """Refuse a split other than "train" and "val"."""
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


def missing_files_error(info: DatasetInfo, root: Path | None) -> DataError:
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
    if info.name in DOWNLOADS:
        origin = f"from the official source {info.source}; run '{download_command(info.name)}' to fetch them"
    else:
        origin = f"from {info.source}"
    return DataError(f"Dataset {info.name!r} needs {needs} in {where}, {origin}.")


def dataset_options(name: str, img_size: int | None, options: dict[str, Any]) -> dict[str, Any]:
    """The options that define the images of ``name`` at ``img_size``.

    For synthetic data the requested size is the generated size (an option), so there is nothing to resize.
    """
    if name == "synthetic" and img_size is not None:
        return {**options, "img_size": img_size}
    return options


def read_only(a: np.ndarray) -> np.ndarray:
    """``a``, made read-only: the arrays of a dataset are shared by every reader of it."""
    a.setflags(write=False)
    return a


# -- download -------------------------------------------------------------------------------------------------
def download_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Fetch the official files of ``name`` into ``<root>/<name's first folder>/``, checking each md5.

    Files already there are kept. Each file is written atomically: a failed or mismatching download leaves
    nothing behind. Returns the folder.
    """
    info = lookup(name)
    if name not in DOWNLOADS:
        raise DataError(f"Dataset {name!r} cannot be downloaded; downloadable are {', '.join(DOWNLOADS)}.")
    root = data_root(data_dir)
    if root is None:
        raise DataError(f"Downloading {name!r} needs a data folder: pass --data-dir or set {ENV_VAR}.")
    folder = root / info.folders[0]
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first: removed again if left empty
    mirrors, files = DOWNLOADS[name]
    try:
        for file_name, md5 in files.items():
            if not (folder / file_name).is_file():
                _fetch([m + file_name for m in mirrors], folder / file_name, md5)
    except BaseException:
        for path in made:
            try:
                path.rmdir()
            except OSError:  # files of an earlier success there, or another process's
                break
        raise
    return folder


def _fetch(urls: list[str], dest: Path, md5: str) -> None:
    failures = []
    for url in urls:
        def write(tmp: Path) -> None:
            import http.client

            # a failure of the network is this mirror's (the next one is tried); one of the disk stops the download
            network = (OSError, http.client.HTTPException)
            digest = hashlib.md5(usedforsecurity=False)
            try:
                response = urllib.request.urlopen(url, timeout=60)
            except network as e:
                raise DataError(str(getattr(e, "reason", None) or e)) from None
            with response, open(tmp, "wb") as f:
                while True:
                    try:
                        chunk = response.read(1 << 20)
                    except network as e:
                        raise DataError(f"the connection broke: {e}") from None
                    if not chunk:
                        break
                    digest.update(chunk)
                    f.write(chunk)
            if digest.hexdigest() != md5:
                raise DataError(f"md5 {digest.hexdigest()} instead of the official {md5}")

        try:
            atomic_write(dest, write)
            return
        except DataError as e:
            failures.append(f"{url} ({e})")
    raise DataError(f"Could not download {dest.name}: {'; '.join(failures)}.")
