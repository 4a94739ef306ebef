"""Imbalanced classes: when the training labels are skewed, weight the loss and judge on balanced accuracy.

    from transferkit.core.imbalance import decide, loss_weights, balanced_comparison

The rule (`train.class_weights`, `train.imbalance_ratio`):
  skew = the largest class count / the smallest in the train split.
  auto  weights the loss (fine-tune cross-entropy, the SGD head, the L-BFGS probe) when skew >= imbalance_ratio
  on    always weights; off never does.
Weights are scikit-learn's "balanced" ones, n / (classes * count_c): every class carries the same total weight,
so a 500:20 split is fitted as if it were 20:20 on average and its minority is not ignored.

Judging: with skewed train labels (skew >= imbalance_ratio, whatever the weighting) the gate's gain is measured on
balanced accuracy (the mean per-class recall), model and baseline on the same test images (balanced_comparison):
plain accuracy rewards predicting the majority, which is exactly what a skewed fit drifts to. Balanced classes keep
plain accuracy (on a balanced test split the two are equal anyway).

`imbalanced_counts` is the built-in imbalanced target's train sizes (`data builtin ... --imbalance RATIO`):
geometric decay from the first class to the last.
"""

from __future__ import annotations

import numpy as np

METRICS = ("accuracy", "balanced_accuracy")


def imbalanced_counts(n_max: int, ratio: float, n_classes: int) -> list[int]:
    """Class sizes decaying geometrically from `n_max` (first class) to `n_max / ratio` (last), each >= 1."""
    if n_classes == 1:
        return [n_max]
    return [max(1, int(round(n_max * ratio ** (-c / (n_classes - 1))))) for c in range(n_classes)]


def label_counts(labels, n_classes: int) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)[:n_classes]


def skew(counts) -> float:
    """Largest over smallest class count (inf when a class has no label)."""
    c = np.asarray(counts, dtype=np.float64)
    return float("inf") if c.min() <= 0 else float(c.max() / c.min())


def decide(labels, n_classes: int, mode: str, ratio: float) -> dict:
    """{weighted, skewed, skew, train_counts, threshold, metric, reason}: whether the loss is class-weighted and
    which metric judges the gain (module docstring)."""
    counts = label_counts(labels, n_classes)
    s = skew(counts)
    skewed = s >= ratio
    weighted = mode == "on" or (mode == "auto" and skewed)
    said = f"train label counts {int(counts.min())}..{int(counts.max())} (max/min {s:.1f})"
    if mode == "auto":
        why = (
            f"{said} >= train.imbalance_ratio {ratio:g}: class-weighted loss (balanced weights), gain judged on "
            "balanced accuracy"
            if skewed
            else f"{said} < train.imbalance_ratio {ratio:g}: classes balanced enough, plain loss"
        )
    else:
        why = f"{said}: train.class_weights {mode}" + (", gain judged on balanced accuracy" if skewed else "")
    return {
        "weighted": bool(weighted),
        "skewed": bool(skewed),
        "skew": round(s, 4) if np.isfinite(s) else None,
        "train_counts": counts.tolist(),
        "threshold": ratio,
        "mode": mode,
        "metric": "balanced_accuracy" if skewed else "accuracy",
        "reason": why,
    }


