"""validate: the gate flags overfitting and negative transfer on real runs, and passes a sound one."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from transferkit.core.config import load_params
from transferkit.train.stage import run_train
from transferkit.validate.overfitting import divergence_streak
from transferkit.validate.quality import expected_calibration_error
from transferkit.validate.stage import run_validate

NO_REGULARISATION = {"train.weight_decay": 0, "train.drop_rate": 0, "train.label_smoothing": 0, "train.augment": False}


@pytest.fixture(scope="module")
def sound_run(tiny_clipart, tmp_path_factory):
    # colour clipart at 160 px: ImageNet features beat raw pixels and a small CNN from scratch by far
    params = load_params(
        None, {"data.image_size": 160, "train.epochs": 15, "train.patience": 15, "validate.cnn_epochs": 15}
    )
    out = tmp_path_factory.mktemp("run")
    run_train(tiny_clipart, out, params, "mobilenetv2_100", strategy="linear-probe", progress=False)
    return out, params


@pytest.fixture(scope="module")
def sound_validated(sound_run):
    out, params = sound_run
    return out, params, run_validate(out, params, progress=False)


def test_sound_transfer_passes_with_a_gain_whose_interval_excludes_zero(sound_validated):
    out, params, r = sound_validated
    saved = json.loads((out / "validation.json").read_text())
    for key in (
        "passed",
        "overfit",
        "train_val_gap",
        "baseline",
        "transfer_gain",
        "reasons",
        "gain_interval",
        "gain_p_value",
        "verdict",
        "baselines",
    ):
        assert key in saved
    rows = {b["name"]: b for b in r["baselines"]}
    assert set(rows) == {"pixels-logreg", "pixels-knn", "pixels-svm", "small-cnn"}
    # the bar is the working baseline with the best *val* accuracy, and the gain is measured against it
    best = max(rows.values(), key=lambda b: b["val_accuracy"])
    assert r["baseline"]["name"] == best["name"] and r["baseline"]["test_accuracy"] == best["test_accuracy"]
    assert r["transfer_gain"] == pytest.approx(r["test_accuracy"] - best["test_accuracy"], abs=1e-6)
    lo, hi = r["gain_interval"]
    assert 0 < lo < r["transfer_gain"] < hi and r["gain_p_value"] < 0.05
    assert r["verdict"] == "transfer helps" and r["passed"] is True and r["reasons"] == []
    assert r["recommendation"] is None
    for b in rows.values():  # every row's gain is this run's test accuracy minus the baseline's
        assert b["gain"] == pytest.approx(r["test_accuracy"] - b["test_accuracy"], abs=1e-6)
        assert b["model_only"] - b["baseline_only"] == round(b["gain"] * b["n"])


def test_a_train_val_gap_alone_does_not_block_a_probe_that_beats_every_baseline(sound_run):
    out, params = sound_run
    metrics = json.loads((out / "metrics.json").read_text())
    gap = metrics["train_accuracy"] - metrics["val_accuracy"]
    assert gap > 0.05  # 6 labels per class: the head fits train better than val
    strict = params.model_copy(update={"validate": params.validate.model_copy(update={"max_gap": gap / 2})})
    r = run_validate(out, strict, progress=False)
    check = next(c for c in r["checks"] if c["name"] == "accuracy_gap")
    assert check["failed"] is True and check["blocking"] is False and r["overfit"] is True
    assert "not blocking: val accuracy beats every no-transfer baseline" in check["message"]
    assert check["message"] in r["warnings"] and r["passed"] is True


def test_a_gap_with_worse_generalisation_blocks():
    from transferkit.validate.gate import generalisation_rule as _generalisation_rule

    checks = [
        {"name": "accuracy_gap", "failed": True, "blocking": True, "message": "overfitting: gap 0.4"},
        {"name": "loss_gap", "failed": False, "blocking": True, "message": "ok"},
    ]
    _generalisation_rule(checks, {"val_accuracy": 0.60}, {"val_accuracy": 0.65})
    assert (
        checks[0]["blocking"] is True and "no better than the best no-transfer baseline's 0.650" in checks[0]["message"]
    )
    assert checks[1]["blocking"] is True  # a check that did not fail is left alone
    checks[0].update(blocking=True, message="overfitting: gap 0.4")
    _generalisation_rule(checks, {"val_accuracy": 0.70}, {"val_accuracy": 0.65})
    assert checks[0]["blocking"] is False
    # a diverging tail after the shipped best epoch follows the same rule; with no working baseline it blocks
    div = [{"name": "divergence", "failed": True, "blocking": True, "message": "overfitting: val loss rose"}]
    _generalisation_rule(div, {"val_accuracy": 0.70}, {"val_accuracy": 0.65})
    assert div[0]["blocking"] is False
    div[0].update(blocking=True)
    _generalisation_rule(div, {"val_accuracy": 0.70}, None)
    assert div[0]["blocking"] is True


def test_guard_blocks_a_run_that_does_not_beat_the_baseline(sound_run, tmp_path):
    out, params = sound_run
    # the scratch baseline here is the run itself trained again as a linear probe: zero gain, an interval
    # [0, 0] that does not clear min_gain, so noise (here: nothing) is not called a gain
    twin = tmp_path / "twin"
    run_train(
        json.loads((out / "metrics.json").read_text())["target"],
        twin,
        params,
        "mobilenetv2_100",
        strategy="linear-probe",
        progress=False,
    )
    r = run_validate(out, params, baseline=twin, progress=False)
    assert r["baseline"]["name"] == "scratch"  # best on val: it ties the run itself
    assert r["transfer_gain"] == pytest.approx(0.0, abs=1e-9) and r["gain_interval"] == [0.0, 0.0]
    assert r["verdict"] == "no clear gain" and r["passed"] is False
    assert any("transfer does not help here beyond test noise" in x for x in r["reasons"])


@pytest.fixture(scope="module")
def digits10(tmp_path_factory):
    """The demo's target: sklearn digits, 10 labels per class (100 train / 200 val / 700 test)."""
    from transferkit.data.builtin import write_builtin

    out = tmp_path_factory.mktemp("data") / "digits10"
    write_builtin("digits", out, per_class=100, size=32, train_per_class=10, val_per_class=20, progress=False)
    return out


