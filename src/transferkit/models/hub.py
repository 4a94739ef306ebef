"""Hub-hosted source models (any timm name with pretrained weights): where timm finds them, how to get them,
and their sha256 pins.

    transferkit zoo fetch vit_small_patch14_dinov2.lvd142m   # online: fills the HF cache, pins the file
    HF_HUB_OFFLINE=1 transferkit train --model vit_small_patch14_dinov2.lvd142m ...   # then offline

timm loads `timm/NAME` from the Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub: models--timm--NAME/snapshots/REV/model.safetensors + refs/main). `zoo fetch` records
the file's sha256 in the registry's hub-pins.json; a pinned name loads only if the cached file still has it.
RECOMMENDED lists the sources by family that `zoo list` shows (size, input side and licence read from timm).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transferkit.core.errors import TransferkitError
from transferkit.core.io import sha256_file

# Sources users online pick, by family (timm names); the smallest of each is what tests/models/test_backbones.py
# builds with random weights
RECOMMENDED: dict[str, tuple[str, ...]] = {
    "vit": ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", "vit_small_patch16_224.augreg_in21k_ft_in1k"),
    "deit": ("deit_small_patch16_224.fb_in1k",),
    "dinov2": ("vit_small_patch14_dinov2.lvd142m", "vit_small_patch14_reg4_dinov2.lvd142m"),
    "convnext": ("convnext_atto.d2_in1k", "convnext_tiny.in12k_ft_in1k"),
    "clip": (
        "vit_xsmall_patch16_clip_224.tinyclip_yfcc15m",
        "vit_base_patch16_clip_224.openai",
        "vit_base_patch16_siglip_224.webli",
    ),
}

PINS_FILE = "hub-pins.json"
_WEIGHT_FILES = ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin")


class HubError(TransferkitError, ValueError):
    """A hub model that cannot be had here, or whose cached file fails its pin; one line saying what to do."""


def hub_repo(arch: str) -> str | None:
    from transferkit.models.arch import pretrained_cfg

    return pretrained_cfg(arch).get("hf_hub_id") or None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def cached_file(arch: str) -> Path | None:
    """The locally cached hub weights of a timm name, if any (never downloads)."""
    repo = hub_repo(arch)
    if not repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    for fname in _WEIGHT_FILES:
        hit = try_to_load_from_cache(repo, fname)
        if isinstance(hit, str):
            return Path(hit)
    return None


def how_to_get(arch: str, why: str = "") -> str:
    """The one line that says how to get a hub model's weights, online and offline."""
    repo = hub_repo(arch) or f"timm/{arch}"
    cache = os.environ.get("HF_HUB_CACHE") or str(Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    return (
        f"model {arch!r}: weights not in the local Hugging Face cache ({cache}){f'; {why}' if why else ''}. "
        f"Online: `transferkit zoo fetch {arch}` (downloads {repo} and pins its sha256); offline: copy "
        f"models--{repo.replace('/', '--')} into that cache from a machine that has it, or pass "
        "file:PATH.safetensors (header metadata 'arch'); packaged models: `transferkit zoo list`"
    )


def read_pins(path: Path) -> dict[str, dict[str, str]]:
    """The pins file (zoo.registry_dir() / PINS_FILE): timm name -> {repo, file, sha256, bytes}."""
    from transferkit.core.io import read_json

    if not path.is_file():
        return {}
    pins = read_json(path)
    if not isinstance(pins, dict):
        raise HubError(f"{path}: not a JSON object of pins; remove it and run `transferkit zoo fetch` again")
    return pins


def check_pin(arch: str, path: Path, pins: Path) -> str:
    """The cached file's sha256; refuses a file that a `zoo fetch` pinned to other bytes."""
    sha = sha256_file(path)
    pin = read_pins(pins).get(arch)
    if pin and pin.get("sha256") != sha:
        raise HubError(
            f"model {arch!r}: cached {path} has sha256 {sha[:12]}... but `zoo fetch` pinned "
            f"{pin.get('sha256', '?')[:12]}... in {pins}; refusing to load (fetch it again to re-pin)"
        )
    return sha


def fetch(arch: str, pins: Path) -> dict[str, Any]:
    """Fill the local cache with `arch`'s weights through timm's own loader and pin the file's sha256.

    Offline (HF_HUB_OFFLINE=1) it pins what the cache already holds, or fails with how_to_get's line.
    """
    import timm

    from transferkit.core.io import write_json

    if not timm.is_model(arch) or not hub_repo(arch):
        raise HubError(f"model {arch!r}: not a timm name with hub weights (see `timm.list_pretrained()`)")
    if cached_file(arch) is None:
        if offline():
            raise HubError(how_to_get(arch, "HF_HUB_OFFLINE=1"))
        try:
            timm.create_model(arch, pretrained=True)  # the download the loader itself makes
        except Exception as e:
            raise HubError(how_to_get(arch, f"download failed: {type(e).__name__}: {str(e)[:160]}")) from None
    path = cached_file(arch)
    if path is None:
        raise HubError(how_to_get(arch, "timm loaded it but no weights file is in the cache"))
    pin = {"repo": hub_repo(arch), "file": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}
    write_json(pins, {**read_pins(pins), arch: pin})
    return {"model": arch, **pin}


def size_of(arch: str) -> dict[str, Any]:
    """Parameters (millions) and fp32 MB of an architecture, built on the meta device (no memory, no weights)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    n = sum(p.numel() for p in model.parameters())
    return {"params_m": round(n / 1e6, 1), "mb": round(n * 4 / 2**20)}


def recommended_rows() -> list[dict[str, Any]]:
    """`zoo list`'s hub rows: family, size, input side, licence of the weights, and whether cached here."""
    from transferkit.models.arch import pretrained_cfg

    rows = []
    for fam, names in RECOMMENDED.items():
        for name in names:
            cfg = pretrained_cfg(name)
            path = cached_file(name)
            rows.append(
                {
                    "model": name,
                    "kind": "hub",
                    "family": fam,
                    **size_of(name),
                    "input_size": int(cfg["input_size"][-1]),
                    "license": cfg.get("license") or "see the model card",
                    "available": path is not None,
                    "detail": f"hub cache {path}" if path else f"online: transferkit zoo fetch {name}",
                }
            )
    return rows
