"""validate's error analysis: RUN/errors.html (one self-contained page, thumbnails inline) and RUN/errors.json.

    transferkit validate --run runs/demo/train      # then open runs/demo/train/errors.html

Sections (docs/predict.md says how to read them):
  highest-loss test images    the shipped checkpoint's cross-entropy on each test image, highest first:
                              confident mistakes first, then unsure right answers
  highest-loss train images   the same on the train split (a fitted image with a high loss is one the model
                              could not fit: often a wrong or ambiguous label)
  most confused class pairs   off-diagonal cells of the test confusion matrix, largest first, with the test
                              images behind each cell (most confident mistakes first)
  labels the model doubts     train images whose given label is unlikely under a model that never saw them:
                              out-of-fold probabilities of a linear probe (transferkit.train.probe, C chosen on val)
                              on the source model's cached features, K stratified folds; candidates are what
                              cleanlab's confident learning flags (find_label_issues, prune_by_noise_rate),
                              ranked by self-confidence (the out-of-fold probability of the given label)

Only reporting reads the test labels here; nothing in this file feeds the gate or the model.
"""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Any

import numpy as np

ERRORS_HTML = "errors.html"
ERRORS_JSON = "errors.json"
THUMB_PX = 96  # longest side of a thumbnail (shown at this size, small images scaled up)
TOP_LOSS = 16  # images per top-loss section
PAIRS = 6  # confused class pairs shown
PER_PAIR = 4  # example images per pair
DOUBTS = 16  # label-error candidates shown
MAX_FOLDS = 5


def write_error_report(
    run: Path,
    metrics: dict,
    params,
    test: tuple[np.ndarray, np.ndarray, list[str]],
    train: tuple[np.ndarray, np.ndarray, list[str]],
    progress: bool = False,
) -> dict[str, Any]:
    """RUN/errors.html and RUN/errors.json from validate's test and train probabilities ([N, C], labels,
    classes: validate.predict_test's); returns the summary validation.json records under `errors_report`."""
    from transferkit.core.io import atomic_write_text, write_json
    from transferkit.data.folder import load_with_params

    t0 = time.perf_counter()
    run = Path(run)
    ds = load_with_params(Path(metrics["target"]), params, seed=int(metrics.get("seed", params.seed)))
    classes = list(test[2])
    test_paths = [p for p, _ in ds.splits["test"]]
    train_paths = [p for p, _ in ds.splits["train"]]
    data = {
        "classes": classes,
        "top_loss_test": top_losses(test_paths, test[0], test[1], classes, TOP_LOSS),
        "top_loss_train": top_losses(train_paths, train[0], train[1], classes, TOP_LOSS),
        "confused_pairs": confused_pairs(test_paths, test[0], test[1], classes, PAIRS, PER_PAIR),
        "label_doubts": label_doubts(ds, metrics, params, progress),
    }
    write_json(run / ERRORS_JSON, data)
    atomic_write_text(run / ERRORS_HTML, render_html(data, metrics))
    doubts = data["label_doubts"]
    return {
        "path": ERRORS_HTML,
        "json": ERRORS_JSON,
        "confused_pairs": [[c["true"], c["predicted"], c["count"]] for c in data["confused_pairs"][:3]],
        "label_doubts": len(doubts.get("candidates", [])),
        "label_doubt_method": doubts.get("method"),
        "seconds": round(time.perf_counter() - t0, 2),  # recorded, never decides anything
    }


# --------------------------------------------------------------------------- the sections' data


def _losses(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))


def _item(path: Path, probs_row: np.ndarray, y: int, classes: list[str], loss: float | None = None) -> dict:
    pred = int(probs_row.argmax())
    out = {
        "path": str(path),
        "true": classes[int(y)],
        "predicted": classes[pred],
        "confidence": round(float(probs_row[pred]), 6),
        "p_true": round(float(probs_row[int(y)]), 6),
    }
    if loss is not None:
        out["loss"] = round(float(loss), 6)
    return out


def top_losses(paths: list[Path], probs: np.ndarray, y: np.ndarray, classes: list[str], n: int) -> list[dict]:
    """The `n` images with the highest cross-entropy of the true label, highest first (ties in split order)."""
    if len(paths) != len(y):
        raise ValueError(f"{len(paths)} images but {len(y)} predictions: the split changed since validate read it")
    loss = _losses(probs, y)
    order = np.argsort(-loss, kind="stable")[:n]
    return [_item(paths[i], probs[i], y[i], classes, loss[i]) for i in order]


