"""The gate between training and export: overfitting and negative transfer are caught here.

    transferkit validate --run runs/demo/train

Negative-transfer guard (blocking while `validate.require_gain`). Transfer must beat what a user could do
without it, on the same splits (transferkit.baselines; every baseline trains on train, tunes on val):
  pixels-logreg / pixels-knn / pixels-svm   scikit-learn on raw pixels (seconds on CPU)
  small-cnn                                 a small CNN from random init, LR chosen on val
  scratch                                   the same architecture from random init, same budget
                                            (RUN/baseline/, or `--baseline DIR`)
A baseline whose val accuracy is not above chance is `broken`: listed, never the bar. The bar (`baseline`)
is the working baseline with the best val accuracy. `transfer_gain` is test accuracy minus the bar's, with
a paired interval (`gain_interval`, `validate.confidence`) and McNemar's exact p-value on the same test
images. Verdicts: "transfer helps" (lower bound > `validate.min_gain`), "negative transfer" (upper bound
< 0), "no clear gain" (in between: within test noise). Only the first passes. On a refusal,
`recommendation` names the better model, the likely reason from the drift verdict, and the options
(more labels, a closer source, another strategy, `export --force`).
  linear-probe     for runs that are not linear probes: the frozen source features with a linear head,
                   same budget (RUN/baseline_linear_probe/). Losing by more than
                   `validate.linear_probe_tolerance` blocks while `require_match_linear_probe`.
The scratch and linear-probe runs are reused when their folder saw the same data md5, seed and params.

Overfitting checks on RUN/metrics.json, each recorded in validation.json `checks` as {name, value,
threshold, failed, blocking, message}:
  accuracy_gap     train - val accuracy of the shipped (best) epoch > `validate.max_gap`. Blocking only
                   with worse generalisation (val accuracy no better than the best no-transfer
                   baseline's); otherwise a warning. With 10 labels per class a linear probe reaches
                   train accuracy 1.0 by construction: a 10-shot probe with a 0.26 gap that beat every
                   baseline by 9 test points is a good model, not an overfit one.
  loss_gap         val loss - train loss at the best epoch > `validate.max_loss_gap` (nats); blocking on the
                   same terms. The history's train loss includes label smoothing, dropout, augmentation.
  divergence       Longest run of consecutive epochs in which val loss sits above its best so far while
                   train loss is below its value at that best epoch, > `train.patience`: `train.min_epochs`
                   kept a memorising run going. Blocking on the same terms: the checkpoint that ships is
                   the best-val epoch from before the divergence (a probe whose tail diverged can still
                   beat the best no-transfer baseline beyond noise: tests/test_validate.py).
  wasted_epochs    warning. Epochs trained after the best epoch > `train.patience`.
  test_val_gap     warning. |test - val accuracy| > `validate.max_test_val_gap` (selection bias, or too
                   few val images to trust: with 40 images one estimate has a standard error of ~0.06).
Quality report of the shipped checkpoint on the test split (re-evaluated from model.safetensors):
  RUN/report.json        per-class precision/recall/F1/support, confusion matrix, macro F1, accuracy,
                         expected calibration error (ECE: `validate.calibration_bins` equal-width bins of
                         max softmax probability; sum over bins of share * |accuracy - mean confidence|)
  RUN/confusion.csv      one row per test image (actual, predicted): DVC's confusion template
  RUN/reliability.csv    per-bin confidence/accuracy/count (DVC plot)
  RUN/plots/{confusion,reliability,learning_curves}.png
  RUN/errors.html        error analysis (transferkit.report): highest-loss test and train images, the most
                         confused class pairs, train labels a held-out fit doubts; RUN/errors.json the same data
Writes RUN/validation.json with `passed` and plain-words `reasons`.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from transferkit.config import Params, load_params

_OVERFIT_CHECKS = ("accuracy_gap", "loss_gap", "divergence")


def run_validate(run: Path, params: Params | None = None, baseline: Path | None = None, progress: bool = True) -> dict:
    from transferkit.io import read_json, write_json

    run = Path(run)
    metrics = read_json(run / "metrics.json")
    if params is None:
        params = load_params(run / "params.yaml") if (run / "params.yaml").is_file() else Params()

    probs, y, classes = predict_test(run, metrics, params)
    checks = overfitting_checks(metrics, params)
    rows = no_transfer_rows(run, metrics, params, probs.argmax(1) == y, baseline, progress)
    judged = _judged_metric(metrics, params, rows, probs.argmax(1) == y, y)
    from transferkit.baselines import best_baseline

    best = best_baseline(rows, judged["val_key"])
    gain_check = gain_verdict(metrics, best, params, judged)
    _generalisation_rule(checks, metrics, best)
    reasons = [c["message"] for c in checks if c["failed"] and c["blocking"]]
    if gain_check["blocking"]:
        reasons.append(gain_check["message"])

    baselines = [{k: val for k, val in r.items() if k not in ("val_correct", "test_correct")} for r in rows]
    if metrics["strategy"] != "linear-probe":
        lp = _linear_probe_baseline(run, metrics, params, progress)
        baselines.append(lp)
        reasons += _linear_probe_reasons(lp, metrics, params)

    report = quality_report(run, metrics, params, (probs, y, classes))
    result = _validation_result(metrics, params, checks, rows, best, gain_check, reasons, baselines, report, len(y))
    result["errors_report"] = _error_report(run, metrics, params, (probs, y, classes), progress)
    write_json(run / "validation.json", result)
    return result


def _error_report(run: Path, metrics: dict, params: Params, test, progress: bool) -> dict:
    """RUN/errors.html and errors.json (transferkit.report), written once the verdict is decided: report only."""
    from transferkit.report import write_error_report

    train = predict_test(run, metrics, params, "train")
    return write_error_report(run, metrics, params, test, train, progress)


def _linear_probe_reasons(lp: dict, metrics: dict, params: Params) -> list[str]:
    """The blocking reason when the run loses to the frozen-feature linear probe by more than the tolerance."""
    v = params.validate
    lost = lp.get("test_accuracy") is not None and lp["gain"] < -v.linear_probe_tolerance
    if not (lost and v.require_match_linear_probe):
        return []
    return [
        f"negative transfer vs linear probe: {metrics['strategy']} test accuracy "
        f"{metrics['test_accuracy']:.3f} vs linear-probe baseline {lp['test_accuracy']:.3f} "
        f"(gain {lp['gain']:+.3f} < -validate.linear_probe_tolerance {v.linear_probe_tolerance}): "
        "the frozen source features do better; ship the linear probe (--strategy linear-probe)"
    ]


def _validation_result(metrics, params, checks, rows, best, gain_check, reasons, baselines, report, n_test) -> dict:
    """validation.json: the verdict, the reasons and warnings, every check and baseline."""
    gap = float(metrics["train_accuracy"]) - float(metrics["val_accuracy"])
    helps = gain_check["verdict"] == "transfer helps"
    return {
        "passed": not reasons,
        "overfit": any(c["failed"] for c in checks if c["name"] in _OVERFIT_CHECKS),
        "train_val_gap": round(gap, 6),
        "baseline": _contract_baseline(best, metrics),
        "transfer_gain": gain_check["gain"],
        "gain_interval": gain_check["interval"],
        "gain_p_value": gain_check["p_value"],
        "verdict": gain_check["verdict"],
        "verdict_message": gain_check["message"],
        "gain_metric": gain_check["metric"],
        "gain_metric_reason": gain_check["metric_reason"],
        "recommendation": None if helps else recommendation(gain_check, best, metrics),
        "reasons": reasons,
        "warnings": _warnings(checks, gain_check),
        "checks": checks,
        "baselines": baselines,
        "broken_baselines": [r["name"] for r in rows if r.get("broken")],
        "report": {
            "path": "report.json",
            "test_accuracy": report["accuracy"],
            "balanced_accuracy": report["balanced_accuracy"],
            "macro_f1": report["macro_f1"],
            "ece": report["ece"],
            "plots": report["plots"],
        },
        "test_accuracy": metrics["test_accuracy"],
        "val_accuracy": metrics["val_accuracy"],
        "n_test": int(n_test),
        "strategy": metrics["strategy"],
        "model": metrics["model"],
        "thresholds": {**params.validate.model_dump(), "train.patience": params.train.patience},
    }


def _warnings(checks: list[dict], gain_check: dict) -> list[str]:
    """Failed non-blocking checks, then a non-blocking gain verdict other than a pass or a scratch run."""
    out = [c["message"] for c in checks if c["failed"] and not c["blocking"]]
    if gain_check["verdict"] not in ("transfer helps", "not a transfer run") and not gain_check["blocking"]:
        out.append(gain_check["message"])
    return out


# --------------------------------------------------------------------------------------------------
# the negative-transfer guard


def no_transfer_rows(
    run: Path, metrics: dict, params: Params, correct, baseline: Path | None, progress: bool
) -> list[dict]:
    """Every no-transfer baseline of `validate.no_transfer`, each compared with this run on the test images."""
    from transferkit.baselines import DESCRIPTIONS, chance_check, paired_comparison
    from transferkit.data import load_with_params

    v = params.validate
    ds = load_with_params(Path(metrics["target"]), params, seed=int(metrics.get("seed", params.seed)))
    rows = []
    if ("scratch" in v.no_transfer or baseline is not None) and metrics["strategy"] != "scratch":
        bm, folder = _scratch_metrics(run, metrics, params, baseline, progress)
        val_probs, val_y, _ = predict_test(folder, bm, params, "val")
        test_probs, test_y, _ = predict_test(folder, bm, params, "test")
        rows.append(
            {
                "name": "scratch",
                "kind": "no-transfer",
                "description": DESCRIPTIONS["scratch"],
                "strategy": "scratch",
                "model": bm["model"],
                "hyper": {"lr": params.train.scratch_lr, "epochs": bm["epochs"]},
                "val_accuracy": bm["val_accuracy"],
                "test_accuracy": bm["test_accuracy"],
                "epochs": bm["epochs"],
                "seconds": bm.get("seconds"),
                **chance_check(val_probs.argmax(1) == val_y, val_y, v.chance_alpha),
                "val_correct": val_probs.argmax(1) == val_y,
                "test_correct": test_probs.argmax(1) == test_y,
            }
        )
    from transferkit.baselines import cached_no_transfer

    rows = cached_no_transfer(run, ds, params, progress) + rows
    for r in rows:
        r.update(paired_comparison(correct, r["test_correct"], v.confidence))
    return rows


def _judged_metric(metrics: dict, params: Params, rows: list[dict], correct, y) -> dict:
    """The metric the gain is judged on (transferkit.imbalance.gate_metric): with skewed train labels the rows'
    gains are re-measured on balanced accuracy in place (same test images) and the bar is chosen on val
    balanced accuracy. {metric, reason, val_key, model}: `model` is this run's test score on the metric."""
    from transferkit.imbalance import gate_metric, judge_rows

    g = gate_metric(metrics)
    if g["metric"] != "balanced_accuracy":
        return {**g, "val_key": "val_accuracy", "model": metrics["test_accuracy"]}
    from transferkit.data import load_with_params

    ds = load_with_params(Path(metrics["target"]), params, seed=int(metrics.get("seed", params.seed)))
    val_y = np.array([lbl for _, lbl in ds.splits["val"]])
    model = judge_rows(rows, correct, y, val_y, params.validate.confidence)["test_balanced_accuracy"]
    return {**g, "val_key": "val_balanced_accuracy", "model": model}


