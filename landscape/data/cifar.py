"""CIFAR-10 and CIFAR-100 batches, read from the official python-pickle folder or its ``.tar.gz``.

CIFAR batches are Python pickles; they are read by an unpickler that builds no Python or numpy object beyond
plain containers, strings and numbers, and accepts only the official layout (see :class:`_ArrayUnpickler`).
"""

from __future__ import annotations

import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from landscape.data.registry import lookup
from landscape.errors import DataError


CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz",
                {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "val": ("test_batch",)}, "labels"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", {"train": ("train",), "val": ("test",)}, "fine_labels"),
}


def find_cifar(name: str, root: Path | None) -> Path | None:
    """The batch folder or the ``.tar.gz`` of a CIFAR dataset, whichever is found first."""
    if root is None:
        return None
    folder_name, tar_name, members, _ = CIFAR_LAYOUT[name]
    for sub in lookup(name).folders:
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


def load_cifar(name: str, location: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    folder_name, _, members, label_key = CIFAR_LAYOUT[name]
    num_classes = lookup(name).num_classes
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
