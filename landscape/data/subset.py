"""The fixed evaluation set every analysis measures on."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from landscape.data.datasets import arrays, build_dataset
from landscape.data.registry import check_split, data_root, dataset_options, get_dataset_info
from landscape.data.transforms import to_eval_tensor
from landscape.errors import DataError


def _order(size: int, n: int, seed: int, within: int | None) -> np.ndarray:
    """The first ``n`` indices of ``RandomState(seed).permutation(size)``, among the first ``within`` of
    ``RandomState(0).permutation(size)`` only when ``within`` is given (and less than ``size``)."""
    order = np.random.RandomState(seed).permutation(size)
    if within is not None and within < size:
        kept = np.zeros(size, dtype=bool)
        kept[np.random.RandomState(0).permutation(size)[:within]] = True
        order = order[kept[order]]
    return order[:n]


def analysis_subset(
    name: str,
    n: int,
    *,
    seed: int = 0,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    img_size: int | None = None,
    within: int | None = None,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed evaluation set of the analyses: ``(x float32 (n, C, S, S), y int64 (n,))``.

    The examples are the first ``n`` of ``RandomState(seed).permutation(len(split))``, in that order, passed
    through the evaluation transform (no augmentation); with ``within``, only those among the split's fixed subset
    of that size that a run with ``data.train_size`` trains on (the first ``within`` of
    ``RandomState(0).permutation``; so at seed 0 the set is the same with or without it). The same arguments give
    bitwise the same tensors, and a smaller ``n`` gives a prefix of a larger one. When ``n`` exceeds the split (or
    ``within``), all of it is returned (in the permuted order); check ``len(y)``.
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"The analysis subset size must be a positive integer, not {n!r}.")
    check_split(split)
    generator_options = dataset_options(name, img_size, options)
    info = get_dataset_info(name, **generator_options)
    if info.in_memory:
        images, labels = arrays(name, split, data_root(data_dir), False, generator_options)
        order = _order(len(labels), n, seed, within)
        x = to_eval_tensor(images[order], name, img_size, **options)
        return x, torch.from_numpy(labels[order].copy())
    dataset = build_dataset(name, split, data_dir=data_dir, img_size=img_size, **options)
    order = _order(len(dataset), n, seed, within)
    pairs = [dataset[int(i)] for i in order]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs], dtype=torch.int64)
