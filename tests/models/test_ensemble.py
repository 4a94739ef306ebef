"""Feature ensembles (SPEC+SPEC): one model over several sources' features, served from their cache.

.venv/bin/pytest -q tests/models/test_ensemble.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from transferkit.models import catalog, registry, zoo

PAIR = "mobilenetv2_100+tf_efficientnet_lite0"


def test_ensemble_spec_parses_and_refuses_what_cannot_be_one():
    ms = zoo.parse_spec(PAIR)
    assert (ms.kind, ms.arch, ms.members) == ("ensemble", PAIR, ("mobilenetv2_100", "tf_efficientnet_lite0"))
    assert catalog.availability(PAIR)[0] is True
    with pytest.raises(registry.ZooError, match="two or more different"):
        zoo.parse_spec("mobilenetv2_100+mobilenetv2_100")
    with pytest.raises(registry.ZooError, match="scratch"):
        zoo.parse_spec("mobilenetv2_100+scratch:mobilenetv2_100")
    with pytest.raises(registry.ZooError, match="not_a_model"):
        zoo.parse_spec("mobilenetv2_100+not_a_model")


def test_cached_ensemble_features_equal_the_ensemble_models_forward(tiny_target, tiny_params):
    """The cache serves an ensemble by concatenating its members' features; that must be what the model
    computes (one input at mean 0 / std 1, each member normalising inside), or a probe fitted on cached
    features would not be the model that is exported."""
    from transferkit.data.folder import load_with_params
    from transferkit.models.embed import embeddings, forward

    ds = load_with_params(tiny_target, tiny_params)
    samples = ds.splits["train"][:12]
    cached = embeddings(PAIR, samples, ds.md5, tiny_params.data, progress=False)["features"]
    a, b = (embeddings(m, samples, ds.md5, tiny_params.data, progress=False)["features"] for m in PAIR.split("+"))
    np.testing.assert_array_equal(cached, np.concatenate([a, b], axis=1))
    lm = zoo.create_model(PAIR, image_size=tiny_params.data.image_size)
    assert lm.data_config["mean"] == [0.0, 0.0, 0.0] and lm.data_config["std"] == [1.0, 1.0, 1.0]
    direct = forward(lm, samples, 8, False, PAIR)["features"]
    assert direct.shape == cached.shape == (12, 1280 + 1280)
    np.testing.assert_allclose(direct, cached, atol=2e-4, rtol=1e-4)


def test_members_that_see_different_inputs_are_refused(tmp_path):
    """A checkpoint trained at 48 px runs at its own side under image_size auto; a packaged source at AUTO_SIZE:
    one image cannot feed both, and both the model and the cache say so naming the sides."""
    from transferkit.core.config import load_params
    from transferkit.models.embed import embeddings

    lm = zoo.create_model("mobilenetv2_100", num_classes=3, image_size=48)
    ckpt = tmp_path / "m48.safetensors"
    zoo.save_checkpoint(lm.model, ckpt, {"arch": "mobilenetv2_100", "num_classes": "3", "data_config": lm.data_config})
    spec = f"file:{ckpt}+tf_efficientnet_lite0"
    with pytest.raises(registry.ZooError, match=rf"48px.*{zoo.AUTO_SIZE}px"):
        zoo.create_model(spec, num_classes=2, image_size="auto")
    with pytest.raises(registry.ZooError, match="different inputs"):
        embeddings(spec, [], "md5", load_params(None, {"data.image_size": "auto"}).data, progress=False)


def test_partial_fine_tuning_refuses_an_ensemble():
    from transferkit.train.freezing import set_trainable
    from transferkit.train.strategy import StrategyError

    lm = zoo.create_model(PAIR, num_classes=3, image_size=32)
    with pytest.raises(StrategyError, match="group_matcher"):
        set_trainable(lm.model, "partial", 2)


def test_select_scores_the_top_two_as_one_ensemble(tiny_target, tiny_params, tmp_path):
    from transferkit.select.rank import knn_accuracy, run_select

    p = tiny_params.model_copy(deep=True)
    p.select.candidates = ["mobilenetv2_100", "tf_efficientnet_lite0", "scratch:mobilenetv2_100"]
    p.select.confirm = 0
    r = run_select(tiny_target, tmp_path / "on", p, progress=False)
    by = {c["model"]: c for c in r["candidates"]}
    singles = sorted(("mobilenetv2_100", "tf_efficientnet_lite0"), key=lambda m: -by[m]["score"])
    ens = "+".join(singles)  # members in score order
    assert set(by) == {*singles, "scratch:mobilenetv2_100", ens}
    assert by[ens]["feature_dim"] == 2560 and by[ens]["control"] is False and by[ens]["leep"] is None
    from transferkit.data.folder import load_with_params
    from transferkit.models.embed import embeddings

    ds = load_with_params(tiny_target, p)
    samples = ds.splits["train"] + ds.splits["val"]
    f = np.concatenate([embeddings(m, samples, ds.md5, p.data, False)["features"] for m in singles], axis=1)
    assert by[ens]["knn"] == knn_accuracy(f, np.array([y for _, y in samples]), k=p.select.knn_k)
    p.select.ensemble = 0
    off = run_select(tiny_target, tmp_path / "off", p, progress=False)
    assert not any("+" in c["model"] for c in off["candidates"])


@pytest.mark.slow
def test_an_ensemble_trains_checkpoints_and_exports_with_parity(tiny_target, tiny_params, tmp_path):
    """Linear probe on cached features -> safetensors checkpoint -> file: reload -> ONNX with parity."""
    from transferkit.export.stage import run_export
    from transferkit.train.stage import run_train

    p = tiny_params.model_copy(deep=True)
    p.export.int8 = False
    m = run_train(tiny_target, tmp_path / "run", p, PAIR, strategy="linear-probe", progress=False)
    assert m["model"] == PAIR and m["strategy"] == "linear-probe"
    assert m["val_accuracy"] > 0.3  # 10 classes: chance is 0.1
    lm = zoo.create_model(f"file:{tmp_path / 'run' / 'model.safetensors'}")
    assert type(lm.model).__name__ == "FeatureEnsemble" and lm.model.num_classes == 10
    assert lm.data_config["mean"] == [0.0, 0.0, 0.0]
    meta = run_export(tmp_path / "run", tmp_path / "repo", p, force=True, progress=False)
    assert meta["parity"]["top1_agreement"] >= p.export.min_top1_agreement
    assert meta["parity"]["max_abs_diff"] <= p.export.parity_atol
    saved = json.loads((Path(meta["path"]) / "metadata.json").read_text())
    assert saved["mean"] == [0.0, 0.0, 0.0] and saved["source_model"] == PAIR
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert lm.model.eval()(x).shape == (2, 10)
