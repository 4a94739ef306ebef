"""validate: the gate flags overfitting and negative transfer on real runs, and passes a sound one."""

from __future__ import annotations

import json

import pytest

from transferkit.config import load_params
from transferkit.train import run_train
from transferkit.validate import run_validate


@pytest.fixture(scope="module")
def sound_run(tiny_target, tmp_path_factory):
    # 64 px: ImageNet features separate the digits well enough that the gap stays under max_gap
    params = load_params(None, {"data.image_size": 64, "train.epochs": 15, "train.patience": 15})
    out = tmp_path_factory.mktemp("run")
    run_train(tiny_target, out, params, "mobilenetv2_100", strategy="linear-probe", progress=False)
    return out, params


def test_sound_run_passes_and_beats_scratch(sound_run):
    out, params = sound_run
    r = run_validate(out, params, progress=False)
    saved = json.loads((out / "validation.json").read_text())
    for key in ("passed", "overfit", "train_val_gap", "baseline", "transfer_gain", "reasons"):
        assert key in saved
    base = json.loads((out / "baseline" / "metrics.json").read_text())
    assert base["strategy"] == "scratch" and base["epochs"] <= params.train.epochs
    assert r["baseline"]["test_accuracy"] == base["test_accuracy"]
    assert r["transfer_gain"] == pytest.approx(r["test_accuracy"] - base["test_accuracy"], abs=1e-6)
    assert r["transfer_gain"] > 0, "ImageNet features must beat random init on real digits"
    assert r["passed"] is True and r["reasons"] == []


def test_gap_above_threshold_is_flagged_as_overfitting(sound_run):
    out, params = sound_run
    metrics = json.loads((out / "metrics.json").read_text())
    gap = metrics["train_accuracy"] - metrics["val_accuracy"]
    assert gap > 0.05  # 6 labels per class: the head fits train better than val
    strict = params.model_copy(update={"validate": params.validate.model_copy(update={"max_gap": gap / 2})})
    r = run_validate(out, strict, progress=False)
    assert r["overfit"] is True and r["passed"] is False
    assert any("overfitting" in x and "validate.max_gap" in x for x in r["reasons"])


def test_guard_blocks_a_run_that_does_not_beat_the_baseline(sound_run, tmp_path):
    out, params = sound_run
    # the baseline here is the run itself trained as a linear probe: zero gain, so it must be blocked
    twin = tmp_path / "twin"
    run_train(json.loads((out / "metrics.json").read_text())["target"], twin, params, "mobilenetv2_100",
              strategy="linear-probe", progress=False)  # fmt: skip
    r = run_validate(out, params, baseline=twin, progress=False)
    assert r["transfer_gain"] == pytest.approx(0.0, abs=1e-9)
    assert r["passed"] is False
    assert any("negative transfer" in x for x in r["reasons"])


def test_baseline_on_other_data_is_refused(sound_run, tiny_reference, tmp_path):
    out, params = sound_run
    other = tmp_path / "other"
    run_train(tiny_reference, other, params, "mobilenetv2_100", strategy="scratch", progress=False)
    with pytest.raises(ValueError, match="different data"):
        run_validate(out, params, baseline=other, progress=False)
