"""pretrain: a source model trained on real MNIST, registered in the zoo, pinned, and usable by select.

    .venv/bin/pytest -q tests/train/test_pretrain.py

One real (tiny) training run per module: 48 MNIST images at 32 px, one epoch from ImageNet weights.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRANSFERKIT_ZOO", str(d))
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def pretrained(registry, tiny_reference, tmp_path_factory):
    from transferkit.core.config import load_params
    from transferkit.train.pretrain import run_pretrain

    p = load_params(None, {"data.image_size": 32, "train.epochs": 1, "train.min_epochs": 0})
    out = tmp_path_factory.mktemp("pretrain-run")
    return run_pretrain(tiny_reference, "mobilenetv2_100", p, out=out, progress=False), out


def test_card_says_what_it_was_trained_on(pretrained, registry, tiny_reference):
    from transferkit.core.io import sha256_file
    from transferkit.data.folder import load_dataset

    card, run = pretrained
    assert card["name"] == "mobilenetv2_100-mnist" and card["spec"] == "zoo:mobilenetv2_100-mnist"
    entry = registry / card["name"]
    assert json.loads((entry / "card.json").read_text()) == card
    assert card["sha256"] == sha256_file(entry / "model.safetensors")
    t = card["trained_on"]
    assert t["data_md5"] == load_dataset(tiny_reference).md5
    assert t["classes"] == [str(i) for i in range(10)] and t["n_train"] > 0 and t["n_test"] > 0
    assert card["init"] == "mobilenetv2_100" and card["strategy"] == "full" and card["arch"] == "mobilenetv2_100"
    metrics = json.loads((run / "metrics.json").read_text())
    assert card["accuracy"]["test"] == metrics["test_accuracy"]
    md = (entry / "card.md").read_text()
    assert card["sha256"] in md and t["data_md5"] in md


def test_registered_model_is_listed_loaded_and_has_a_source_head(pretrained):
    import torch

    from transferkit.models import catalog, zoo

    card, _ = pretrained
    rows = {r["model"]: r for r in catalog.list_entries()}
    assert rows["zoo:mobilenetv2_100-mnist"]["available"] is True
    assert "mnist" in rows["zoo:mobilenetv2_100-mnist"]["note"]
    lm = zoo.create_model("zoo:mobilenetv2_100-mnist")
    assert lm.spec.kind == "zoo" and lm.spec.pretrained and lm.weights_sha256 == card["sha256"]
    assert lm.data_config["input_size"] == [3, 32, 32]  # the checkpoint's own preprocessing
    with torch.no_grad():
        assert lm.model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_select_scores_the_registered_model_with_leep(pretrained, tiny_target, tiny_params, tmp_path):
    from transferkit.select.rank import run_select

    r = run_select(
        tiny_target, tmp_path, tiny_params, ["zoo:mobilenetv2_100-mnist", "scratch:mobilenetv2_100"], progress=False
    )
    by = {c["model"]: c for c in r["candidates"]}
    assert by["zoo:mobilenetv2_100-mnist"]["leep"] is not None and by["scratch:mobilenetv2_100"]["leep"] is None
    assert r["selected"] == "zoo:mobilenetv2_100-mnist"


def test_zoo_star_candidates_are_every_registered_source_at_its_own_side(pretrained, registry, tmp_path, monkeypatch):
    from transferkit.core.config import Params
    from transferkit.models import zoo
    from transferkit.select.rank import expand_candidates

    assert expand_candidates(["pixels", "zoo:*", "mobilenetv2_100"]) == [
        "pixels",
        "zoo:mobilenetv2_100-mnist",
        "mobilenetv2_100",
    ]
    assert "zoo:*" in Params().select.candidates  # the defaults rank what `transferkit pretrain` registered
    # data.image_size auto (the default): the source runs at the 32 px it was pretrained at, not at 128
    lm = zoo.create_model("zoo:mobilenetv2_100-mnist", num_classes=3, image_size=Params().data.image_size)
    assert lm.data_config["input_size"] == [3, 32, 32]
    monkeypatch.setenv("TRANSFERKIT_ZOO", str(tmp_path / "empty"))
    assert expand_candidates(["zoo:*", "pixels"]) == ["pixels"]  # nothing registered: nothing added


def test_tampered_weights_are_refused(pretrained, registry):
    from transferkit.models import catalog, zoo
    from transferkit.models import registry as models_registry

    card, _ = pretrained
    path = registry / card["name"] / "model.safetensors"
    original = path.read_bytes()
    try:
        data = bytearray(original)
        data[-1] ^= 0xFF  # one bit of one weight
        path.write_bytes(bytes(data))
        ok, detail = catalog.availability("zoo:mobilenetv2_100-mnist")
        assert ok is False and "sha256" in detail
        with pytest.raises(models_registry.ZooError, match="sha256"):
            zoo.create_model("zoo:mobilenetv2_100-mnist")
    finally:
        path.write_bytes(original)
    assert catalog.availability("zoo:mobilenetv2_100-mnist")[0] is True


def test_name_clash_needs_force_and_bad_inputs_fail_before_training(pretrained, tiny_reference, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from transferkit.cli.main import app

    monkeypatch.chdir(tmp_path)  # no ./params.yaml: defaults
    runner = CliRunner()
    r = runner.invoke(app, ["pretrain", "--data", str(tiny_reference), "--model", "mobilenetv2_100", "-q"])
    assert r.exit_code == 1 and "already registered" in r.output and "--force" in r.output
    r = runner.invoke(app, ["pretrain", "--data", str(tiny_reference), "--model", "resnet18", "--name", "x", "-q"])
    assert r.exit_code == 1 and "resnet18" in r.output and "not available" in r.output
    r = runner.invoke(
        app, ["pretrain", "--data", str(tmp_path / "absent"), "--model", "mobilenetv2_100", "--name", "y", "-q"]
    )
    assert r.exit_code == 1 and str(tmp_path / "absent") in r.output
    r = runner.invoke(
        app, ["pretrain", "--data", str(tiny_reference), "--model", "mobilenetv2_100", "--name", "../evil", "-q"]
    )
    assert r.exit_code == 1 and "zoo name" in r.output
