"""drift stage on real data: MNIST (reference) vs sklearn digits, vs another MNIST draw, unlabelled
and mismatched-label folders, and refusal of too-small folders.

    .venv/bin/pytest -q tests/drift/test_drift.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from transferkit.data.builtin import write_builtin
from transferkit.data.folder import DataError
from transferkit.drift import detect as drift_module
from transferkit.drift.detect import STAT_COLUMNS, image_stats, run_drift

REQUIRED = {"drift_detected", "severity", "method", "score", "threshold", "n_reference", "n_current"}
EXTRA = {"per_feature", "embeddings", "task_mismatch", "label_sets", "reference_md5", "current_md5", "seconds"}


@pytest.fixture(scope="module")
def mnist_vs_digits(tiny_reference, tiny_target, tmp_path_factory):
    from transferkit.core.config import load_params

    params = load_params(None, {"data.image_size": 32, "data.batch_size": 32, "drift.min_samples": 5})
    out = tmp_path_factory.mktemp("drift-digits")
    seen = []
    real = drift_module._embeddings_verdict
    with pytest.MonkeyPatch.context() as mp:  # record what the report's EmbeddingsDrift decided
        mp.setattr(drift_module, "_embeddings_verdict", lambda snap: seen.append(real(snap)) or seen[-1])
        result = run_drift(tiny_reference, tiny_target, out, params, progress=False)
    return result, out, seen


def _pngs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png"))


def test_mnist_vs_digits_is_severe_drift(mnist_vs_digits):
    result, out, seen = mnist_vs_digits
    assert REQUIRED | EXTRA <= set(result)
    assert result["drift_detected"] is True
    assert result["severity"] == "severe"
    assert "image-stats" in result["method"] and "embeddings" in result["method"]
    assert result["n_reference"] == 80 and result["n_current"] == 160  # all splits of digits used
    assert result["score"] >= result["threshold"]
    assert result["embeddings"]["drifted"] is True and result["embeddings"]["score"] > 0.8
    # the verdict is read from the report's own EmbeddingsDrift run (pinned evidently), not recomputed
    assert seen == [(result["embeddings"]["score"], True, "model")]
    # same digit classes on both sides: no task mismatch, class balance tested and equal
    assert result["task_mismatch"] is False
    assert result["label_sets"]["reference"] == result["label_sets"]["current"] == [str(i) for i in range(10)]
    assert result["labels"]["checked"] is True and result["labels"]["drifted"] is False

    features = {f["feature"]: f for f in result["per_feature"]}
    assert set(STAT_COLUMNS) <= set(features)
    assert features["brightness"]["drifted"] is True  # blurry upscaled 8x8 digits vs crisp MNIST
    assert features["width"]["drifted"] is False  # both written at 32 px: a constant column
    assert all({"feature", "stattest", "p_value", "drifted"} <= set(f) for f in result["per_feature"])

    on_disk = json.loads((out / "drift.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    html = (out / "drift.html").read_text(encoding="utf-8")
    assert "<html" in html.lower()
    assert (out / "params.yaml").is_file()
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_mnist_vs_other_mnist_draw_does_not_fire(tiny_reference, tiny_params, tmp_path):
    other = tmp_path / "mnist-seed1"
    write_builtin("mnist", other, per_class=8, size=32, seed=1, progress=False)
    ref_names = {p.relative_to(tiny_reference) for p in _pngs(tiny_reference)}
    overlap = ref_names & {p.relative_to(other) for p in _pngs(other)}
    assert len(overlap) <= 4  # essentially a fresh draw of the same distribution

    result = run_drift(tiny_reference, other, tmp_path / "out", tiny_params, progress=False)
    assert result["drift_detected"] is False, result["method"]
    assert result["severity"] == "none"
    assert result["score"] < tiny_params.drift.severe_share
    assert result["task_mismatch"] is False
    assert (tmp_path / "out" / "drift.json").is_file()


def test_unlabelled_current_folder(tiny_reference, tiny_target, tiny_params, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in _pngs(tiny_target):  # images directly in the folder: no class folders
        shutil.copy(p, flat / f"{p.parent.parent.name}_{p.parent.name}_{p.name}")
    n = len(list(flat.iterdir()))
    assert n == 160

    result = run_drift(tiny_reference, flat, tmp_path / "out", tiny_params, progress=False)
    assert result["n_current"] == n
    assert result["label_sets"] == {"reference": [str(i) for i in range(10)], "current": None}
    assert result["task_mismatch"] is False
    assert result["labels"]["checked"] is False
    assert result["drift_detected"] is True  # still digits vs MNIST, labels or not


def test_too_few_images_is_refused_naming_the_folder(tiny_reference, tiny_params, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for p in _pngs(tiny_reference)[:3]:
        shutil.copy(p, small / p.name)
    assert tiny_params.drift.min_samples == 5
    with pytest.raises(DataError, match=r"at least 5") as err:
        run_drift(tiny_reference, small, tmp_path / "out", tiny_params, progress=False)
    assert str(small) in str(err.value)
    with pytest.raises(DataError, match=str(small)):
        run_drift(small, tiny_reference, tmp_path / "out", tiny_params, progress=False)
    assert not (tmp_path / "out" / "drift.json").exists()


def test_small_sets_decide_embeddings_outside_the_report(tiny_reference, tiny_target, tiny_params, tmp_path):
    # 6 + 6 images: too few for the t-SNE plot inside EmbeddingsDrift, the test itself still runs
    ref, cur = tmp_path / "ref", tmp_path / "cur"
    for folder, src in ((ref, tiny_reference), (cur, tiny_target)):
        folder.mkdir()
        for i, p in enumerate(_pngs(src)[::8][:6]):
            shutil.copy(p, folder / f"{i}.png")
    result = run_drift(ref, cur, tmp_path / "out", tiny_params, progress=False)
    assert (result["n_reference"], result["n_current"]) == (6, 6)
    emb = result["embeddings"]
    assert emb["in_report"] is False and emb["error"] is None
    assert 0.0 <= emb["score"] <= 1.0 and emb["pca_components"] == 5  # n_reference - 1
    assert json.loads((tmp_path / "out" / "drift.json").read_text())["embeddings"] == emb
    assert "<html" in (tmp_path / "out" / "drift.html").read_text(encoding="utf-8").lower()


def test_task_mismatch_when_label_sets_differ(tiny_reference, tiny_params, tmp_path):
    animals = tmp_path / "animals"
    pngs = _pngs(tiny_reference)
    for name, chunk in (("cat", pngs[:8]), ("dog", pngs[8:16])):
        (animals / name).mkdir(parents=True)
        for p in chunk:
            shutil.copy(p, animals / name / p.name)

    result = run_drift(tiny_reference, animals, tmp_path / "out", tiny_params, progress=False)
    assert result["task_mismatch"] is True
    assert result["label_sets"]["current"] == ["cat", "dog"]
    assert result["label_sets"]["reference"] == [str(i) for i in range(10)]
    assert result["severity"] == "severe" and result["drift_detected"] is True
    assert "task-mismatch" in result["method"]
    assert result["labels"]["checked"] is False  # no class distribution to compare across tasks


def test_image_stats_on_known_images():
    from PIL import Image

    grey = image_stats(Image.new("RGB", (20, 10), (128, 128, 128)))
    assert grey["contrast"] == 0 and grey["sharpness"] == 0 and grey["entropy"] == 0
    assert grey["colourfulness"] == 0 and grey["brightness"] == pytest.approx(128, abs=0.5)
    assert (grey["width"], grey["height"], grey["aspect"]) == (20, 10, 2.0)
    assert image_stats(Image.new("RGB", (8, 8), (255, 255, 255)))["saturated_fraction"] == 1.0
    assert image_stats(Image.new("RGB", (8, 8), (0, 0, 0)))["black_fraction"] == 1.0
    assert image_stats(Image.new("RGB", (8, 8), (255, 0, 0)))["colourfulness"] > 50

    checker = np.indices((16, 16)).sum(axis=0) % 2 * 255
    sharp = image_stats(Image.fromarray(checker.astype(np.uint8)).convert("RGB"))
    assert sharp["sharpness"] > 1e4 and sharp["entropy"] == pytest.approx(1.0)


def test_import_is_light():
    heavy = "('evidently', 'torch', 'sklearn', 'pandas')"
    code = f"import sys, transferkit.drift.detect; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