def gain_verdict(metrics: dict, best: dict | None, params: Params, judged: dict | None = None) -> dict:
    """The gate's gain rule: the interval of the test gain over the best baseline must clear `validate.min_gain`.

    verdict: "transfer helps" (lower bound > min_gain), "negative transfer" (upper bound < 0), "no clear
    gain" (the interval straddles: noise is never called a gain), or "not a transfer run" / "no baseline".
    `judged` (_judged_metric): the metric the gain is on; accuracy by default, balanced accuracy for skewed labels.
    """
    v = params.validate
    metric = (judged or {}).get("metric", "accuracy")
    out = {"gain": None, "interval": None, "p_value": None, "blocking": False, "metric": metric}
    out["metric_reason"] = (judged or {}).get("reason", "")
    if metrics["strategy"] == "scratch":
        return {**out, "gain": 0.0, "verdict": "not a transfer run", "message": "a scratch run is not a transfer"}
    if best is None:
        return {
            **out,
            "verdict": "no baseline",
            "message": "no working no-transfer baseline (none configured, or all at chance): the gain is unmeasured",
        }
    lo, hi = best["interval"]
    n, pct = best["n"], int(round(v.confidence * 100))
    balanced = metric == "balanced_accuracy"
    base_score = best["test_balanced_accuracy"] if balanced else best["test_accuracy"]
    model_score = judged["model"] if balanced else metrics["test_accuracy"]
    stats = (
        f"{best['description']} {base_score:.3f} vs this model {model_score:.3f}"
        f"{' balanced accuracy (skewed train labels)' if balanced else ''} on "
        f"{n:,} test images (gain {best['gain']:+.3f}, {pct}% CI [{lo:+.3f}, {hi:+.3f}], "
        f"{'paired normal-test' if balanced else 'McNemar'} p = {best['p_value']:.2g})"
    )
    if lo > v.min_gain:
        verdict, msg = "transfer helps", f"transfer helps: {stats}"
    elif hi < 0:
        verdict, msg = "negative transfer", f"negative transfer: transfer does not help here: {stats}"
    else:
        verdict = "no clear gain"
        msg = (
            f"no clear gain: transfer does not help here beyond test noise: {stats}; the interval does not clear "
            f"validate.min_gain {v.min_gain}"
        )
    return {
        **out,
        "gain": best["gain"],
        "interval": [lo, hi],
        "p_value": best["p_value"],
        "verdict": verdict,
        "message": msg,
        "blocking": v.require_gain and verdict != "transfer helps",
    }


