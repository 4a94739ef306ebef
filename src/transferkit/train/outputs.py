"""What a train run writes into OUT: metrics.json (with the shift summary for the model card), history.csv, params.yaml, the checkpoint, and test_logits.npz that validate and export read back instead of repeating a forward pass."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import numpy as np

from transferkit.core.config import Params, dump_params
from transferkit.train.fit import Fit


def build_metrics(fit: Fit, ds, params: Params, target, model: str, drift, drift_report, search) -> dict:
    """metrics.json (the train contract in docs/stages.md, plus what explains the run)."""
    t, lm = params.train, fit.lm
    drop_path_blocks = sum(1 for m in lm.model.modules() if float(getattr(m, "drop_prob", 0) or 0) > 0)
    info = {k: v for k, v in fit.info.items() if k != "spec"}
    return {
        "model": model,
        "strategy": fit.strategy,
        "strategy_reason": fit.reason,
        "train_accuracy": fit.acc["train"],
        "val_accuracy": fit.acc["val"],
        "test_accuracy": fit.acc["test"],
        "best_epoch": fit.best_epoch,
        "epochs": len(fit.history),
        "history": fit.history,
        "target": str(target),
        "data_md5": ds.md5,
        "classes": ds.classes,
        "labels_per_class": ds.min_per_class("train"),
        "n_train": len(ds.splits["train"]),
        "n_val": len(ds.splits["val"]),
        "n_test": len(ds.splits["test"]),
        "image_size": int(lm.data_config["input_size"][-1]),
        "seed": params.seed,
        "skipped_files": len(ds.skipped),
        "device": "cuda" if _cuda() else "cpu",
        **info,
        "layer_decay": t.layer_decay if fit.strategy in ("partial", "full", "lp-ft") else None,
        "drop_path": {"rate": t.drop_path_rate, "blocks": drop_path_blocks},  # blocks that really drop
        "shift": shift_summary(drift_report, drift),
        "search": search,
    }


def write_run(out: Path, fit: Fit, ds, params: Params, model: str, metrics: dict, t_start: float) -> None:
    """The run folder: checkpoint (its sha256 into metrics), history.csv, params.yaml, metrics.json."""
    from transferkit.core.io import atomic_write_text, write_json
    from transferkit.models import zoo

    lm = fit.lm
    meta = {
        "arch": lm.arch,
        "num_classes": str(len(ds.classes)),
        "classes": ds.classes,
        "data_config": lm.data_config,
        "source_model": model,
        "source_sha256": lm.weights_sha256 or "",
        "strategy": fit.strategy,
        "data_md5": ds.md5,
    }
    metrics["checkpoint_sha256"] = zoo.save_checkpoint(lm.model, out / "model.safetensors", meta)
    if fit.test_logits is not None:
        write_test_logits(out, ds.splits["test"], fit.test_logits, metrics["checkpoint_sha256"])
    metrics["seconds"] = round(time.perf_counter() - t_start, 2)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fit.history[0]))
    w.writeheader()
    w.writerows(fit.history)
    atomic_write_text(out / "history.csv", buf.getvalue())
    dump_params(params, out / "params.yaml")
    write_json(out / "metrics.json", metrics)
    (out / "checkpoint.pt").unlink(missing_ok=True)  # finished: nothing left to resume


TEST_LOGITS = "test_logits.npz"


def write_test_logits(out: Path, samples: list, logits: np.ndarray, checkpoint_sha256: str) -> None:
    """OUT/test_logits.npz: the shipped model's test logits as train computed them, keyed by image, with the
    checkpoint's sha256. validate checks the checkpoint against a sample of them and reuses the rest; export's
    parity compares onnxruntime with them: neither repeats a forward pass over the whole test split."""
    import io

    from transferkit.core.io import atomic_write_bytes
    from transferkit.models.embed import row_key

    buf = io.BytesIO()
    keys = np.array([row_key(p) for p, _ in samples])
    np.savez(buf, keys=keys, logits=np.asarray(logits, np.float32), checkpoint_sha256=np.array(checkpoint_sha256))
    atomic_write_bytes(out / TEST_LOGITS, buf.getvalue())


def read_test_logits(run: Path, samples: list, checkpoint_sha256: str | None) -> np.ndarray | None:
    """The stored test logits of `samples` (in their order), or None when absent, damaged, written for another
    checkpoint or missing an image."""
    from transferkit.models.embed import row_key

    path = Path(run) / TEST_LOGITS
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            keys, logits, sha = z["keys"].tolist(), z["logits"], str(z["checkpoint_sha256"])
    except (OSError, ValueError, KeyError):
        return None
    if checkpoint_sha256 is None or sha != checkpoint_sha256:
        return None
    index = {k: i for i, k in enumerate(keys)}
    rows = [index.get(row_key(p)) for p, _ in samples]
    return None if any(r is None for r in rows) else logits[rows]


def shift_summary(drift_report: dict | None, path: Path | None) -> dict | None:
    """What the drift stage said about this target (carried to the model card), or None if not measured."""
    if not drift_report:
        return None
    keys = (
        "drift_detected",
        "severity",
        "method",
        "score",
        "threshold",
        "n_reference",
        "n_current",
        "task_mismatch",
        "reference",
        "current",
    )
    return {
        **{k: drift_report.get(k) for k in keys},
        "report": str(Path(path).with_name("drift.html")) if path else None,
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
