"""The model card (model_card.md) written beside each version: model, data, transfer verdict against the baselines, checks and provenance, all rendered from metadata.json and the validation result."""

from __future__ import annotations

from pathlib import Path

from transferkit.core.results import GateResult
from transferkit.modelrepo.repository import (
    INT8_FILE,
)

# --------------------------------------------------------------------------- model card


def transfer_record(validation) -> dict | None:
    """The gain verdict and every baseline from validation.json (the model card's "Transfer" table)."""
    if not isinstance(validation, dict) or "verdict" not in validation:
        return None
    keep = (
        "name",
        "description",
        "strategy",
        "model",
        "val_accuracy",
        "test_accuracy",
        "gain",
        "interval",
        "p_value",
        "broken",
        "broken_reason",
        "kind",
    )
    return {
        "verdict": validation.get("verdict"),
        "message": validation.get("verdict_message"),
        "gain": validation.get("transfer_gain"),
        "interval": validation.get("gain_interval"),
        "p_value": validation.get("gain_p_value"),
        "gain_metric": validation.get("gain_metric", "accuracy"),
        "test_accuracy": validation.get("test_accuracy"),
        "val_accuracy": validation.get("val_accuracy"),
        "recommendation": validation.get("recommendation"),
        "baselines": [{k: b[k] for k in keep if k in b} for b in validation.get("baselines", [])],
    }


def _transfer_lines(transfer: dict | None) -> list[str]:
    if not transfer:
        return []
    return ["", *GateResult.from_transfer(transfer).markdown("##")]


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


def _shift_line(shift: dict | None) -> str:
    if not shift:
        return "not measured (train ran without a drift.json; run `transferkit drift` against the source data)"
    what = (
        "task mismatch (the label sets differ)" if shift.get("task_mismatch") else f"views fired: {shift.get('method')}"
    )
    report = f"; report `{shift['report']}`" if shift.get("report") else ""
    return (
        f"**{shift.get('severity')}** (detected: {shift.get('drift_detected')}) between `{shift.get('reference')}` "
        f"and `{shift.get('current')}` ({shift.get('n_reference')} / {shift.get('n_current')} images); {what}{report}"
    )


def model_card(meta: dict, metrics: dict, validation: dict | None) -> str:
    """model_card.md: the model, its data and metrics, parity, int8, limitations and provenance."""
    parts = [*_card_model(meta), *_card_data(meta, metrics), *_card_errors(meta, validation)]
    return "\n".join([*parts, *_card_checks(meta), *_card_provenance(meta)])


def _card_errors(meta: dict, validation: dict | None) -> list[str]:
    """A link to validate's error-analysis page in the run folder (transferkit.report), when it wrote one."""
    rep = (validation or {}).get("errors_report")
    if not isinstance(rep, dict) or not rep.get("path"):
        return []
    pairs = ", ".join(f"{t} -> {p} ({n})" for t, p, n in rep.get("confused_pairs") or []) or "none"
    return [
        "## Error analysis",
        f"- [{Path(meta['run']) / rep['path']}]({(Path(meta['run']) / rep['path']).resolve().as_uri()}): "
        "highest-loss test and train images, most confused class pairs, train labels a held-out fit doubts",
        f"- Most confused (test): {pairs}; label-error candidates in train: {rep.get('label_doubts', 0)}",
        "",
    ]


def _card_model(meta: dict) -> list[str]:
    h, w = meta["input_size"][1], meta["input_size"][2]
    return [
        f"# {meta['name']} v{meta['version']}",
        "",
        f"An image classifier for {len(meta['classes'])} classes, adapted by transfer learning from "
        f"`{meta['source_model']}` and exported to ONNX (opset {meta['opset']}, {meta['exporter']} exporter).",
        "",
        "## Model",
        f"- Source model: `{meta['source_model']}`"
        + (f" (weights sha256 `{meta['source_sha256'][:16]}...`)" if meta.get("source_sha256") else ""),
        f"- Strategy: `{meta['strategy']}`" + (f": {meta['strategy_reason']}" if meta.get("strategy_reason") else ""),
        f"- Classes: {', '.join(f'`{c}`' for c in meta['classes'])}",
        f"- Input `{meta['input_name']}`: float32 [N, 3, {h}, {w}], N dynamic. Preprocessing: RGB; resize the "
        f"shorter side to {h} px ({meta.get('interpolation')}), centre-crop {h}x{w} (nothing is cut from "
        f"square images); scale to 0..1; (x - mean) / std with mean {meta['mean']} and std {meta['std']}.",
        f"- Output `{meta['output_name']}`: float32 [N, {len(meta['classes'])}] logits (softmax for probabilities).",
        "",
    ]


