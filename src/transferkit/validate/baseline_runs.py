"""The no-transfer baselines this run is compared with on the same test images: the cached scikit-learn and small-CNN rows plus the same-architecture scratch run (RUN/baseline/ or `--baseline DIR`), and the frozen-feature linear probe (RUN/baseline_linear_probe/). A baseline folder is reused only when it saw the same data md5, seed and params; otherwise it is trained there."""

from __future__ import annotations

from pathlib import Path

from transferkit.core.config import Params, load_params
from transferkit.validate.predict import predict_test

# --------------------------------------------------------------------------------------------------
# the negative-transfer guard


def no_transfer_rows(
    run: Path, metrics: dict, params: Params, correct, baseline: Path | None, progress: bool
) -> list[dict]:
    """Every no-transfer baseline of `validate.no_transfer`, each compared with this run on the test images."""
    from transferkit.data.folder import load_with_params
    from transferkit.models.baselines import DESCRIPTIONS, chance_check, paired_comparison

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
    from transferkit.models.baselines import cached_no_transfer

    rows = cached_no_transfer(run, ds, params, progress) + rows
    for r in rows:
        r.update(paired_comparison(correct, r["test_correct"], v.confidence))
    return rows


# --------------------------------------------------------------------------------------------------
# baselines


def _scratch_metrics(run: Path, metrics: dict, params: Params, baseline: Path | None, progress: bool):
    """The same-architecture scratch run's metrics and folder: `--baseline DIR`, or RUN/baseline (reused or trained)."""
    from transferkit.core.io import read_json
    from transferkit.data.folder import DataError

    folder = Path(baseline) if baseline is not None else run / "baseline"
    if baseline is not None:
        bm = read_json(folder / "metrics.json")
    else:
        bm = _baseline_metrics(folder, metrics, params, metrics["model"], "scratch", progress)
    if bm.get("data_md5") != metrics.get("data_md5"):
        raise DataError(f"baseline {baseline} was trained on different data (md5 differs); not comparable")
    return bm, folder


def linear_probe_baseline(run: Path, metrics: dict, params: Params, progress: bool) -> dict:
    """Frozen source features + linear head, same data/params; trained into RUN/baseline_linear_probe."""
    from transferkit.models.registry import ZooError
    from transferkit.models.zoo import parse_spec

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
    from transferkit.core.io import read_json
    from transferkit.train.stage import run_train

    if _reusable_baseline(folder, metrics, params):
        return read_json(folder / "metrics.json")
    return run_train(
        Path(metrics["target"]), folder, params, model, strategy=strategy, progress=progress, baselines=False
    )


def _reusable_baseline(folder: Path, metrics: dict, params: Params) -> bool:
    """Reuse a baseline folder only if it saw the same data with the same data/train params and seed."""
    from transferkit.core.io import read_json

    if not (folder / "metrics.json").is_file() or not (folder / "params.yaml").is_file():
        return False
    base, bp = read_json(folder / "metrics.json"), load_params(folder / "params.yaml")
    return (
        base.get("data_md5") == metrics.get("data_md5")
        and bp.seed == params.seed
        and bp.data == params.data
        and bp.train.model_copy(update={"strategy": "auto"}) == params.train.model_copy(update={"strategy": "auto"})
    )