def confused_pairs(
    paths: list[Path], probs: np.ndarray, y: np.ndarray, classes: list[str], n_pairs: int, per_pair: int
) -> list[dict]:
    """The largest off-diagonal cells of the confusion matrix (true -> predicted), each with its share of the
    true class and up to `per_pair` of its images, the most confident mistakes first."""
    pred = probs.argmax(1)
    cells: dict[tuple[int, int], list[int]] = {}
    for i, (t, p) in enumerate(zip(y.tolist(), pred.tolist())):
        if t != p:
            cells.setdefault((t, p), []).append(i)
    ranked = sorted(cells.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:n_pairs]
    out = []
    for (t, p), idx in ranked:
        idx = sorted(idx, key=lambda i: (-probs[i, p], i))[:per_pair]
        out.append(
            {
                "true": classes[t],
                "predicted": classes[p],
                "count": len(cells[(t, p)]),
                "of_true": int((y == t).sum()),
                "examples": [_item(paths[i], probs[i], y[i], classes) for i in idx],
            }
        )
    return out


def label_doubts(ds, metrics: dict, params, progress: bool = False) -> dict:
    """Train images whose label a held-out fit doubts (module docstring): {method, folds, C, candidates}, or
    {method, skipped: why} when the features or the folds are not available."""
    method = (
        "out-of-fold linear probe on the source model's features; cleanlab confident learning "
        "(find_label_issues, prune_by_noise_rate), ranked by self-confidence"
    )
    y = np.array([lbl for _, lbl in ds.splits["train"]], dtype=np.int64)
    counts = np.bincount(y, minlength=len(ds.classes))
    folds = int(min(MAX_FOLDS, counts.min()))
    if folds < 2:
        return {"method": method, "skipped": f"a class has {counts.min()} train image(s): no held-out fit is possible"}
    try:
        feats = _features(ds, metrics, params, progress)
    except Exception as e:  # a source that cannot be loaded here: the other sections still stand
        return {"method": method, "skipped": f"no features of {metrics.get('model')} ({type(e).__name__}: {e})"}
    oof, C = _out_of_fold(feats["train"], y, feats["val"], len(ds.classes), params.train.probe_c, folds, params.seed)
    candidates = _issues(y, oof)
    paths = [p for p, _ in ds.splits["train"]]
    sc = oof[np.arange(len(y)), y]  # self-confidence: the held-out probability of the given label
    rows = [
        {**_item(paths[i], oof[i], y[i], ds.classes), "self_confidence": round(float(sc[i]), 6)} for i in candidates
    ]
    scores = [[str(paths[i]), ds.classes[y[i]], round(float(sc[i]), 6)] for i in np.argsort(sc, kind="stable")]
    return {"method": method, "folds": folds, "C": C, "n_train": int(len(y)), "candidates": rows, "scores": scores}


