"""What export reads before it writes anything: the train run, its validation gate, the checkpoint with its class names, and the run's own test split rebuilt with its seed and fractions. Everything is gathered into one ExportInputs record."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.core.config import ConfigError, Params, load_params
from transferkit.core.io import read_json
from transferkit.export.convert import ExportError

# --------------------------------------------------------------------------- reading the run


def _read_run(run: Path) -> tuple[dict, Path, Params | None]:
    if not run.is_dir():
        raise ExportError(f"run folder not found: {run}")
    ckpt = run / "model.safetensors"
    if not ckpt.is_file():
        raise ExportError(f"run {run} has no checkpoint: {ckpt} not found (run `transferkit train` first)")
    try:
        metrics = read_json(run / "metrics.json")
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"run {run}: {e}") from None
    run_params = None
    if (run / "params.yaml").is_file():
        try:
            run_params = load_params(run / "params.yaml")
        except ConfigError as e:
            raise ExportError(f"run {run}: {e}") from None
    return metrics, ckpt, run_params


def _gate(run: Path) -> tuple[dict | None, str | None]:
    """(validation.json contents or None, why the gate is closed or None)."""
    path = run / "validation.json"
    if not path.is_file():
        return None, f"run {run} has not been validated ({path} not found; run `transferkit validate --run {run}`)"
    try:
        validation = read_json(path)
    except ValueError as e:
        return None, f"cannot read the validation result: {e}"
    if not isinstance(validation, dict) or validation.get("passed") is not True:
        reasons = validation.get("reasons") if isinstance(validation, dict) else None
        why = "; ".join(str(r) for r in reasons) if reasons else "no reasons given"
        return validation if isinstance(validation, dict) else None, f"run {run} failed validation ({why})"
    return validation, None


# --------------------------------------------------------------------------- the stage


@dataclass
class ExportInputs:
    """Everything export reads before it writes anything: the run, its gate, the model and its test images."""

    run: Path
    metrics: dict
    params: Params
    validation: dict | None
    closed: str | None  # why the validation gate is closed (None: it passed)
    force: bool
    ckpt: Path
    model: Any
    fmeta: dict
    cfg: dict
    classes: list[str]
    target: str
    seed: int
    train: list
    test: list
    transform: Any
    example: Any  # batch 2 of test images: keeps N symbolic in the exported graph
    warn: list[str]


def read_inputs(run: Path, params: Params | None, force: bool) -> ExportInputs:
    """Read and check the run, its gate, checkpoint and test split; nothing is written yet."""
    import torch

    from transferkit.models import zoo

    metrics, ckpt, run_params = _read_run(run)
    params = params or run_params or Params()
    validation, closed = _gate(run)
    if closed and not force:
        raise ExportError(f"refusing to export: {closed}. Fix the run, or export anyway with force=True (--force)")
    model, fmeta, cfg, classes = _load_checkpoint(ckpt, metrics)
    split = run_params or params
    seed = int(metrics.get("seed", split.seed))
    ds, test = _test_split(run, metrics, split, seed, classes, ckpt)
    if params.export.check_images and len(test) > params.export.check_images:
        from transferkit.data.loader import subsample

        test = subsample(test, params.export.check_images, seed)
    transform = zoo.eval_transform(cfg)
    warn = []
    if metrics.get("data_md5") and metrics["data_md5"] != ds.md5:
        warn.append(f"target data changed since training (md5 {ds.md5} != {metrics['data_md5']}); parity ran on it")
    return ExportInputs(
        run=run,
        metrics=metrics,
        params=params,
        validation=validation,
        closed=closed,
        force=force,
        ckpt=ckpt,
        model=model,
        fmeta=fmeta,
        cfg=cfg,
        classes=classes,
        target=str(metrics["target"]),
        seed=seed,
        train=ds.splits.get("train") or [],
        test=test,
        transform=transform,
        example=torch.stack([transform(rgb_image(p)) for p, _ in test[:2]]),
        warn=warn,
    )


def _load_checkpoint(ckpt: Path, metrics: dict) -> tuple[Any, dict, dict, list[str]]:
    """(model in eval mode on CPU, file header, data config, class names), the names checked against its head."""
    from transferkit.models import registry, zoo

    try:
        loaded = zoo.create_model(f"file:{ckpt}")
    except registry.ZooError as e:
        raise ExportError(str(e) if str(ckpt) in str(e) else f"checkpoint {ckpt}: {e}") from None
    except Exception as e:  # safetensors/torch errors on damaged files
        raise ExportError(f"checkpoint {ckpt}: cannot load ({type(e).__name__}: {e})") from None
    model = loaded.model.eval().to("cpu")
    fmeta = loaded.file_meta
    try:
        classes = json.loads(fmeta["classes"]) if fmeta.get("classes") else list(metrics.get("classes") or [])
    except ValueError:
        raise ExportError(f"checkpoint {ckpt}: header 'classes' is not a JSON list") from None
    num_classes = int(getattr(model, "num_classes", len(classes)))
    if len(classes) != num_classes:
        raise ExportError(f"checkpoint {ckpt}: {len(classes)} class names for a {num_classes}-way head")
    return model, fmeta, loaded.data_config, classes


def _test_split(run: Path, metrics: dict, split: Params, seed: int, classes: list[str], ckpt: Path) -> tuple[Any, list]:
    """(the run's target with its own seed and fractions, the test split it was tested on: >= 2 images)."""
    from transferkit.data.folder import DataError, load_with_params

    target = metrics.get("target")
    if not target:
        raise ExportError(f"{run / 'metrics.json'} lacks 'target' (the dataset folder parity runs on)")
    try:
        ds = load_with_params(target, split, seed=seed)
    except DataError as e:
        raise ExportError(f"parity needs the run's real test images: {e}") from None
    if ds.classes != classes:
        raise ExportError(f"target {target} has classes {ds.classes}, the checkpoint {ckpt} was trained on {classes}")
    test = ds.splits.get("test") or []
    if len(test) < 2:
        raise ExportError(f"target {target}: the test split has {len(test)} image(s); parity needs at least 2")
    return ds, test


def rgb_image(path):
    from transferkit.data.images import load_rgb

    return load_rgb(path)