def balanced_weights(labels, n_classes: int) -> np.ndarray:
    """Per-class weights n / (classes present * count_c); 0 for a class without labels."""
    counts = label_counts(labels, n_classes).astype(np.float64)
    present = counts > 0
    w = np.zeros(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


def loss_weights(labels, n_classes: int, train_params) -> np.ndarray | None:
    """The class weights a loss over `labels` uses under `train_params` (TrainParams), or None (plain loss)."""
    d = decide(labels, n_classes, train_params.class_weights, train_params.imbalance_ratio)
    return balanced_weights(labels, n_classes) if d["weighted"] else None


def balanced_accuracy(correct, labels) -> float:
    """Mean over the classes present of the share of their images predicted right."""
    correct, labels = np.asarray(correct, bool), np.asarray(labels)
    classes = np.unique(labels)
    return float(np.mean([correct[labels == c].mean() for c in classes])) if len(classes) else float("nan")


def scores(y, pred, n_classes: int) -> dict:
    """accuracy, balanced accuracy and macro F1 of predictions `pred` against `y`."""
    from sklearn.metrics import f1_score

    y, pred = np.asarray(y), np.asarray(pred)
    return {
        "accuracy": round(float((y == pred).mean()), 6),
        "balanced_accuracy": round(balanced_accuracy(y == pred, y), 6),
        "macro_f1": round(float(f1_score(y, pred, labels=list(range(n_classes)), average="macro", zero_division=0)), 6),
    }


def balanced_comparison(model_correct, base_correct, labels, confidence: float = 0.95) -> dict:
    """Balanced-accuracy difference (model - baseline) on the same images, with its interval and p-value.

    The gain is the mean over classes of each class's paired recall difference; its variance is the sum of the
    per-class paired (Wald) variances over classes^2, the stratified form of baselines.paired_comparison's
    interval; the p-value is the two-sided normal test of gain / se. Same keys as paired_comparison."""
    from scipy.stats import norm

    a, b_, y = np.asarray(model_correct, bool), np.asarray(base_correct, bool), np.asarray(labels)
    if a.shape != b_.shape or a.shape != y.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"balanced comparison needs equal, non-empty vectors; got {a.shape}, {b_.shape}, {y.shape}")
    classes = np.unique(y)
    k = len(classes)
    gain, var = 0.0, 0.0
    for c in classes:
        m = y == c
        n = int(m.sum())
        b = int((a[m] & ~b_[m]).sum())
        cc = int((~a[m] & b_[m]).sum())
        gain += (b - cc) / n / k
        var += max(b + cc - (b - cc) ** 2 / n, 0.0) / n**2 / k**2
    z = float(norm.ppf(0.5 + confidence / 2))
    se = float(np.sqrt(var))
    p = 1.0 if se == 0 else float(2 * norm.sf(abs(gain) / se))
    return {
        "gain": round(gain, 6),
        "interval": [round(gain - z * se, 6), round(gain + z * se, 6)],
        "confidence": confidence,
        "p_value": p,
        "model_only": int((a & ~b_).sum()),
        "baseline_only": int((~a & b_).sum()),
        "n": len(a),
        "metric": "balanced_accuracy",
    }


def judge_rows(rows: list[dict], model_correct, test_labels, val_labels, confidence: float) -> dict:
    """Re-judge the gate's no-transfer rows on balanced accuracy, in place: each row's test/val balanced accuracy,
    and its gain, interval and p-value against the model (same test images, balanced_comparison). The bar is then
    chosen on val balanced accuracy (`val_accuracy_judged`). Returns the model's test balanced accuracy."""
    for r in rows:
        r["test_balanced_accuracy"] = round(balanced_accuracy(r["test_correct"], test_labels), 6)
        r["val_balanced_accuracy"] = round(balanced_accuracy(r["val_correct"], val_labels), 6)
        r.update(balanced_comparison(model_correct, r["test_correct"], test_labels, confidence))
    return {"test_balanced_accuracy": round(balanced_accuracy(model_correct, test_labels), 6)}


def gate_metric(metrics: dict) -> dict:
    """The metric the gate judges a run on, from train's record (metrics.json `imbalance`): balanced accuracy
    when the train labels were skewed; accuracy otherwise, and for runs recorded before the rule."""
    imb = metrics.get("imbalance") or {}
    if not imb:
        return {"metric": "accuracy", "reason": "no train label counts recorded (a run from before the rule)"}
    return {"metric": imb.get("metric", "accuracy"), "reason": imb.get("reason", "")}
