"""The fine-tune's augmentation draws from its own generator per image, never from the process's global ones.

.venv/bin/pytest -q tests/data/test_augment.py
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import drawing_thread
from PIL import Image

from transferkit.data.augment import TrainAugment, sample_rng
from transferkit.data.loader import ImageList, make_loader


def _images(root: Path, n: int = 4, size: int = 40) -> list[tuple[Path, int]]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        out.append((path, i % 2))
    return out


def _augment() -> TrainAugment:
    return TrainAugment((32, 32), "bicubic", (0.5,) * 3, (0.5,) * 3, scale=(0.75, 1.0), ratio=(0.9, 1.1), jitter=0.2)


def test_an_images_augmentation_is_a_function_of_seed_epoch_and_index_only(tmp_path):
    items = ImageList(_images(tmp_path), _augment(), seed=7)
    items.set_epoch(3)
    first = [items[i][0] for i in range(len(items))]
    random.seed(123)  # whatever the global generators hold, and whoever else draws from them meanwhile
    torch.manual_seed(123)
    with drawing_thread() as draws:
        again = [items[i][0] for i in range(len(items))]
    assert draws[0] > 0
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert first[0].shape == (3, 32, 32) and first[0].dtype == torch.float32
    items.set_epoch(4)  # another epoch, another crop of the same image
    assert not torch.equal(items[0][0], first[0])
    other_seed = ImageList(items.samples, items.transform, seed=8)
    other_seed.set_epoch(3)
    assert not torch.equal(other_seed[0][0], first[0])


def test_a_loader_with_workers_gives_the_batches_of_one_without(tmp_path):
    """Worker processes get copies of the dataset: the crops are still those of (seed, epoch, index)."""
    samples = _images(tmp_path, n=6)

    def batches(workers: int) -> list[torch.Tensor]:
        loader = make_loader(samples, _augment(), batch_size=3, shuffle=True, seed=1, num_workers=workers)
        loader.dataset.set_epoch(2)
        return [x for x, _ in loader]

    inline, pooled = batches(0), batches(2)
    assert len(inline) == 2 and all(torch.equal(a, b) for a, b in zip(inline, pooled))


def test_crops_keep_the_area_and_aspect_bounds_and_fall_back_to_a_centred_crop():
    aug = _augment()
    for k in range(300):
        top, left, h, w = aug.crop_box(64, 48, sample_rng(0, 0, k))
        assert 0 <= top <= 48 - h and 0 <= left <= 64 - w
        assert 0.75 * 64 * 48 * 0.95 <= h * w <= 64 * 48  # rounding to whole pixels
        assert math.log(0.9) - 0.05 <= math.log(w / h) <= math.log(1.1) + 0.05
    # a 100 x 10 strip fits no crop of aspect <= 1.1 with 75% of its area: a centred 11 x 10 crop
    assert aug.crop_box(100, 10, sample_rng(0, 0, 0)) == (0, 44, 10, 11)


def test_an_unknown_interpolation_is_refused():
    with pytest.raises(ValueError, match="interpolation 'cubic'"):
        TrainAugment((32, 32), "cubic", (0.5,) * 3, (0.5,) * 3)
