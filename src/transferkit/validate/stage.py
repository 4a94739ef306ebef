"""The validate stage's entry point, `run_validate`: it runs the checks, baselines, gate and quality report on RUN, writes RUN/validation.json, then the error report (errors_report) once the verdict is decided."""

from __future__ import annotations

from pathlib import Path

from transferkit.core.config import Params, load_params
from transferkit.validate.baseline_runs import linear_probe_baseline, no_transfer_rows
from transferkit.validate.gate import (
    gain_verdict,
    generalisation_rule,
    judged_metric,
    linear_probe_reasons,
    validation_result,
)
from transferkit.validate.overfitting import overfitting_checks
from transferkit.validate.predict import predict_test
from transferkit.validate.quality import quality_report


def run_validate(run: Path, params: Params | None = None, baseline: Path | None = None, progress: bool = True) -> dict:
    from transferkit.core.io import read_json, write_json

    run = Path(run)
    metrics = read_json(run / "metrics.json")
    if params is None:
        params = load_params(run / "params.yaml") if (run / "params.yaml").is_file() else Params()

    probs, y, classes = predict_test(run, metrics, params)
    checks = overfitting_checks(metrics, params)
    rows = no_transfer_rows(run, metrics, params, probs.argmax(1) == y, baseline, progress)
    judged = judged_metric(metrics, params, rows, probs.argmax(1) == y, y)
    from transferkit.models.baselines import best_baseline

    best = best_baseline(rows, judged["val_key"])
    gain_check = gain_verdict(metrics, best, params, judged)
    generalisation_rule(checks, metrics, best)
    reasons = [c["message"] for c in checks if c["failed"] and c["blocking"]]
    if gain_check["blocking"]:
        reasons.append(gain_check["message"])

    baselines = [{k: val for k, val in r.items() if k not in ("val_correct", "test_correct")} for r in rows]
    if metrics["strategy"] != "linear-probe":
        lp = linear_probe_baseline(run, metrics, params, progress)
        baselines.append(lp)
        reasons += linear_probe_reasons(lp, metrics, params)

    report = quality_report(run, metrics, params, (probs, y, classes))
    result = validation_result(metrics, params, checks, rows, best, gain_check, reasons, baselines, report, len(y))
    result["errors_report"] = _error_report(run, metrics, params, (probs, y, classes), progress)
    write_json(run / "validation.json", result)
    return result


def _error_report(run: Path, metrics: dict, params: Params, test, progress: bool) -> dict:
    """RUN/errors.html and errors.json (transferkit.report), written once the verdict is decided: report only."""
    from transferkit.validate.errors_report import write_error_report

    train = predict_test(run, metrics, params, "train")
    return write_error_report(run, metrics, params, test, train, progress)