def recommendation(gain: dict, best: dict | None, metrics: dict) -> dict:
    """What to do when transfer does not clearly help: the better model, the likely reason, the options."""
    shift = metrics.get("shift") or {}
    if shift.get("task_mismatch"):
        why = "task mismatch: the target's label set differs from the reference's, so source features fit poorly"
    elif shift.get("severity") == "severe":
        why = (
            f"severe domain shift between the reference ({shift.get('reference') or 'source'}) and the target: "
            "the source features describe other images"
        )
    elif shift.get("severity"):
        why = f"measured shift {shift['severity']}; the target is simple enough that raw pixels already separate it"
    else:
        why = "no shift measured (run with --reference); the target may be simple enough for raw pixels"
    options = [
        "add labelled images (the gain is judged again on the next run)",
        "a source closer to the target: `transferkit pretrain --data REFERENCE` then `--candidates zoo:NAME`",
        "another strategy or resolution: `--strategy full|lp-ft`, `--set data.image_size=...`",
        "ship anyway: `transferkit export --force` (recorded as forced in the metadata and model card)",
    ]
    better = None if best is None or gain["verdict"] != "negative transfer" else best["description"]
    return {"better_model": better, "likely_reason": why, "options": options}


def _generalisation_rule(checks: list[dict], metrics: dict, best: dict | None) -> None:
    """Overfitting signs block only with worse generalisation: few labels make a train accuracy of 1.0 the norm,
    and the shipped checkpoint is the best-val epoch from before any divergence; so a gap or a diverging tail
    is a warning unless val accuracy is also no better than the best no-transfer baseline's (or none works)."""
    val = float(metrics["val_accuracy"])
    for c in checks:
        if c["name"] in _OVERFIT_CHECKS and c["failed"]:
            worse = best is None or val <= float(best["val_accuracy"])
            c["blocking"] = worse
            if best is None:
                c["message"] += "; no working no-transfer baseline to show it generalises better"
            elif worse:
                c["message"] += (
                    f"; val accuracy {val:.3f} is no better than the best no-transfer baseline's "
                    f"{best['val_accuracy']:.3f}"
                )
            else:
                c["message"] += "; not blocking: val accuracy beats every no-transfer baseline"


