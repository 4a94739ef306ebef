"""No-transfer baselines: they learn, choose on val only, and the paired statistics match a hand calculation."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from transferkit.core.config import load_params
from transferkit.data.folder import load_dataset
from transferkit.models.baselines import chance_check, fit_no_transfer, paired_comparison, pixel_arrays

FAST = {"validate.cnn_epochs": 15}


def test_paired_comparison_matches_a_hand_calculation():
    # 100 images: both right on 70, only the model on 8, only the baseline on 2, both wrong on 20
    model = np.array([1] * 70 + [1] * 8 + [0] * 2 + [0] * 20, bool)
    base = np.array([1] * 70 + [0] * 8 + [1] * 2 + [0] * 20, bool)
    r = paired_comparison(model, base, 0.95)
    assert (r["model_only"], r["baseline_only"], r["n"]) == (8, 2, 100)
    assert r["gain"] == pytest.approx(0.06)
    # Wald on the paired difference: 1.959964 * sqrt(8 + 2 - 6^2/100) / 100
    half = 1.959964 * np.sqrt(10 - 0.36) / 100
    assert r["interval"] == pytest.approx([0.06 - half, 0.06 + half], abs=1e-5)
    # McNemar exact: 2 * P(X <= 2), X ~ Binomial(10, 1/2) = 2 * (1 + 10 + 45) / 1024
    assert r["p_value"] == pytest.approx(112 / 1024)
    same = paired_comparison(model, model)
    assert same["gain"] == 0 and same["interval"] == [0, 0] and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="equal"):
        paired_comparison(model, base[:10])


def test_chance_check_flags_a_baseline_at_chance():
    y = np.repeat(np.arange(10), 20)  # 200 val images, chance 0.1
    at_chance = np.zeros(200, bool)
    at_chance[:22] = True  # 0.11: not distinguishable from 0.1
    assert chance_check(at_chance, y, 0.01)["broken"] is True
    learnt = np.zeros(200, bool)
    learnt[:60] = True  # 0.30: far above chance
    r = chance_check(learnt, y, 0.01)
    assert r["broken"] is False and r["chance"] == pytest.approx(0.1) and r["p_above_chance"] < 1e-6
    # chance is the majority share, not 1/K: always answering class 0 on a 90/10 split is 0.9 for nothing
    skew = np.array([0] * 90 + [1] * 10)
    assert chance_check(skew == 0, skew, 0.01)["broken"] is True


def test_pixel_arrays_keep_native_size_and_grey(tiny_target, tiny_clipart):
    ds = load_dataset(tiny_target)
    x, side, ch = pixel_arrays({"train": ds.splits["train"][:5]}, 32)
    assert (
        (side, ch) == (32, 1) and x["train"].shape == (5, 1, 32, 32) and 0 <= x["train"].min() <= x["train"].max() <= 1
    )
    assert pixel_arrays({"train": ds.splits["train"][:5]}, 16)[1] == 16  # capped
    colour = load_dataset(tiny_clipart)
    assert pixel_arrays({"train": colour.splits["train"][:5]}, 32)[2] == 3


def test_baselines_learn_and_choose_on_val_only(tiny_target, tmp_path):
    params = load_params(None, FAST)
    ds = load_dataset(tiny_target)
    rows = fit_no_transfer(ds, params, progress=False)
    assert [r["name"] for r in rows] == ["pixels-logreg", "pixels-knn", "pixels-svm", "small-cnn"]
    for r in rows:
        # real digits: every baseline is well above chance; none is broken
        assert r["broken"] is False and r["val_accuracy"] > 0.5 and r["test_accuracy"] > 0.5, r
        assert len(r["test_correct"]) == len(ds.splits["test"])
        assert r["test_accuracy"] == pytest.approx(float(np.mean(r["test_correct"])), abs=1e-6)
        # the hyper-parameter kept is the val-best of its sweep
        best = max(s["val_accuracy"] for s in r["sweep"])
        chosen = next(s for s in r["sweep"] if all(s[k] == v for k, v in r["hyper"].items() if k in s))
        assert chosen["val_accuracy"] == best

    # shuffle the test labels (move test images between class folders): choices and val scores stay
    moved = tmp_path / "shuffled"
    shutil.copytree(tiny_target, moved)
    classes = sorted(p.name for p in (moved / "test").iterdir())
    rng = np.random.default_rng(0)
    for f in sorted((moved / "test").rglob("*.png")):
        dest = moved / "test" / classes[rng.integers(len(classes))] / f"x{f.parent.name}{f.name}"
        f.rename(dest)
    again = fit_no_transfer(load_dataset(moved), params, progress=False)
    for a, b in zip(rows, again):
        assert a["hyper"] == b["hyper"] and a["val_accuracy"] == b["val_accuracy"], a["name"]
    assert any(a["test_accuracy"] != b["test_accuracy"] for a, b in zip(rows, again))


def test_select_ranks_the_raw_pixel_control(tiny_target, tmp_path):
    from transferkit.select.rank import run_select

    params = load_params(None, {"data.image_size": 32, "select.confirm": 0})
    r = run_select(tiny_target, tmp_path / "select", params, ["mobilenetv2_100", "pixels"], progress=False)
    pix = next(c for c in r["candidates"] if c["model"] == "pixels")
    assert pix["control"] is True and pix["leep"] is None and pix["feature_dim"] == 32 * 32
    assert 0.5 < pix["knn"] <= 1.0  # raw digits pixels separate the classes
    assert r["selected"] == "mobilenetv2_100"  # a control is never selected
    src = next(c for c in r["candidates"] if c["model"] == "mobilenetv2_100")
    assert r["beats_pixels"] == (src["score"] > pix["score"])
    if not r["beats_pixels"]:
        assert "raw pixels" in r["warning"] and "no source model beats no transfer" in r["warning"]
