"""The fine-tune's training augmentation, with its randomness owned by the caller.

timm's transforms draw from Python's global `random` and torch's global generator. Other threads of the same
process draw from those too (Prefect's event client pings its server with `random.getrandbits`), so the crops a
fine-tune saw, and the model it shipped, changed from run to run inside a Prefect flow. `TrainAugment` draws
every choice from the `random.Random` it is handed; `ImageList` hands it one seeded by (seed, epoch, index), so
an image's augmentation in an epoch is a pure function of those three: the same in a flow, a CLI run, a resumed
run, and in DataLoader workers.
"""

from __future__ import annotations

import math
import random


class TrainAugment:
    """Random resized crop (area `scale`, log-uniform aspect `ratio`, 10 tries, then a centred crop clamped to
    `ratio`), colour jitter (brightness, contrast, saturation factors in [1 - jitter, 1 + jitter], in random
    order), then to a normalised tensor: timm's `create_transform(is_training=True, scale, ratio, hflip=0,
    color_jitter)` with its draws from `rng`."""

    def __init__(
        self,
        size: tuple[int, int],
        interpolation: str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        scale: tuple[float, float] = (0.75, 1.0),
        ratio: tuple[float, float] = (0.9, 1.1),
        jitter: float = 0.2,
    ):
        from torchvision.transforms import InterpolationMode

        try:
            self.mode = InterpolationMode(interpolation)
        except ValueError:
            raise ValueError(f"interpolation {interpolation!r}: not one of torchvision's InterpolationMode") from None
        self.size, self.interpolation = (int(size[0]), int(size[1])), interpolation
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale, self.ratio, self.jitter = tuple(scale), tuple(ratio), float(jitter)

    def __repr__(self) -> str:
        return (
            f"TrainAugment(size={self.size}, interpolation={self.interpolation}, scale={self.scale}, "
            f"ratio={self.ratio}, jitter={self.jitter})"
        )

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop, as torchvision's RandomResizedCrop.get_params draws it."""
        area, log_ratio = width * height, (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img, rng: random.Random):
        from torchvision.transforms import functional as F

        top, left, h, w = self.crop_box(img.width, img.height, rng)
        img = F.resized_crop(img, top, left, h, w, list(self.size), self.mode)
        if self.jitter:
            ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
            for k in rng.sample(range(3), 3):
                img = ops[k](img, rng.uniform(1 - self.jitter, 1 + self.jitter))
        return F.normalize(F.to_tensor(img), self.mean, self.std)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of one image's augmentation: seeded from a string, which Python hashes with SHA-512 (the
    same in every process, unlike hash())."""
    return random.Random(f"transferkit-augment:{seed}:{epoch}:{index}")