def test_the_old_demo_model_is_refused_as_negative_transfer_on_digits(digits10, tmp_path):
    # the model `make demo` shipped before: tf_efficientnet_lite1, linear probe at 96 px (0.823 test)
    # the raw-pixel baselines suffice to refuse it (the small CNN is stronger still: tests/models/test_baselines.py)
    params = load_params(
        None,
        {
            "data.image_size": 96,
            "train.epochs": 20,
            "train.min_epochs": 10,
            "validate.no_transfer": ["pixels-logreg", "pixels-knn", "pixels-svm"],
        },
    )
    out = tmp_path / "lp"
    m = run_train(digits10, out, params, "tf_efficientnet_lite1", strategy="linear-probe", progress=False)
    r = run_validate(out, params, progress=False)
    best = r["baseline"]
    assert best["name"] in ("pixels-knn", "pixels-svm") and best["test_accuracy"] > m["test_accuracy"]
    assert r["gain_interval"][1] < 0 and r["gain_p_value"] < 1e-3
    assert r["verdict"] == "negative transfer" and r["passed"] is False
    msg = next(x for x in r["reasons"] if x.startswith("negative transfer"))
    assert "transfer does not help here" in msg and f"{best['test_accuracy']:.3f}" in msg and "700 test images" in msg
    assert r["recommendation"]["better_model"] == best["description"]
    assert any("--force" in o for o in r["recommendation"]["options"])


