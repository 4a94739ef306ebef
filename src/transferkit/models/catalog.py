"""What can be used on this machine, without loading any model: availability(spec) checks that a spec's weights are here and match their pins, list_entries() is the table `transferkit zoo list` prints, and fetch() is `transferkit zoo fetch` (fill the HF cache and pin the file's sha256)."""

from __future__ import annotations

from typing import Any

from transferkit.core.io import sha256_file
from transferkit.models.registry import (
    PACKAGED,
    ZooError,
    cached_hub_file,
    hub_pins,
    packaged_path,
    read_card,
    registered_names,
)
from transferkit.models.zoo import parse_spec


def fetch(arch: str) -> dict[str, Any]:
    """`transferkit zoo fetch NAME`: fill the local HF cache with a hub model and pin its sha256."""
    from transferkit.models.hub import fetch as hub_fetch

    return hub_fetch(arch, hub_pins())


def availability(spec: str) -> tuple[bool, str]:
    """(available offline here, human detail) without loading the model."""
    try:
        ms = parse_spec(spec)
    except ZooError as e:
        return False, str(e)
    if ms.kind == "scratch":
        return True, "random init (no weights needed)"
    if ms.kind == "ensemble":
        missing = [f"{m}: {d}" for m, (ok, d) in ((m, availability(m)) for m in ms.members) if not ok]
        return (False, "; ".join(missing)) if missing else (True, f"ensemble of {len(ms.members)} available sources")
    if ms.kind == "file":
        return True, f"safetensors {ms.path}"
    if ms.kind == "zoo":
        card = read_card(spec.split(":", 1)[1])
        if not ms.path.is_file():
            return False, f"{ms.path} is missing (card.json without its weights)"
        got = sha256_file(ms.path)
        if got != card["sha256"]:
            return False, f"{ms.path}: sha256 {got[:12]}... does not match the card's {card['sha256'][:12]}..."
        return True, f"registered {ms.path.parent} (sha256 {card['sha256'][:12]}...)"
    if ms.kind == "packaged":
        entry = PACKAGED[spec]
        p = packaged_path(entry)
        if p is None:
            return False, f"pip package {entry.package} not installed"
        got = sha256_file(p)
        if got != entry.sha256:
            return False, f"{p}: sha256 {got[:12]}... does not match the pinned {entry.sha256[:12]}..."
        return True, f"{entry.package} (sha256 {entry.sha256[:12]}...)"
    cached = cached_hub_file(ms.arch)
    if cached:
        return True, f"hub cache {cached}"
    return False, f"needs the Hugging Face hub (not cached here): `transferkit zoo fetch {ms.arch}` online"


def list_entries() -> list[dict[str, Any]]:
    rows = []
    for name, entry in PACKAGED.items():
        ok, detail = availability(name)
        rows.append({"model": name, "kind": "packaged", "available": ok, "detail": detail, "note": entry.note})
    for name in registered_names():
        ok, detail = availability(f"zoo:{name}")
        try:
            card = read_card(name)
            note = f"{card['arch']} trained on {card.get('trained_on', {}).get('dataset', '?')}"
            if card.get("accuracy", {}).get("test") is not None:
                note += f" (test accuracy {card['accuracy']['test']:.3f})"
        except ZooError as e:
            note = str(e)
        rows.append({"model": f"zoo:{name}", "kind": "zoo", "available": ok, "detail": detail, "note": note})
    rows.append(
        {
            "model": "scratch:<arch>",
            "kind": "scratch",
            "available": True,
            "detail": "random init of any timm architecture",
            "note": "baseline",
        }
    )
    rows.append(
        {
            "model": "<spec>+<spec>",
            "kind": "ensemble",
            "available": True,
            "detail": "pretrained sources' features side by side, one head (select scores its top 2 as one)",
            "note": "",
        }
    )
    rows.append(
        {
            "model": "file:<path.safetensors>",
            "kind": "file",
            "available": True,
            "detail": "your own checkpoint, header metadata 'arch'",
            "note": "",
        }
    )
    from transferkit.models.hub import recommended_rows

    rows += recommended_rows()
    rows.append(
        {
            "model": "<timm name>",
            "kind": "timm",
            "available": False,
            "detail": "any timm model with pretrained weights, when the hub or HF cache has it",
            "note": "online users",
        }
    )
    return rows
