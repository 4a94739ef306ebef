"""The gate's verdict: the metric the gain is judged on, the gain interval over the best working baseline and its verdict (transfer helps / no clear gain / negative transfer), the linear-probe rule, and the rule that overfitting signs block only with worse generalisation. On a refusal it builds the recommendation, and it assembles the validation.json record with its reasons and warnings."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transferkit.core.config import Params
from transferkit.validate.overfitting import OVERFIT_CHECKS


def linear_probe_reasons(lp: dict, metrics: dict, params: Params) -> list[str]:
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


def validation_result(metrics, params, checks, rows, best, gain_check, reasons, baselines, report, n_test) -> dict:
    """validation.json: the verdict, the reasons and warnings, every check and baseline."""
    gap = float(metrics["train_accuracy"]) - float(metrics["val_accuracy"])
    helps = gain_check["verdict"] == "transfer helps"
    return {
        "passed": not reasons,
        "overfit": any(c["failed"] for c in checks if c["name"] in OVERFIT_CHECKS),
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


def judged_metric(metrics: dict, params: Params, rows: list[dict], correct, y) -> dict:
    """The metric the gain is judged on (transferkit.imbalance.gate_metric): with skewed train labels the rows'
    gains are re-measured on balanced accuracy in place (same test images) and the bar is chosen on val
    balanced accuracy. {metric, reason, val_key, model}: `model` is this run's test score on the metric."""
    from transferkit.core.imbalance import gate_metric, judge_rows

    g = gate_metric(metrics)
    if g["metric"] != "balanced_accuracy":
        return {**g, "val_key": "val_accuracy", "model": metrics["test_accuracy"]}
    from transferkit.data.folder import load_with_params

    ds = load_with_params(Path(metrics["target"]), params, seed=int(metrics.get("seed", params.seed)))
    val_y = np.array([lbl for _, lbl in ds.splits["val"]])
    model = judge_rows(rows, correct, y, val_y, params.validate.confidence)["test_balanced_accuracy"]
    return {**g, "val_key": "val_balanced_accuracy", "model": model}


def gain_verdict(metrics: dict, best: dict | None, params: Params, judged: dict | None = None) -> dict:
    """The gate's gain rule: the interval of the test gain over the best baseline must clear `validate.min_gain`.

    verdict: "transfer helps" (lower bound > min_gain), "negative transfer" (upper bound < 0), "no clear
    gain" (the interval straddles: noise is never called a gain), or "not a transfer run" / "no baseline".
    `judged` (judged_metric): the metric the gain is on; accuracy by default, balanced accuracy for skewed labels.
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


def generalisation_rule(checks: list[dict], metrics: dict, best: dict | None) -> None:
    """Overfitting signs block only with worse generalisation: few labels make a train accuracy of 1.0 the norm,
    and the shipped checkpoint is the best-val epoch from before any divergence; so a gap or a diverging tail
    is a warning unless val accuracy is also no better than the best no-transfer baseline's (or none works)."""
    val = float(metrics["val_accuracy"])
    for c in checks:
        if c["name"] in OVERFIT_CHECKS and c["failed"]:
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
