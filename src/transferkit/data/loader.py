"""Feeding (path, label) samples to torch: the map-style `ImageList` (decodes with `load_rgb`, applies the transform), the seeded `make_loader` DataLoader, and the seeded stable `subsample`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from transferkit.data.augment import TrainAugment, sample_rng
from transferkit.data.images import load_rgb


class ImageList:
    """Map-style dataset over (path, label) pairs; torch's DataLoader needs only len/getitem.

    A `TrainAugment` transform gets each image's own generator, seeded by (`seed`, the epoch set by
    `set_epoch`, index): the fine-tune's crops never depend on what else in the process drew random numbers."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable, seed: int = 0):
        self.samples = samples
        self.transform = transform
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Before each epoch's iterator is made (DataLoader workers get a copy of this object per iterator)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        if isinstance(self.transform, TrainAugment):
            return self.transform(load_rgb(path), sample_rng(self.seed, self.epoch, i)), label
        return self.transform(load_rgb(path)), label


def make_loader(samples, transform, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0):
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        ImageList(samples, transform, seed),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=g,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )


def subsample(samples: list, n: int, seed: int) -> list:
    """Seeded subsample without replacement (order kept stable)."""
    if len(samples) <= n:
        return list(samples)
    idx = np.sort(np.random.default_rng(seed).choice(len(samples), size=n, replace=False))
    return [samples[i] for i in idx]
