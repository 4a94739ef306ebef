"""The gate between training and export: overfitting and negative transfer are caught here.

    transferkit validate --run runs/demo/train

Checks (thresholds in params.yaml `validate:`):
  overfit          train accuracy - val accuracy > `validate.max_gap` at the shipped (best) epoch
  negative transfer  test accuracy - scratch baseline test accuracy <= `validate.min_gain` while
                   `validate.require_beat_scratch` is on. The baseline is the same architecture from
                   random init trained on the same labels for the same epochs; it is trained into
                   RUN/baseline/ unless `--baseline DIR` names an existing train folder.
Writes RUN/validation.json with `passed` and plain-words `reasons`.
"""

from __future__ import annotations

from pathlib import Path

from transferkit.config import Params, load_params


def run_validate(run: Path, params: Params | None = None, baseline: Path | None = None, progress: bool = True) -> dict:
    from transferkit.io import read_json, write_json
    from transferkit.train import run_train

    run = Path(run)
    metrics = read_json(run / "metrics.json")
    if params is None:
        params = load_params(run / "params.yaml") if (run / "params.yaml").is_file() else Params()
    v = params.validate
    reasons: list[str] = []

    gap = float(metrics["train_accuracy"]) - float(metrics["val_accuracy"])
    overfit = gap > v.max_gap
    if overfit:
        reasons.append(
            f"overfitting: train accuracy {metrics['train_accuracy']:.3f} exceeds validation accuracy "
            f"{metrics['val_accuracy']:.3f} by {gap:.3f} (> validate.max_gap {v.max_gap})"
        )

    if metrics["strategy"] == "scratch":
        base = {"strategy": "scratch", "model": metrics["model"], "test_accuracy": metrics["test_accuracy"]}
        gain = 0.0
    else:
        if baseline is not None:
            bm = read_json(Path(baseline) / "metrics.json")
        elif _reusable_baseline(run / "baseline", metrics, params):
            bm = read_json(run / "baseline" / "metrics.json")
        else:
            bm = run_train(Path(metrics["target"]), run / "baseline", params, metrics["model"], strategy="scratch",
                           progress=progress)  # fmt: skip
        if bm.get("data_md5") != metrics.get("data_md5"):
            raise ValueError(f"baseline {baseline} was trained on different data (md5 differs); not comparable")
        base = {"strategy": bm["strategy"], "model": bm["model"], "test_accuracy": bm["test_accuracy"],
                "val_accuracy": bm["val_accuracy"], "epochs": bm["epochs"]}  # fmt: skip
        gain = float(metrics["test_accuracy"]) - float(bm["test_accuracy"])
        if v.require_beat_scratch and gain <= v.min_gain:
            reasons.append(
                f"negative transfer: test accuracy {metrics['test_accuracy']:.3f} vs scratch baseline "
                f"{bm['test_accuracy']:.3f} (gain {gain:+.3f} <= validate.min_gain {v.min_gain})"
            )

    result = {
        "passed": not reasons,
        "overfit": overfit,
        "train_val_gap": round(gap, 6),
        "baseline": base,
        "transfer_gain": round(gain, 6),
        "reasons": reasons,
        "test_accuracy": metrics["test_accuracy"],
        "strategy": metrics["strategy"],
        "model": metrics["model"],
        "thresholds": v.model_dump(),
    }
    write_json(run / "validation.json", result)
    return result


def _reusable_baseline(folder: Path, metrics: dict, params: Params) -> bool:
    """Reuse RUN/baseline only if it saw the same data with the same data/train params and seed."""
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
