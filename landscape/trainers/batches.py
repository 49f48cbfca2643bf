"""Training and validation batches, in an order that depends only on the seed and the position in the run.

Order. Epoch ``e`` visits the training set in the permutation drawn from ``derive_seed(seed, "order", e)``;
with repeated augmentation (DeiT, timm's ``RepeatAugSampler``) each index of that permutation is repeated
``r`` times and the list is cut back to one epoch's length, so an epoch sees ``N / r`` distinct images ``r``
times each. Update ``u`` of the epoch takes positions ``[u B, (u + 1) B)`` (the last incomplete batch is
dropped); with ``W`` processes, process ``k`` takes every ``W``-th of them starting at ``k`` (so the repeats of
an image go to different processes, as in DeiT), and splits its share into ``accum_steps`` micro-batches.

Randomness. Micro-batch ``m`` of update ``u`` of epoch ``e`` on process ``k`` is augmented under the seed
``derive_seed(seed, "images", e, u, k, m)`` (image by image, in order, by whichever loader worker gets it) and
``derive_seed(seed, "batch", e, u, k, m)`` (whole-batch operations). Which images are seen and how they are
augmented is therefore a function of the position alone: it does not depend on the number of loader workers,
and a run resumed in the middle of an epoch sees exactly the batches it would have seen.

Two paths produce the batches:

- in memory (the default for every dataset but ``imagefolder``): the whole split is normalised once into one
  float tensor; a batch is one indexing operation plus tensor augmentation (random shift, flip, erasing).
- image by image, through a DataLoader with workers, when the recipe asks for PIL-only augmentation
  (``augment.auto_augment``, ``augment.crop: rrc``) or the dataset is read from files.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from landscape.config import TrainConfig
from landscape.errors import ConfigError
from landscape.trainers.distributed import Distributed

Batch = tuple[torch.Tensor, torch.Tensor]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed that is a fixed function of ``parts`` (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_order(num_samples: int, *, seed: int, epoch: int, repeats: int = 1) -> torch.Tensor:
    """The positions -> dataset indices of one epoch (``int64``, length ``num_samples``)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    order = torch.randperm(num_samples, generator=g)
    if repeats > 1:
        order = order.repeat_interleave(repeats)[:num_samples]
    return order


