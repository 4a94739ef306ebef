"""The quality report of the shipped checkpoint on the test split: per-class precision/recall/F1, the confusion matrix, macro F1, balanced accuracy and the expected calibration error. Writes RUN/report.json, RUN/confusion.csv and RUN/reliability.csv (DVC plots) and the figures."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from transferkit.core.config import Params
from transferkit.validate.figures import write_plots
from transferkit.validate.predict import predict_test

# --------------------------------------------------------------------------------------------------
# quality report


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> tuple[float, list]:
    """ECE over `n_bins` equal-width bins of (0, 1] on the max probability; returns (ece, per-bin rows).

    ECE = sum_b n_b / N * |accuracy_b - mean confidence_b|; empty bins contribute nothing.
    """
    confidence, correct = np.asarray(confidence, float), np.asarray(correct, float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin b holds (edges[b], edges[b+1]]; a confidence of exactly 0 cannot occur for a softmax max
    idx = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    rows, ece, n = [], 0.0, max(len(confidence), 1)
    for b in range(n_bins):
        m = idx == b
        cnt = int(m.sum())
        conf = float(confidence[m].mean()) if cnt else None
        acc = float(correct[m].mean()) if cnt else None
        if cnt:
            ece += cnt / n * abs(acc - conf)
        rows.append(
            {
                "bin": b,
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": cnt,
                "confidence": conf,
                "accuracy": acc,
            }
        )
    return float(ece), rows


def quality_report(run: Path, metrics: dict, params: Params, predictions=None) -> dict:
    """Per-class table, confusion matrix, ECE and plots for the shipped checkpoint (module docstring).

    `predictions`: (probs, labels, classes) from predict_test, when the caller has them already."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    from transferkit.core.imbalance import balanced_accuracy
    from transferkit.core.io import atomic_write_text, write_json

    probs, y, classes = predictions if predictions is not None else predict_test(run, metrics, params)
    labels = list(range(len(classes)))
    pred = probs.argmax(1)
    prec, rec, f1, sup = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    cm = confusion_matrix(y, pred, labels=labels)
    conf = probs.max(1)
    ece, bins = expected_calibration_error(conf, pred == y, params.validate.calibration_bins)
    per_class = {
        c: {
            "precision": round(float(prec[i]), 6),
            "recall": round(float(rec[i]), 6),
            "f1": round(float(f1[i]), 6),
            "support": int(sup[i]),
        }
        for i, c in enumerate(classes)
    }
    plots_dir = run / "plots"
    report = {
        "split": "test",
        "n": int(len(y)),
        "accuracy": round(float((pred == y).mean()), 6),
        "accuracy_in_metrics": metrics["test_accuracy"],
        "macro_f1": round(float(f1_score(y, pred, labels=labels, average="macro", zero_division=0)), 6),
        "balanced_accuracy": round(balanced_accuracy(pred == y, y), 6),
        "ece": round(ece, 6),
        "ece_bins": params.validate.calibration_bins,
        "mean_confidence": round(float(conf.mean()), 6),
        "classes": classes,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),  # rows: actual, columns: predicted, in `classes` order
        "reliability": bins,
        "plots": {k: str(Path("plots") / f"{k}.png") for k in ("confusion", "reliability", "learning_curves")},
    }
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["actual", "predicted"])
    w.writerows([classes[a], classes[p]] for a, p in zip(y.tolist(), pred.tolist()))
    atomic_write_text(run / "confusion.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["bin", "confidence", "accuracy", "count"])
    w.writerows([r["bin"], r["confidence"], r["accuracy"], r["count"]] for r in bins if r["count"])
    atomic_write_text(run / "reliability.csv", buf.getvalue())
    write_plots(plots_dir, report, metrics)
    write_json(run / "report.json", report)
    return report