def _contract_baseline(best: dict | None, metrics: dict) -> dict:
    """`baseline` (the contract in docs/stages.md): the best working no-transfer baseline."""
    if best is None:
        return {"strategy": "none", "model": None, "test_accuracy": None, "val_accuracy": None}
    keep = (
        "name",
        "strategy",
        "model",
        "description",
        "test_accuracy",
        "val_accuracy",
        "hyper",
        "gain",
        "interval",
        "p_value",
        "epochs",
        "test_balanced_accuracy",  # with skewed train labels (the metric the gain is on)
        "val_balanced_accuracy",
    )
    return {k: best[k] for k in keep if k in best}


# --------------------------------------------------------------------------------------------------
# overfitting checks


def _check(name: str, value, threshold, failed: bool, blocking: bool, message: str) -> dict:
    return {
        "name": name,
        "value": value,
        "threshold": threshold,
        "failed": bool(failed),
        "blocking": blocking,
        "message": message,
    }


def divergence_streak(history: list[dict]) -> tuple[int, int, int]:
    """Longest run of consecutive epochs with val loss above its best so far while train loss is below its
    value at that best epoch; returns (length, first epoch, last epoch), (0, 0, 0) if none."""
    best_val, train_at_best = float("inf"), float("inf")
    longest, cur, start, span = 0, 0, 0, (0, 0)
    for h in history:
        vl, tl, ep = float(h["val_loss"]), float(h["train_loss"]), int(h["epoch"])
        if vl < best_val:
            best_val, train_at_best, cur = vl, tl, 0
            continue
        if tl < train_at_best:
            cur += 1
            start = ep if cur == 1 else start
            if cur > longest:
                longest, span = cur, (start, ep)
        else:
            cur = 0
    return longest, span[0], span[1]