def random_shift(x: torch.Tensor, pad: int, fill: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Translate each image of ``x`` (B, C, H, W) by up to ``pad`` pixels, filling with ``fill`` (C,).

    The same as padding by ``pad`` and taking a random crop of the original size (torchvision ``RandomCrop``).
    """
    b, c, h, w = x.shape
    padded = fill.view(1, c, 1, 1).to(x).expand(b, c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, :, pad:pad + h, pad:pad + w] = x
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = padded.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], rows, cols]
    return out.permute(0, 3, 1, 2).contiguous()


@dataclass
class BatchAugment:
    """Augmentation of a whole normalised batch: random shift, horizontal flip, random erasing."""

    shift: int = 0
    hflip: float = 0.0
    fill: torch.Tensor | None = None  # the normalised value of a black pixel, per channel
    erasing: Any = None  # timm RandomErasing, or None

    @property
    def active(self) -> bool:
        return self.shift > 0 or self.hflip > 0 or self.erasing is not None

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if self.shift > 0:
            x = random_shift(x, self.shift, self.fill, g)
        if self.hflip > 0:
            flip = torch.rand(len(x), generator=g) < self.hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.erasing is not None:
            x = self.erasing(x)
        return x


def _data_options(config: TrainConfig) -> tuple[str, int | None, dict]:
    """``(name, img_size, options)`` of the training data. Synthetic images are generated at their size (given as
    ``img_size`` or as the option ``data.options.img_size``), not generated at 8 px and resized: the size is
    passed as ``img_size``, which the data functions turn into the generator's option."""
    name, img_size, options = config.data.name, config.data.img_size, dict(config.data.options)
    if name == "synthetic" and "img_size" in options:
        size = options.pop("img_size")
        img_size = img_size if img_size is not None else size
    return name, img_size, options


class TrainBatches:
    """This process's micro-batches, update by update, for any epoch and any starting update."""

    def __init__(self, config: TrainConfig, dist: Distributed, *, data_dir=None):
        from landscape import data

        self.seed = config.seed
        self.batch_size = config.batch_size
        self.accum_steps = config.optim.accum_steps
        self.repeats = config.augment.repeated_aug
        self.dist = dist
        name, img_size, options = _data_options(config)
        self.info = info = data.get_dataset_info(name, **data.dataset_options(name, img_size, options))
        aug = config.augment
        hflip = aug.hflip if aug.hflip is not None else (0.5 if info.hflip else 0.0)
        self.image_by_image = (not info.in_memory) or aug.crop == "rrc" or bool(aug.auto_augment)
        per_process = self.batch_size // dist.world_size
        if self.batch_size % (dist.world_size * self.accum_steps):
            raise ConfigError(
                f"batch_size {self.batch_size} must be divisible by the number of processes ({dist.world_size}) "
                f"times optim.accum_steps ({self.accum_steps})."
            )
        self.micro_batch_size = per_process // self.accum_steps

        if self.image_by_image:
            rrc = aug.crop == "rrc"
            transform = data.create_train_transform(
                name, img_size, auto_augment=aug.auto_augment, hflip=hflip if rrc else False,
                scale=(aug.crop_scale or info.train_scale) if rrc else (1.0, 1.0), ratio=None if rrc else (1.0, 1.0),
                re_prob=aug.re_prob if rrc else 0.0, re_mode=aug.re_mode, color_jitter=None,
                interpolation=aug.interpolation, **options,
            )
            dataset = data.build_dataset(name, "train", data_dir=data_dir, transform=transform, img_size=img_size,
                                         **options)
            self.subset = fixed_subset(len(dataset), config.data.train_size)
            self.num_samples = len(self.subset)
            self.sampler = _EpochBatchSampler(self)
            self.loader = torch.utils.data.DataLoader(
                _SeededImages(dataset), batch_sampler=self.sampler, num_workers=config.data.num_workers,
                persistent_workers=config.data.num_workers > 0, pin_memory=torch.cuda.is_available(),
                generator=torch.Generator(),  # without one, every new iterator would draw from the global RNG
            )
            self.info = getattr(dataset, "info", info)  # imagefolder learns its classes from the folders
            self.augment = BatchAugment() if rrc else self._batch_augment(aug, hflip, info)
        else:
            images, labels = data.load_arrays(name, "train", data_dir=data_dir,
                                              **data.dataset_options(name, img_size, options))
            keep = fixed_subset(len(labels), config.data.train_size)
            self.x = data.to_eval_tensor(images[keep], name, img_size, **options)
            self.y = torch.from_numpy(labels[keep])
            self.num_samples = len(self.y)
            self.augment = self._batch_augment(aug, hflip, info)
        self.updates_per_epoch = self.num_samples // self.batch_size
        if self.updates_per_epoch < 1:
            raise ConfigError(
                f"batch_size {self.batch_size} is larger than the training set ({self.num_samples} images)."
            )

    @staticmethod
    def _batch_augment(aug, hflip: float, info) -> BatchAugment:
        fill = -torch.tensor(info.mean) / torch.tensor(info.std)
        erasing = None
        if aug.re_prob > 0:
            from timm.data.random_erasing import RandomErasing

            erasing = RandomErasing(aug.re_prob, mode=aug.re_mode, device="cpu")
        shift = aug.crop_padding if aug.crop == "pad" else 0
        return BatchAugment(shift=shift, hflip=hflip, fill=fill, erasing=erasing)

    def positions(self, epoch: int, update: int) -> torch.Tensor:
        """Positions in the epoch's order that this process trains on at ``update``."""
        start = update * self.batch_size
        return torch.arange(start + self.dist.rank, start + self.batch_size, self.dist.world_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[list[Batch]]:
        """The micro-batches of every update of ``epoch`` from update ``start`` on."""
        order = epoch_order(self.num_samples, seed=self.seed, epoch=epoch, repeats=self.repeats)
        if self.image_by_image:
            self.sampler.set_epoch(epoch, start, order)
            micro = iter(self.loader)
            for u in range(start, self.updates_per_epoch):
                yield [self._augmented(next(micro), epoch, u, m) for m in range(self.accum_steps)]
            return
        for u in range(start, self.updates_per_epoch):
            chunks = order[self.positions(epoch, u)].chunk(self.accum_steps)
            yield [self._augmented((self.x[i], self.y[i]), epoch, u, m) for m, i in enumerate(chunks)]

    def _augmented(self, batch: Batch, epoch: int, update: int, micro: int) -> Batch:
        if not self.augment.active:
            return batch
        g = torch.Generator().manual_seed(derive_seed(self.seed, "batch", epoch, update, self.dist.rank, micro))
        x, y = batch
        return self.augment(x, g), y


class _EpochBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of ``(dataset index, image seed)`` keys for the DataLoader, from a chosen update on."""

    def __init__(self, batches: TrainBatches):
        self.batches = batches
        self.epoch, self.start, self.order = 0, 0, torch.arange(batches.num_samples)

    def set_epoch(self, epoch: int, start: int, order: torch.Tensor) -> None:
        self.epoch, self.start, self.order = epoch, start, order

    def __iter__(self):
        b = self.batches
        for u in range(self.start, b.updates_per_epoch):
            positions = b.positions(self.epoch, u)
            for m, chunk in enumerate(positions.chunk(b.accum_steps)):
                seed = derive_seed(b.seed, "images", self.epoch, u, b.dist.rank, m)
                yield [(int(b.subset[self.order[p]]), seed) for p in chunk]

    def __len__(self) -> int:
        return (self.batches.updates_per_epoch - self.start) * self.batches.accum_steps


class _SeededImages(torch.utils.data.Dataset):
    """Transforms a micro-batch of ``(index, seed)`` keys (one seed per micro-batch) under that seed.

    In a loader worker nothing else uses the generators; in the main process (no workers) their states are
    put back afterwards, so the training loop's own random stream is untouched.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        in_worker = torch.utils.data.get_worker_info() is not None
        saved = None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        _seed_all(keys[0][1])
        try:
            return [self.dataset[index] for index, _ in keys]
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])

    def __getitem__(self, key: tuple[int, int]):
        return self.__getitems__([key])[0]


