"""The export stage entry point run_export: read the run, convert, pass the parity gate, quantise, publish, and on any failure leave the repository exactly as it was."""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import suppress
from pathlib import Path
from typing import Any

from transferkit.core.config import Params
from transferkit.export.convert import ExportError, check_graph, export_onnx, parity_check
from transferkit.export.inputs import ExportInputs, read_inputs
from transferkit.export.publish import BuildResult, publish_version
from transferkit.export.quantize import quantize_int8
from transferkit.modelrepo.repository import (
    INT8_FILE,
    list_versions,
    open_staging,
    sanitize_name,
)

log = logging.getLogger("transferkit.export")


def run_export(
    run: Path,
    repo: Path,
    params: Params | None = None,
    force: bool = False,
    progress: bool = True,
    promote: bool = True,
) -> dict:
    """Export RUN's checkpoint to REPO/<name>/<version>/ and return its metadata plus "path".

    promote=False publishes the version without moving `latest` (the flow records it in DVC first).

    `params` defaults to RUN/params.yaml; its `export` group names the model and sets opset and the
    parity tolerances. The test split is rebuilt with the run's own seed and fractions, so parity is
    measured on exactly the images the run was tested on.
    """
    from tqdm import tqdm

    src = read_inputs(Path(run), params, force)
    name = sanitize_name(src.params.export.name or Path(src.target).name)
    model_dir = Path(repo) / name
    created = [p for p in (model_dir, *model_dir.parents) if not p.exists()]  # to remove on failure
    model_dir.mkdir(parents=True, exist_ok=True)
    staging, held, cleaned = open_staging(model_dir)
    if cleaned:
        log.warning("removed leftovers of killed exports in %s: %s", model_dir, ", ".join(cleaned))
    steps = tqdm(total=4, desc="export", unit="step", disable=not progress)
    try:
        built = _build(src, staging, steps, progress)
        steps.set_postfix_str("publish")
        meta = publish_version(src, built, staging, model_dir, promote)
        steps.update()
    except BaseException:
        _undo(staging, model_dir, created)
        raise
    finally:
        steps.close()
        if held is not None:
            os.close(held)
    return {**meta, "path": str(model_dir / str(meta["version"]))}


def _build(src: ExportInputs, staging: Path, steps, progress: bool) -> BuildResult:
    """ONNX export, parity gate, int8: all inside STAGING/raw, the exporter's own folder (anything it writes
    beside the file dies with it)."""
    raw = staging / "raw"
    raw.mkdir()
    steps.set_postfix_str("onnx export")
    how, proto, opset = _to_onnx(src, raw / "model.onnx")
    steps.update()
    steps.set_postfix_str("parity")
    parity = _parity_gate(src, raw / "model.onnx", progress)
    steps.update()
    steps.set_postfix_str("int8")
    int8 = quantize_int8(
        raw / "model.onnx",
        raw / INT8_FILE,
        src.train,
        src.test,
        src.transform,
        parity["onnx_test_accuracy"],
        src.params.export,
        seed=src.seed,
    )
    steps.update()
    return BuildResult(proto=proto, opset=opset, how=how, parity=parity, int8=int8)


def _to_onnx(src: ExportInputs, path: Path) -> tuple[dict, Any, int]:
    """(how it was exported, the loaded graph, its real opset), after the graph and full checker checks."""
    import onnx

    opset = src.params.export.opset
    how = export_onnx(src.model, src.example, path, opset, src.params.export.exporter)
    proto = onnx.load(str(path), load_external_data=True)
    actual = check_graph(proto, opset, len(src.classes))
    onnx.checker.check_model(str(path), full_check=True)
    return how, proto, actual


def _parity_gate(src: ExportInputs, path: Path, progress: bool) -> dict[str, Any]:
    """parity_check on the test split; ExportError unless it is within export.parity_atol and agreement."""
    from transferkit.train.outputs import read_test_logits

    reference = read_test_logits(src.run, src.test, src.metrics.get("checkpoint_sha256"))
    parity = parity_check(src.model, path, src.test, src.transform, progress=progress, reference=reference)
    atol, min_agree = src.params.export.parity_atol, src.params.export.min_top1_agreement
    if not parity["max_abs_diff"] <= atol or parity["top1_agreement"] < min_agree:
        raise ExportError(
            f"ONNX parity failed on {parity['n_images']} test images of {src.target}: max abs logit diff "
            f"{parity['max_abs_diff']:.3g} (allowed {atol:g}, largest |logit| {parity['max_abs_logit']:.3g}), "
            f"top-1 agreement {parity['top1_agreement']:.4f} (required {min_agree:g}); nothing was published"
        )
    return parity


def _undo(staging: Path, model_dir: Path, created: list[Path]) -> None:
    """A failed export leaves the repository as it was: its staging folder and any folder it made go."""
    shutil.rmtree(staging, ignore_errors=True)
    if created and not list_versions(model_dir):
        with suppress(OSError):
            (model_dir / ".lock").unlink()
    for p in created:  # deepest first; only folders this call made, and only if empty
        with suppress(OSError):
            p.rmdir()
