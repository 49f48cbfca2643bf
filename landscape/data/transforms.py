"""The per-example transforms every part of the toolkit uses, and the evaluation transform of a whole batch.

Per-example transforms take PIL images (mode ``"L"`` for one channel, ``"RGB"`` for three) so that timm's training
transforms apply unchanged; :func:`to_eval_tensor` applies the evaluation transform to a whole ``uint8`` batch at
once, with the same numbers as :func:`create_eval_transform` applied image by image.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from landscape.data.registry import dataset_options, get_dataset_info
from landscape.errors import DataError


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

    info = get_dataset_info(name, **dataset_options(name, img_size, options))
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

    info = get_dataset_info(name, **dataset_options(name, img_size, options))
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

    info = get_dataset_info(name, **dataset_options(name, img_size, options))
    size = img_size or info.img_size
    x = torch.as_tensor(np.array(images, copy=True)) if isinstance(images, np.ndarray) else images.clone()
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise DataError(f"to_eval_tensor needs uint8 images of shape (N, H, W, C), got {x.dtype} {tuple(x.shape)}.")
    x = x.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    if size != info.img_size:
        x = TF.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.normalize(x, info.mean, info.std)