def overfitting_checks(metrics: dict, params: Params) -> list[dict]:
    """The five history checks described in the module docstring, in a fixed order."""
    v, patience = params.validate, params.train.patience
    history = metrics.get("history") or []
    tr, va, te = (float(metrics[k]) for k in ("train_accuracy", "val_accuracy", "test_accuracy"))
    best, last = int(metrics["best_epoch"]), int(metrics["epochs"])
    return [
        _accuracy_gap_check(tr, va, v.max_gap),
        _loss_gap_check(history, best, v.max_loss_gap),
        _divergence_check(history, patience),
        _wasted_epochs_check(best, last, patience),
        _test_val_gap_check(te, va, v.max_test_val_gap),
    ]


def _accuracy_gap_check(tr: float, va: float, max_gap: float) -> dict:
    gap = tr - va
    bad = gap > max_gap
    return _check(
        "accuracy_gap",
        round(gap, 6),
        max_gap,
        bad,
        True,
        f"overfitting: train accuracy {tr:.3f} exceeds validation accuracy {va:.3f} by {gap:.3f} "
        f"(> validate.max_gap {max_gap})"
        if bad
        else f"train-val accuracy gap {gap:.3f} <= validate.max_gap {max_gap}",
    )


def _loss_gap_check(history: list[dict], best: int, max_loss_gap: float) -> dict:
    at_best = next((h for h in history if int(h["epoch"]) == best), None)
    if at_best is None:
        return _check("loss_gap", None, max_loss_gap, False, True, "no history entry for the best epoch")
    lgap = float(at_best["val_loss"]) - float(at_best["train_loss"])
    bad = lgap > max_loss_gap
    return _check(
        "loss_gap",
        round(lgap, 6),
        max_loss_gap,
        bad,
        True,
        f"overfitting: at the best epoch {best} validation loss {at_best['val_loss']:.3f} exceeds training "
        f"loss {at_best['train_loss']:.3f} by {lgap:.3f} nats (> validate.max_loss_gap {max_loss_gap})"
        if bad
        else f"val-train loss gap {lgap:.3f} at the best epoch <= validate.max_loss_gap {max_loss_gap}",
    )


def _divergence_check(history: list[dict], patience: int) -> dict:
    streak, first, end = divergence_streak(history)
    bad = streak > patience
    return _check(
        "divergence",
        streak,
        patience,
        bad,
        True,
        f"overfitting: validation loss rose while training loss fell for {streak} consecutive epochs "
        f"({first}-{end}; > train.patience {patience}): the network memorises the training images"
        if bad
        else f"longest val-loss-rising/train-loss-falling streak {streak} <= train.patience {patience}",
    )


def _wasted_epochs_check(best: int, last: int, patience: int) -> dict:
    wasted = last - best
    if wasted > patience:
        msg = (
            f"{wasted} epochs after the best epoch {best} of {last} were wasted (> train.patience {patience}): "
            "train.min_epochs kept training past the point early stopping would have ended it"
        )
    elif wasted == 0:
        msg = f"best epoch is the last ({last}): validation loss was still improving; more epochs may help"
    else:
        msg = f"best epoch {best} of {last}: {wasted} epochs after it (<= train.patience {patience})"
    return _check("wasted_epochs", wasted, patience, wasted > patience, False, msg)


