"""The L-BFGS linear probe and self-training (transferkit.train.probe), on crafted features and on real digits."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from transferkit.core.config import load_params
from transferkit.train.probe import fit_probe
from transferkit.train.stage import run_train


def _blobs(rng, n_per_class: int, centres: np.ndarray, noise: float):
    y = np.repeat(np.arange(len(centres)), n_per_class)
    return centres[y] + noise * rng.standard_normal((len(y), centres.shape[1])), y


def test_probe_weights_act_on_raw_features_with_floored_standardisation():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 16)) * 3 + 50  # far from 0 and unscaled: the folding must be exact
    (x, y), (xv, yv) = _blobs(rng, 10, centres, 2.0), _blobs(rng, 10, centres, 2.0)
    x[:, 5] = 7.0  # a constant feature (a dead ReLU) must not divide by zero
    xv[:, 5] = 7.0
    x[:, :4] *= 1e-3  # near-constant features: their std is floored at the median feature's
    xv[:, :4] *= 1e-3
    fit = fit_probe((x, y), (xv, yv), 4, grid=[0.3])
    sd = x.std(0)
    scaled = LogisticRegression(C=0.3, max_iter=2000, tol=1e-6).fit((x - x.mean(0)) / np.maximum(sd, np.median(sd)), y)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=2000, tol=1e-6)).fit(x, y)
    want = scaled.decision_function((xv - x.mean(0)) / np.maximum(sd, np.median(sd)))
    np.testing.assert_allclose(fit.logits(xv), want, rtol=1e-6, atol=1e-6)
    # plain standardisation would blow the near-constant features up into large weights
    assert np.abs(fit.weight).max() < np.abs(ref[1].coef_ / ref[0].scale_).max() / 10


def test_binary_probe_gives_sklearns_probabilities():
    from sklearn.linear_model import LogisticRegression

    from transferkit.core.numeric import softmax

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((2, 8))
    (x, y), (xv, yv) = _blobs(rng, 15, centres, 1.5), _blobs(rng, 15, centres, 1.5)
    fit = fit_probe((x, y), (xv, yv), 2, grid=[1.0])
    sd = x.std(0)
    z, zv = ((a - x.mean(0)) / np.maximum(sd, np.median(sd)) for a in (x, xv))
    ref = LogisticRegression(C=1.0, max_iter=2000, tol=1e-6).fit(z, y)
    np.testing.assert_allclose(softmax(fit.logits(xv)), ref.predict_proba(zv), atol=1e-6)


def test_probe_picks_the_val_best_strength():
    # 30% of the train labels flipped, 12 per class in 40 dimensions: a weak L2 (large C) memorises the noise,
    # which clean validation labels must expose
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((3, 40)) * 0.6
    (x, y), (xv, yv) = _blobs(rng, 12, centres, 1.0), _blobs(rng, 60, centres, 1.0)
    flip = rng.random(len(y)) < 0.3
    y = np.where(flip, (y + 1) % 3, y)
    fit = fit_probe((x, y), (xv, yv), 3, grid=[1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    best = max(fit.grid, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert fit.C == best["C"] and len(fit.grid) == 6
    assert max(r["train_accuracy"] for r in fit.grid) == 1.0  # the weakest L2 memorises the flipped labels
    assert best["val_accuracy"] > fit.grid[-1]["val_accuracy"]  # ... and val says it generalises worse


def test_self_training_uses_the_pool_and_keeps_only_what_val_supports():
    # 2 labels per class of 5 overlapping classes; 400 unlabelled points: pseudo-labels move the boundary
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((5, 10)) * 1.2
    (x, y), (xv, yv) = _blobs(rng, 2, centres, 1.0), _blobs(rng, 40, centres, 1.0)
    pool, _ = _blobs(rng, 80, centres, 1.0)
    plain = fit_probe((x, y), (xv, yv), 5, grid=[0.1])
    st = fit_probe((x, y), (xv, yv), 5, grid=[0.1], pool=pool)
    assert [r["round"] for r in st.rounds] == [0, 1, 2, 3, 4, 5]
    assert st.rounds[0]["val_accuracy"] == pytest.approx(plain.grid[0]["val_accuracy"])
    assert [r["pseudo_labels"] for r in st.rounds][1:] == sorted(r["pseudo_labels"] for r in st.rounds[1:])
    kept = st.rounds[st.kept_round]
    assert kept["val_accuracy"] == max(r["val_accuracy"] for r in st.rounds)
    assert kept["val_accuracy"] > plain.grid[0]["val_accuracy"]  # the pool helps on this case
    # a pool of noise far from every class helps nothing: round 0 (the plain probe) must ship
    noise = fit_probe((x, y), (xv, yv), 5, grid=[0.1], pool=rng.standard_normal((200, 10)) * 40)
    assert noise.kept_round == 0 and np.array_equal(noise.weight, plain.weight)


@pytest.fixture(scope="module")
def pooled_target(tmp_path_factory):
    from transferkit.data.builtin import write_builtin

    out = tmp_path_factory.mktemp("pooled") / "digits"
    write_builtin(
        "digits",
        out,
        per_class=14,
        size=32,
        train_per_class=4,
        val_per_class=4,
        unlabelled_per_class=6,
        progress=False,
    )
    return out


def test_self_training_never_reads_test_labels(pooled_target, tmp_path):
    params = load_params(None, {"data.image_size": 32, "train.self_training": "auto"})
    a = run_train(pooled_target, tmp_path / "a", params, "mobilenetv2_100", strategy="linear-probe", progress=False)
    assert a["probe"]["method"] == "lbfgs" and a["probe"]["self_training"]["pool"] == 60
    # the same images with the test labels shuffled: every test image moved to another class's folder
    shuffled = tmp_path / "shuffled"
    shutil.copytree(pooled_target, shuffled)
    classes = sorted(p.name for p in (shuffled / "test").iterdir())
    files = {c: sorted((shuffled / "test" / c).iterdir()) for c in classes}
    for i, c in enumerate(classes):
        for f in files[c]:
            f.rename(shuffled / "test" / classes[(i + 1) % len(classes)] / f"moved-{c}-{f.name}")
    b = run_train(shuffled, tmp_path / "b", params, "mobilenetv2_100", strategy="linear-probe", progress=False)
    assert a["data_md5"] != b["data_md5"]  # a different dataset as far as any cache can tell ...
    wa, wb = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("a", "b"))  # (its metadata names the md5)
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)  # ... the same weights
    assert b["probe"] == a["probe"] and b["val_accuracy"] == a["val_accuracy"]
    assert b["test_accuracy"] != a["test_accuracy"]  # the shuffled labels were read, by the test only
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["probe"]["C"] in params.train.probe_c


def test_self_training_is_off_by_default_and_then_ignores_the_pool(pooled_target, tmp_path):
    params = load_params(None, {"data.image_size": 32})
    m = run_train(pooled_target, tmp_path, params, "mobilenetv2_100", strategy="linear-probe", progress=False)
    assert m["probe"]["method"] == "lbfgs" and "self_training" not in m["probe"]