def _seed_all(seed: int) -> None:
    # timm's transforms draw from Python's random (RandAugment, RandomResizedCrop, erasing) and NumPy (the
    # choice of RandAugment operations); torchvision's from torch. torch.manual_seed would also seed every
    # accelerator, a hundred times slower than seeding the CPU generator alone.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


def fixed_subset(n: int, size: int | None) -> np.ndarray:
    """A fixed seeded subset of ``size`` of ``n`` indices (all of them when ``size`` is None)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.RandomState(0).permutation(n)[:size])


def validation_batches(config: TrainConfig, dist: Distributed, *, data_dir=None, batch_size: int = 256) -> Iterable[Batch]:
    """This process's share of the validation set in batches (every ``W``-th image from image ``k`` on)."""
    from landscape import data

    name, img_size, options = _data_options(config)
    n = config.data.val_size or 10**12
    info = data.get_dataset_info(name, **data.dataset_options(name, img_size, options))
    if info.in_memory:
        x, y = data.analysis_subset(name, n, seed=0, split="val", data_dir=data_dir, img_size=img_size, **options)
        x, y = x[dist.rank::dist.world_size], y[dist.rank::dist.world_size]
        return list(zip(x.split(batch_size), y.split(batch_size)))
    dataset = data.build_dataset(name, "val", data_dir=data_dir, img_size=img_size, **options)
    keep = fixed_subset(len(dataset), config.data.val_size)[dist.rank::dist.world_size]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, keep.tolist()), batch_size=batch_size, num_workers=config.data.num_workers,
        generator=torch.Generator(),
    )
    return _LazyBatches(loader)


class _LazyBatches:
    """Re-iterable validation batches read from files on every pass (too large to hold in memory)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)