def test_a_useless_source_is_refused_and_a_broken_scratch_is_never_the_bar(tiny_target, tmp_path):
    # a "source model" that is random init saved as a checkpoint, probed linearly: no transfer can come of it.
    # The same-architecture scratch baseline with 1 epoch stays at chance: reported broken, not the bar.
    from transferkit.models import zoo

    lm = zoo.create_model("scratch:mobilenetv2_100", image_size=32, seed=0)
    src = tmp_path / "random.safetensors"
    zoo.save_checkpoint(lm.model, src, {"arch": "mobilenetv2_100", "num_classes": 1000})
    params = load_params(
        None,
        {
            "data.image_size": 32,
            "train.epochs": 1,
            "train.patience": 1,
            "validate.cnn_epochs": 15,
            "validate.no_transfer": ["pixels-knn", "pixels-svm", "small-cnn", "scratch"],
        },
    )
    out = tmp_path / "useless"
    run_train(tiny_target, out, params, f"file:{src}", strategy="linear-probe", progress=False)
    r = run_validate(out, params, progress=False)
    rows = {b["name"]: b for b in r["baselines"]}
    assert rows["scratch"]["broken"] is True and "not above chance" in rows["scratch"]["broken_reason"]
    assert r["broken_baselines"] == ["scratch"] and r["baseline"]["name"] != "scratch"
    assert r["verdict"] in ("negative transfer", "no clear gain") and r["passed"] is False
    assert any("transfer does not help here" in x for x in r["reasons"])


def test_baseline_on_other_data_is_refused(sound_run, tiny_reference, tmp_path):
    out, params = sound_run
    other = tmp_path / "other"
    quick = load_params(None, {"data.image_size": 32, "train.epochs": 1})  # only its data matters here
    run_train(tiny_reference, other, quick, "mobilenetv2_100", strategy="scratch", progress=False)
    with pytest.raises(ValueError, match="different data"):
        run_validate(out, params, baseline=other, progress=False)


def test_sound_run_checks_all_pass_and_are_recorded(sound_validated):
    out, params, saved = sound_validated  # the in-memory result: later tests rewrite validation.json
    names = [c["name"] for c in saved["checks"]]
    assert names == ["accuracy_gap", "loss_gap", "divergence", "wasted_epochs", "test_val_gap"]
    for c in saved["checks"]:
        assert set(c) >= {"name", "value", "threshold", "failed", "message"}
        if c["blocking"]:
            assert c["failed"] is False, c["message"]
    m = json.loads((out / "metrics.json").read_text())
    best = next(h for h in m["history"] if h["epoch"] == m["best_epoch"])
    loss_gap = next(c for c in saved["checks"] if c["name"] == "loss_gap")
    assert loss_gap["value"] == pytest.approx(best["val_loss"] - best["train_loss"], abs=1e-5)
    assert loss_gap["threshold"] == params.validate.max_loss_gap
    # a linear probe is its own linear-probe baseline: only the no-transfer baselines are compared
    assert [b["strategy"] for b in saved["baselines"]] == ["pixels-logreg", "pixels-knn", "pixels-svm", "small-cnn"]
    assert not (out / "baseline_linear_probe").exists() and not (out / "baseline").exists()


