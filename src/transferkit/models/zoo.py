"""Model specs and model building: parse_spec turns a spec string (packaged name, timm name, file:, zoo:, scratch:, A+B ensemble) into a ModelSpec, and create_model builds the timm model with those weights, loaded safely (safetensors or torch.load(weights_only=True), sha256-checked) and seeded. It also holds the matching preprocessing (resolve_data_config, eval/train transforms) and save_checkpoint, which writes byte-stable safetensors."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.core.io import sha256_file
from transferkit.models.registry import (
    PACKAGED,
    ZooError,
    cached_hub_file,
    checkpoint_meta,
    hub_pins,
    packaged_path,
    read_card,
    registry_dir,
)

# data.image_size "auto" for sources without a side of their own (ImageNet weights): one side for every source,
# so that feature ensembles of any of them are served from their members' cached features. 192 px beat the
# models' own 224-260 and 128 for the best single source on the built-in colour and clothing targets, at less
# compute than their own side (docs/stages.md, params.yaml data.image_size)
AUTO_SIZE = 192


@dataclass(frozen=True)
class ModelSpec:
    spec: str
    kind: str  # packaged | timm | file | zoo | scratch | ensemble
    arch: str  # an ensemble's: its members' archs joined by '+'
    path: Path | None = None
    members: tuple[str, ...] = ()  # an ensemble's member specs

    @property
    def pretrained(self) -> bool:
        return self.kind != "scratch"


def parse_spec(spec: str) -> ModelSpec:
    spec = spec.strip()
    if not spec:
        raise ZooError("empty model spec")
    if spec.startswith("scratch:"):
        arch = spec.split(":", 1)[1]
        _check_arch(arch, spec)
        return ModelSpec(spec, "scratch", arch)
    if "+" in spec and not (spec.startswith("file:") and Path(spec[5:]).is_file()):
        return _parse_ensemble(spec)
    if spec.startswith("file:"):
        path = Path(spec.split(":", 1)[1])
        return ModelSpec(spec, "file", checkpoint_meta(path).get("arch", "?"), path)
    if spec.startswith("zoo:"):
        card = read_card(spec.split(":", 1)[1])
        return ModelSpec(spec, "zoo", card["arch"], registry_dir() / card["name"] / "model.safetensors")
    if spec in PACKAGED:
        return ModelSpec(spec, "packaged", spec)
    _check_arch(spec, spec)
    return ModelSpec(spec, "timm", spec)


def _parse_ensemble(spec: str) -> ModelSpec:
    parts = [p.strip() for p in spec.split("+")]
    if len(set(parts)) != len(parts) or any(not p for p in parts):
        raise ZooError(f"model {spec!r}: an ensemble names two or more different models joined by '+'")
    members = [parse_spec(p) for p in parts]
    if any(m.kind == "scratch" for m in members):
        raise ZooError(f"model {spec!r}: an ensemble combines pretrained sources; scratch: has no features to add")
    return ModelSpec(spec, "ensemble", "+".join(m.arch for m in members), None, tuple(parts))


def _check_arch(arch: str, spec: str) -> None:
    import timm

    if not timm.is_model(arch):
        raise ZooError(f"model {spec!r}: {arch!r} is not a timm architecture (see `timm.list_models()`)")


def _map_in_order(src: dict, dst: dict, label: str) -> dict:
    """Map a foreign state dict onto timm's by position; shapes must agree one for one."""
    if len(src) != len(dst):
        raise ZooError(f"{label}: {len(src)} tensors, timm expects {len(dst)}")
    out = {}
    for (sk, sv), (dk, dv) in zip(src.items(), dst.items()):
        if tuple(sv.shape) != tuple(dv.shape):
            raise ZooError(f"{label}: tensor {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dv.shape)}")
        out[dk] = sv
    return out


