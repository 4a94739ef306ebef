"""Penultimate-layer embeddings (and source-head logits), cached on disk and shared by drift/select/train.

The cache key is (model spec, weights sha256, dataset md5, input size), so a changed file, weight or
resolution can never serve stale features; rows inside a file are keyed by split/class/file name.
Files are .npz read with allow_pickle=False. Scratch models are seeded, so their features repeat.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from transferkit.core.io import atomic_write_bytes


def cache_dir() -> Path:
    return Path(os.environ.get("TRANSFERKIT_CACHE", Path.home() / ".cache" / "transferkit")) / "embeddings"


def cache_key(spec: str, weights_sha: str | None, data_md5: str, input_size: int) -> str:
    h = hashlib.sha256()
    for part in ("v2", spec, weights_sha or "-", data_md5, str(input_size)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:32]


def torch_threads() -> None:
    """Use every core we were given (CI has 2), unless OMP_NUM_THREADS says otherwise."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return  # torch already follows it; a shared machine is better served by fewer threads

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=4)
def source_model(spec: str, image_size: int | str | None):
    """Loaded once per process: drift, select and train embed several splits with the same model."""
    from transferkit.models import zoo

    return zoo.create_model(spec, image_size=image_size)


def row_key(path: Path) -> str:
    """A sample's identity inside its dataset (split/class/file); the dataset md5 covers its bytes."""
    return "/".join(Path(path).parts[-3:])


def compute_embeddings(
    spec: str,
    samples: list[tuple[Path, int]],
    data_md5: str,
    image_size: int | str | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Return {'features': [N,D] float32, 'logits': [N,C] (source head, if any), 'labels': [N]} in sample order.

    One cache file per (model, weights sha256, dataset md5, input size) holds every image of that
    dataset embedded so far; a call embeds only the images the file lacks, so drift, select and
    train share the work whatever subset each of them needs.
    """
    from transferkit.models import zoo

    ms = zoo.parse_spec(spec)
    if ms.kind == "ensemble":
        return _ensemble_embeddings(ms, samples, data_md5, image_size, batch_size, progress)
    # source head kept: its logits feed LEEP; file: checkpoints may change on disk, so never memoised
    lm = zoo.create_model(spec, image_size=image_size) if spec.startswith("file:") else source_model(spec, image_size)
    size = int(lm.data_config["input_size"][-1])
    path = cache_dir() / f"{cache_key(spec, lm.weights_sha256, data_md5, size)}.npz"
    stored: dict[str, np.ndarray] = {}
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                stored = {k: z[k] for k in z.files}
        except (OSError, ValueError):  # a damaged cache file is rebuilt, never trusted
            stored = {}
    arrays = {"keys", "features"} | ({"logits"} if _has_head(lm) else set())
    if set(stored) != arrays:  # not written by this layout: start over
        stored = {}
    index = {k: i for i, k in enumerate(stored["keys"].tolist())} if stored else {}
    keys = [row_key(p) for p, _ in samples]
    missing = sorted({k: i for i, k in enumerate(keys) if k not in index}.values())
    if missing:
        new = forward(lm, [samples[i] for i in missing], batch_size, progress, spec)
        new["keys"] = np.array([keys[i] for i in missing])
        stored = {k: np.concatenate([stored[k], new[k]]) for k in new} if stored else new
        _save(path, stored)
        index = {k: i for i, k in enumerate(stored["keys"].tolist())}
    rows = np.array([index[k] for k in keys], dtype=np.int64)
    out = {k: v[rows] for k, v in stored.items() if k != "keys"}
    out["labels"] = np.array([y for _, y in samples], dtype=np.int64)
    return out


def _ensemble_embeddings(ms, samples, data_md5: str, image_size, batch_size: int, progress: bool) -> dict:
    """An ensemble's features are its members' side by side (transferkit.models.ensemble): served from their cache
    entries, so scoring or probing an ensemble after select embedded its members costs no forward pass.
    Members that would see different inputs are refused as zoo.create_model refuses them."""
    from transferkit.models import zoo

    configs = {
        m: (
            source_model(m, image_size) if not m.startswith("file:") else zoo.create_model(m, image_size=image_size)
        ).data_config
        for m in ms.members
    }
    zoo.check_one_input(ms.spec, configs)
    parts = [compute_embeddings(m, samples, data_md5, image_size, batch_size, progress) for m in ms.members]
    return {"features": np.concatenate([p["features"] for p in parts], axis=1), "labels": parts[0]["labels"]}


def embeddings(spec: str, samples: list[tuple[Path, int]], data_md5: str, data, progress: bool = True) -> dict:
    """compute_embeddings at `data` params' (DataParams) input size and batch size: drift, select and train
    embed through here, so their cache keys agree and one stage's features serve the others."""
    return compute_embeddings(
        spec, samples, data_md5, image_size=data.image_size, batch_size=data.batch_size, progress=progress
    )


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _has_head(lm) -> bool:
    """Only a pretrained source classifier's logits mean anything (LEEP, output drift): not a DINOv2 tower's
    missing head nor a CLIP tower's image-text projection (transferkit.models.arch.source_classifier)."""
    from transferkit.models.arch import source_classifier

    return lm.spec.kind != "scratch" and source_classifier(lm.model)


def forward(lm, samples, batch_size: int, progress: bool, spec: str) -> dict[str, np.ndarray]:
    """Embed SAMPLES with the loaded model LM now, bypassing the cache ({'features'[, 'logits']}); SPEC labels
    the progress bar. For models whose weights are not a cache key (train's AdaBN-adapted copy)."""
    import torch
    from tqdm import tqdm

    from transferkit.data.loader import make_loader
    from transferkit.models import zoo

    torch_threads()
    dev = device()
    model = lm.model.to(dev).eval()
    has_head = _has_head(lm)
    loader = make_loader(samples, zoo.eval_transform(lm.data_config), batch_size=batch_size)
    feats, logits = [], []
    with torch.inference_mode():
        for x, _ in tqdm(loader, desc=f"embed {spec}", unit="batch", disable=not progress, leave=False):
            f = model.forward_head(model.forward_features(x.to(dev)), pre_logits=True)
            feats.append(f.float().cpu().numpy())
            if has_head:
                logits.append(model.get_classifier()(f).float().cpu().numpy())
    out = {"features": np.concatenate(feats).astype(np.float32)}
    if logits:
        out["logits"] = np.concatenate(logits).astype(np.float32)
    return out
