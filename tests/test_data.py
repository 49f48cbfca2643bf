import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from landscape import data as D
from landscape.data import cifar, registry
from landscape.errors import DataError


# -- writers of the official formats --------------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> Path:
    """An unsigned-byte IDX file (gzip-compressed when the name ends in .gz)."""
    blob = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(blob) if path.suffix == ".gz" else blob)
    return path


def write_tiny_mnist(folder: Path, n_train=12, n_val=6, gz=True, seed=0):
    rng = np.random.RandomState(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.randint(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.randint(0, 256, (n_val, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_val) + 3) % 10,
    }
    for stem, a in arrays.items():
        write_idx(folder / (stem + (".gz" if gz else "")), a)
    return arrays


def cifar_batch(n: int, num_classes: int, seed: int, label_key: bytes) -> dict:
    rng = np.random.RandomState(seed)
    batch = {
        b"batch_label": b"testing batch",
        label_key: [int(v) for v in rng.randint(0, num_classes, n)],
        b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [v // 5 for v in batch[label_key]]
    return batch


def write_tiny_cifar(base: Path, name: str, as_tar: bool, n=4) -> dict[str, dict]:
    """CIFAR batches as the official python pickles (protocol 2, bytes keys), in a folder or a .tar.gz."""
    folder_name, tar_name, members, label_key = cifar.CIFAR_LAYOUT[name]
    num_classes = 10 if name == "cifar10" else 100
    batches = {m: cifar_batch(n, num_classes, seed=i, label_key=label_key.encode())
               for i, m in enumerate(members["train"] + members["val"])}
    blobs = {m: pickle.dumps(b, protocol=2) for m, b in batches.items()}
    write_members(base, folder_name, tar_name, blobs, as_tar)
    return batches


def write_members(base: Path, folder_name: str, tar_name: str, blobs: dict[str, bytes], as_tar: bool) -> None:
    base.mkdir(parents=True, exist_ok=True)
    if as_tar:
        with tarfile.open(base / tar_name, "w:gz") as tar:
            for m, blob in blobs.items():
                info = tarfile.TarInfo(f"{folder_name}/{m}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    else:
        (base / folder_name).mkdir(parents=True, exist_ok=True)
        for m, blob in blobs.items():
            (base / folder_name / m).write_bytes(blob)


class FileCreatingPayload:
    """Unpickling this object opens (so creates) ``target`` for writing."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


# -- registry -------------------------------------------------------------------------------------------------
def test_registry_names_every_dataset_and_refuses_unknown_ones():
    assert D.dataset_names() == ["digits", "synthetic", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder"]
    assert D.get_dataset_info("cifar100").num_classes == 100
    with pytest.raises(DataError, match="known datasets are digits, synthetic, mnist"):
        D.get_dataset_info("imagenet-22k")
    with pytest.raises(DataError, match="Unknown dataset"):
        D.build_dataset("nope")
    with pytest.raises(DataError, match="accepted splits are train, val"):
        D.build_dataset("digits", "test")
    with pytest.raises(DataError, match="takes no options"):
        D.get_dataset_info("digits", count=3)


# -- digits ---------------------------------------------------------------------------------------------------
def test_digits_split_is_fixed_disjoint_stratified_and_covers_all_images():
    from sklearn.datasets import load_digits

    labels = load_digits().target
    val = D.digits_val_indices(labels)
    assert len(val) == 360 and len(np.unique(val)) == 360
    # The split never changes: its exact indices are pinned.
    assert hashlib.sha256(val.astype(np.int64).tobytes()).hexdigest()[:16] == DIGITS_VAL_SHA
    per_class = np.bincount(labels[val], minlength=10)
    assert np.all(np.abs(per_class - 0.2 * np.bincount(labels)) < 1)

    xt, yt = D.load_arrays("digits", "train")
    xv, yv = D.load_arrays("digits", "val")
    assert xt.shape == (1437, 8, 8, 1) and xv.shape == (360, 8, 8, 1)
    assert xt.dtype == np.uint8 and yt.dtype == np.int64 and xt.max() == 255
    assert set(yt) == set(yv) == set(range(10))
    # Train and val are complementary parts of the 1797 images (as multisets of image+label rows).
    rows = lambda x, y: sorted(map(bytes, np.concatenate([x.reshape(len(x), -1), y[:, None].astype(np.uint8)], 1)))
    all_images = np.rint(load_digits().images * 255 / 16).astype(np.uint8)[..., None]
    assert rows(np.concatenate([xt, xv]), np.concatenate([yt, yv])) == rows(all_images, labels)
    np.testing.assert_array_equal(xv, all_images[val])


DIGITS_VAL_SHA = "d040d215f6d53853"


def test_digits_are_read_without_importing_sklearn_and_equal_load_digits():
    import subprocess
    import sys

    code = ("import sys; from landscape.data.generated import digits_arrays; x, y = digits_arrays('train'); "
            "print(x.shape, 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(1437, 8, 8, 1) False"
    from sklearn.datasets import load_digits

    from landscape.data.generated import _digits_table

    pixels, labels = _digits_table()
    bunch = load_digits()
    np.testing.assert_array_equal(pixels, bunch.images)
    np.testing.assert_array_equal(labels, bunch.target)


def test_digits_fall_back_to_load_digits_when_the_csv_is_not_as_expected(monkeypatch, tmp_path):
    import importlib.util

    from sklearn.datasets import load_digits

    from landscape.data import generated

    fake = tmp_path / "sklearn"
    (fake / "datasets" / "data").mkdir(parents=True)
    (fake / "datasets" / "data" / "digits.csv.gz").write_bytes(b"not gzip")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.util.spec_from_file_location(
        "sklearn", fake / "__init__.py", submodule_search_locations=[str(fake)]) if name == "sklearn"
        else real_find_spec(name, *a))
    generated._digits_table.cache_clear()
    try:
        pixels, labels = generated._digits_table()
    finally:
        generated._digits_table.cache_clear()
    np.testing.assert_array_equal(pixels, load_digits().images)
    np.testing.assert_array_equal(labels, load_digits().target)


def test_load_arrays_returns_copies_the_caller_may_change():
    x, _ = D.load_arrays("digits")
    x[:] = 0
    assert D.load_arrays("digits")[0].max() == 255


# -- synthetic ------------------------------------------------------------------------------------------------
def test_synthetic_is_seeded():
    a = D.load_arrays("synthetic", count=64, data_seed=3)
    b = D.load_arrays("synthetic", count=64, data_seed=3)
    c = D.load_arrays("synthetic", count=64, data_seed=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0][:16], D.load_arrays("synthetic", "val", count=64, data_seed=3)[0][:16])


def test_synthetic_is_learnable_by_nearest_class_mean():
    xt, yt = D.load_arrays("synthetic", count=512)
    xv, yv = D.load_arrays("synthetic", "val", count=512)
    assert len(xv) == 128 and np.all(np.bincount(yt) == [52] * 2 + [51] * 8)
    xt = xt.reshape(len(xt), -1) / 255.0
    xv = xv.reshape(len(xv), -1) / 255.0
    means = np.stack([xt[yt == k].mean(0) for k in range(10)])
    predicted = ((xv[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == yv).mean() > 0.8  # chance is 0.1


def test_synthetic_options_set_shape_classes_and_are_checked():
    ds = D.build_dataset("synthetic", "val", img_size=12, in_chans=3, num_classes=5, count=40, val_count=15)
    x, y = ds[0]
    assert len(ds) == 15 and x.shape == (3, 12, 12) and x.dtype == torch.float32 and 0 <= y < 5
    info = D.get_dataset_info("synthetic", img_size=12, in_chans=3, num_classes=5)
    assert info.shape == (3, 12, 12) and info.num_classes == 5 and len(info.mean) == 3
    with pytest.raises(DataError, match="accepted are img_size, in_chans"):
        D.load_arrays("synthetic", colour=True)
    with pytest.raises(DataError, match="positive integer"):
        D.load_arrays("synthetic", num_classes=0)


# -- MNIST / Fashion-MNIST ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, first_train_label", [("mnist", 5), ("fashion-mnist", 9)])
def test_official_idx_files_load_with_their_known_sizes_and_labels(data_dir, name, first_train_label):
    xt, yt = D.load_arrays(name, "train", data_dir=data_dir)
    xv, yv = D.load_arrays(name, "val", data_dir=data_dir)
    assert xt.shape == (60000, 28, 28, 1) and xv.shape == (10000, 28, 28, 1)
    assert xt.dtype == np.uint8 and yt.dtype == np.int64
    assert yt[0] == first_train_label
    assert np.array_equal(np.bincount(yt), np.bincount(yt, minlength=10)) and yt.min() == 0 and yt.max() == 9
    if name == "fashion-mnist":
        assert np.all(np.bincount(yt) == 6000) and np.all(np.bincount(yv) == 1000)
    row = {r["name"]: r for r in D.dataset_status(data_dir)}[name]
    assert (row["found"], row["train"], row["val"], row["shape"]) == ("yes", 60000, 10000, "1x28x28")


def test_official_files_are_found_in_torchvisions_layout(data_dir, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (data_dir / "mnist").glob("*.gz"):
        (raw / f.name).symlink_to(f.resolve())
    _, y = D.load_arrays("mnist", "val", data_dir=tmp_path)
    assert len(y) == 10000


@pytest.mark.parametrize("gz", [True, False])
def test_idx_loader_reads_what_was_written(tmp_path, gz):
    arrays = write_tiny_mnist(tmp_path / "mnist", gz=gz)
    x, y = D.load_arrays("mnist", "train", data_dir=tmp_path)
    np.testing.assert_array_equal(x[..., 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(y, arrays["train-labels-idx1-ubyte"])
    ds = D.build_dataset("mnist", "val", data_dir=tmp_path)
    image, label = ds[1]
    assert image.shape == (1, 28, 28) and label == 4 and len(ds) == 6


def test_idx_header_gives_sizes_without_reading_the_data(tmp_path):
    write_tiny_mnist(tmp_path / "fashion-mnist", n_train=7, n_val=3)
    assert D.read_idx_shape(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz") == (7, 28, 28)
    row = {r["name"]: r for r in D.dataset_status(tmp_path)}["fashion-mnist"]
    assert (row["found"], row["train"], row["val"]) == ("yes", 7, 3)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda blob: blob[: len(blob) // 2], "could not be read as an IDX file"),  # truncated gzip stream
        (lambda blob: gzip.compress(gzip.decompress(blob)[:-5]), r"holds \d+ bytes where its IDX header announces"),
        # a small file expanding to far more than announced (a gzip bomb) is read no further than that
        (lambda blob: gzip.compress(gzip.decompress(blob) + bytes(50 << 20)), "holds more than that where its IDX "
                                                                              "header announces"),
        (lambda blob: gzip.compress(b"\x00\x00\x0d\x03" + gzip.decompress(blob)[4:]), "magic number 00000d03"),
        (lambda blob: b"not gzip at all", "could not be read as an IDX file"),
    ],
)
def test_corrupt_idx_file_is_one_error_naming_the_file(tmp_path, damage, message):
    write_tiny_mnist(tmp_path / "mnist")
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=message) as e:
        D.load_arrays("mnist", data_dir=tmp_path)
    assert str(path) in str(e.value)


def test_an_empty_split_is_refused_naming_its_file(tmp_path):
    # an empty validation split trained to the end with exit 0 and empty val columns
    write_tiny_mnist(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", np.zeros((0, 28, 28)))
    write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", np.zeros(0))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz holds no images"):
        D.load_arrays("mnist", "val", data_dir=tmp_path)


def test_mismatched_image_and_label_counts_are_refused(tmp_path):
    write_tiny_mnist(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", np.zeros(5))
    with pytest.raises(DataError, match="holds 12 images but .* holds 5 labels"):
        D.load_arrays("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("split_stem", ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte"])
def test_idx_images_of_another_size_are_refused_and_not_listed_as_found(tmp_path, split_stem):
    # 32x32 files passed every check, trained an epoch, then crashed in evaluation; 28x20 ones were stretched
    write_tiny_mnist(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / f"{split_stem}.gz", np.zeros((12 if "train" in split_stem else 6, 32, 32)))
    split = "train" if "train" in split_stem else "val"
    with pytest.raises(DataError, match="holds 32x32 images, but mnist images are 28x28"):
        D.load_arrays("mnist", split, data_dir=tmp_path)
    from landscape.data.datasets import dataset_status

    row = next(r for r in dataset_status(tmp_path) if r.get("name") == "mnist")
    assert row.get("found") != "yes" and "32x32 images, not 28x28" in str(row.get("location")), row


# -- CIFAR ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar_loader_reads_the_official_pickle_layout(tmp_path, name, as_tar):
    batches = write_tiny_cifar(tmp_path / name, name, as_tar)
    _, _, members, label_key = cifar.CIFAR_LAYOUT[name]
    x, y = D.load_arrays(name, "train", data_dir=tmp_path)
    assert x.shape == (4 * len(members["train"]), 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    first = batches[members["train"][0]]
    np.testing.assert_array_equal(y[:4], first[label_key.encode()])
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each a 32x32 image in row-major order.
    data = first[b"data"]
    assert x[2, 5, 7, 0] == data[2, 5 * 32 + 7] and x[2, 5, 7, 2] == data[2, 2048 + 5 * 32 + 7]
    xv, yv = D.load_arrays(name, "val", data_dir=tmp_path)
    np.testing.assert_array_equal(yv, batches[members["val"][0]][label_key.encode()])
    ds = D.build_dataset(name, "val", data_dir=tmp_path)
    assert ds[0][0].shape == (3, 32, 32) and ds.info.num_classes == (10 if name == "cifar10" else 100)
    assert {r["name"]: r for r in D.dataset_status(tmp_path)}[name]["found"] == "yes"


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, as_tar):
    target = tmp_path / "created-by-pickle"
    payload = pickle.dumps({b"data": FileCreatingPayload(target), b"labels": []}, protocol=2)
    # The payload is live: an ordinary unpickler creates the file.
    witness = tmp_path / "witness"
    pickle.loads(pickle.dumps(FileCreatingPayload(witness), protocol=2)).close()
    assert witness.exists()

    blobs = {f"data_batch_{i}": payload for i in range(1, 6)} | {"test_batch": payload}
    write_members(tmp_path / "cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz", blobs, as_tar)
    with pytest.raises(DataError, match=r"refers to io\.open, which a CIFAR batch never contains") as e:
        D.load_arrays("cifar10", data_dir=tmp_path)
    assert "data_batch_1" in str(e.value)
    assert not target.exists()


def test_cifar_object_arrays_and_garbage_are_refused(tmp_path):
    objects = pickle.dumps({b"data": np.array([None, 1], dtype=object), b"labels": [0, 1]}, protocol=2)
    write_members(tmp_path, "cifar-10-batches-py", "", {f"data_batch_{i}": objects for i in range(1, 6)}
                  | {"test_batch": objects}, as_tar=False)
    with pytest.raises(DataError, match="refused"):
        D.load_arrays("cifar10", data_dir=tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match="data_batch_1 is not a readable CIFAR batch"):
        D.load_arrays("cifar10", data_dir=tmp_path)


# Pickle opcodes, for writing CIFAR batches byte by byte: the Python 2 form of the official files, and forgeries.
def op_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_str(text: str) -> bytes:  # a Python 2 str (read back as latin-1 text)
    raw = text.encode("latin1")
    return b"T" + struct.pack("<I", len(raw)) + raw


def op_bytes(raw: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(raw)) + raw


def op_int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def op_dtype(spec: str, state: bytes) -> bytes:
    return op_global("numpy", "dtype") + b"(" + op_str(spec) + b"\x89\x88tR(" + state + b"tb"


PLAIN_U1_STATE = op_int(3) + op_str("|") + b"NNN" + op_int(-1) + op_int(-1) + op_int(0)


def op_array(shape: tuple[int, ...], dtype: bytes, raw: bytes) -> bytes:
    """numpy's pickle of an array: _reconstruct(ndarray, (0,), "b"), then BUILD (1, shape, dtype, False, raw)."""
    empty = op_global("numpy.core.multiarray", "_reconstruct") + b"(" + op_global("numpy", "ndarray")
    empty += b"(" + op_int(0) + b"t" + op_str("b") + b"tR"
    return empty + b"(" + op_int(1) + b"(" + b"".join(op_int(n) for n in shape) + b"t" + dtype + b"\x89" + raw + b"tb"


def python2_cifar_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle (protocol 2) wrote the official files: str keys, the raw data as a str."""
    raw = op_str(data.tobytes().decode("latin1"))
    body = op_str("data") + op_array(data.shape, op_dtype("u1", PLAIN_U1_STATE), raw)
    body += op_str("labels") + b"(l" + b"".join(op_int(v) + b"a" for v in labels)
    body += op_str("batch_label") + op_str("training batch 1 of 5")
    return b"\x80\x02}(" + body + b"u."


def test_cifar_batch_in_the_python2_pickle_form_of_the_official_files_loads(tmp_path):
    rng = np.random.RandomState(0)
    data = rng.randint(0, 256, (3, 3072)).astype(np.uint8)
    blob = python2_cifar_batch(data, [0, 9, 4])
    assert pickle.loads(blob, encoding="latin1")["labels"] == [0, 9, 4]  # a valid pickle of that batch
    write_members(tmp_path, "cifar-10-batches-py", "", {f"data_batch_{i}": blob for i in range(1, 6)}
                  | {"test_batch": blob}, as_tar=False)
    x, y = D.load_arrays("cifar10", "val", data_dir=tmp_path)
    np.testing.assert_array_equal(y, [0, 9, 4])
    np.testing.assert_array_equal(x, data.reshape(3, 3, 32, 32).transpose(0, 2, 3, 1))


LOAD_IN_A_CHILD = """
import sys
from landscape import data as D
from landscape.errors import DataError
for root in sys.argv[1:]:
    try:
        D.load_arrays("cifar10", data_dir=root)
        print("loaded")
    except DataError as e:
        print("DataError:", e)
"""


def test_cifar_pickles_forging_numpy_objects_are_refused_without_building_them(tmp_path):
    import subprocess
    import sys

    n = 2
    forgeries = {
        # ndarray((n,), "O", buffer) called by REDUCE: an object array whose "pointers" are bytes of the file.
        "ndarray_call": b"\x80\x02}(" + op_str("data")
        + op_global("numpy", "ndarray") + b"(" + op_int(n) + op_int(3072) + b"\x86" + op_str("u1")
        + op_bytes(bytes(n * 3072)) + b"tR" + op_str("labels") + op_global("numpy", "ndarray") + b"("
        + op_int(n) + b"\x85" + op_str("O") + op_bytes(b"\x41" * 8 * n) + b"tRu.",
        # A plain dtype("V8") whose BUILD state sets the flags of a dtype holding Python objects.
        "dtype_flags": b"\x80\x02}(" + op_str("data") + op_array(
            (n, 3072), op_dtype("V8", op_int(3) + op_str("|") + b"NNN" + op_int(8) + op_int(1) + op_int(0x3F)),
            op_bytes(b"\x41" * 8 * n * 3072),
        ) + op_str("labels") + b"(l" + op_int(0) + b"a" + op_int(1) + b"au.",
        "dtype_alone": b"\x80\x02" + op_dtype("V8", op_int(3) + op_str("|") + b"NNN" + op_int(8) + op_int(1)
                                            + op_int(0x3F)) + b".",
    }
    for name, blob in forgeries.items():
        write_members(tmp_path / name, "cifar-10-batches-py", "", {f"data_batch_{i}": blob for i in range(1, 6)}
                      | {"test_batch": blob}, as_tar=False)
    # In a child process: if a forgery were built, the crash would end the child, not the test session.
    child = subprocess.run([sys.executable, "-c", LOAD_IN_A_CHILD, *(str(tmp_path / k) for k in forgeries)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    lines = child.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("DataError:") for line in lines), lines
    assert "refers to a call of numpy.ndarray, which a CIFAR batch never contains" in lines[0]
    assert "its 'data' is a 2x3072 array of |V8 with fields or flags" in lines[1]
    assert "is not a CIFAR batch" in lines[2]


def test_truncated_cifar_archive_is_one_error_naming_it(tmp_path):
    write_tiny_cifar(tmp_path, "cifar100", as_tar=True)
    path = tmp_path / "cifar-100-python.tar.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="cifar-100-python.tar.gz"):
        D.load_arrays("cifar100", data_dir=tmp_path)


# -- imagefolder ----------------------------------------------------------------------------------------------
def write_png_folders(root: Path, counts: dict[str, dict[str, int]]) -> None:
    rng = np.random.RandomState(0)
    for split, classes in counts.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.randint(0, 256, (10, 14, 3)).astype(np.uint8)).save(root / split / cls / f"{i}.png")


def test_imagefolder_reads_class_folders_with_train_class_indices(tmp_path):
    write_png_folders(tmp_path / "imagefolder", {"train": {"cat": 3, "dog": 2}, "val": {"dog": 2}})
    train = D.build_dataset("imagefolder", "train", data_dir=tmp_path, img_size=16)
    val = D.build_dataset("imagefolder", "val", data_dir=tmp_path, img_size=16)
    assert len(train) == 5 and len(val) == 2 and train.info.num_classes == 2
    assert len(pickle.loads(pickle.dumps(val))) == 2  # data-loader workers started by spawn receive a pickle
    x, y = val[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert y == 1  # "dog" is class 1 in train/, even though val/ holds only "dog"
    x, y = D.analysis_subset("imagefolder", 4, data_dir=tmp_path, img_size=16)
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64
    tf = D.create_train_transform("imagefolder", 16, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.5)
    assert tf(Image.open(tmp_path / "imagefolder" / "train" / "cat" / "0.png").convert("RGB")).shape == (3, 16, 16)
    row = {r["name"]: r for r in D.dataset_status(tmp_path)}["imagefolder"]
    assert (row["found"], row["train"], row["val"], row["classes"]) == ("yes", 5, 2, 2)


def test_imagefolder_val_class_unknown_to_train_is_refused(tmp_path):
    write_png_folders(tmp_path, {"train": {"cat": 1}, "val": {"cow": 1}})
    with pytest.raises(DataError, match="class folders not in train/: cow"):
        D.build_dataset("imagefolder", "val", data_dir=tmp_path)


# -- missing files --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expected",
    [
        ("mnist", ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "yann.lecun.com/exdb/mnist/"]),
        ("fashion-mnist", ["train-labels-idx1-ubyte.gz", "zalandoresearch/fashion-mnist"]),
        ("cifar10", ["cifar-10-batches-py/", "cifar-10-python.tar.gz", "www.cs.toronto.edu/~kriz/cifar.html"]),
        ("cifar100", ["cifar-100-python.tar.gz", "www.cs.toronto.edu/~kriz/cifar.html"]),
        ("imagefolder", ["train/<class>/", "val/<class>/"]),
    ],
)
def test_missing_files_are_one_sentence_naming_files_and_source(tmp_path, monkeypatch, name, expected):
    with pytest.raises(DataError) as e:
        D.build_dataset(name, data_dir=tmp_path)
    message = str(e.value)
    assert all(text in message for text in expected) and str(tmp_path) in message
    assert message.endswith(".") and "\n" not in message
    if name in registry.DOWNLOADS:  # the command that fetches them, which calls download_dataset(name, data_dir)
        assert f"run 'landscape datasets --download {name}'" in message
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    with pytest.raises(DataError, match=f"--data-dir or {D.ENV_VAR}"):
        D.build_dataset(name)


def test_some_idx_files_missing_is_one_error_naming_them_and_the_folder(tmp_path):
    write_tiny_mnist(tmp_path / "fashion-mnist")
    (tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "fashion-mnist" / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as e:
        D.load_arrays("fashion-mnist", data_dir=tmp_path)
    assert str(e.value) == (
        f"Dataset 'fashion-mnist' is incomplete in {tmp_path / 'fashion-mnist'}: train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz are missing; run 'landscape datasets --download fashion-mnist' to fetch the "
        "official files from github.com/zalandoresearch/fashion-mnist (data/fashion/)."
    )
    status = {r["name"]: r for r in D.dataset_status(tmp_path)}["fashion-mnist"]
    assert status["found"] == "no" and status["location"] == (
        f"{tmp_path / 'fashion-mnist'} lacks train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz"
    )


def test_nothing_is_downloaded_without_download(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(registry.urllib.request, "urlopen", refuse)
    with pytest.raises(DataError):
        D.load_arrays("mnist", data_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_download_checks_md5_and_keeps_nothing_on_mismatch(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_tiny_mnist(mirror)
    md5 = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in mirror.iterdir()}
    monkeypatch.setitem(registry.DOWNLOADS, "mnist", ((mirror.as_uri() + "/",), md5))
    root = tmp_path / "root"
    x, y = D.load_arrays("mnist", data_dir=root, download=True)
    assert len(y) == 12 and sorted(p.name for p in (root / "mnist").iterdir()) == sorted(md5)

    wrong = dict(md5, **{"t10k-images-idx3-ubyte.gz": "0" * 32})
    monkeypatch.setitem(registry.DOWNLOADS, "mnist", ((mirror.as_uri() + "/",), wrong))
    other = tmp_path / "other"
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: .* instead of the official 0000"):
        D.download_dataset("mnist", other)
    left = list((other / "mnist").iterdir()) if (other / "mnist").exists() else []  # gone if nothing else came
    assert "t10k-images-idx3-ubyte.gz" not in [p.name for p in left]
    assert not [p for p in left if p.name.endswith(".tmp")]


def test_a_mirror_the_network_cannot_reach_is_passed_over_for_the_next(tmp_path):
    # the first mirror's network error became a "Could not write" sentence and the second was never tried
    import urllib.error

    mirror = tmp_path / "mirror"
    write_tiny_mnist(mirror)
    md5 = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in mirror.iterdir()}
    real = registry.urllib.request.urlopen

    def offline_first(url, *args, **kwargs):
        if url.startswith("http://unreachable.invalid/"):
            raise urllib.error.URLError("Name or service not known")
        return real(url, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry.urllib.request, "urlopen", offline_first)
        patch.setitem(registry.DOWNLOADS, "mnist", (("http://unreachable.invalid/", mirror.as_uri() + "/"), md5))
        D.download_dataset("mnist", tmp_path / "root")
        assert sorted(p.name for p in (tmp_path / "root" / "mnist").iterdir()) == sorted(md5)
        patch.setitem(registry.DOWNLOADS, "mnist", (("http://unreachable.invalid/",), md5))
        with pytest.raises(DataError, match=r"Could not download .*unreachable.invalid.*Name or service not known"):
            D.download_dataset("mnist", tmp_path / "none" / "deeper")
        assert not (tmp_path / "none").exists()  # the folders it made for nothing are gone (they were left empty)
        (tmp_path / "root" / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()  # one file to fetch beside the others
        with pytest.raises(DataError, match="Could not download t10k-labels"):
            D.download_dataset("mnist", tmp_path / "root")
        assert len(list((tmp_path / "root" / "mnist").iterdir())) == len(md5) - 1  # the others stay


# -- transforms -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, size, options", [("digits", 8, {}), ("synthetic", 28, {}), ("digits", 28, {}),
                                                 ("synthetic", 32, {"in_chans": 3})])
def test_train_transform_with_randaugment_and_erasing_gives_normalised_tensors(name, size, options):
    transform = D.create_train_transform(name, size, auto_augment="rand-m10-n3-mstd0-inc1", re_prob=0.5, **options)
    dataset = D.build_dataset(name, transform=transform, **({"img_size": size, "count": 40} if name == "synthetic" else {}),
                              **options)
    torch.manual_seed(0)
    import random

    random.seed(0)
    channels = options.get("in_chans", 1)
    # Magnitude 10 with "inc1" asks posterize for 0 bits, which recent Pillow refuses unless handled.
    for i in range(120):
        x, y = dataset[i % len(dataset)]
        assert x.shape == (channels, size, size) and x.dtype == torch.float32


def test_random_erasing_and_flip_defaults_follow_the_dataset():
    white = Image.fromarray(np.full((8, 8), 255, dtype=np.uint8))
    erase = D.create_train_transform("digits", re_prob=1.0, re_mode="const", color_jitter=None, scale=(1, 1), ratio=(1, 1))
    plain = D.create_train_transform("digits", re_prob=0.0, color_jitter=None, scale=(1, 1), ratio=(1, 1))
    assert not (plain(white) == 0).any() and (erase(white) == 0).any()
    flips = lambda t: any(type(s).__name__ == "RandomHorizontalFlip" for s in t.transforms)
    assert not flips(D.create_train_transform("digits")) and not flips(D.create_train_transform("mnist"))
    assert flips(D.create_train_transform("cifar10")) and flips(D.create_train_transform("digits", hflip=True))


def test_eval_transform_normalises_with_the_dataset_statistics():
    image = Image.fromarray(np.full((8, 8), 255, dtype=np.uint8))
    x = D.create_eval_transform("digits")(image)
    mean, std = D.get_dataset_info("digits").mean[0], D.get_dataset_info("digits").std[0]
    assert x.shape == (1, 8, 8) and torch.allclose(x, torch.full_like(x, (1 - mean) / std))
    assert D.create_eval_transform("digits", 16)(image).shape == (1, 16, 16)
    with pytest.raises(DataError, match="uint8 images of shape"):
        D.to_eval_tensor(np.zeros((2, 8, 8)), "digits")


# -- analysis subset ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("img_size", [None, 16])
def test_analysis_subset_is_deterministic_nested_and_equals_the_eval_transform(img_size):
    x, y = D.analysis_subset("digits", 50, seed=1, img_size=img_size)
    x2, y2 = D.analysis_subset("digits", 50, seed=1, img_size=img_size)
    side = img_size or 8
    assert x.shape == (50, 1, side, side) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2)
    xs, ys = D.analysis_subset("digits", 20, seed=1, img_size=img_size)
    assert torch.equal(xs, x[:20]) and torch.equal(ys, y[:20])
    other, _ = D.analysis_subset("digits", 50, seed=2, img_size=img_size)
    assert not torch.equal(other, x)
    # The fixed order is the seeded permutation; each example is the per-image evaluation transform.
    order = np.random.RandomState(1).permutation(1437)[:50]
    dataset = D.build_dataset("digits", img_size=img_size)
    expected = torch.stack([dataset[int(i)][0] for i in order])
    assert torch.equal(x, expected) and torch.equal(y, torch.tensor([dataset[int(i)][1] for i in order]))


def test_analysis_subset_larger_than_the_split_is_the_whole_split():
    x, y = D.analysis_subset("digits", 10_000, split="val")
    assert len(x) == 360 and sorted(y.tolist()) == sorted(D.load_arrays("digits", "val")[1].tolist())
    with pytest.raises(DataError, match="positive integer"):
        D.analysis_subset("digits", 0)


def test_the_evaluation_set_of_a_run_trained_on_a_subset_is_drawn_from_that_subset_at_every_seed(tmp_path):
    # at --seed 1, 252 of 256 "training" images were images the run never trained on
    from landscape.analyses.evaluation import analysis_data_for_run
    from landscape.runs import Run
    from landscape.trainers.batches import fixed_subset

    from landscape.data.transforms import to_eval_tensor
    from landscape.errors import LandscapeError

    images = D.load_arrays("digits", "train")[0]
    trained = {row.numpy().tobytes() for row in to_eval_tensor(images[fixed_subset(len(images), 100)], "digits")}
    run = Run.create(tmp_path / "run")
    run.save_config({"data": {"name": "digits", "train_size": 100}, "model": {"name": "vit_tiny_patch16_224"}})
    for seed in (0, 1, 7):
        x, _ = analysis_data_for_run(run, 64, seed=seed)
        assert all(row.numpy().tobytes() in trained for row in x), seed  # every one was trained on
        plain, _ = D.analysis_subset("digits", 64, seed=seed)
        assert torch.equal(x, plain) == (seed == 0)  # at seed 0 the set it always was
    with pytest.raises(LandscapeError, match="--samples 101 is more than the 100 training images the run trained "
                                             r"on \(data.train_size\)"):
        analysis_data_for_run(run, 101)


# -- status ---------------------------------------------------------------------------------------------------
def test_dataset_status_lists_every_dataset_with_digits_found(monkeypatch, tmp_path):
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    rows = D.dataset_status()
    assert [r["name"] for r in rows] == D.dataset_names()
    assert all(set(r) == set(rows[0]) for r in rows)
    status = {r["name"]: r for r in rows}
    assert (status["digits"]["found"], status["digits"]["train"], status["digits"]["val"]) == ("yes", 1437, 360)
    assert status["mnist"]["found"] == "no" and status["cifar10"]["source"] == "www.cs.toronto.edu/~kriz/cifar.html"
    status = {r["name"]: r for r in D.dataset_status(tmp_path)}
    # <root> itself is searched too (CIFAR, image folders), so the row names the root, not one sub-folder.
    assert status["mnist"]["found"] == "no" and status["mnist"]["location"] == f"not found under {tmp_path}"
    assert status["cifar10"]["location"] == f"not found under {tmp_path}"
