"""train: strategies on real tiny data, the auto rule, checkpoints that reload to the same accuracy."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import drawing_thread

from transferkit.core.config import load_params
from transferkit.data.folder import DataError, load_dataset
from transferkit.data.images import load_rgb
from transferkit.data.loader import make_loader
from transferkit.models import registry, zoo
from transferkit.train.evaluation import EarlyStop as _EarlyStop
from transferkit.train.evaluation import evaluate_cpu
from transferkit.train.finetune import param_groups
from transferkit.train.fit import Fit
from transferkit.train.freezing import adapt_batchnorm, set_trainable, stage_groups
from transferkit.train.freezing import precise_batchnorm as _precise_bn
from transferkit.train.search import search_configs
from transferkit.train.stage import run_train
from transferkit.train.strategy import StrategyError, choose_strategy


@pytest.fixture(scope="module")
def lp_run(tiny_target, tmp_path_factory):
    # search_mode rule: `auto` is the fixed rule (the search has its own tests below)
    params = load_params(
        None, {"data.image_size": 32, "train.epochs": 15, "train.patience": 15, "train.search_mode": "rule"}
    )
    out = tmp_path_factory.mktemp("lp")
    return out, run_train(tiny_target, out, params, "mobilenetv2_100", progress=False), params


def test_auto_picks_linear_probe_for_few_labels_and_explains(lp_run):
    out, m, _ = lp_run
    assert m["strategy"] == "linear-probe"
    assert "6 labels per class" in m["strategy_reason"]
    for key in (
        "model",
        "strategy",
        "strategy_reason",
        "train_accuracy",
        "val_accuracy",
        "test_accuracy",
        "best_epoch",
        "epochs",
        "seconds",
        "history",
    ):
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
    # ... and bit for bit: every backbone tensor (BatchNorm running statistics included) is ImageNet's
    got, want = lm.model.state_dict(), ref.state_dict()
    body = [k for k in want if not k.startswith("classifier.")]
    assert len(body) > 300 and all(torch.equal(got[k], want[k]) for k in body)
    assert not torch.equal(got["classifier.weight"][:10], want["classifier.weight"][:10])  # the head did train


def test_choose_strategy_rule_on_crafted_inputs():
    p = load_params(None, {"train.linear_probe_max_per_class": 20, "train.partial_min_params": 20})
    s, reason = choose_strategy(p, 20, {"severity": "severe"}, n_params=3_500_000)
    assert s == "linear-probe" and "20 labels per class" in reason and "severe" in reason
    s, reason = choose_strategy(p, 21, {"severity": "severe"}, n_params=3_500_000)
    assert s == "lp-ft" and "severe" in reason
    s, reason = choose_strategy(p, 100, {"severity": "moderate"}, n_params=86_000_000)
    assert s == "partial" and "86.0 M" in reason
    assert choose_strategy(p, 100, {"severity": "moderate"}, n_params=86_000_000, has_stages=False)[0] == "full"
    s, reason = choose_strategy(p, 100, None, n_params=3_500_000)
    assert s == "full" and "10x below scratch" in reason


def test_requires_grad_per_strategy():
    lm = zoo.create_model("mobilenetv2_100", num_classes=10, image_size=32)
    m = lm.model
    head = {n for n, p in m.named_parameters() if any(p is q for q in m.get_classifier().parameters())}
    assert head == {"classifier.weight", "classifier.bias"}
    stages = stage_groups(m)
    assert len(stages) == 8 and stages[0][0] == "conv_stem.weight" and "conv_head.weight" in stages[-1]

    set_trainable(m, "linear-probe", 2)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == head
    info = set_trainable(m, "partial", 2)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == head | set(stages[-1]) | set(stages[-2])
    assert info["trainable_params"] + info["frozen_params"] == sum(p.numel() for p in m.parameters())
    set_trainable(m, "full", 2)
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(StrategyError, match="train.unfreeze_blocks=8"):
        set_trainable(m, "partial", 8)


def test_layer_decay_param_groups():
    lm = zoo.create_model("mobilenetv2_100", num_classes=10, image_size=32)
    set_trainable(lm.model, "full", 2)
    groups = param_groups(lm.model, lr=1e-3, head_lr=1e-2, weight_decay=1e-4, layer_decay=0.5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(lm.model.parameters()))  # every parameter exactly once
    assert groups[-1]["lr"] == 1e-2 and {id(p) for p in groups[-1]["params"]} == {
        id(p) for p in lm.model.get_classifier().parameters()
    }
    stem = next(g for g in groups if any(p is lm.model.conv_stem.weight for p in g["params"]))
    top = next(g for g in groups if any(p is lm.model.conv_head.weight for p in g["params"]))
    assert stem["lr"] < top["lr"] <= 1e-3  # deeper from the top, smaller LR
    assert stem["lr"] == pytest.approx(1e-3 * 0.5 ** round(math.log(stem["lr"] / 1e-3, 0.5)))
    plain = param_groups(lm.model, lr=1e-3, head_lr=1e-2, weight_decay=1e-4, layer_decay=None)
    assert [g["lr"] for g in plain] == [1e-3, 1e-2]


def test_adabn_sets_target_statistics_and_keeps_weights(tiny_target):
    import torch

    lm = zoo.create_model("mobilenetv2_100", num_classes=10, image_size=32)
    ds = load_dataset(tiny_target)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    momentum = lm.model.bn1.momentum
    assert momentum is not None
    samples = ds.splits["train"]
    tf = zoo.eval_transform(lm.data_config)
    n = adapt_batchnorm(lm.model, samples, tf, batch_size=len(samples))
    assert n == len(samples)
    x = torch.stack([tf(load_rgb(p)) for p, _ in samples])
    with torch.no_grad():
        z = lm.model.conv_stem(x)  # what the first BatchNorm sees
    bn = lm.model.bn1
    assert torch.allclose(bn.running_mean, z.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, z.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)
    after = lm.model.state_dict()
    for k, v in before.items():
        if k.endswith(("running_mean", "running_var")):
            continue
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, after[k]), k
    assert not lm.model.training and bn.momentum == momentum  # the training-time momentum is restored


def test_early_stopping_stops_at_patience():
    stop = _EarlyStop(patience=2, min_epochs=0)
    seq = [stop.step(v, e) for e, v in enumerate([1.0, 0.8, 0.9, 0.85, 0.7], start=1)]
    assert seq[:4] == [(True, False), (True, False), (False, False), (False, True)]
    late = _EarlyStop(patience=1, min_epochs=4)
    assert [late.step(v, e)[1] for e, v in enumerate([1.0, 2.0, 2.0, 2.0], start=1)] == [False, False, False, True]


def test_linear_probe_stops_early_on_real_data(tiny_target, tmp_path):
    params = load_params(
        None,
        {"data.image_size": 32, "train.probe": "sgd", "train.epochs": 300, "train.patience": 3, "train.min_epochs": 0},
    )  # the epoch-wise head, stopping as soon as patience allows
    m = run_train(tiny_target, tmp_path, params, "mobilenetv2_100", strategy="linear-probe", progress=False)
    assert m["epochs"] < 300 and m["epochs"] == m["best_epoch"] + 3


def test_full_and_scratch_train_the_whole_network(tiny_target, tmp_path):
    params = load_params(None, {"data.image_size": 32, "train.epochs": 2, "train.patience": 5})
    full = run_train(tiny_target, tmp_path / "full", params, "mobilenetv2_100", strategy="full", progress=False)
    scratch = run_train(tiny_target, tmp_path / "s", params, "mobilenetv2_100", strategy="scratch", progress=False)
    assert full["strategy"] == "full" and scratch["strategy"] == "scratch"
    assert scratch["model"] == "mobilenetv2_100"
    lm_full = zoo.create_model(f"file:{tmp_path / 'full' / 'model.safetensors'}")
    lm_s = zoo.create_model(f"file:{tmp_path / 's' / 'model.safetensors'}")
    assert lm_full.file_meta["source_sha256"] == registry.PACKAGED["mobilenetv2_100"].sha256
    assert lm_s.file_meta["source_sha256"] == ""
    ref = zoo.create_model("mobilenetv2_100").model.state_dict()["conv_stem.weight"]
    # fine-tuning moved the first layer a little; scratch is far from ImageNet
    d_full = (lm_full.model.state_dict()["conv_stem.weight"] - ref).abs().max().item()
    d_scratch = (lm_s.model.state_dict()["conv_stem.weight"] - ref).abs().max().item()
    assert 0 < d_full < d_scratch
    assert len(full["history"]) == 2
    # LP-FT starts fine-tuning from a trained head: its first epoch is already far better than full's
    lpft = run_train(tiny_target, tmp_path / "lpft", params, "mobilenetv2_100", strategy="lp-ft", progress=False)
    assert lpft["strategy"] == "lp-ft" and lpft["linear_probe_phase"]["epochs"] >= 1
    # val loss is the strict measure: since precise BatchNorm statistics, full's first epoch can tie LP-FT's
    # accuracy on these few val images (0.35 = 0.35 measured), but it never beats it
    assert lpft["history"][0]["val_loss"] < full["history"][0]["val_loss"]
    assert lpft["history"][0]["val_accuracy"] >= full["history"][0]["val_accuracy"]
    assert not (tmp_path / "lpft" / "checkpoint.pt").exists()  # a finished run leaves nothing to resume


def test_drop_path_rate_reaches_the_residual_blocks(tiny_target, tmp_path):
    import torch
    from timm.layers import DropPath

    def rates(model):
        return [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]

    assert not any(rates(zoo.create_model("mobilenetv2_100", num_classes=10).model))  # off by default
    lm = zoo.create_model("mobilenetv2_100", num_classes=10, drop_path_rate=0.2)
    r = rates(lm.model)
    assert len(r) >= 10 and 0 < max(r) <= 0.2 and r == sorted(r)  # timm: rising linearly with depth
    x = torch.randn(4, 3, 32, 32)
    lm.model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        a, b = lm.model(x), lm.model(x)
    assert not torch.allclose(a, b)  # blocks are dropped at random while training
    lm.model.eval()
    with torch.no_grad():
        assert torch.equal(lm.model(x), lm.model(x))  # and never at inference
    params = load_params(None, {"data.image_size": 32, "train.epochs": 1, "train.drop_path_rate": 0.1})
    m = run_train(tiny_target, tmp_path, params, "mobilenetv2_100", strategy="full", progress=False)
    assert m["drop_path"]["rate"] == 0.1 and m["drop_path"]["blocks"] == len(r)  # the trained model had them


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0]


def test_partial_trains_only_the_top_stages(tiny_target, tmp_path):
    import torch

    params = load_params(None, {"data.image_size": 32, "train.epochs": 2, "train.unfreeze_blocks": 2})
    m = run_train(tiny_target, tmp_path, params, "mobilenetv2_100", strategy="partial", progress=False)
    assert m["strategy"] == "partial" and m["trainable_params"] > 0 and m["frozen_params"] > 0
    src = zoo.create_model("mobilenetv2_100", image_size=32).model
    stages = stage_groups(src)
    got = zoo.create_model(f"file:{tmp_path / 'model.safetensors'}").model.state_dict()
    ref = src.state_dict()
    frozen = {_module_of(n) for g in stages[:-2] for n in g}
    trained = {_module_of(n) for g in stages[-2:] for n in g}
    for k in ref:  # weights and BatchNorm statistics of the frozen stages are bit-identical
        if _module_of(k) in frozen and not k.endswith("num_batches_tracked"):
            assert torch.equal(ref[k], got[k]), k
    assert any(not torch.equal(ref[k], got[k]) for k in ref if _module_of(k) in trained and k.endswith("weight"))


def test_adabn_auto_under_detected_shift(lp_run, tiny_target, tmp_path):
    """AdaBN is off by default (bench/transfer: it hurt linear probes); `auto` applies it under shift."""
    import torch

    assert lp_run[1]["adabn"]["applied"] is False  # no drift.json: nothing to adapt to
    drift = tmp_path / "drift.json"
    drift.write_text(json.dumps({"drift_detected": True, "severity": "severe"}))
    rule = {"data.image_size": 32, "train.epochs": 5, "train.search_mode": "rule"}  # auto = the fixed rule
    params = load_params(None, {**rule, "train.adabn": "auto"})
    m = run_train(tiny_target, tmp_path / "run", params, "mobilenetv2_100", drift=drift, progress=False)
    assert m["strategy"] == "linear-probe" and m["adabn"] == {"applied": True, "images": 100}
    assert "AdaBN" in m["strategy_reason"]
    got = zoo.create_model(f"file:{tmp_path / 'run' / 'model.safetensors'}").model.state_dict()
    ref = zoo.create_model("mobilenetv2_100", image_size=32).model.state_dict()
    assert torch.equal(got["conv_stem.weight"], ref["conv_stem.weight"])
    assert not torch.allclose(got["bn1.running_mean"], ref["bn1.running_mean"])
    off = run_train(
        tiny_target,
        tmp_path / "off",
        load_params(None, {**rule, "train.adabn": "off"}),
        "mobilenetv2_100",
        drift=drift,
        progress=False,
    )
    assert off["adabn"]["applied"] is False


def _train_cmd(target, out):
    import sys

    exe = Path(sys.executable).parent / "transferkit"
    return [
        str(exe),
        "train",
        "--target",
        str(target),
        "--out",
        str(out),
        "--model",
        "mobilenetv2_100",
        "--strategy",
        "full",
        "-q",
        "--set",
        "data.image_size=32",
        "--set",
        "train.epochs=8",
        "--set",
        "train.min_epochs=8",
        "--set",
        "train.patience=8",
    ]


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_result(tiny_target, tmp_path):
    import os
    import signal
    import subprocess
    import time

    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every process: same floating-point sums
    subprocess.run(_train_cmd(tiny_target, tmp_path / "ref"), env=env, check=True, capture_output=True)
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())

    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(tiny_target, out), env=env, stderr=subprocess.PIPE)
    ckpt, epoch, deadline = out / "checkpoint.pt", 0, time.time() + 300
    while epoch < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
        if ckpt.is_file():
            epoch = torch.load(ckpt, weights_only=True)["epoch"]
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()
    killed_at = torch.load(ckpt, weights_only=True)["epoch"]
    assert 2 <= killed_at < 8

    again = subprocess.run(_train_cmd(tiny_target, out), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"resuming {out} from epoch {killed_at + 1}" in again.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from_epoch"] == killed_at + 1
    assert [h["epoch"] for h in m["history"]] == list(range(1, 9))
    assert [h["val_loss"] for h in m["history"]] == pytest.approx([h["val_loss"] for h in ref["history"]], rel=1e-6)
    assert m["test_accuracy"] == ref["test_accuracy"] and m["best_epoch"] == ref["best_epoch"]
    assert not ckpt.exists()


def test_resume_ignores_a_checkpoint_from_other_arguments(tiny_target, tmp_path):
    params = load_params(None, {"data.image_size": 32, "train.epochs": 2})
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")  # damaged: start over, don't fail
    m = run_train(tiny_target, tmp_path, params, "mobilenetv2_100", strategy="full", progress=False)
    assert m["resumed_from_epoch"] == 0 and len(m["history"]) == 2


def test_bad_strategy_and_scratch_model_errors(tiny_target, tmp_path):
    params = load_params(None, {"data.image_size": 32})
    with pytest.raises(ValueError, match="--strategy"):
        run_train(tiny_target, tmp_path, params, "mobilenetv2_100", strategy="magic", progress=False)
    with pytest.raises(DataError, match="no pretrained weights"):
        run_train(tiny_target, tmp_path, params, "scratch:mobilenetv2_100", strategy="linear-probe", progress=False)
    with pytest.raises(DataError, match="no pretrained weights"):
        run_train(tiny_target, tmp_path, params, "scratch:mobilenetv2_100", strategy="lp-ft", progress=False)
    big = load_params(None, {"data.image_size": 32, "train.unfreeze_blocks": 9})
    with pytest.raises(StrategyError, match="unfreeze_blocks=9"):
        run_train(tiny_target, tmp_path, big, "mobilenetv2_100", strategy="partial", progress=False)
    assert not (tmp_path / "metrics.json").exists()


def test_same_seed_same_result_whatever_ran_before(lp_run, tiny_target, tmp_path):
    """A warm in-process model cache (as inside the flow) and a cold one (as under DVC) give one result."""
    from transferkit.models import embed

    _, first, params = lp_run
    embed.source_model.cache_clear()  # cold: the model is built again, consuming the global RNG
    again = run_train(tiny_target, tmp_path, params, "mobilenetv2_100", progress=False)
    assert [h["val_loss"] for h in again["history"]] == pytest.approx(
        [h["val_loss"] for h in first["history"]], rel=1e-6
    )
    assert again["test_accuracy"] == first["test_accuracy"]


def test_search_fine_tunes_only_when_the_evidence_says_one_can_win():
    """A crafted objective: the first config's val correctness against the best no-transfer baseline's decides
    whether the fine-tunes run at all; a pruned or skipped config never replaces the kept one."""
    import numpy as np

    from transferkit.train.search import finetune_evidence

    seen = []

    def fit(config, bar):
        seen.append((config, bar))
        c = np.zeros(200, bool)
        c[: {"a": 150, "b": 180, "c": 170}[config]] = True
        return Fit(None, config, "", {"val": float(c.mean())}, [{}], 1, {}, val_correct=c)

    def go(finetune):
        return lambda first: {"finetune": finetune, "reason": "crafted"}

    best, rows, why = search_configs(["a", "b", "c"], fit, go(False), confidence=0.8)
    assert best.strategy == "a" and [s[0] for s in seen] == ["a"] and why["reason"] == "crafted"
    assert [r["stopped"] for r in rows] == ["", "evidence", "evidence"] and rows[1]["val_accuracy"] is None
    seen.clear()
    best, rows, _ = search_configs(["a", "b", "c"], fit, go(True), confidence=0.8)
    assert [s for s in seen] == [("a", None), ("b", 0.75), ("c", 0.9)]  # each later config knows the bar to beat
    assert best.strategy == "b"  # +15 points clears the interval; c (below b) never replaces it

    # the evidence itself: the probe's val correctness against the best working baseline's, paired
    p = load_params(None, {})
    probe = np.zeros(200, bool)
    probe[:170] = True  # 0.850

    def rows_with(right: int, start: int = 0):  # right on images start .. start + right - 1
        c = np.zeros(200, bool)
        c[start : start + right] = True
        return [{"name": "small-cnn", "val_accuracy": right / 200, "val_correct": c, "broken": False}]

    first = Fit(None, "linear-probe", "", {"val": 0.85}, [{}], 1, {}, val_correct=probe)
    clear = finetune_evidence(first, 10, p, rows_with(120))  # 0.85 vs 0.60: features fit, no fine-tune
    assert not clear["finetune"] and clear["baseline"] == "small-cnn" and clear["interval"][0] > 0
    close = finetune_evidence(first, 10, p, rows_with(168, 30))  # 0.85 vs 0.84, other images: noise, fine-tune
    assert close["finetune"] and close["interval"][0] <= 0 < close["interval"][1]
    assert finetune_evidence(first, 10, p, rows_with(190))["finetune"]  # no transfer ahead: fine-tune
    assert finetune_evidence(first, 100, p, rows_with(120))["finetune"]  # > 50 labels per class: always
    p.train.search_mode = "all"
    assert finetune_evidence(first, 10, p, rows_with(120))["finetune"]


def test_search_keeps_the_cheaper_config_unless_a_later_one_wins_beyond_noise():
    """Crafted per-image val correctness on 200 images: +3 images is noise, +14 is a gain."""
    import numpy as np

    base = np.zeros(200, bool)
    base[:180] = True  # 0.900
    noisy = base.copy()
    noisy[[0, 1]] = False  # two the probe had right, now wrong ...
    noisy[180:185] = True  # ... five it had wrong, now right: 0.915
    clear = base.copy()
    clear[180:194] = True  # 14 more right, none lost: 0.970
    vectors = {"linear-probe": base, "full": noisy, "lp-ft": clear}

    def fit(config, bar):
        c = vectors[config]
        return Fit(None, config, "", {"val": float(c.mean())}, [{}], 1, {}, val_correct=c)

    def kept(configs, confidence):
        return search_configs(configs, fit, lambda first: {"finetune": True, "reason": ""}, confidence=confidence)

    best, rows, _ = kept(["linear-probe", "full"], 0.8)
    assert best.strategy == "linear-probe"  # +1.5 points, interval [-, +] straddles 0
    assert rows[1]["vs_kept"]["kept"] == "linear-probe" and rows[1]["vs_kept"]["interval"][0] < 0
    assert abs(rows[1]["vs_kept"]["gain"] - 0.015) < 1e-9
    assert kept(["linear-probe", "full"], 0.0)[0].strategy == "full"  # 0 = any higher val accuracy
    best, rows, _ = kept(["linear-probe", "full", "lp-ft"], 0.8)
    assert best.strategy == "lp-ft" and rows[2]["vs_kept"]["interval"][0] > 0  # +7 points clears the interval
    assert kept(["lp-ft", "linear-probe"], 0.8)[0].strategy == "lp-ft"  # a lower one never replaces


def test_auto_search_on_real_data_picks_the_val_best_and_explains(tiny_target, tmp_path):
    params = load_params(
        None,
        {
            "data.image_size": 32,
            "train.epochs": 2,
            "train.search": ["linear-probe", "full"],
            "train.search_mode": "all",
            "train.finetune_image_size": None,
            "validate.cnn_epochs": 2,
        },
    )
    m = run_train(tiny_target, tmp_path, params, "mobilenetv2_100", progress=False)
    s = m["search"]
    assert [r["strategy"] for r in s["candidates"]] == ["linear-probe", "full"]
    lp, full = s["candidates"]
    vs = full["vs_kept"]  # the paired comparison on the same val images, against the kept linear probe
    assert vs["kept"] == "linear-probe" and vs["interval"][0] <= vs["gain"] <= vs["interval"][1]
    assert abs(vs["gain"] - (full["val_accuracy"] - lp["val_accuracy"])) < 1e-5  # paired gain = accuracy gap
    best = full if full["val_accuracy"] > lp["val_accuracy"] and vs["interval"][0] > 0 else lp
    assert m["strategy"] == s["selected"] == best["strategy"] and m["val_accuracy"] == best["val_accuracy"]
    assert f"{best['val_accuracy']:.3f}" in m["strategy_reason"] and "search_mode all" in m["strategy_reason"]
    assert "paired 80% interval" in m["strategy_reason"]
    assert not (tmp_path / "search").exists()
    # the no-transfer baselines were fitted once, by train, for validate to read back
    nt = json.loads((tmp_path / "no_transfer.json").read_text())
    assert {r["name"] for r in nt["rows"]} == set(params.validate.no_transfer)
    assert all(len(r["val_correct"]) == m["n_val"] for r in nt["rows"])
    assert set(m["timings"]) == {"fit", "no_transfer"} and m["timings"]["no_transfer"] > 0
    # the kept configuration's test logits (a probe's test split is embedded only once it is kept)
    import numpy as np

    from transferkit.train.outputs import read_test_logits

    ds = load_dataset(tiny_target)
    logits = read_test_logits(tmp_path, ds.splits["test"], m["checkpoint_sha256"])
    labels = np.array([y for _, y in ds.splits["test"]])
    assert logits.shape == (m["n_test"], 10) and float((logits.argmax(1) == labels).mean()) == m["test_accuracy"]


def test_precise_bn_refreshes_only_the_batchnorms_that_train(tiny_target):
    import torch

    lm = zoo.create_model("mobilenetv2_100", num_classes=10, image_size=32)
    set_trainable(lm.model, "partial", 2)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ds = load_dataset(tiny_target)
    _precise_bn(lm.model, ds.splits["train"], zoo.eval_transform(lm.data_config), 32)
    after = lm.model.state_dict()
    stats = [k for k in before if k.endswith("running_mean")]
    frozen = [k for k in stats if not lm.model.get_submodule(_module_of(k)).weight.requires_grad]
    assert frozen and len(frozen) < len(stats)
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # the source's statistics stay
    assert all(not torch.equal(before[k], after[k]) for k in stats if k not in frozen)  # the target's replace them


def test_what_ships_does_not_depend_on_how_busy_the_machine_is(tiny_target, tmp_path, monkeypatch):
    """The same search twice: once on an idle machine, once with a CPU-bound process competing for the cores
    and every clock running an hour per call. Same configurations tried, same kept strategy, same weights."""
    import hashlib
    import subprocess
    import sys
    import time

    params = load_params(
        None,
        {
            "data.image_size": 32,
            "train.epochs": 2,
            "train.min_epochs": 0,
            "train.search_mode": "all",
            "train.finetune_image_size": None,
            "validate.cnn_epochs": 2,
        },
    )

    def run(out: Path) -> tuple[dict, str]:
        m = run_train(tiny_target, out, params, "mobilenetv2_100", progress=False)
        return m, hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()

    idle, idle_sha = run(tmp_path / "idle")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a competing CPU-bound process
    try:
        hour = [0.0]

        def slow_clock(real=time.monotonic):  # every reading an hour later than the last
            hour[0] += 3600.0
            return real() + hour[0]

        monkeypatch.setattr(time, "monotonic", slow_clock)
        monkeypatch.setattr(time, "perf_counter", slow_clock)
        busy, busy_sha = run(tmp_path / "busy")
    finally:
        hog.kill()
        hog.wait()
    assert [r["seconds"] for r in busy["search"]["candidates"]] != [r["seconds"] for r in idle["search"]["candidates"]]

    def decisions(m: dict) -> list:
        return [(r["strategy"], r["val_accuracy"], r["epochs"], r["stopped"]) for r in m["search"]["candidates"]]

    assert decisions(busy) == decisions(idle) and len(decisions(idle)) == 2  # both configurations trained
    assert busy["strategy"] == idle["strategy"] and busy["test_accuracy"] == idle["test_accuracy"]
    assert busy_sha == idle_sha  # the same checkpoint, byte for byte: the same test predictions


def test_a_fine_tune_ships_the_same_model_while_another_thread_draws_random_numbers(tiny_target, tmp_path):
    """Inside a Prefect flow the event client's thread draws from Python's global generator; the augmentation
    drew from it too, so the same fine-tune shipped other weights from one flow run to the next."""
    import hashlib

    params = load_params(None, {"data.image_size": 32, "train.epochs": 2, "train.patience": 5})

    def run(out: Path) -> tuple[list, str]:
        m = run_train(tiny_target, out, params, "mobilenetv2_100", strategy="full", progress=False, baselines=False)
        return [h["train_loss"] for h in m["history"]], hashlib.sha256(
            (out / "model.safetensors").read_bytes()
        ).hexdigest()

    alone = run(tmp_path / "alone")
    with drawing_thread() as draws:
        beside = run(tmp_path / "beside")
    assert draws[0] > 100  # the other thread did draw while the fine-tune ran
    assert beside == alone  # the same losses in every epoch and the same checkpoint, byte for byte


@pytest.mark.parametrize("strategy", ["linear-probe", "full"])
def test_the_kept_configuration_gets_its_deferred_test_split(tiny_target, tmp_path, strategy):
    """The search reads the test images only for the configuration it keeps: the result equals a plain run's."""
    over = {
        "data.image_size": 32,
        "train.search": [strategy],
        "train.finetune_image_size": None,
        "train.epochs": 2,
        "train.min_epochs": 0,
        "validate.cnn_epochs": 2,
    }
    searched = run_train(tiny_target, tmp_path / "s", load_params(None, over), "mobilenetv2_100", progress=False)
    plain = run_train(tiny_target, tmp_path / "p", load_params(None, over), "mobilenetv2_100", strategy, progress=False)
    assert searched["strategy"] == strategy and searched["search"]["candidates"][0]["strategy"] == strategy
    assert searched["test_accuracy"] == plain["test_accuracy"] and searched["val_accuracy"] == plain["val_accuracy"]
    assert searched["checkpoint_sha256"] == plain["checkpoint_sha256"]
    ds = load_dataset(tiny_target)
    from transferkit.train.outputs import read_test_logits

    a = read_test_logits(tmp_path / "s", ds.splits["test"], searched["checkpoint_sha256"])
    b = read_test_logits(tmp_path / "p", ds.splits["test"], plain["checkpoint_sha256"])
    assert a is not None and b is not None and abs(a - b).max() <= 1e-5
