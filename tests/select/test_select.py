"""select: LogME / LEEP / kNN against worked examples, and a real ranking on real data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from transferkit.select.rank import (
    cv_logreg_accuracy,
    knn_accuracy,
    leep,
    logme,
    logme_evidence,
    logme_fixed_point,
    rank,
    run_select,
)


def _direct_log_evidence(f: np.ndarray, t: np.ndarray, alpha: float, beta: float) -> float:
    """Bayesian linear regression evidence without any SVD: t ~ N(0, I/beta + F F^T / alpha), per sample."""
    from scipy.stats import multivariate_normal

    n = f.shape[0]
    cov = np.eye(n) / beta + f @ f.T / alpha
    return float(multivariate_normal(mean=np.zeros(n), cov=cov).logpdf(t)) / n


@pytest.mark.parametrize("n,d", [(60, 8), (30, 50)])  # N > D and N < D (thin SVD, null space of F)
def test_logme_evidence_equals_direct_gaussian_marginal(n, d):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    f = rng.normal(size=(n, d)) + y[:, None] * 0.5
    t = (y == 1).astype(float)
    for alpha, beta in [(0.7, 3.0), (25.0, 0.4), logme_fixed_point(f, t)]:
        assert logme_evidence(f, t, alpha, beta) == pytest.approx(_direct_log_evidence(f, t, alpha, beta), rel=1e-9)
    # LogME = mean over classes of the evidence at each class's fixed point
    per_class = [
        logme_evidence(f, (y == c).astype(float), *logme_fixed_point(f, (y == c).astype(float))) for c in range(3)
    ]
    assert logme(f, y) == pytest.approx(np.mean(per_class), rel=1e-12)


def test_logme_fixed_point_maximises_the_evidence():
    """MacKay's updates are the stationarity conditions: run to convergence, the direct evidence is a
    maximum in alpha and beta, and beta recovers the noise precision the data were drawn with."""
    rng = np.random.default_rng(3)
    n, d, alpha0, beta0 = 400, 6, 2.0, 16.0
    f = rng.normal(size=(n, d))
    t = f @ rng.normal(scale=alpha0**-0.5, size=d) + rng.normal(scale=beta0**-0.5, size=n)
    alpha, beta = logme_fixed_point(f, t, max_iter=500, tol=1e-12)
    best = _direct_log_evidence(f, t, alpha, beta)
    for da, db in [(1.1, 1), (0.9, 1), (1, 1.1), (1, 0.9)]:
        assert _direct_log_evidence(f, t, alpha * da, beta * db) < best
    assert beta == pytest.approx(beta0, rel=0.15)


def test_logme_prefers_informative_features():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 25)
    noise = rng.normal(size=(100, 32))
    informative = noise.copy()
    informative[:, :4] += 3.0 * np.eye(4)[y]  # class signal in 4 dims
    assert logme(informative, y) > logme(noise, y) + 0.1


def test_leep_perfect_vs_uninformative_source():
    y = np.repeat(np.arange(3), 10)
    perfect = np.full((30, 5), -20.0)
    perfect[np.arange(30), y] = 20.0  # source class z == target class y
    assert leep(perfect, y) == pytest.approx(0.0, abs=1e-6)
    flat = np.zeros((30, 5))
    assert leep(flat, y) == pytest.approx(np.log(1 / 3), abs=1e-6)


def test_leep_matches_a_hand_calculation():
    """Nguyen et al. 2020, eq. 1-2, worked by hand for 4 images, 2 source classes, 2 target classes."""
    theta = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]])  # source softmax outputs
    y = np.array([0, 0, 1, 1])
    # joint P(z, y) = 1/4 sum_i theta_iz [y_i = y]: z0: (0.35, 0.10), z1: (0.15, 0.40)
    # P(y | z0) = (7/9, 2/9), P(y | z1) = (3/11, 8/11)
    eep = [
        0.8 * 7 / 9 + 0.2 * 3 / 11,
        0.6 * 7 / 9 + 0.4 * 3 / 11,
        0.3 * 2 / 9 + 0.7 * 8 / 11,
        0.1 * 2 / 9 + 0.9 * 8 / 11,
    ]
    expected = np.mean(np.log(eep))
    assert leep(np.log(theta) + 5.0, y) == pytest.approx(
        expected, rel=1e-12
    )  # logits: any shift gives the same softmax
    assert leep(np.log(theta), np.array([3, 3, 7, 7])) == pytest.approx(
        expected, rel=1e-12
    )  # label values don't matter


def test_cv_logreg_accuracy_separable_and_random():
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(3), 12)
    f = rng.normal(size=(36, 10)) * 0.1
    f[np.arange(36), y] += 2.0
    assert cv_logreg_accuracy(f, y) == 1.0
    assert cv_logreg_accuracy(rng.normal(size=(36, 10)), y) < 0.7


def test_rank_never_selects_the_control_and_puts_missing_scores_last():
    from pathlib import Path

    from transferkit.select.rank import Plan

    plan = Plan("t", [(Path("a.png"), 0)], "md5", [], [])
    rows = [
        {"model": "scratch:m", "control": True, "score": 0.9, "seconds": 1.0},
        {"model": "a", "control": False, "score": 0.5, "seconds": 1.0},
        {"model": "b", "control": False, "score": None, "seconds": 1.0},  # e.g. LEEP without a source head
        {"model": "c", "control": False, "score": 0.7, "seconds": 2.0},
    ]
    r = rank(rows, plan, "leep")
    assert [c["model"] for c in r["candidates"]] == ["scratch:m", "c", "a", "b"]
    assert r["selected"] == "c" and r["metric"] == "leep" and r["scoring_seconds"] == 5.0
    assert "scratch:m" in r["warning"]
    assert rank(rows[1:], plan, "leep")["warning"] is None


def test_knn_accuracy_separable_and_random():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 20)
    f = rng.normal(size=(40, 4)) * 0.1 + np.where(y[:, None] == 0, [1, 0, 0, 0], [0, 1, 0, 0])
    assert knn_accuracy(f, y) == 1.0
    assert knn_accuracy(rng.normal(size=(40, 4)), rng.permutation(y)) < 0.8


def test_run_select_ranks_pretrained_above_scratch(tiny_target, tiny_params, tmp_path):
    r = run_select(tiny_target, tmp_path, tiny_params, progress=False)
    saved = json.loads((tmp_path / "ranking.json").read_text())
    assert saved["selected"] == r["selected"] == "mobilenetv2_100"
    assert {"metric", "selected", "candidates"} <= saved.keys()
    models = [c["model"] for c in saved["candidates"]]
    assert sorted(models) == ["mobilenetv2_100", "scratch:mobilenetv2_100"]
    scores = [c["score"] for c in saved["candidates"]]
    assert scores == sorted(scores, reverse=True)
    by = {c["model"]: c for c in saved["candidates"]}
    # ImageNet features separate real digits better than random ones: LogME and kNN agree.
    assert by["mobilenetv2_100"]["logme"] > by["scratch:mobilenetv2_100"]["logme"]
    assert by["mobilenetv2_100"]["leep"] is not None and by["scratch:mobilenetv2_100"]["leep"] is None
    assert all(c["seconds"] > 0 for c in saved["candidates"])
    assert saved["n_images"] == 100  # train 6 + val 4 per class; test is never looked at


def test_run_select_reports_unavailable_candidates(tiny_target, tiny_params, tmp_path):
    r = run_select(tiny_target, tmp_path, tiny_params, ["mobilenetv2_100", "resnet18"], progress=False)
    assert [u["model"] for u in r["unavailable"]] == ["resnet18"]
    assert r["selected"] == "mobilenetv2_100"


def test_cache_key_follows_the_image_bytes(tmp_path, tiny_params):
    """Changing one image changes the dataset md5, hence the cache key, and its features are recomputed."""
    import shutil

    from PIL import Image

    from transferkit.data.folder import load_dataset
    from transferkit.models.embed import cache_dir, cache_key, compute_embeddings

    src = tmp_path / "ds"
    for c in ("a", "b"):
        for i in range(3):
            (src / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((32, 32), 40 * i + (0 if c == "a" else 120), np.uint8)).save(src / c / f"{i}.png")
    ds1 = load_dataset(src, split_missing=False)
    spec = "scratch:mobilenetv2_100"
    k1 = cache_key(spec, None, ds1.md5, 32)
    e1 = compute_embeddings(spec, ds1.all_samples(), ds1.md5, image_size=32, progress=False)
    assert (cache_dir() / f"{k1}.npz").is_file()

    changed = tmp_path / "ds2"
    shutil.copytree(src, changed)
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(changed / "a" / "0.png")  # same name, new pixels
    ds2 = load_dataset(changed, split_missing=False)
    assert ds2.md5 != ds1.md5
    k2 = cache_key(spec, None, ds2.md5, 32)
    assert k2 != k1
    assert cache_key(spec, None, ds1.md5, 64) != k1 and cache_key(spec, "sha", ds1.md5, 32) != k1
    e2 = compute_embeddings(spec, ds2.all_samples(), ds2.md5, image_size=32, progress=False)
    keys = [p.name for p, _ in ds2.all_samples()]
    i = next(j for j, (p, _) in enumerate(ds2.all_samples()) if p.parent.name == "a" and p.name == "0.png")
    assert not np.allclose(e1["features"][i], e2["features"][i])  # not served from the old file
    same = [j for j in range(len(keys)) if j != i]
    np.testing.assert_allclose(e1["features"][same], e2["features"][same], rtol=1e-5, atol=1e-6)


def test_unknown_candidate_is_a_clear_error(tiny_target, tiny_params, tmp_path):
    from transferkit.models.registry import ZooError

    with pytest.raises(ZooError, match="mobilenetv2_10'.*not a timm architecture"):
        run_select(tiny_target, tmp_path, tiny_params, ["mobilenetv2_100", "mobilenetv2_10"], progress=False)
    with pytest.raises(ZooError, match="zoo:nope.*not registered"):
        run_select(tiny_target, tmp_path, tiny_params, ["zoo:nope"], progress=False)
    with pytest.raises(ZooError, match="none of the candidates can be loaded here.*resnet18"):
        run_select(tiny_target, tmp_path, tiny_params, ["resnet18"], progress=False)
    assert not (tmp_path / "ranking.json").exists()


def test_cli_unknown_candidate_exits_1_with_one_line(tiny_target, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from transferkit.cli.main import app

    monkeypatch.chdir(tmp_path)  # no ./params.yaml: defaults
    r = CliRunner().invoke(
        app,
        [
            "select",
            "--target",
            str(tiny_target),
            "--out",
            str(tmp_path / "o"),
            "--candidates",
            "file:/nonexistent/model.safetensors",
            "-q",
        ],
    )
    assert r.exit_code == 1
    assert "/nonexistent/model.safetensors" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_confirm_fine_tunes_the_top_k_and_picks_by_validation(tiny_target, tiny_params, tmp_path):
    tiny_params.select.confirm_epochs = 1
    tiny_params.select.confirm_strategy = "full"
    r = run_select(
        tiny_target,
        tmp_path,
        tiny_params,
        ["mobilenetv2_100", "tf_efficientnet_lite0", "scratch:mobilenetv2_100"],
        progress=False,
        confirm=2,
    )
    saved = json.loads((tmp_path / "ranking.json").read_text())
    assert saved == json.loads(json.dumps(r))
    assert {"metric", "selected", "candidates"} <= saved.keys()
    c = saved["confirm"]
    assert (
        c["k"] == 2
        and [x["model"] for x in c["runs"]] == [x["model"] for x in saved["candidates"] if not x["control"]][:2]
    )
    best = max(x["val_accuracy"] for x in c["runs"])
    assert saved["selected"] == c["selected"] and saved["selected_by"] == "confirm"
    assert next(x for x in c["runs"] if x["model"] == saved["selected"])["val_accuracy"] == best
    for x in c["runs"]:
        assert x["strategy"] == "full" and x["epochs"] == 1
        assert (
            json.loads((tmp_path / "confirm" / x["run"].split("/")[-1] / "metrics.json").read_text())["model"]
            == x["model"]
        )
    # default `auto`: 6 labels per class -> train would ship a linear probe, so confirm compares linear probes
    tiny_params.select.confirm_strategy = "auto"
    auto = run_select(
        tiny_target,
        tmp_path / "auto",
        tiny_params,
        ["mobilenetv2_100", "tf_efficientnet_lite0"],
        progress=False,
        confirm=2,
    )
    # a linear probe is confirmed on the cached features, exactly as train fits it: one fit, no run folder
    assert auto["confirm"]["strategy"] == "linear-probe" and auto["confirm"]["epochs"] == 1
    assert all(x["strategy"] == "linear-probe" and x["run"] is None for x in auto["confirm"]["runs"])
    assert not (tmp_path / "auto" / "confirm").exists()
    from transferkit.train.stage import run_train

    m = run_train(
        tiny_target, tmp_path / "t", tiny_params, auto["selected"], "linear-probe", progress=False, baselines=False
    )
    assert m["val_accuracy"] == pytest.approx(
        next(x for x in auto["confirm"]["runs"] if x["model"] == auto["selected"])["val_accuracy"]
    )


def test_confirm_auto_compares_where_the_train_search_starts(tiny_target, tiny_params):
    from transferkit.select.rank import confirm_strategy

    p = tiny_params.model_copy(deep=True)
    p.select.confirm_strategy, p.train.strategy = "auto", "auto"
    p.train.linear_probe_max_per_class = 1  # 6 labels per class: the rule alone would fine-tune every layer
    p.train.search_mode = "rule"
    assert confirm_strategy(tiny_target, p) == "full"
    p.train.search_mode, p.train.search = "evidence", ["lp-ft", "full"]
    assert confirm_strategy(tiny_target, p) == "lp-ft"  # the search's first configuration, not the rule's
    p.train.strategy = "full"  # train does not search: confirm trains what the rule ships
    assert confirm_strategy(tiny_target, p) == "full"
    p.select.confirm_strategy = "linear-probe"
    assert confirm_strategy(tiny_target, p) == "linear-probe"


@pytest.mark.slow
def test_dask_runner_ranks_like_the_sequential_path(tiny_target, tiny_params, tmp_path):
    """`select --runner dask` (Prefect flow, LocalCluster worker processes, cold cache) == run_select."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    seq = run_select(tiny_target, tmp_path / "seq", tiny_params, progress=False)
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "TRANSFERKIT_CACHE": str(tmp_path / "cold"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    cmd = [
        str(Path(sys.executable).parent / "transferkit"),
        "select",
        "--target",
        str(tiny_target),
        "--out",
        str(tmp_path / "dask"),
        "--runner",
        "dask",
        "-q",
        "--candidates",
        ",".join(tiny_params.select.candidates),
        "--set",
        "data.image_size=32",
        "--set",
        "data.batch_size=32",
        "--set",
        "select.workers=2",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)  # no params.yaml
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    par = json.loads((tmp_path / "dask" / "ranking.json").read_text())
    assert list((tmp_path / "cold").rglob("*.npz"))  # the workers computed features, not read ours
    assert par["selected"] == seq["selected"]
    assert [c["model"] for c in par["candidates"]] == [c["model"] for c in seq["candidates"]]
    for a, b in zip(par["candidates"], seq["candidates"]):
        for k in ("logme", "knn", "score"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6)
