"""Datasets by name: the files they need, how they are read, and the transforms every part of the toolkit uses.

=====================  =====================================================================================
module                 what
=====================  =====================================================================================
:mod:`.registry`       the registered datasets (:func:`dataset_names`, :func:`get_dataset_info`), the data root
                       (``--data-dir`` or ``LANDSCAPE_DATA_DIR``) and the official downloads with their md5
:mod:`.generated`      scikit-learn's embedded ``digits`` and the seeded ``synthetic`` prototypes
:mod:`.idx`            MNIST and Fashion-MNIST: the IDX reader (:func:`read_idx`)
:mod:`.cifar`          CIFAR-10/100 batches through an unpickler that builds no Python or numpy object
:mod:`.imagefolder`    ImageNet-style ``train/<class>/`` and ``val/<class>/`` folders, read file by file
:mod:`.transforms`     timm's training transform per dataset, the evaluation transform (per image and per batch)
:mod:`.datasets`       :func:`build_dataset`, :func:`load_arrays`, :func:`check_data_fits`, :func:`dataset_status`
:mod:`.subset`         :func:`analysis_subset`, the fixed evaluation set every analysis measures on
=====================  =====================================================================================

Small datasets live in memory as ``uint8`` arrays of shape ``(N, H, W, C)`` with ``int64`` labels ``(N,)``.
Nothing is downloaded unless asked (:func:`download_dataset`, ``landscape datasets --download NAME``).
"""

from __future__ import annotations

from landscape.data.cifar import RefusedPickle
from landscape.data.datasets import (ArrayDataset, build_dataset, check_data_fits, check_data_record, data_record,
                                     dataset_status, load_arrays)
from landscape.data.generated import DIGITS_SPLIT_SEED, DIGITS_VAL_SIZE, digits_val_indices
from landscape.data.idx import read_idx, read_idx_shape
from landscape.data.registry import (
    ENV_VAR,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLITS,
    DatasetInfo,
    data_root,
    dataset_names,
    dataset_options,
    download_command,
    download_dataset,
    get_dataset_info,
)
from landscape.data.subset import analysis_subset
from landscape.data.transforms import create_eval_transform, create_train_transform, to_eval_tensor

__all__ = [
    "ENV_VAR",
    "SPLITS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DIGITS_VAL_SIZE",
    "DIGITS_SPLIT_SEED",
    "DatasetInfo",
    "ArrayDataset",
    "RefusedPickle",
    "dataset_names",
    "get_dataset_info",
    "data_root",
    "dataset_options",
    "check_data_fits",
    "check_data_record",
    "data_record",
    "build_dataset",
    "load_arrays",
    "digits_val_indices",
    "read_idx",
    "read_idx_shape",
    "create_train_transform",
    "create_eval_transform",
    "to_eval_tensor",
    "analysis_subset",
    "dataset_status",
    "download_command",
    "download_dataset",
]
