"""train: strategies on real tiny data, the auto rule, checkpoints that reload to the same accuracy."""

from __future__ import annotations

import csv
import json

import pytest

from transferkit import zoo
from transferkit.config import load_params
from transferkit.data import DataError, load_dataset, make_loader
from transferkit.train import choose_strategy, evaluate_cpu, run_train


@pytest.fixture(scope="module")
def lp_run(tiny_target, tmp_path_factory):
    params = load_params(None, {"data.image_size": 32, "train.epochs": 15, "train.patience": 15})
    out = tmp_path_factory.mktemp("lp")
    return out, run_train(tiny_target, out, params, "mobilenetv2_100", progress=False), params


def test_auto_picks_linear_probe_for_few_labels_and_explains(lp_run):
    out, m, _ = lp_run
    assert m["strategy"] == "linear-probe"
    assert "6 labels per class" in m["strategy_reason"]
    for key in ("model", "strategy", "strategy_reason", "train_accuracy", "val_accuracy", "test_accuracy",
                "best_epoch", "epochs", "seconds", "history"):  # fmt: skip
        assert key in m
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] == m["test_accuracy"]
    assert 1 <= m["best_epoch"] <= m["epochs"] == len(m["history"])
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, m["epochs"] + 1))
    # the shipped epoch is the one with the lowest validation loss
    best = min(m["history"], key=lambda h: h["val_loss"])
    assert best["epoch"] == m["best_epoch"]
    assert (out / "params.yaml").is_file()


def test_linear_probe_learns_real_digits(lp_run):
    _, m, _ = lp_run
    assert m["test_accuracy"] > 0.4  # 10 classes: chance is 0.1


def test_checkpoint_reloads_to_the_same_test_accuracy(lp_run, tiny_target):
    out, m, params = lp_run
    lm = zoo.create_model(f"file:{out / 'model.safetensors'}")
    assert lm.file_meta["strategy"] == "linear-probe"
    assert json.loads(lm.file_meta["classes"]) == [str(i) for i in range(10)]
    assert lm.data_config["input_size"] == [3, 32, 32]
    ds = load_dataset(tiny_target)
    acc = evaluate_cpu(lm.model, make_loader(ds.splits["test"], zoo.eval_transform(lm.data_config), 32))
    assert acc == pytest.approx(m["test_accuracy"], abs=1e-6)
    # the backbone stayed frozen: features equal the packaged ImageNet model's
    import torch

    ref = zoo.create_model("mobilenetv2_100", image_size=32).model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = lm.model.forward_head(lm.model.forward_features(x), pre_logits=True)
        b = ref.forward_head(ref.forward_features(x), pre_logits=True)
    assert torch.allclose(a, b, atol=1e-5)


def test_choose_strategy_rule():
    p = load_params(None, {"train.linear_probe_max_per_class": 20})
    assert choose_strategy(p, 20, None)[0] == "linear-probe"
    s, reason = choose_strategy(p, 21, {"severity": "severe"})
    assert s == "full" and "severe" in reason


def test_full_and_scratch_train_the_whole_network(tiny_target, tmp_path):
    params = load_params(None, {"data.image_size": 32, "train.epochs": 2, "train.patience": 5})
    full = run_train(tiny_target, tmp_path / "full", params, "mobilenetv2_100", strategy="full", progress=False)
    scratch = run_train(tiny_target, tmp_path / "s", params, "mobilenetv2_100", strategy="scratch", progress=False)
    assert full["strategy"] == "full" and scratch["strategy"] == "scratch"
    assert scratch["model"] == "mobilenetv2_100"
    lm_full = zoo.create_model(f"file:{tmp_path / 'full' / 'model.safetensors'}")
    lm_s = zoo.create_model(f"file:{tmp_path / 's' / 'model.safetensors'}")
    assert lm_full.file_meta["source_sha256"] == zoo.PACKAGED["mobilenetv2_100"].sha256
    assert lm_s.file_meta["source_sha256"] == ""
    ref = zoo.create_model("mobilenetv2_100").model.state_dict()["conv_stem.weight"]
    # fine-tuning moved the first layer a little; scratch is far from ImageNet
    d_full = (lm_full.model.state_dict()["conv_stem.weight"] - ref).abs().max().item()
    d_scratch = (lm_s.model.state_dict()["conv_stem.weight"] - ref).abs().max().item()
    assert 0 < d_full < d_scratch
    assert len(full["history"]) == 2


def test_bad_strategy_and_scratch_model_errors(tiny_target, tmp_path):
    params = load_params(None, {"data.image_size": 32})
    with pytest.raises(ValueError, match="--strategy"):
        run_train(tiny_target, tmp_path, params, "mobilenetv2_100", strategy="magic", progress=False)
    with pytest.raises(DataError, match="no pretrained weights"):
        run_train(tiny_target, tmp_path, params, "scratch:mobilenetv2_100", strategy="linear-probe", progress=False)
    assert not (tmp_path / "metrics.json").exists()


def test_same_seed_same_result_whatever_ran_before(lp_run, tiny_target, tmp_path):
    """A warm in-process model cache (as inside the flow) and a cold one (as under DVC) give one result."""
    from transferkit import embed

    _, first, params = lp_run
    embed._source_model.cache_clear()  # cold: the model is built again, consuming the global RNG
    again = run_train(tiny_target, tmp_path, params, "mobilenetv2_100", progress=False)
    assert [h["val_loss"] for h in again["history"]] == pytest.approx([h["val_loss"] for h in first["history"]], rel=1e-6)
    assert again["test_accuracy"] == first["test_accuracy"]