def _features(ds, metrics: dict, params, progress: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (features, labels)} for train and val from the embedding cache (train's own features)."""
    from transferkit.models.embed import embeddings
    from transferkit.models.zoo import parse_spec

    spec = metrics["model"]
    if parse_spec(spec).kind == "scratch":
        spec = parse_spec(spec).arch  # random-init features say nothing about labels: the pretrained ones do
    out = {}
    for s in ("train", "val"):
        e = embeddings(spec, ds.splits[s], ds.md5, params.data, progress)
        out[s] = (e["features"], e["labels"])
    return out


def _out_of_fold(train, y, val, n_classes: int, grid: list[float], folds: int, seed: int) -> tuple[np.ndarray, float]:
    """Each train image's probabilities from a probe fitted without it (C chosen once on val over `grid`)."""
    from sklearn.model_selection import StratifiedKFold

    from transferkit.core.numeric import softmax
    from transferkit.train.probe import fit_probe

    x = np.asarray(train[0], np.float64)
    C = fit_probe((x, y), val, n_classes, list(grid)).C
    oof = np.zeros((len(y), n_classes))
    for tr, te in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        fit = fit_probe((x[tr], y[tr]), val, n_classes, [C])
        oof[te] = softmax(fit.logits(x[te]))
    return oof, float(C)


def _issues(y: np.ndarray, oof: np.ndarray) -> list[int]:
    """cleanlab's label-issue indices, lowest self-confidence first, at most DOUBTS."""
    from cleanlab.filter import find_label_issues

    from transferkit.core.numeric import one_blas_thread

    with one_blas_thread():
        idx = find_label_issues(y, oof, return_indices_ranked_by="self_confidence", n_jobs=1)
    return [int(i) for i in idx[:DOUBTS]]


# --------------------------------------------------------------------------- the page


def thumbnail_uri(path: str | Path, px: int = THUMB_PX) -> str:
    """A PNG data: URI of the image at most `px` a side (read as training reads it); '' if unreadable."""
    from transferkit.data.images import load_rgb

    try:
        img = load_rgb(path)
    except Exception:  # the page still lists the image, without its picture
        return ""
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _card(item: dict, extra: str) -> str:
    e = html.escape
    uri = thumbnail_uri(item["path"])
    img = f'<img src="{uri}" alt="{e(Path(item["path"]).name)}">' if uri else '<div class="missing">unreadable</div>'
    ok = "right" if item["true"] == item["predicted"] else "wrong"
    return (
        f'<figure class="card {ok}" title="{e(item["path"])}" data-true="{e(item["true"])}" '
        f'data-predicted="{e(item["predicted"])}">{img}<figcaption>'
        f'<span class="true">true: <b>{e(item["true"])}</b></span>'
        f'<span class="pred">predicted: <b>{e(item["predicted"])}</b> ({item["confidence"]:.2f})</span>'
        f'<span>{extra}</span><span class="path">{e(Path(item["path"]).name)}</span></figcaption></figure>'
    )


def _grid(items: list[dict], extra) -> str:
    if not items:
        return '<p class="none">none</p>'
    return '<div class="grid">' + "".join(_card(it, extra(it)) for it in items) + "</div>"


def render_html(data: dict, metrics: dict) -> str:
    """The report page: inline CSS, inline thumbnails, no script and nothing fetched."""
    e = html.escape
    loss = lambda it: f"loss {it['loss']:.2f}, p(true) {it['p_true']:.2f}"  # noqa: E731
    pairs = (
        "".join(
            f'<h3 class="pair">{e(c["true"])} &rarr; {e(c["predicted"])}: {c["count"]} of {c["of_true"]} test images</h3>'
            + _grid(c["examples"], lambda it: f"p(true) {it['p_true']:.2f}")
            for c in data["confused_pairs"]
        )
        or '<p class="none">no test image is misclassified</p>'
    )
    d = data["label_doubts"]
    if "skipped" in d:
        doubts = f'<p class="none">not computed: {e(d["skipped"])}</p>'
    else:
        doubts = (
            f"<p>{len(d['candidates'])} candidates of {d['n_train']} train images ({d['folds']} folds, C {d['C']:g}). "
            f"Method: {e(d['method'])}.</p>"
            + _grid(d["candidates"], lambda it: f"self-confidence {it['self_confidence']:.2f}")
        )
    title = f"Error analysis: {e(str(metrics.get('model')))} ({e(str(metrics.get('strategy')))})"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 10px; }}
.card {{ margin: 0; width: 150px; border: 1px solid #ccc; border-radius: 4px; padding: 6px; font-size: 12px; }}
.card.wrong {{ border-color: #c33; }}
.card img {{ width: {THUMB_PX}px; height: {THUMB_PX}px; object-fit: contain; image-rendering: pixelated;
  display: block; margin: auto; background: #eee; }}
figcaption span {{ display: block; overflow-wrap: anywhere; }}
.path {{ color: #777; }} .none {{ color: #777; }}
</style></head><body>
<h1>{title}</h1>
<p>Test accuracy {metrics.get("test_accuracy", float("nan")):.3f} on {metrics.get("n_test", "?")} images. Loss is the
cross-entropy of the true label (nats); a red frame is a mistake. Hover a picture for its path.</p>
<section id="top-loss-test"><h2>Highest-loss test images</h2>{_grid(data["top_loss_test"], loss)}</section>
<section id="top-loss-train"><h2>Highest-loss train images</h2>{_grid(data["top_loss_train"], loss)}</section>
<section id="confused"><h2>Most confused class pairs (test)</h2>{pairs}</section>
<section id="label-doubt"><h2>Train labels the model doubts (label-error candidates)</h2>{doubts}</section>
</body></html>
"""