def _test_val_gap_check(te: float, va: float, max_test_val_gap: float) -> dict:
    tv = abs(te - va)
    bad = tv > max_test_val_gap
    return _check(
        "test_val_gap",
        round(tv, 6),
        max_test_val_gap,
        bad,
        False,
        f"selection bias? test accuracy {te:.3f} vs validation {va:.3f} differ by {tv:.3f} "
        f"(> validate.max_test_val_gap {max_test_val_gap}); the val set may be too small or unrepresentative"
        if bad
        else f"test accuracy {te:.3f} vs validation {va:.3f}: |gap| {tv:.3f} <= {max_test_val_gap}",
    )


# --------------------------------------------------------------------------------------------------
# baselines


def _scratch_metrics(run: Path, metrics: dict, params: Params, baseline: Path | None, progress: bool):
    """The same-architecture scratch run's metrics and folder: `--baseline DIR`, or RUN/baseline (reused or trained)."""
    from transferkit.data import DataError
    from transferkit.io import read_json

    folder = Path(baseline) if baseline is not None else run / "baseline"
    if baseline is not None:
        bm = read_json(folder / "metrics.json")
    else:
        bm = _baseline_metrics(folder, metrics, params, metrics["model"], "scratch", progress)
    if bm.get("data_md5") != metrics.get("data_md5"):
        raise DataError(f"baseline {baseline} was trained on different data (md5 differs); not comparable")
    return bm, folder


def _linear_probe_baseline(run: Path, metrics: dict, params: Params, progress: bool) -> dict:
    """Frozen source features + linear head, same data/params; trained into RUN/baseline_linear_probe."""
    from transferkit.zoo import ZooError, parse_spec

    folder = run / "baseline_linear_probe"
    model = metrics["model"]
    if model.startswith("scratch:"):
        model = parse_spec(model).arch  # a scratch run is compared with its architecture's pretrained weights
    try:
        bm = _baseline_metrics(folder, metrics, params, model, "linear-probe", progress)
    except ZooError as e:
        return {
            "strategy": "linear-probe",
            "model": model,
            "test_accuracy": None,
            "gain": None,
            "skipped": f"no pretrained weights for the linear probe: {e}",
        }
    return {
        "strategy": "linear-probe",
        "model": bm["model"],
        "test_accuracy": bm["test_accuracy"],
        "val_accuracy": bm["val_accuracy"],
        "epochs": bm["epochs"],
        "gain": round(float(metrics["test_accuracy"]) - float(bm["test_accuracy"]), 6),
    }


def _baseline_metrics(folder: Path, metrics: dict, params: Params, model: str, strategy: str, progress: bool) -> dict:
    """The baseline's metrics: reused from `folder` when it matches this run, else trained there."""
    from transferkit.io import read_json
    from transferkit.train import run_train

    if _reusable_baseline(folder, metrics, params):
        return read_json(folder / "metrics.json")
    return run_train(
        Path(metrics["target"]), folder, params, model, strategy=strategy, progress=progress, baselines=False
    )


def _reusable_baseline(folder: Path, metrics: dict, params: Params) -> bool:
    """Reuse a baseline folder only if it saw the same data with the same data/train params and seed."""
    from transferkit.io import read_json

    if not (folder / "metrics.json").is_file() or not (folder / "params.yaml").is_file():
        return False
    base, bp = read_json(folder / "metrics.json"), load_params(folder / "params.yaml")
    return (
        base.get("data_md5") == metrics.get("data_md5")
        and bp.seed == params.seed
        and bp.data == params.data
        and bp.train.model_copy(update={"strategy": "auto"}) == params.train.model_copy(update={"strategy": "auto"})
    )


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


