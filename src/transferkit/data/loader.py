"""Feeding (path, label) samples to torch: the map-style `ImageList` (decodes with `load_rgb`, applies the transform), the seeded `make_loader` DataLoader, and the seeded stable `subsample`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from transferkit.data.images import load_rgb


class ImageList:
    """Map-style dataset over (path, label) pairs; torch's DataLoader needs only len/getitem."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(load_rgb(path)), label


def make_loader(samples, transform, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0):
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        ImageList(samples, transform),
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
