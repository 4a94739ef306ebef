"""select: LogME / LEEP / kNN against worked examples, and a real ranking on real data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from transferkit.select import knn_accuracy, leep, logme, run_select


def _logme_reference(f: np.ndarray, y: np.ndarray) -> float:
    """The paper's reference formulation: eigendecomposition of the D x D matrix F^T F."""
    f = f.astype(np.float64)
    n, d = f.shape
    v, s, _ = np.linalg.svd(f.T @ f)
    evid = []
    for c in np.unique(y):
        t = (y == c).astype(np.float64)
        tmp = v.T @ (f.T @ t)
        alpha, beta, lam = 1.0, 1.0, 1.0
        for _ in range(11):
            gamma = (s / (s + lam)).sum()
            m = v @ (tmp * beta / (alpha + beta * s))
            alpha_de = (m * m).sum()
            alpha = gamma / alpha_de
            beta_de = ((t - f @ m) ** 2).sum()
            beta = (n - gamma) / beta_de
            new_lam = alpha / beta
            done = abs(new_lam - lam) / lam < 0.01
            lam = new_lam
            if done:
                break
        e = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * s))
             - beta / 2 * beta_de - alpha / 2 * alpha_de - n / 2 * np.log(2 * np.pi))  # fmt: skip
        evid.append(e / n)
    return float(np.mean(evid))


@pytest.mark.parametrize("n,d", [(60, 8), (30, 50)])  # N > D and N < D (thin SVD path)
def test_logme_matches_reference_formulation(n, d):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    f = rng.normal(size=(n, d)) + y[:, None] * 0.5
    assert logme(f, y) == pytest.approx(_logme_reference(f, y), rel=1e-6, abs=1e-8)


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