def predict_test(
    run: Path, metrics: dict, params: Params, split: str = "test"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Softmax probabilities [N, C] and labels [N] of the checkpoint in RUN on a split (test by default)."""
    import torch

    from transferkit import zoo
    from transferkit.data import DataError, load_with_params, make_loader
    from transferkit.embed import torch_threads
    from transferkit.numeric import softmax

    ds = load_with_params(Path(metrics["target"]), params, seed=int(metrics.get("seed", params.seed)))
    if ds.md5 != metrics.get("data_md5"):
        raise DataError(f"{metrics['target']}: data changed since training (md5 differs); re-train before validating")
    torch_threads()
    lm = zoo.create_model(f"file:{run / 'model.safetensors'}")
    samples = ds.splits[split]
    transform = zoo.eval_transform(lm.data_config)
    stored = _checked_test_logits(run, metrics, samples, lm.model, transform) if split == "test" else None
    labels = np.array([y for _, y in samples], dtype=np.int64)
    if stored is not None:
        return softmax(stored).astype(np.float32), labels, list(ds.classes)
    loader = make_loader(samples, transform, params.data.batch_size)
    probs = []
    with torch.inference_mode():
        for xb, _ in loader:
            probs.append(torch.softmax(lm.model(xb).float(), dim=1))
    return torch.cat(probs).numpy(), labels, list(ds.classes)


# train's stored test logits stand for the checkpoint's when a seeded sample of this many test images, run
# through the checkpoint here, reproduces them to LOGIT_ATOL (float32 on one CPU: ~1e-5 between batchings)
LOGIT_CHECK_IMAGES = 32
LOGIT_ATOL = 1e-3


def _checked_test_logits(run: Path, metrics: dict, samples: list, model, transform):
    """Train's test logits (OUT/test_logits.npz) once the checkpoint reproduces them on a sample, else None."""
    import torch

    from transferkit.data import make_loader, subsample
    from transferkit.train import read_test_logits

    stored = read_test_logits(run, samples, metrics.get("checkpoint_sha256"))
    if stored is None or len(samples) == 0:
        return None
    idx = subsample(list(range(len(samples))), LOGIT_CHECK_IMAGES, 0)  # in split order
    with torch.inference_mode():
        got = torch.cat([model(x).float() for x, _ in make_loader([samples[i] for i in idx], transform, 32)])
    diff = float(np.max(np.abs(got.numpy() - stored[idx])))
    return stored if diff <= LOGIT_ATOL else None


def quality_report(run: Path, metrics: dict, params: Params, predictions=None) -> dict:
    """Per-class table, confusion matrix, ECE and plots for the shipped checkpoint (module docstring).

    `predictions`: (probs, labels, classes) from predict_test, when the caller has them already."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    from transferkit.imbalance import balanced_accuracy
    from transferkit.io import atomic_write_text, write_json

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
    _plots(plots_dir, report, metrics)
    write_json(run / "report.json", report)
    return report


def _plots(folder: Path, report: dict, metrics: dict) -> None:
    """PNG confusion matrix, reliability diagram and learning curves (matplotlib, Agg: no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from transferkit.io import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)

    def save(fig, name: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(folder / f"{name}.png", buf.getvalue())

    save(_confusion_figure(plt, report), "confusion")
    save(_reliability_figure(plt, report), "reliability")
    save(_learning_curves_figure(plt, metrics), "learning_curves")


def _confusion_figure(plt, report: dict):
    """The test confusion matrix with counts in the non-empty cells."""
    classes, cm = report["classes"], np.asarray(report["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * len(classes), 0.8 + 0.5 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (i, j), n in np.ndenumerate(cm):
        if n:
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > cm.max() / 2 else "black", fontsize=8)
    ax.set_title(f"test confusion (accuracy {report['accuracy']:.3f}, macro F1 {report['macro_f1']:.3f})")
    return fig


def _reliability_figure(plt, report: dict):
    """Accuracy per confidence bin against the diagonal of perfect calibration."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    rows = [r for r in report["reliability"] if r["count"]]
    width = rows[0]["upper"] - rows[0]["lower"] if rows else 0.1
    ax.bar(
        [r["lower"] for r in rows],
        [r["accuracy"] for r in rows],
        width=width,
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.scatter(
        [r["confidence"] for r in rows],
        [r["accuracy"] for r in rows],
        color="red",
        s=12,
        zorder=3,
        label="bin mean confidence",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {report['ece']:.3f}, {report['ece_bins']} bins)")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def _learning_curves_figure(plt, metrics: dict):
    """Train and val loss and accuracy per epoch, the best epoch marked."""
    hist = metrics.get("history") or []
    ep = [h["epoch"] for h in hist]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, ax in (("loss", a1), ("accuracy", a2)):
        ax.plot(ep, [h[f"train_{key}"] for h in hist], label=f"train {key}")
        ax.plot(ep, [h[f"val_{key}"] for h in hist], label=f"val {key}")
        ax.axvline(metrics["best_epoch"], color="grey", ls=":", label=f"best epoch {metrics['best_epoch']}")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.suptitle(f"{metrics['model']} ({metrics['strategy']})")
    return fig