def load_state(path: Path, expected_sha256: str | None = None) -> dict:
    """Load a checkpoint safely: safetensors, or torch.load(weights_only=True); optional sha256 pin."""
    import torch

    if expected_sha256 is not None:
        got = sha256_file(path)
        if got != expected_sha256:
            raise ZooError(f"{path}: sha256 {got} does not match the pinned {expected_sha256}; refusing to load")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ZooError(f"{path}: cannot load with weights_only=True ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ZooError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


@dataclass
class LoadedModel:
    model: Any  # torch.nn.Module
    spec: ModelSpec
    weights_sha256: str | None
    data_config: dict  # input_size, mean, std, interpolation, crop_pct
    file_meta: dict

    @property
    def arch(self) -> str:
        return self.spec.arch


def create_model(
    spec: str,
    num_classes: int | None = None,
    drop_rate: float = 0.0,
    image_size: int | str | None = None,
    seed: int = 0,
    drop_path_rate: float = 0.0,
) -> LoadedModel:
    """Build a timm model with the spec's weights; `num_classes` replaces the head (None keeps it).

    Random parts (a scratch model, a new head) are drawn from `seed`, so they repeat across runs.
    Thread-safe: torch's RNG is process-global, so concurrent builds (select's thread runner) take turns.
    `drop_path_rate` > 0 turns on stochastic depth (timm's DropPath in the residual blocks).
    `image_size`: a side in pixels; None = the model's own (a trained checkpoint's, else timm's); "auto" = a
    trained checkpoint's own, else AUTO_SIZE.
    """
    with _CREATE_LOCK:
        return _create_model(spec, num_classes, drop_rate, image_size, seed, drop_path_rate)


_CREATE_LOCK = threading.Lock()


def _create_model(
    spec: str,
    num_classes: int | None,
    drop_rate: float,
    image_size: int | str | None,
    seed: int,
    drop_path_rate: float = 0.0,
) -> LoadedModel:
    import timm
    import torch

    from transferkit.models import arch as archs

    ms = parse_spec(spec)
    # only when asked: a few timm architectures take no drop_path_rate argument at all
    reg = {"drop_rate": drop_rate, **({"drop_path_rate": drop_path_rate} if drop_path_rate > 0 else {})}
    sha = None
    meta: dict = {}
    if ms.kind == "ensemble":
        return _create_ensemble(ms, num_classes, drop_rate, image_size, seed, drop_path_rate)
    if image_size == "auto" and (ms.kind == "timm" or (ms.kind == "scratch" and ms.arch not in PACKAGED)):
        image_size = archs.native_side(ms.arch) or AUTO_SIZE  # a hub model at its pretrained config's side
    side = image_size if isinstance(image_size, int) else None
    if ms.kind == "scratch":
        with torch.random.fork_rng(devices=[]):  # seeded init, without disturbing the caller's RNG
            torch.manual_seed(seed)
            model = timm.create_model(
                ms.arch, pretrained=False, num_classes=num_classes or 1000, **reg, **archs.size_kwargs(ms.arch, side)
            )
    elif ms.kind == "packaged":
        entry = PACKAGED[ms.spec]
        path = packaged_path(entry)
        if path is None:
            raise ZooError(f"model {spec!r}: install the pip package providing {entry.package} (see `make install`)")
        state = load_state(path, expected_sha256=entry.sha256)
        sha = entry.sha256
        model = timm.create_model(ms.arch, pretrained=False, **reg)
        model.load_state_dict(_map_in_order(state, model.state_dict(), f"{path.name}"), strict=True)
    elif ms.kind in ("file", "zoo"):
        model, sha, meta = _load_checkpoint(ms, reg)
    else:
        model, sha = _load_hub(ms, reg, side)
    if num_classes is not None and model.num_classes != num_classes:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # deterministic fresh head
            model.reset_classifier(num_classes)
    if image_size == "auto":  # a trained checkpoint at its own side: its features were learnt at that scale
        image_size = None if meta.get("data_config") else AUTO_SIZE
    cfg = resolve_data_config(model, image_size)
    if meta.get("data_config") and not image_size:
        cfg = json.loads(meta["data_config"])  # a trained checkpoint carries its own preprocessing
    return LoadedModel(model.eval(), ms, sha, cfg, meta)


def _load_hub(ms: ModelSpec, reg: dict, side: int | None):
    """(model, sha256) of a timm hub name through timm's own loader (HF cache, HF_HUB_OFFLINE honoured), at
    `side` px for fixed-grid models; one line on how to get weights that are not here (transferkit.hub)."""
    import timm

    from transferkit.models import arch as archs
    from transferkit.models import hub

    if cached_hub_file(ms.arch) is None and hub.offline():
        raise ZooError(hub.how_to_get(ms.arch, "HF_HUB_OFFLINE=1"))
    try:
        model = timm.create_model(ms.arch, pretrained=True, **reg, **archs.size_kwargs(ms.arch, side))
    except Exception as e:
        why = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
        raise ZooError(
            hub.how_to_get(ms.arch, why) if cached_hub_file(ms.arch) is None else f"model {ms.spec!r}: {why}"
        ) from None
    cached = cached_hub_file(ms.arch)
    return model, (hub.check_pin(ms.arch, cached, hub_pins()) if cached else None)


def check_one_input(spec: str, configs: dict[str, dict]) -> None:
    """Refuse an ensemble whose members (spec -> data config) would not see one image: input size and
    interpolation must agree (one transform feeds them all; the embedding cache serves it from theirs)."""
    if len({(tuple(c["input_size"]), c["interpolation"]) for c in configs.values()}) > 1:
        seen = ", ".join(f"{m} {c['input_size'][-1]}px {c['interpolation']}" for m, c in configs.items())
        raise ZooError(f"model {spec!r}: its members resolve to different inputs ({seen}); set data.image_size")


def _create_ensemble(ms: ModelSpec, num_classes, drop_rate: float, image_size, seed: int, drop_path_rate: float):
    """A FeatureEnsemble of the members' pretrained models (check_one_input)."""
    import hashlib

    import torch

    from transferkit.models.ensemble import build

    loaded = [_create_model(m, None, 0.0, image_size, seed, drop_path_rate) for m in ms.members]
    check_one_input(ms.spec, {m: lm.data_config for m, lm in zip(ms.members, loaded)})
    norms = [(lm.data_config["mean"], lm.data_config["std"]) for lm in loaded]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # deterministic fresh head
        model = build([lm.model for lm in loaded], norms, num_classes or 0, drop_rate)
    shas = [lm.weights_sha256 for lm in loaded]
    sha = hashlib.sha256("+".join(shas).encode()).hexdigest() if all(shas) else None
    cfg = {**loaded[0].data_config, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    return LoadedModel(model.eval(), ms, sha, cfg, {})


def _ensemble_from_archs(arch: str, num_classes: int, reg: dict):
    """An untrained FeatureEnsemble of `arch`'s members ('a+b'), to load a checkpoint's weights into (the
    members' mean/std are buffers of the checkpoint)."""
    import timm

    from transferkit.models.ensemble import build

    member_reg = {**reg, "drop_rate": 0.0}  # dropout belongs to the ensemble's head, not inside each member
    members = [timm.create_model(a, pretrained=False, num_classes=0, **member_reg) for a in arch.split("+")]
    return build(members, [((0.0,) * 3, (1.0,) * 3)] * len(members), num_classes, reg.get("drop_rate", 0.0))


def _load_checkpoint(ms: ModelSpec, reg: dict):
    """(model, sha256, header metadata) of a `file:` or `zoo:` safetensors checkpoint."""
    import timm

    from transferkit.models import arch as archs

    meta = checkpoint_meta(ms.path)
    if ms.kind == "zoo":  # registered weights load only if they are still the bytes the card pins
        sha = read_card(ms.spec.split(":", 1)[1])["sha256"]
        state = load_state(ms.path, expected_sha256=sha)
    else:
        sha = sha256_file(ms.path)
        state = load_state(ms.path)
    n = int(meta.get("num_classes", 1000))
    if "+" in meta["arch"]:
        model = _ensemble_from_archs(meta["arch"], n, reg)
    else:  # a fixed-grid model at the side it was trained at
        side = json.loads(meta["data_config"])["input_size"][-1] if meta.get("data_config") else None
        model = timm.create_model(
            meta["arch"], pretrained=False, num_classes=n, **reg, **archs.size_kwargs(meta["arch"], side)
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ZooError(f"checkpoint {ms.path} does not fit arch {meta['arch']!r}: {str(e)[:300]}") from None
    return model, sha, meta


def resolve_data_config(model, image_size: int | None = None) -> dict:
    """timm's preprocessing for this model; `image_size` overrides the resolution only."""
    from timm.data import resolve_data_config as _resolve

    cfg = dict(_resolve({}, model=model))
    if image_size:
        cfg["input_size"] = (3, int(image_size), int(image_size))
    cfg["crop_pct"] = 1.0  # small, centred objects: resize the whole image, never crop it away
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def eval_transform(cfg: dict):
    from timm.data import create_transform

    return create_transform(
        input_size=tuple(cfg["input_size"]),
        interpolation=cfg["interpolation"],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        crop_pct=1.0,
        is_training=False,
    )


def train_transform(cfg: dict):
    """Mild augmentation (timm's random resized crop and colour jitter, drawn per image from a seeded generator:
    transferkit.data.augment); no horizontal flip (digits and text are not mirror-symmetric)."""
    from transferkit.data.augment import TrainAugment

    return TrainAugment(
        size=tuple(cfg["input_size"][-2:]),
        interpolation=cfg["interpolation"],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        scale=(0.75, 1.0),
        ratio=(0.9, 1.1),
        jitter=0.2,
    )


def save_checkpoint(model, path: Path, meta: dict[str, Any]) -> str:
    """Write a safetensors checkpoint atomically with `arch`/`num_classes` etc. in its header."""
    from safetensors.torch import save as st_save

    from transferkit.core.io import atomic_write_bytes

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in meta.items()}
    atomic_write_bytes(path, canonical_safetensors(st_save(state, metadata=header)))
    return sha256_file(path)


def canonical_safetensors(blob: bytes) -> bytes:
    """The same file with its JSON header's keys sorted: safetensors writes them in hash-map order, which changes
    from process to process, so equal weights gave different bytes (and DVC saw a changed model). Tensor data and
    offsets are untouched; the header is re-padded with spaces to 8 bytes, as the format allows."""
    import struct

    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]