def test_quality_report_is_consistent(sound_validated):
    out, params, r = sound_validated
    m = json.loads((out / "metrics.json").read_text())
    rep = json.loads((out / "report.json").read_text())
    cm = np.array(rep["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == rep["n"] == m["n_test"] == 200
    assert 0.0 <= rep["ece"] <= 1.0 and rep["ece_bins"] == 15
    # the re-evaluated checkpoint agrees with training's own test accuracy (at most one image flips)
    assert abs(rep["accuracy"] - m["test_accuracy"]) <= 1 / m["n_test"] + 1e-9
    assert rep["accuracy"] == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-6)
    for i, c in enumerate(rep["classes"]):
        row = rep["per_class"][c]
        assert row["support"] == cm[i].sum() == 20
        assert row["recall"] == pytest.approx(cm[i, i] / cm[i].sum(), abs=1e-6)
        if cm[:, i].sum():
            assert row["precision"] == pytest.approx(cm[i, i] / cm[:, i].sum(), abs=1e-6)
    assert rep["macro_f1"] == pytest.approx(np.mean([v["f1"] for v in rep["per_class"].values()]), abs=1e-5)
    assert sum(b["count"] for b in rep["reliability"]) == rep["n"]
    assert r["report"]["ece"] == rep["ece"] and r["report"]["macro_f1"] == rep["macro_f1"]
    # DVC confusion template: one (actual, predicted) row per test image, reproducing the matrix
    rows = list(csv.DictReader((out / "confusion.csv").open()))
    assert len(rows) == rep["n"]
    idx = {c: i for i, c in enumerate(rep["classes"])}
    again = np.zeros_like(cm)
    for row in rows:
        again[idx[row["actual"]], idx[row["predicted"]]] += 1
    assert (again == cm).all()
    from PIL import Image

    for name in ("confusion", "reliability", "learning_curves"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_expected_calibration_error_by_hand():
    conf = np.array([0.95] * 10 + [0.55] * 10)
    correct = np.array([1] * 5 + [0] * 5 + [1] * 5 + [0] * 5)
    ece, bins = expected_calibration_error(conf, correct, 15)
    # two occupied bins, each half the data: |0.5 - 0.95| and |0.5 - 0.55|
    assert ece == pytest.approx(0.5 * 0.45 + 0.5 * 0.05)
    assert [b["count"] for b in bins if b["count"]] == [10, 10] and len(bins) == 15
    assert expected_calibration_error(np.array([0.9] * 10), np.array([1] * 9 + [0]), 15)[0] == pytest.approx(0.0)


def test_divergence_streak_counts_val_rising_while_train_falls():
    h = lambda e, tl, vl: {"epoch": e, "train_loss": tl, "val_loss": vl}  # noqa: E731
    hist = [
        h(1, 2.0, 2.0),
        h(2, 1.0, 1.0),
        h(3, 0.8, 1.1),
        h(4, 0.6, 1.2),
        h(5, 0.7, 1.3),  # train up at 5:
        h(6, 0.5, 1.4),
        h(7, 0.4, 1.5),
        h(8, 0.3, 1.6),
    ]  # still below epoch 2's train loss
    assert divergence_streak(hist) == (6, 3, 8)
    hist[4] = h(5, 1.5, 1.3)  # train loss back above its value at the best epoch: the streak breaks
    assert divergence_streak(hist) == (3, 6, 8)
    assert divergence_streak([h(1, 2.0, 2.0), h(2, 1.0, 1.0), h(3, 0.9, 0.9)]) == (0, 0, 0)


def test_overfitting_configuration_is_flagged(tiny_target, tmp_path):
    # no regularisation, an aggressive head LR and min_epochs = epochs (early stopping disabled) on 6
    # labels per class: the head memorises the training set while validation loss climbs
    params = load_params(
        None,
        {
            **NO_REGULARISATION,
            "data.image_size": 32,
            "train.epochs": 60,
            "train.min_epochs": 60,
            "train.patience": 3,
            "train.head_lr": 0.1,
            "train.probe": "sgd",  # the epoch-wise head (the L-BFGS probe has no epochs to overfit over)
        },
    )
    out = tmp_path / "overfit"
    m = run_train(tiny_target, out, params, "mobilenetv2_100", strategy="linear-probe", progress=False)
    assert m["epochs"] == 60 and m["history"][-1]["train_accuracy"] == 1.0
    r = run_validate(
        out,
        params.model_copy(update={"validate": params.validate.model_copy(update={"cnn_epochs": 15})}),
        progress=False,
    )
    checks = {c["name"]: c for c in r["checks"]}
    assert checks["divergence"]["failed"] is True and checks["divergence"]["value"] > params.train.patience
    assert checks["divergence"]["threshold"] == params.train.patience
    assert r["overfit"] is True and r["passed"] is False
    assert any(x.startswith("overfitting: validation loss rose while training loss fell") for x in r["reasons"])
    wasted = checks["wasted_epochs"]
    assert wasted["value"] == 60 - m["best_epoch"] and wasted["failed"] is True and wasted["blocking"] is False
    assert wasted["message"] in r["warnings"] and wasted["message"] not in r["reasons"]
    saved = json.loads((out / "validation.json").read_text())
    assert saved["checks"] == r["checks"] and saved["reasons"] == r["reasons"]


def test_test_val_gap_is_a_warning_not_a_failure(sound_validated):
    out, params, _ = sound_validated
    m = json.loads((out / "metrics.json").read_text())
    tv = abs(m["test_accuracy"] - m["val_accuracy"])
    assert tv > 0  # 40 val vs 200 test images: the two estimates differ
    strict = params.model_copy(update={"validate": params.validate.model_copy(update={"max_test_val_gap": tv / 2})})
    r = run_validate(out, strict, progress=False)
    check = next(c for c in r["checks"] if c["name"] == "test_val_gap")
    assert check["failed"] is True and check["blocking"] is False
    assert r["passed"] is True and any("selection bias" in w for w in r["warnings"])


def test_non_linear_probe_run_is_compared_with_a_linear_probe(tiny_target, tmp_path):
    # 2 epochs from random init: the linear probe with the same budget must beat it, and the guard blocks it
    params = load_params(
        None, {"data.image_size": 32, "train.epochs": 2, "train.patience": 2, "validate.no_transfer": ["pixels-knn"]}
    )
    out = tmp_path / "scratch"
    run_train(tiny_target, out, params, "mobilenetv2_100", strategy="scratch", progress=False)
    r = run_validate(out, params, progress=False)
    assert [b["strategy"] for b in r["baselines"]] == ["pixels-knn", "linear-probe"]
    assert r["verdict"] == "not a transfer run" and r["transfer_gain"] == 0.0  # a scratch run is no transfer
    lp = json.loads((out / "baseline_linear_probe" / "metrics.json").read_text())
    assert lp["strategy"] == "linear-probe" and lp["epochs"] <= params.train.epochs
    assert r["baselines"][1]["test_accuracy"] == lp["test_accuracy"]
    assert r["baselines"][1]["gain"] == pytest.approx(r["test_accuracy"] - lp["test_accuracy"], abs=1e-6)
    assert r["baselines"][1]["gain"] < 0
    assert r["passed"] is False and any("negative transfer vs linear probe" in x for x in r["reasons"])
    # same data and params: the baseline is reused, not retrained
    stamp = (out / "baseline_linear_probe" / "model.safetensors").stat().st_mtime_ns
    run_validate(out, params, progress=False)
    assert (out / "baseline_linear_probe" / "model.safetensors").stat().st_mtime_ns == stamp


def test_validate_writes_the_error_report_and_the_model_card_links_it(sound_validated):
    from transferkit.export.card import _card_errors
    from transferkit.validate.errors_report import TOP_LOSS

    out, _, r = sound_validated
    rep = r["errors_report"]
    assert rep["path"] == "errors.html" and (out / "errors.html").is_file()
    # an earlier test may have re-validated this run: the same report, timed again (`seconds` is wall time)
    on_disk = json.loads((out / "validation.json").read_text())["errors_report"]
    assert {k: v for k, v in on_disk.items() if k != "seconds"} == {k: v for k, v in rep.items() if k != "seconds"}
    data = json.loads((out / "errors.json").read_text())
    assert len(data["top_loss_test"]) == min(TOP_LOSS, r["n_test"]) and data["label_doubts"]["n_train"] > 0
    card = "\n".join(_card_errors({"run": str(out)}, r))
    assert (out / "errors.html").resolve().as_uri() in card
