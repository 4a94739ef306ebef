"""Publishing a built export into the model repository: metadata.json (contract keys, then extras), the metadata embedded in the ONNX files, reference.npz, the model card, then the version rename, the Triton config and the promotion, all under the repository lock."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transferkit.core.io import atomic_write_text, git_rev, sha256_file, write_json
from transferkit.export.card import model_card, transfer_record
from transferkit.export.inputs import ExportInputs, rgb_image
from transferkit.export.promote import promote
from transferkit.modelrepo.repository import (
    INPUT_NAME,
    INT8_FILE,
    OUTPUT_NAME,
    REFERENCE_FILE,
    TRITON_CONFIG,
    next_version,
    publish,
    repo_lock,
    write_triton_config,
)
from transferkit.modelrepo.runtime import execution_providers

REFERENCE_IMAGES = 4


@dataclass
class BuildResult:
    """What the export, parity and int8 steps made in the staging folder."""

    proto: Any  # the fp32 graph, metadata not yet embedded
    opset: int
    how: dict
    parity: dict
    int8: dict


def publish_version(
    src: ExportInputs, built: BuildResult, staging: Path, model_dir: Path, promote_it: bool = True
) -> dict[str, Any]:
    """Number, write, rename and promote the version, all under the repository lock; returns its metadata."""
    with repo_lock(model_dir):
        version = next_version(model_dir)
        meta = _metadata(src, built, model_dir.name, version)
        _write_version(src, built, meta, staging)
        publish(staging, model_dir, version)
        write_triton_config(model_dir, version, meta, create=True)
        # the promotion: last, after everything (we already hold the repository lock)
        if promote_it:
            promote(model_dir.parent, model_dir.name, version, reason=f"export of {src.run}", lock=False)
    return meta


def _write_version(src: ExportInputs, built: BuildResult, meta: dict, staging: Path) -> None:
    """The version's files in STAGING, metadata embedded and each artifact's sha256 in metadata.json."""
    import onnx

    raw, onnx_path = staging / "raw", staging / "model.onnx"
    _embed_metadata(built.proto, meta)
    onnx.save_model(built.proto, str(onnx_path), save_as_external_data=False)
    if built.int8["kept"]:
        proto8 = onnx.load(str(raw / INT8_FILE))
        _embed_metadata(proto8, {**meta, "precision": "int8"})
        onnx.save_model(proto8, str(staging / INT8_FILE), save_as_external_data=False)
        onnx.checker.check_model(str(staging / INT8_FILE))
    shutil.rmtree(raw)
    onnx.checker.check_model(str(onnx_path), full_check=True)
    meta["sha256"] = sha256_file(onnx_path)
    if built.int8["kept"]:
        meta["int8"]["sha256"] = sha256_file(staging / INT8_FILE)
    meta["reference"] = write_reference(src.model, src.test, src.transform, staging / REFERENCE_FILE)
    write_json(staging / "metadata.json", meta)
    atomic_write_text(staging / "model_card.md", model_card(meta, src.metrics, src.validation))


def write_reference(model, samples: list, transform, path: Path) -> dict[str, Any]:
    """The first REFERENCE_IMAGES test images (decoded RGB, original size) and torch's logits for them.

    A server loads the file (np.load, allow_pickle=False), preprocesses the images its own way and runs the
    ONNX file: the end-to-end parity of this version in the serving environment, against torch itself.
    """
    import numpy as np
    import torch

    imgs = [rgb_image(p) for p, _ in samples[:REFERENCE_IMAGES]]
    with torch.inference_mode():
        logits = model(torch.stack([transform(im) for im in imgs])).float().numpy()
    arrays = {f"image{i}": np.asarray(im, dtype=np.uint8) for i, im in enumerate(imgs)}
    np.savez_compressed(path, logits=logits.astype(np.float32), **arrays)  # in export's temp folder: no half file
    return {"file": REFERENCE_FILE, "n": len(imgs), "sha256": sha256_file(path)}


def _metadata(src: ExportInputs, built: BuildResult, name: str, version: int) -> dict[str, Any]:
    """metadata.json: the contract keys (REQUIRED_KEYS) first, then the extras a reader and a server use."""
    return {**_contract(src, built), **_extras(src, built, name, version)}


def _contract(src: ExportInputs, built: BuildResult) -> dict[str, Any]:
    cfg, parity, ep = src.cfg, built.parity, src.params.export
    return {
        "classes": src.classes,
        "input_size": [int(v) for v in cfg["input_size"]],
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "opset": int(built.opset),
        "sha256": None,  # of model.onnx, filled in once the file is final
        "parity": {
            **{
                k: parity[k]
                for k in ("max_abs_diff", "top1_agreement", "n_images", "batch_sizes", "n_compared", "max_abs_logit")
            },
            "atol": ep.parity_atol,
            "min_top1_agreement": ep.min_top1_agreement,
        },
        "source_model": src.fmeta.get("source_model") or src.metrics.get("model"),
        "data_md5": src.metrics.get("data_md5"),
        "git_rev": git_rev(Path(__file__).resolve().parent),
        "params": src.params.model_dump(mode="json"),
    }


def _extras(src: ExportInputs, built: BuildResult, name: str, version: int) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    cfg, metrics, parity, validation = src.cfg, src.metrics, built.parity, src.validation
    side = (int(cfg["input_size"][1]), int(cfg["input_size"][2]))
    baseline = (validation or {}).get("baseline")
    return {
        "name": name,
        "version": version,
        "interpolation": cfg.get("interpolation"),
        "preprocess": {  # what zoo.eval_transform does; serving must do the same
            "resize_shorter_side": side[0],
            "center_crop": list(side),
            "interpolation": cfg.get("interpolation"),
            "scale": "pixel / 255",
            "normalize": "(x - mean) / std",
        },
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "layout": "NCHW float32 RGB, pixel/255 then (x - mean) / std; batch dim dynamic",
        "exporter": built.how["exporter"],
        "fallback_reason": built.how["fallback_reason"],
        "provider": parity["provider"],  # the one that actually ran the parity check
        "providers": [p if isinstance(p, str) else p[0] for p in execution_providers()],  # requested, in order
        "int8": built.int8,
        "triton": {
            "config": f"../{TRITON_CONFIG}",
            "backend": "onnxruntime",
            "max_batch_size": src.params.export.triton_max_batch_size,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "forced": bool(src.force and src.closed),
        "validation": {
            "passed": (validation or {}).get("passed"),
            "reasons": (validation or {}).get("reasons", []),
            "gate": src.closed or "passed",
        },
        "source_sha256": src.fmeta.get("source_sha256") or None,
        "strategy": src.fmeta.get("strategy") or metrics.get("strategy"),
        "strategy_reason": metrics.get("strategy_reason"),
        "shift": metrics.get("shift"),  # train's record of drift.json (None: not measured)
        "test_accuracy": metrics.get("test_accuracy"),
        "onnx_test_accuracy": parity["onnx_test_accuracy"],
        "torch_test_accuracy": parity["torch_test_accuracy"],
        "baseline": baseline if isinstance(baseline, dict) else None,
        "transfer": transfer_record(validation),
        "run": str(src.run),
        "checkpoint_sha256": sha256_file(src.ckpt),
        "warnings": src.warn,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def _embed_metadata(proto, meta: dict) -> None:
    """Copy the metadata into model.metadata_props (values JSON-encoded unless already strings).

    "sha256" is the one key left out: a file cannot contain its own hash; metadata.json carries it.
    """
    ours = {k: v for k, v in meta.items() if k != "sha256"}
    kept = [p for p in proto.metadata_props if p.key not in ours]
    del proto.metadata_props[:]
    for p in kept:  # the exporter's own pkg.torch.* entries
        proto.metadata_props.add(key=p.key, value=p.value)
    for k, v in ours.items():
        proto.metadata_props.add(key=k, value=v if isinstance(v, str) else json.dumps(v))
    proto.model_version = int(meta["version"])
    proto.doc_string = f"transferkit {meta['name']} v{meta['version']}: {len(meta['classes'])}-class image classifier"
