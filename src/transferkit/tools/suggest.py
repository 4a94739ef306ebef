"""Which images to label next: rank the target's unlabelled pool by what labelling them would teach the model.

    transferkit suggest --target data/clipart --model tf_efficientnet_lite1 --out runs/suggest --n 20
    transferkit suggest --target data/clipart --run runs/demo/train --out runs/suggest

The model's view of the pool (`TARGET/unlabelled/`), from the embedding cache the other stages share:
  --model SPEC  the linear probe train ships (transferkit.train.probe, C on val, class-weighted when the train labels
                are skewed) fitted on the source's cached features of train
  --run RUN     the trained checkpoint of a run (RUN/model.safetensors): its own features and predictions
Only the train and val splits' labels are read: test labels never take part (a shuffled test split gives the
same suggestions), and nothing here draws a random number unless `suggest.strategy` is random (seeded).

Strategies (`suggest.strategy`; random by default: no ranking beat it beyond noise in bench/suggest.py):
  uncertain-diverse  score = (1 - margin) * balance(predicted class) * distance. margin: top-1 minus top-2
                     probability (small = the model hesitates between two classes); distance: cosine distance
                     (of L2-normalised features) to the nearest labelled (train/val) or already suggested image,
                     so near-duplicates of a pick score ~0 and the N are spread over the pool (k-center greedy,
                     Sener & Savarese 2018, weighted by uncertainty); balance: (mean count / count of the
                     predicted class)^`suggest.balance`, counts = labels + picks so far, so predicted-minority
                     classes are favoured
  uncertain          the N smallest margins (uncertainty sampling, Lewis & Gale 1994), no spreading
  diverse            k-center greedy on the features alone (balance and distance, no uncertainty)
  typical            TypiClust (Hacohen et al. 2022, for small budgets): k-means of labelled + pool features into
                     labelled + N clusters; from the largest clusters no label covers yet, each one's most typical
                     image (the smallest mean distance to its nearest neighbours in the cluster)
  random             a seeded random draw (the default): the control every strategy is measured against
Outputs in OUT: suggestions.csv and suggestions.json (rank, path, score, predicted label, confidence, margin,
distance, reason), contact_sheet.png (a grid of the N with rank and prediction) and contact_sheet.html.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from transferkit.core.config import Params
from transferkit.core.errors import TransferkitError

STRATEGIES = ("uncertain-diverse", "uncertain", "diverse", "typical", "random")


class SuggestError(TransferkitError, ValueError):
    """A suggest request that cannot be served (no pool, a run for other classes); names the path or field."""


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def rank_pool(
    probs: np.ndarray,
    feats: np.ndarray,
    labelled_feats: np.ndarray,
    labelled_counts,
    n: int,
    strategy: str = "uncertain-diverse",
    balance: float = 1.0,
    seed: int = 0,
) -> list[dict]:
    """Pick `n` pool images (module docstring); each pick: {index, score, margin, distance, predicted}.

    probs [P, C]: the model's probabilities on the pool; feats [P, D] its features; labelled_feats [L, D] the
    labelled images' features; labelled_counts [C] labels per class. Ties go to the lower pool index."""
    if strategy not in STRATEGIES:
        raise SuggestError(f"suggest.strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    probs = np.asarray(probs, np.float64)
    n = min(int(n), len(probs))
    top2 = np.sort(probs, axis=1)[:, -2:] if probs.shape[1] > 1 else np.c_[np.zeros(len(probs)), probs]
    margin = top2[:, 1] - top2[:, 0]
    pred = probs.argmax(1)
    f = _unit(feats)
    lab = _unit(labelled_feats) if len(labelled_feats) else np.zeros((0, f.shape[1]))
    # cosine distance in [0, 2] to the nearest labelled image (1 for every image when nothing is labelled)
    dist = (1.0 - (f @ lab.T).max(1)) if len(lab) else np.ones(len(f))
    dist = np.maximum(dist, 0.0)
    counts = np.asarray(labelled_counts, np.float64).copy()
    if strategy == "random":
        order = np.random.default_rng(seed).permutation(len(probs))[:n]
        return [_pick(int(i), 0.0, margin, dist, pred) for i in order]
    if strategy == "uncertain":
        order = np.argsort(margin, kind="stable")[:n]
        return [_pick(int(i), float(1 - margin[i]), margin, dist, pred) for i in order]
    if strategy == "typical":
        order, typ = _typical(f, lab, n, seed)
        return [_pick(int(i), float(typ[i]), margin, dist, pred) for i in order]
    uncertainty = 1.0 - margin if strategy == "uncertain-diverse" else np.ones(len(probs))
    taken = np.zeros(len(probs), bool)
    picks = []
    for _ in range(n):
        weight = (counts.mean() + 1.0) / (counts + 1.0)  # > 1 for classes with fewer labels than the mean
        score = uncertainty * weight[pred] ** balance * dist
        score[taken] = -np.inf
        i = int(np.argmax(score))
        picks.append(_pick(i, float(score[i]), margin, dist, pred))
        taken[i] = True
        counts[pred[i]] += 1
        dist = np.minimum(dist, np.maximum(1.0 - f @ f[i], 0.0))
    return picks


def _typical(f: np.ndarray, lab: np.ndarray, n: int, seed: int, neighbours: int = 20):
    """TypiClust's picks (pool indices) and every pool image's typicality (1 / mean distance to its nearest
    neighbours within its k-means cluster)."""
    from sklearn.cluster import KMeans

    from transferkit.core.numeric import one_blas_thread

    both = np.concatenate([lab, f])
    k = min(len(lab) + n, len(both))
    with one_blas_thread():
        assign = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(both).labels_
    covered, cl = set(assign[: len(lab)].tolist()), assign[len(lab) :]
    typ = np.zeros(len(f))
    for c in np.unique(cl):
        idx = np.flatnonzero(cl == c)
        if len(idx) == 1:
            typ[idx] = 1.0
            continue
        d = np.sqrt(np.maximum(2 - 2 * f[idx] @ f[idx].T, 0))
        d.sort(axis=1)
        typ[idx] = 1.0 / (d[:, 1 : 1 + neighbours].mean(1) + 1e-9)
    sizes = np.bincount(cl, minlength=k)
    # rounds over the clusters, the largest uncovered first, then the covered ones (ties: lower cluster id); each
    # round takes every cluster's most typical image not yet picked
    by_size = [int(c) for c in np.argsort(-sizes, kind="stable") if sizes[c]]
    order = [c for c in by_size if c not in covered] + [c for c in by_size if c in covered]
    members = {c: list(np.flatnonzero(cl == c)[np.argsort(-typ[cl == c], kind="stable")]) for c in order}
    picks: list[int] = []
    for r in range(int(sizes.max())):
        picks += [int(members[c][r]) for c in order if r < len(members[c])]
        if len(picks) >= n:
            break
    return picks[:n], typ


def _pick(i: int, score: float, margin, dist, pred) -> dict:
    return {
        "index": i,
        "score": round(score, 6),
        "margin": round(float(margin[i]), 6),
        "distance": round(float(dist[i]), 6),
        "predicted": int(pred[i]),
    }


def _view(target: Path, params: Params, model: str | None, run: Path | None, progress: bool):
    """(dataset, pool probabilities, pool features, labelled features, labelled labels, what was used)."""
    from transferkit.core.numeric import softmax
    from transferkit.data.folder import load_with_params
    from transferkit.models.embed import embeddings

    if (model is None) == (run is None):
        raise SuggestError("give exactly one of --model (a source: its linear probe) or --run (a trained run)")
    ds = load_with_params(target, params)
    if not ds.unlabelled:
        raise SuggestError(f"{Path(target) / 'unlabelled'}: no unlabelled images to rank (the pool is empty)")
    labelled = ds.splits["train"] + ds.splits["val"]  # never the test split
    pool = [(p, -1) for p in ds.unlabelled]
    if run is not None:
        return (ds, *_run_view(Path(run), ds, labelled, pool, params, progress))
    feats = {
        name: embeddings(model, samples, ds.md5, params.data, progress)["features"]
        for name, samples in (("train", ds.splits["train"]), ("val", ds.splits["val"]), ("pool", pool))
    }
    from transferkit.core.imbalance import loss_weights
    from transferkit.train.probe import fit_probe

    ytr = np.array([y for _, y in ds.splits["train"]])
    yva = np.array([y for _, y in ds.splits["val"]])
    weights = loss_weights(ytr, len(ds.classes), params.train)
    fit = fit_probe((feats["train"], ytr), (feats["val"], yva), len(ds.classes), params.train.probe_c, None, weights)
    probs = softmax(fit.logits(feats["pool"]))
    used = {"model": model, "source": "linear probe on the cached features", "C": fit.C}
    used["class_weighted"] = weights is not None
    return ds, probs, feats["pool"], np.concatenate([feats["train"], feats["val"]]), np.r_[ytr, yva], used


def _run_view(run: Path, ds, labelled, pool, params: Params, progress: bool):
    from transferkit.core.io import read_json
    from transferkit.core.numeric import softmax
    from transferkit.models.embed import compute_embeddings

    metrics = read_json(run / "metrics.json")
    if list(metrics.get("classes", [])) != list(ds.classes):
        raise SuggestError(f"{run}: trained for classes {metrics.get('classes')}, the target has {ds.classes}")
    spec = f"file:{run / 'model.safetensors'}"
    size = params.data.image_size
    lab = compute_embeddings(spec, labelled, ds.md5, size, params.data.batch_size, progress)
    got = compute_embeddings(spec, pool, ds.md5, size, params.data.batch_size, progress)
    used = {"model": metrics.get("model"), "source": f"the trained checkpoint {run / 'model.safetensors'}"}
    used["checkpoint_sha256"] = metrics.get("checkpoint_sha256")
    labels = np.array([y for _, y in labelled])
    return softmax(got["logits"]), got["features"], lab["features"], labels, used


def run_suggest(
    target: Path,
    out: Path,
    params: Params,
    model: str | None = None,
    run: Path | None = None,
    n: int | None = None,
    progress: bool = True,
) -> dict:
    """Rank TARGET's unlabelled pool and write OUT/suggestions.{csv,json} and the contact sheet (module docstring)."""
    from transferkit.core.io import write_json

    s = params.suggest
    n = s.n if n is None else n
    if n < 1:
        raise SuggestError(f"--n must be at least 1, got {n}")
    ds, probs, feats, lab_feats, lab_y, used = _view(Path(target), params, model, run, progress)
    counts = np.bincount(lab_y, minlength=len(ds.classes))
    picks = rank_pool(probs, feats, lab_feats, counts, n, s.strategy, s.balance, params.seed)
    rows = [_row(k, p, ds, probs, counts) for k, p in enumerate(picks, start=1)]
    result = {
        "target": str(target),
        "data_md5": ds.md5,
        "pool": len(ds.unlabelled),
        "n": len(rows),
        "strategy": s.strategy,
        "balance": s.balance,
        "seed": params.seed,
        **used,
        "labels_per_class": dict(zip(ds.classes, counts.tolist())),
        "suggestions": rows,
    }
    out = Path(out)
    _write_csv(out / "suggestions.csv", rows)
    _contact_sheet(out, rows, ds.root, f"{len(rows)} of {len(ds.unlabelled)} pool images ({s.strategy})")
    write_json(out / "suggestions.json", result)
    return result


def _row(rank: int, p: dict, ds, probs: np.ndarray, counts: np.ndarray) -> dict:
    i, c = p["index"], p["predicted"]
    path = ds.unlabelled[i]
    second = int(np.argsort(probs[i])[-2]) if probs.shape[1] > 1 else c
    reason = (
        f"margin {p['margin']:.2f} ({ds.classes[c]} {probs[i, c]:.2f} vs {ds.classes[second]} {probs[i, second]:.2f}); "
        f"distance {p['distance']:.2f} to the nearest labelled or earlier suggestion; "
        f"predicted class {ds.classes[c]} has {int(counts[c])} labels"
    )
    return {
        "rank": rank,
        "path": path.relative_to(ds.root).as_posix(),
        "score": p["score"],
        "predicted": ds.classes[c],
        "confidence": round(float(probs[i, c]), 6),
        "margin": p["margin"],
        "distance": p["distance"],
        "reason": reason,
    }


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv
    import io

    from transferkit.core.io import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


THUMB = 96  # px, contact sheet cell


def _thumb(path: Path):
    from PIL import Image, ImageOps

    from transferkit.data.images import load_rgb

    im = load_rgb(path)
    # small images (digits' 32 px) are enlarged too: pixels kept sharp (NEAREST), large ones reduced (LANCZOS)
    small = max(im.size) < THUMB
    im = ImageOps.contain(im, (THUMB, THUMB), Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS)
    cell = Image.new("RGB", (THUMB, THUMB), (255, 255, 255))
    cell.paste(im, ((THUMB - im.width) // 2, (THUMB - im.height) // 2))
    return cell


def _contact_sheet(out: Path, rows: list[dict], root: Path, title: str) -> None:
    """OUT/contact_sheet.png (a grid: rank, predicted label, confidence under each image) and .html (the same
    with the reasons; thumbnails inline, so the page is one file)."""
    import base64
    import io

    from PIL import Image, ImageDraw

    from transferkit.core.io import atomic_write_bytes, atomic_write_text

    cols, caption = min(5, len(rows)), 26
    sheet = Image.new("RGB", (cols * (THUMB + 8), -(-len(rows) // cols) * (THUMB + caption + 8)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    figures = []
    for k, r in enumerate(rows):
        cell = _thumb(root / r["path"])
        x, y = (k % cols) * (THUMB + 8) + 4, (k // cols) * (THUMB + caption + 8) + 4
        sheet.paste(cell, (x, y))
        draw.text((x, y + THUMB + 1), f"#{r['rank']}: {r['predicted'][:11]}", fill=(0, 0, 0))
        draw.text((x, y + THUMB + 13), f"p={r['confidence']:.2f} m={r['margin']:.2f}", fill=(90, 90, 90))
        buf = io.BytesIO()
        cell.save(buf, format="PNG")
        src = base64.b64encode(buf.getvalue()).decode()
        e = html.escape
        figures.append(
            f'<figure><img src="data:image/png;base64,{src}" alt="{e(r["path"])}" width="{THUMB}">'
            f"<figcaption><b>#{r['rank']}</b> {e(r['path'])}<br>predicted <b>{e(r['predicted'])}</b> "
            f"({r['confidence']:.2f})<br><small>{e(r['reason'])}</small></figcaption></figure>"
        )
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(out / "contact_sheet.png", buf.getvalue())
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>label next: {html.escape(title)}</title>"
        "<style>body{font-family:sans-serif}figure{display:inline-block;width:220px;vertical-align:top;margin:6px}"
        "figcaption{font-size:12px}</style></head>"
        f"<body><h1>Images to label next</h1><p>{html.escape(title)}, most useful first.</p>"
        + "".join(figures)
        + "</body></html>\n"
    )
    atomic_write_text(out / "contact_sheet.html", page)