def _card_data(meta: dict, metrics: dict) -> list[str]:
    gate = "passed" if not meta["forced"] else f"**forced past a closed gate**: {meta['validation']['gate']}"
    return [
        "## Data",
        f"- Target data: `{metrics.get('target')}`, md5 `{meta['data_md5']}`; "
        f"{metrics.get('n_train')} train / {metrics.get('n_val')} val / {metrics.get('n_test')} test images, "
        f"{metrics.get('labels_per_class')} labels per class at least",
        f"- Domain shift: {_shift_line(meta.get('shift'))}",
        f"- Validation gate: {gate}",
        "",
        "## Metrics",
        f"- Test accuracy (torch, from training): {_vs_baseline(meta)}",
        f"- Test accuracy of this ONNX file: {_pct(meta.get('onnx_test_accuracy'))} on "
        f"{meta['parity']['n_images']} test images",
        f"- Train / validation accuracy: {_pct(metrics.get('train_accuracy'))} / {_pct(metrics.get('val_accuracy'))}"
        f" (best epoch {metrics.get('best_epoch')} of {metrics.get('epochs')})",
        *_transfer_lines(meta.get("transfer")),
        "",
    ]


def _vs_baseline(meta: dict) -> str:
    baseline = meta.get("baseline") or {}
    base_acc, test_acc = baseline.get("test_accuracy"), meta.get("test_accuracy")
    if not (isinstance(base_acc, (int, float)) and isinstance(test_acc, (int, float))):
        return f"{_pct(test_acc)} (no baseline recorded in validation.json)"
    what = baseline.get("description") or baseline.get("strategy", "baseline")
    return (
        f"{_pct(test_acc)} vs {_pct(base_acc)} for the best no-transfer baseline ({what}; "
        f"{100 * (test_acc - base_acc):+.1f} points)"
    )


def _card_checks(meta: dict) -> list[str]:
    p, int8 = meta["parity"], meta["int8"]
    lines = [
        "## Parity (onnxruntime vs torch)",
        f"- Max abs logit difference {p['max_abs_diff']:.3g} (allowed {p['atol']:g}), top-1 agreement "
        f"{p['top1_agreement']:.4f} (required {p['min_top1_agreement']:g})",
        f"- {p['n_compared']} comparisons on the real test split at batch sizes {p['batch_sizes']}, "
        f"execution provider `{meta['provider']}`",
        "",
        "## int8",
        f"- {int8['reason']}" + (f"; file `{INT8_FILE}` sha256 `{int8['sha256']}`" if int8["kept"] else ""),
        "",
        "## Limitations",
        "- Trained on a small target set: expect lower accuracy on images unlike it (other sensors, "
        "backgrounds, resolutions); monitor drift on served inputs.",
        "- The model expects the exact preprocessing above; other resizing or normalisation degrades it.",
        "- It always answers with one of its classes; it has no 'unknown' output.",
        "- Parity was measured on the CPU/GPU provider named above; other providers or quantisation "
        "need their own check.",
    ]
    if meta.get("warnings"):
        lines += ["", "## Warnings", *[f"- {w}" for w in meta["warnings"]]]
    return lines


def _card_provenance(meta: dict) -> list[str]:
    return [
        "",
        "## Provenance",
        f"- Run: `{meta['run']}`, checkpoint sha256 `{meta['checkpoint_sha256']}`",
        f"- model.onnx sha256 `{meta['sha256']}`",
        f"- Code revision: `{meta['git_rev']}`; created {meta['created']}",
        f"- torch {meta['versions']['torch']}, onnx {meta['versions']['onnx']}, "
        f"onnxruntime {meta['versions']['onnxruntime']}",
        "",
    ]
