"""The fine-tune's seeded augmentation (transferkit.data.augment.TrainAugment, a generator per image) against
timm's transform with the same operations and ranges (global generators), per image, in the same run.

    .venv/bin/python bench/augment.py [--images 200] [--rounds 5] [--size 128]

Images: the sklearn digits that `transferkit data builtin digits` writes (32 px, upscaled like train does).
Writes bench/results/augment.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/select.py would shadow the standard library's `select` with this folder first on sys.path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def per_image_ms(fn, images, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for i, img in enumerate(images):
            fn(i, img)
        out.append((time.perf_counter() - t) * 1e3 / len(images))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size", type=int, default=128)
    a = ap.parse_args()

    import torch
    from timm.data import create_transform

    from transferkit.data.augment import sample_rng
    from transferkit.data.builtin import write_builtin
    from transferkit.data.images import load_rgb
    from transferkit.models import zoo

    torch.set_num_threads(1)  # per-image CPU work, as in a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        write_builtin("digits", Path(tmp), per_class=a.images // 10, size=32, progress=False)
        images = [load_rgb(p) for p in sorted(Path(tmp).rglob("*.png"))][: a.images]
    cfg = {"input_size": (3, a.size, a.size), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    ours = zoo.train_transform(cfg)
    timm_t = create_transform(
        **cfg, is_training=True, scale=ours.scale, ratio=ours.ratio, hflip=0.0, color_jitter=ours.jitter
    )
    rows = {
        "timm create_transform (global generators)": per_image_ms(lambda i, im: timm_t(im), images, a.rounds),
        "TrainAugment (generator per image)": per_image_ms(
            lambda i, im: ours(im, sample_rng(0, 1, i)), images, a.rounds
        ),
    }
    base = statistics.median(rows["timm create_transform (global generators)"])
    res = {
        "images": len(images),
        "rounds": a.rounds,
        "size": a.size,
        "rows": {
            k: {"median_ms": statistics.median(v), "ratio": statistics.median(v) / base, "ms": v}
            for k, v in rows.items()
        },
    }
    lines = [
        "# bench/augment: seeded per-image augmentation vs timm's transform (same run)",
        "",
        f"{len(images)} digits images upscaled to {a.size} px, {a.rounds} rounds, one torch thread.",
        "",
        "| transform | median ms/image | ratio vs timm |",
        "|---|---|---|",
        *(f"| {k} | {r['median_ms']:.3f} | {r['ratio']:.2f} |" for k, r in res["rows"].items()),
    ]
    results = ROOT / "bench" / "results"
    (results / "augment.json").write_text(json.dumps(res, indent=2) + "\n")
    (results / "augment.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
