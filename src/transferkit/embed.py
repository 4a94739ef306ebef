"""Penultimate-layer embeddings (and source-head logits), cached on disk and shared by drift/select/train.

The cache key is (model spec, weights sha256, dataset md5, the exact sample list, input size), so a
changed file, weight or resolution can never serve stale features. Files are .npz read with
allow_pickle=False.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from transferkit.io import atomic_write_bytes


def cache_dir() -> Path:
    return Path(os.environ.get("TRANSFERKIT_CACHE", Path.home() / ".cache" / "transferkit")) / "embeddings"


def cache_key(spec: str, weights_sha: str | None, data_md5: str, samples, input_size: int) -> str:
    h = hashlib.sha256()
    for part in (spec, weights_sha or "-", data_md5, str(input_size)):
        h.update(part.encode() + b"\0")
    for p, y in samples:
        h.update(f"{Path(p).name}:{Path(p).parent.name}:{y}\n".encode())
    return h.hexdigest()[:32]


def torch_threads() -> None:
    """Use every core we were given (CI has 2), once."""
    import torch

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=4)
def _source_model(spec: str, image_size: int | None):
    """Loaded once per process: drift, select and train embed several splits with the same model."""
    from transferkit import zoo

    return zoo.create_model(spec, image_size=image_size)


def compute_embeddings(
    spec: str,
    samples: list[tuple[Path, int]],
    data_md5: str,
    image_size: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Return {'features': [N,D] float32, 'logits': [N,C] float32 (source head, if it has one), 'labels'}."""
    import torch
    from tqdm import tqdm

    from transferkit import zoo
    from transferkit.data import make_loader

    # source head kept: its logits feed LEEP; file: checkpoints may change on disk, so never memoised
    lm = zoo.create_model(spec, image_size=image_size) if spec.startswith("file:") else _source_model(spec, image_size)
    size = int(lm.data_config["input_size"][-1])
    key = cache_key(spec, lm.weights_sha256, data_md5, samples, size)
    path = cache_dir() / f"{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    torch_threads()
    dev = device()
    model = lm.model.to(dev).eval()
    has_head = lm.spec.kind != "scratch" and getattr(model, "num_classes", 0) > 0
    loader = make_loader(samples, zoo.eval_transform(lm.data_config), batch_size=batch_size)
    feats, logits = [], []
    with torch.inference_mode():
        for x, _ in tqdm(loader, desc=f"embed {spec}", unit="batch", disable=not progress, leave=False):
            f = model.forward_head(model.forward_features(x.to(dev)), pre_logits=True)
            feats.append(f.float().cpu().numpy())
            if has_head:
                logits.append(model.get_classifier()(f).float().cpu().numpy())
    out = {
        "features": np.concatenate(feats).astype(np.float32),
        "labels": np.array([y for _, y in samples], dtype=np.int64),
    }
    if logits:
        out["logits"] = np.concatenate(logits).astype(np.float32)
    import io

    buf = io.BytesIO()
    np.savez(buf, **out)
    atomic_write_bytes(path, buf.getvalue())
    return out
