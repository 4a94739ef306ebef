"""validate's error report (transferkit.validate.errors_report) on a real linear-probe run over real clipart, opened in Debian's
Chromium: the top-loss images decode and carry the labels the stored test logits give.

    .venv/bin/python -m pytest tests/validate/test_report.py -q
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from transferkit.core.config import load_params
from transferkit.core.io import read_json
from transferkit.core.numeric import softmax
from transferkit.data.folder import load_with_params
from transferkit.train.outputs import read_test_logits
from transferkit.train.stage import run_train
from transferkit.validate.errors_report import ERRORS_HTML, ERRORS_JSON, TOP_LOSS, label_doubts, write_error_report
from transferkit.validate.predict import predict_test

FLIPPED = 3  # train images moved to another class folder: label errors the report should find


@pytest.fixture(scope="module")
def noisy_clipart(tmp_path_factory):
    """Debian's openclipart at 64 px, train 20 / val 3 / test 3 per class, with FLIPPED train images moved into
    the next class's folder (wrong labels). 20 labels per class: with 6 the held-out probe is too weak to
    single out a wrong label among honest but unusual images."""
    from transferkit.data.builtin import write_builtin
    from transferkit.data.clipart import CLIPART_DIR

    if not CLIPART_DIR.is_dir():
        pytest.skip(f"openclipart-png not installed in {CLIPART_DIR} (make install adds it as root)")
    out = tmp_path_factory.mktemp("noisy") / "clipart"
    write_builtin("clipart", out, per_class=26, size=64, train_per_class=20, val_per_class=3, progress=False)
    classes = sorted(p.name for p in (out / "train").iterdir())
    moved = []
    for i in range(FLIPPED):
        src = sorted((out / "train" / classes[i]).iterdir())[0]
        dst = out / "train" / classes[i + 1] / f"flipped-{src.name}"
        src.rename(dst)
        moved.append((dst, classes[i], classes[i + 1]))
    return out, moved


@pytest.fixture(scope="module")
def reported(noisy_clipart, tmp_path_factory):
    target, moved = noisy_clipart
    params = load_params(None, {"data.image_size": 64})  # the images are 64 px
    run = tmp_path_factory.mktemp("report-run")
    metrics = run_train(
        target, run, params, "mobilenetv2_100", strategy="linear-probe", progress=False, baselines=False
    )
    test, train = predict_test(run, metrics, params), predict_test(run, metrics, params, "train")
    summary = write_error_report(run, metrics, params, test, train)
    return run, metrics, params, summary, moved


def test_report_loads_in_chromium_with_decoded_top_loss_images_and_their_labels(reported, browser):
    run, metrics, params, summary, _ = reported
    assert summary["path"] == ERRORS_HTML and (run / ERRORS_HTML).is_file()
    # what the page must show, computed here from train's stored test logits and the dataset's labels
    ds = load_with_params(metrics["target"], params, seed=metrics["seed"])
    samples = ds.splits["test"]
    probs = softmax(read_test_logits(run, samples, metrics["checkpoint_sha256"]))
    y = np.array([lbl for _, lbl in samples])
    loss = -np.log(probs[np.arange(len(y)), y])
    want = np.argsort(-loss, kind="stable")[:TOP_LOSS]

    page = browser.new_page()
    page.goto((run / ERRORS_HTML).resolve().as_uri())
    cards = page.locator("#top-loss-test figure.card")
    assert cards.count() == TOP_LOSS
    shown = cards.evaluate_all(
        "els => els.map(e => ({true: e.dataset.true, predicted: e.dataset.predicted, title: e.title,"
        " text: e.innerText, w: e.querySelector('img') ? e.querySelector('img').naturalWidth : 0}))"
    )
    assert [s["title"] for s in shown] == [str(samples[i][0]) for i in want]
    assert [s["true"] for s in shown] == [ds.classes[y[i]] for i in want]
    assert [s["predicted"] for s in shown] == [ds.classes[probs[i].argmax()] for i in want]
    assert all(s["w"] > 0 for s in shown)  # every thumbnail decodes in the browser
    assert f"true: {ds.classes[y[want[0]]]}" in shown[0]["text"]
    widths = page.locator("#top-loss-train img, #confused img, #label-doubt img").evaluate_all(
        "els => els.map(e => e.naturalWidth)"
    )
    assert len(widths) >= TOP_LOSS and min(widths) > 0
    # the confused pairs are the confusion matrix's largest off-diagonal cells
    cm = np.zeros((len(ds.classes),) * 2, int)
    np.add.at(cm, (y, probs.argmax(1)), 1)
    np.fill_diagonal(cm, 0)
    first = page.locator("#confused h3.pair").first.inner_text()
    assert first.endswith(f": {cm.max()} of {int((y == y[0]).sum())} test images")
    page.close()


def test_deliberately_wrong_labels_are_doubted(reported):
    run, _, _, summary, moved = reported
    data = read_json(run / ERRORS_JSON)
    doubts = {d["path"]: d for d in data["label_doubts"]["candidates"]}
    assert summary["label_doubts"] == len(doubts) > 0
    scores = data["label_doubts"]["scores"]  # every train image, lowest self-confidence first
    rank = {path: i for i, (path, _, _) in enumerate(scores)}
    assert len(scores) == data["label_doubts"]["n_train"] == 200
    assert all(rank[str(p)] < len(scores) / 4 for p, _, _ in moved), [rank[str(p)] for p, _, _ in moved]
    assert any(str(p) in doubts for p, _, _ in moved)
    for p, _, given in moved:
        if str(p) in doubts:
            assert doubts[str(p)]["true"] == given  # the label on file, which the held-out fit doubts
    conf = [d["self_confidence"] for d in data["label_doubts"]["candidates"]]
    assert conf == sorted(conf) and conf[-1] <= np.median([s for _, _, s in scores])


def test_label_doubts_never_read_the_test_labels(reported):
    _, metrics, params, _, _ = reported
    ds = load_with_params(metrics["target"], params, seed=metrics["seed"])
    test = ds.splits["test"]
    shuffled = [(p, lbl) for (p, _), lbl in zip(test, np.random.default_rng(0).permutation([lbl for _, lbl in test]))]
    other = dataclasses.replace(ds, splits={**ds.splits, "test": shuffled})
    assert json.dumps(label_doubts(other, metrics, params)) == json.dumps(label_doubts(ds, metrics, params))
