"""The datasets made in memory: scikit-learn's embedded digits and the seeded synthetic prototypes."""

from __future__ import annotations

import functools

import numpy as np

from landscape.data.registry import read_only


DIGITS_VAL_SIZE = 360
DIGITS_SPLIT_SEED = 0


DIGITS_COUNT = 1797


@functools.lru_cache(maxsize=1)
def _digits_table() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's embedded digits as ``(images (1797, 8, 8) float, labels (1797,) int64)``.

    Read straight from the CSV that scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``), found without
    importing scikit-learn, whose import costs seconds in every process that loads the digits; the same numbers as
    ``sklearn.datasets.load_digits``, which is the fallback when the file is not where it should be or not as
    expected.
    """
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        try:
            with gzip.open(path, "rt", encoding="ascii") as f:
                table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
        except (OSError, ValueError, EOFError):
            continue
        if table.shape == (DIGITS_COUNT, 65) and np.all((table >= 0) & (table <= 16) & (table == np.rint(table))):
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.astype(np.int64)


@functools.lru_cache(maxsize=2)
def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    pixels, labels = _digits_table()
    # Pixel values are counts 0..16 of set bits in 4x4 blocks; spread them over 0..255.
    images = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)[:, :, :, None]
    val = digits_val_indices(labels)
    mask = np.zeros(len(labels), dtype=bool)
    mask[val] = True
    keep = np.flatnonzero(mask) if split == "val" else np.flatnonzero(~mask)
    return read_only(images[keep]), read_only(labels[keep])


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
def synthetic_arrays(
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
    return read_only(images), read_only(labels)
