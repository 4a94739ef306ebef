"""What loaders and strategies need to know about an architecture, read from timm's metadata (no weights).

Vision transformers (ViT/DeiT, DINOv2, CLIP/SigLIP towers) have a position embedding for one grid: they are
built at the side we train at (timm's `img_size=` resamples the checkpoint's position embedding while it
loads). Freezing goes by timm's block groups (a transformer block, a ConvNeXt stage), with a final norm kept
with the top block. BatchNorm tricks (AdaBN, precise BN, frozen BN) apply only to models that have BatchNorm.
An image-text tower's head projects into the joint embedding: it is not a source classifier (LEEP: n/a).
"""

from __future__ import annotations

from typing import Any

FAMILIES = ("vit", "dinov2", "clip", "convnext", "cnn")


def pretrained_cfg(arch: str) -> dict[str, Any]:
    """timm's pretrained config of a name (`arch` or `arch.tag`) as a dict; {} for an unknown name."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    return cfg.to_dict() if cfg is not None else {}


def family(arch: str) -> str:
    """One of FAMILIES, from the timm name (the tag tells a CLIP tower from its ImageNet fine-tune)."""
    name = arch.lower()
    base, _, tag = name.partition(".")
    if "dinov2" in base:
        return "dinov2"
    if ("clip" in base or "siglip" in base) and base.startswith(("vit", "eva")):
        return "clip"
    if base.startswith(("vit", "deit", "eva", "beit")):
        return "vit"
    if base.startswith("convnext"):
        return "convnext"
    return "cnn"


def native_side(arch: str) -> int | None:
    """The side the weights were trained at (timm's pretrained input size), None when timm has no config."""
    size = pretrained_cfg(arch).get("input_size")
    return int(size[-1]) if size else None


def fixed_input(arch: str) -> bool:
    """True for models whose position embedding fixes the input grid (timm's `fixed_input_size`)."""
    return bool(pretrained_cfg(arch).get("fixed_input_size"))


def size_kwargs(arch: str, side: int | None) -> dict[str, int]:
    """timm.create_model kwargs that build `arch` for `side` px inputs: {'img_size': side} for a fixed-grid
    model at another side than its own (timm resamples the position embedding on load), else {}."""
    if not side or not fixed_input(arch) or side == native_side(arch):
        return {}
    return {"img_size": int(side)}


def has_batchnorm(model) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) for m in model.modules())


def block_groups(model) -> list[list[str]]:
    """Parameter names per timm block group (stem, each transformer block or CNN stage), input side first,
    the classifier excluded. A trailing group of norms only (ConvNeXt's head.norm) joins the top block: it
    normalises that block's output, so `partial` trains it with the block."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        return []
    head = {id(p) for p in model.get_classifier().parameters()}
    layer = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters():
        if id(p) not in head:
            by_id.setdefault(layer[name], []).append(name)
    groups = [by_id[k] for k in sorted(by_id)]
    while len(groups) > 2 and all("norm" in n.rsplit(".", 2)[-2] for n in groups[-1] if "." in n):
        last = groups.pop()
        groups[-1] = groups[-1] + last
    return groups


def source_classifier(model) -> bool:
    """True when the model's head is a trained classifier over source classes (what LEEP reads): a DINOv2 or
    SigLIP tower has no head (num_classes 0), a CLIP tower's head is its image-text projection."""
    if getattr(model, "num_classes", 0) <= 0:
        return False
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = f"{cfg.get('architecture', '')}.{cfg.get('tag', '')}"
    return not (family(arch) == "clip" and "ft_" not in (cfg.get("tag") or ""))


def describe(model, arch: str) -> dict[str, Any]:
    """The architecture facts a run records (metrics.json `architecture`)."""
    return {
        "family": family(arch),
        "batchnorm": has_batchnorm(model),
        "block_groups": len(block_groups(model)),
        "fixed_input": fixed_input(arch),
    }
