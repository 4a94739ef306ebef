"""transferkit.tools.suggest on real packaged data (sklearn digits, 32 px, the packaged ImageNet MobileNetV2): the pool
ranking never reads test labels, spreads over near-duplicates, favours uncertain images, writes its list and
contact sheet, and refuses bad requests with one readable line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from transferkit.core.config import load_params
from transferkit.tools.suggest import SuggestError, run_suggest

MODEL = "mobilenetv2_100"


def _params(**over):
    return load_params(None, {"data.image_size": 32, **over})


@pytest.fixture(scope="module")
def pool_target(tmp_path_factory):
    """digits 32 px: 2 train / 4 val / 6 test per class, 6 pool images per class in unlabelled/."""
    from transferkit.data.builtin import write_builtin

    out = tmp_path_factory.mktemp("suggest") / "digits"
    write_builtin(
        "digits", out, per_class=12, size=32, train_per_class=2, val_per_class=4, unlabelled_per_class=6, progress=False
    )
    return out


def _paths(result: dict) -> list[str]:
    return [r["path"] for r in result["suggestions"]]


RANKED = {"suggest.strategy": "uncertain-diverse"}  # a strategy that reads the model (the default draws at random)


def test_suggestions_never_read_test_labels(pool_target, tmp_path):
    first = run_suggest(pool_target, tmp_path / "a", _params(**RANKED), model=MODEL, n=10, progress=False)
    shuffled = tmp_path / "shuffled"
    shutil.copytree(pool_target, shuffled)
    test = shuffled / "test"
    files = sorted(p for p in test.rglob("*.png"))
    classes = [p.parent.name for p in files]
    new = np.random.default_rng(0).permutation(classes)
    assert (new != np.array(classes)).mean() > 0.5  # most test labels really change
    for i, (p, c) in enumerate(zip(files, new)):
        p.rename(test / c / f"moved{i:04d}.png")
    second = run_suggest(shuffled, tmp_path / "b", _params(**RANKED), model=MODEL, n=10, progress=False)
    assert second["data_md5"] != first["data_md5"]
    assert first["suggestions"] == second["suggestions"]


def test_the_list_and_the_contact_sheet_are_written(pool_target, tmp_path):
    from PIL import Image

    r = run_suggest(pool_target, tmp_path, _params(**RANKED), model=MODEL, n=7, progress=False)
    lines = (tmp_path / "suggestions.csv").read_text().splitlines()
    assert lines[0].split(",")[:5] == ["rank", "path", "score", "predicted", "confidence"]
    assert len(lines) == 8
    saved = json.loads((tmp_path / "suggestions.json").read_text())
    assert saved["suggestions"] == r["suggestions"] and saved["pool"] == 60
    assert len(set(_paths(r))) == 7 and all(p.startswith("unlabelled/") for p in _paths(r))
    scores = [s["score"] for s in r["suggestions"]]
    assert scores[0] == max(scores)  # the first pick is the best-scored image
    with Image.open(tmp_path / "contact_sheet.png") as im:
        assert im.width >= 5 * 96 and im.height >= 2 * 96
    page = (tmp_path / "contact_sheet.html").read_text()
    assert page.count("<figure>") == 7 and "data:image/png;base64," in page
    assert run_suggest(pool_target, tmp_path / "again", _params(**RANKED), model=MODEL, n=7, progress=False) == r
    assert load_params(None).suggest.strategy == "random"  # what bench/suggest.py measured (docs)


def test_suggestions_favour_uncertain_images(pool_target, tmp_path):
    everything = run_suggest(
        pool_target, tmp_path / "all", _params(**{"suggest.strategy": "uncertain"}), model=MODEL, n=60, progress=False
    )
    pool_margin = np.mean([s["margin"] for s in everything["suggestions"]])
    combined = _params(**RANKED)
    picked = run_suggest(pool_target, tmp_path / "top", combined, model=MODEL, n=10, progress=False)
    assert np.mean([s["margin"] for s in picked["suggestions"]]) < pool_margin
    rand = run_suggest(
        pool_target, tmp_path / "rand", _params(**{"suggest.strategy": "random"}), model=MODEL, n=10, progress=False
    )
    assert np.mean([s["margin"] for s in picked["suggestions"]]) < np.mean([s["margin"] for s in rand["suggestions"]])


def test_near_duplicates_are_suggested_once(pool_target, tmp_path):
    target = tmp_path / "dups"
    shutil.copytree(pool_target, target)
    uncertain = _params(**{"suggest.strategy": "uncertain"})
    top = run_suggest(target, tmp_path / "u0", uncertain, model=MODEL, n=1, progress=False)["suggestions"][0]
    for k in range(3):  # the most uncertain image three more times: equally uncertain, identical features
        shutil.copy(target / top["path"], target / "unlabelled" / f"copy{k}.png")
    copies = {top["path"], *(f"unlabelled/copy{k}.png" for k in range(3))}
    plain = run_suggest(target, tmp_path / "u", uncertain, model=MODEL, n=8, progress=False)
    assert copies <= set(_paths(plain))  # uncertainty alone takes every copy
    for strategy in ("uncertain-diverse", "typical"):
        spread = run_suggest(
            target, tmp_path / strategy, _params(**{"suggest.strategy": strategy}), model=MODEL, n=8, progress=False
        )
        assert len(copies & set(_paths(spread))) <= 1, strategy
        # and no two suggestions are near-duplicates in the features the ranking used
        f = _features(target, _paths(spread))
        assert ((f @ f.T)[~np.eye(len(f), dtype=bool)] < 1 - 1e-6).all(), strategy


def _features(target, paths: list[str]) -> np.ndarray:
    """L2-normalised cached features of TARGET's images `paths`."""
    from transferkit.data.folder import load_with_params
    from transferkit.models.embed import embeddings

    p = _params()
    ds = load_with_params(target, p)
    f = embeddings(MODEL, [(target / s, -1) for s in paths], ds.md5, p.data, progress=False)["features"]
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def test_random_is_seeded_and_a_run_checkpoint_ranks_too(pool_target, tmp_path):
    from conftest import write_fake_run

    r0 = run_suggest(pool_target, tmp_path / "r0", _params(**{"suggest.strategy": "random"}), model=MODEL, n=5)
    r0b = run_suggest(pool_target, tmp_path / "r0b", _params(**{"suggest.strategy": "random"}), model=MODEL, n=5)
    r1 = run_suggest(
        pool_target, tmp_path / "r1", _params(**{"suggest.strategy": "random", "seed": 1}), model=MODEL, n=5
    )
    assert _paths(r0) == _paths(r0b) and _paths(r0) != _paths(r1)
    run = write_fake_run(tmp_path / "run", pool_target, {"data.image_size": 32})
    by_run = run_suggest(pool_target, tmp_path / "byrun", _params(), run=run, n=5, progress=False)
    assert by_run["source"].startswith("the trained checkpoint") and len(by_run["suggestions"]) == 5


def test_bad_requests_are_one_readable_line(pool_target, tmp_path):
    from transferkit.cli.main import app

    flat = tmp_path / "nopool"
    shutil.copytree(pool_target, flat, ignore=shutil.ignore_patterns("unlabelled"))
    with pytest.raises(SuggestError, match="unlabelled"):
        run_suggest(flat, tmp_path / "x", _params(), model=MODEL, n=3, progress=False)
    with pytest.raises(SuggestError, match="exactly one"):
        run_suggest(pool_target, tmp_path / "x", _params(), model=None, run=None)
    res = CliRunner().invoke(
        app, ["suggest", "--target", str(flat), "--out", str(tmp_path / "y"), "--model", MODEL, "-q"]
    )
    assert res.exit_code == 1 and "unlabelled" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(
        app, ["suggest", "--target", str(pool_target), "--out", str(tmp_path / "z"), "--model", MODEL,
              "--set", "suggest.strategy=clever", "-q"]
    )  # fmt: skip
    assert res.exit_code == 1 and "suggest.strategy" in res.output
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()
