"""No-transfer baselines and paired comparisons: what a user could do without any pretrained model.

    from transferkit.models.baselines import fit_no_transfer, paired_comparison

Transfer is worth shipping only if it beats the strongest cheap alternative on the same splits. Every
baseline here trains on the train split only and picks its hyper-parameters on val only (test is
predicted once, at the end, for the comparison):
  pixels-logreg  multinomial logistic regression on raw pixels, C in `validate.pixel_grid.logreg`
  pixels-knn     k-nearest neighbours (Euclidean) on raw pixels, k in `validate.pixel_grid.knn`
  pixels-svm     RBF SVM (gamma = "scale") on raw pixels, C in `validate.pixel_grid.svm`
  small-cnn      a 3-block CNN (BatchNorm, max-pool, dropout) from random init at the pixel size; each LR
                 of `validate.cnn_lrs` trains `validate.cnn_epochs` epochs (at most `validate.cnn_max_steps`
                 optimizer steps) with shift augmentation and keeps its best-val-accuracy epoch; the LR
                 with the best val accuracy wins
Raw pixels: every image resized to the same square side, its native side capped at `validate.pixel_size`
(the digits' 32 px PNGs stay 32 px), one channel when every image is grey, scaled to [0, 1], flattened.

A baseline whose val accuracy is not above chance (the largest class share of val; one-sided exact
binomial test at `validate.chance_alpha`) is `broken`: reported, never used as the bar.

paired_comparison: the model and a baseline answer the same test images, so their difference is judged
on the discordant pairs: McNemar's exact test (two-sided binomial on b vs c) and the Wald interval of the
paired difference in accuracy, (b - c)/n +- z * sqrt(b + c - (b - c)^2/n) / n.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from transferkit.core.config import Params

PIXEL_BASELINES = ("pixels-logreg", "pixels-knn", "pixels-svm")
NO_TRANSFER = (*PIXEL_BASELINES, "small-cnn")
DESCRIPTIONS = {
    "pixels-logreg": "raw-pixel logistic regression",
    "pixels-knn": "raw-pixel k-nearest neighbours",
    "pixels-svm": "raw-pixel RBF SVM",
    "small-cnn": "small CNN trained from scratch",
    "scratch": "the same architecture from random init",
}


# --------------------------------------------------------------------------------------------------
# statistics


def paired_comparison(model_correct, base_correct, confidence: float = 0.95) -> dict:
    """Accuracy difference (model - baseline) on the same images with its interval and McNemar p-value."""
    from scipy.stats import binomtest, norm

    a, b_ = np.asarray(model_correct, bool), np.asarray(base_correct, bool)
    if a.shape != b_.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(
            f"paired comparison needs two equal, non-empty prediction vectors; got {a.shape} and {b_.shape}"
        )
    n = len(a)
    b = int((a & ~b_).sum())  # model right, baseline wrong
    c = int((~a & b_).sum())  # model wrong, baseline right
    gain = (b - c) / n
    z = float(norm.ppf(0.5 + confidence / 2))
    half = z * np.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return {
        "gain": round(gain, 6),
        "interval": [round(gain - half, 6), round(gain + half, 6)],
        "confidence": confidence,
        "p_value": p,
        "model_only": b,
        "baseline_only": c,
        "n": n,
    }


def chance_check(val_correct, val_labels, alpha: float) -> dict:
    """Is val accuracy above chance (the majority-class share)? One-sided exact binomial test."""
    from scipy.stats import binomtest

    y = np.asarray(val_labels)
    k, n = int(np.asarray(val_correct, bool).sum()), len(y)
    chance = float(np.bincount(y).max() / n) if n else 1.0
    p = float(binomtest(k, n, chance, alternative="greater").pvalue) if n and chance < 1 else 1.0
    out = {"chance": round(chance, 6), "p_above_chance": p, "broken": bool(p > alpha)}
    if out["broken"]:
        out["broken_reason"] = (
            f"val accuracy {k / max(n, 1):.3f} is not above chance {chance:.3f} "
            f"(binomial p = {p:.2g} > validate.chance_alpha {alpha})"
        )
    return out


# --------------------------------------------------------------------------------------------------
# raw pixels


def pixel_side(samples, cap: int) -> int:
    """The common square side for raw pixels: the largest native side among `samples`, at most `cap`."""
    from PIL import Image

    side = 1
    for path, _ in samples:
        with Image.open(path) as im:
            side = max(side, *im.size)
        if side >= cap:
            return cap
    return side


def pixel_arrays(splits: dict[str, list], cap: int) -> tuple[dict[str, np.ndarray], int, int]:
    """{split: float32 [N, C, S, S] in [0, 1]}, the side S and channels C (1 when every image is grey)."""
    from PIL import Image

    from transferkit.data.images import load_rgb

    side = pixel_side(splits["train"], cap)
    arrays = {}
    for name, samples in splits.items():
        imgs = []
        for path, _ in samples:
            im = load_rgb(path)
            if im.size != (side, side):
                im = im.resize((side, side), Image.Resampling.BILINEAR)
            imgs.append(np.asarray(im, dtype=np.uint8))
        arrays[name] = np.stack(imgs).transpose(0, 3, 1, 2) if imgs else np.zeros((0, 3, side, side), np.uint8)
    grey = all(bool((a[:, 0] == a[:, 1]).all() and (a[:, 1] == a[:, 2]).all()) for a in arrays.values())
    out = {k: (a[:, :1] if grey else a).astype(np.float32) / 255.0 for k, a in arrays.items()}
    return out, side, 1 if grey else 3


def _fit_pixel_model(name: str, grid: list, x: dict, y: dict, seed: int):
    """Train one raw-pixel classifier per grid value on train, keep the best on val (ties: the first)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    make = {
        "pixels-logreg": lambda v: LogisticRegression(C=v, max_iter=200, random_state=seed),
        "pixels-knn": lambda v: KNeighborsClassifier(n_neighbors=int(v)),
        "pixels-svm": lambda v: SVC(C=v, kernel="rbf", gamma="scale", random_state=seed),
    }[name]
    key = {"pixels-logreg": "C", "pixels-knn": "k", "pixels-svm": "C"}[name]
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from transferkit.core.numeric import one_blas_thread

    best, sweep = None, []
    for v in grid:
        if key == "k" and int(v) > len(y["train"]):
            continue
        # 200 lbfgs steps: within noise of convergence, at a fraction of the cost
        with warnings.catch_warnings(), one_blas_thread():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = make(v).fit(x["train"], y["train"])
            acc = float((clf.predict(x["val"]) == y["val"]).mean())
        sweep.append({key: v, "val_accuracy": round(acc, 6)})
        if best is None or acc > best[0]:
            best = (acc, v, clf)
    return best, key, sweep


# --------------------------------------------------------------------------------------------------
# a CNN from scratch that learns on small images


def small_cnn(in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.3):
    """Three conv-BN-ReLU blocks with max-pooling, global average pooling and a dropout head.

    Few parameters and strong inductive bias: on 100 images a MobileNet from random init stays near
    chance, this one does not.
    """
    import torch.nn as nn

    def block(i, o):
        return nn.Sequential(
            nn.Conv2d(i, o, 3, padding=1, bias=False),
            nn.BatchNorm2d(o),
            nn.ReLU(inplace=True),
            nn.Conv2d(o, o, 3, padding=1, bias=False),
            nn.BatchNorm2d(o),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    return nn.Sequential(
        block(in_channels, width),
        block(width, 2 * width),
        block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(4 * width, num_classes),
    )


def _shift(xb, pad: int, g):
    """Random translation by up to `pad` pixels per image (edge padding, then a random crop), in one gather."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = xb.shape
    padded = F.pad(xb, (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=g) + torch.arange(h)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=g) + torch.arange(w)
    return padded[torch.arange(n)[:, None, None], :, dy[:, :, None], dx[:, None, :]].permute(0, 3, 1, 2)


def _standardised_tensors(x: dict, y: dict):
    """Images as tensors standardised with the train split's pixel mean and std; labels as int64 tensors."""
    import torch

    xs = {k: torch.from_numpy(v) for k, v in x.items()}
    ys = {k: torch.from_numpy(v).long() for k, v in y.items()}
    mean, std = float(xs["train"].mean()), float(xs["train"].std()) + 1e-6
    return {k: (v - mean) / std for k, v in xs.items()}, ys


def _predict_labels(model, images):
    """Arg-max class of every image, in batches of 256, in eval mode."""
    import torch

    model.eval()
    with torch.inference_mode():
        return torch.cat([model(images[i : i + 256]) for i in range(0, len(images), 256)]).argmax(1)


def _train_epoch(model, opt, sched, xs: dict, ys: dict, batch_size: int, pad: int, g) -> None:
    """One pass over train in a random order (from `g`), with shift augmentation and label smoothing."""
    import torch
    import torch.nn.functional as F

    model.train()
    perm = torch.randperm(len(ys["train"]), generator=g)
    for i in range(0, len(perm), batch_size):
        idx = perm[i : i + batch_size]
        if len(idx) < 2:  # BatchNorm needs two images
            continue
        loss = F.cross_entropy(model(_shift(xs["train"][idx], pad, g)), ys["train"][idx], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _train_cnn(
    x: dict,
    y: dict,
    n_classes: int,
    lr: float,
    epochs: int,
    seed: int,
    batch_size: int,
    weight_decay: float,
    max_steps: int = 10**9,
) -> dict:
    """One from-scratch CNN run; returns the best-val-accuracy epoch's predictions on val and test."""
    import torch

    torch.manual_seed(seed)  # before the model: its initial weights come from the global generator
    xs, ys = _standardised_tensors(x, y)
    model = small_cnn(xs["train"].shape[1], n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = max(1, -(-len(ys["train"]) // batch_size))
    epochs = max(1, min(epochs, max_steps // per_epoch))  # a step budget bounds the cost on large targets
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)  # batch order and shifts
    pad = max(1, xs["train"].shape[-1] // 16)
    best, history = None, []
    for epoch in range(1, epochs + 1):
        _train_epoch(model, opt, sched, xs, ys, batch_size, pad, g)
        val_acc = float((_predict_labels(model, xs["val"]) == ys["val"]).float().mean())
        history.append(round(val_acc, 4))
        if best is None or val_acc > best["val_accuracy"]:
            best = {
                "val_accuracy": val_acc,
                "epoch": epoch,
                "state": {k: v.clone() for k, v in model.state_dict().items()},
            }
    model.load_state_dict(best["state"])
    return {
        "lr": lr,
        "val_accuracy": best["val_accuracy"],
        "best_epoch": best["epoch"],
        "epochs": epochs,
        "val_history": history,
        "val_pred": _predict_labels(model, xs["val"]).numpy(),
        "test_pred": _predict_labels(model, xs["test"]).numpy(),
    }


# --------------------------------------------------------------------------------------------------
# the stage-facing entry point


def fit_no_transfer(ds, params: Params, progress: bool = True) -> list[dict]:
    """Train every baseline of `validate.no_transfer` on `ds` (a transferkit.data.Dataset).

    Each row: name, description, hyper (what val chose), sweep, val_accuracy, test_accuracy, seconds,
    chance/p_above_chance/broken, and `val_correct`/`test_correct` (bool per image, in ds.splits order;
    callers strip them before writing JSON).
    """
    from tqdm import tqdm

    v = params.validate
    names = [n for n in NO_TRANSFER if n in v.no_transfer]
    if not names:
        return []
    t0 = time.perf_counter()
    splits = {s: ds.splits[s] for s in ("train", "val", "test")}
    x4, side, channels = pixel_arrays(splits, v.pixel_size)
    y = {s: np.array([lbl for _, lbl in samples], dtype=np.int64) for s, samples in splits.items()}
    flat = {s: a.reshape(len(a), -1) for s, a in x4.items()}
    load_seconds = time.perf_counter() - t0
    rows = []
    for name in tqdm(names, desc="no-transfer baselines", unit="model", disable=not progress, leave=False):
        t = time.perf_counter()
        if name == "small-cnn":
            val_pred, test_pred, hyper, sweep = _fit_small_cnn(x4, y, len(ds.classes), params)
        else:
            val_pred, test_pred, hyper, sweep = _fit_pixel_baseline(name, flat, y, params)
        seconds = time.perf_counter() - t + load_seconds / len(names)  # loading the pixels is shared
        rows.append(_row(name, hyper, sweep, val_pred, test_pred, y, v.chance_alpha, seconds, side, channels))
    return rows


def best_baseline(rows: list[dict], key: str = "val_accuracy") -> dict | None:
    """The strongest working no-transfer baseline, chosen on val accuracy (test never chooses); ties: the first.
    `key`: another val score of the rows (val_balanced_accuracy when validate judges skewed classes)."""
    working = [r for r in rows if not r.get("broken")]
    return max(working, key=lambda r: r[key]) if working else None


def cached_no_transfer(run: Path, ds, params: Params, progress: bool = True) -> list[dict]:
    """fit_no_transfer, reused from RUN/no_transfer.json when data, seed and baseline settings are the same:
    train fits them once (its search measures the features against them), validate reads them back, and
    re-validating with another gate threshold (`dvc exp run -S validate.max_gap=0.1`) costs nothing."""
    import hashlib
    import json

    from transferkit.core.io import read_json, write_json

    v = params.validate
    settings = {
        "md5": ds.md5,
        "seed": params.seed,
        "batch_size": params.data.batch_size,
        "weight_decay": params.train.weight_decay,
        "version": 2,
        **v.model_dump(
            mode="json",
            include={
                "no_transfer",
                "pixel_size",
                "pixel_grid",
                "cnn_epochs",
                "cnn_lrs",
                "cnn_max_steps",
                "chance_alpha",
            },
        ),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = run / "no_transfer.json"
    if path.is_file():
        saved = read_json(path)
        if saved.get("key") == key:
            return [{**r, **{k: _bits(r[k]) for k in ("val_correct", "test_correct")}} for r in saved["rows"]]
    rows = fit_no_transfer(ds, params, progress)
    write_json(
        path,
        {
            "key": key,
            "settings": settings,
            "rows": [
                {**r, **{k: "".join("1" if c else "0" for c in r[k]) for k in ("val_correct", "test_correct")}}
                for r in rows
            ],
        },
    )  # per val and test image, in split order
    return rows


def _bits(s: str) -> np.ndarray:
    return np.array([c == "1" for c in s], bool)


def _fit_small_cnn(x4: dict, y: dict, n_classes: int, params: Params):
    """small-cnn: one run per LR of `validate.cnn_lrs`, the best val accuracy wins (ties: the first LR).
    Returns (val predictions, test predictions, hyper, sweep)."""
    from transferkit.models.embed import torch_threads

    v = params.validate
    torch_threads()
    runs = [
        _train_cnn(
            x4,
            y,
            n_classes,
            lr,
            v.cnn_epochs,
            params.seed,
            params.data.batch_size,
            params.train.weight_decay,
            v.cnn_max_steps,
        )
        for lr in v.cnn_lrs
    ]
    run = max(runs, key=lambda r: r["val_accuracy"])  # ties: the first LR
    hyper = {"lr": run["lr"], "epochs": run["epochs"], "best_epoch": run["best_epoch"]}
    sweep = [{"lr": r["lr"], "val_accuracy": round(r["val_accuracy"], 6), "best_epoch": r["best_epoch"]} for r in runs]
    return run["val_pred"], run["test_pred"], hyper, sweep


def _fit_pixel_baseline(name: str, flat: dict, y: dict, params: Params):
    """A raw-pixel classifier over its `validate.pixel_grid` values; returns (val preds, test preds, hyper, sweep)."""
    grid = list(getattr(params.validate.pixel_grid, name.split("-")[1]))
    (_, value, clf), key, sweep = _fit_pixel_model(name, grid, flat, y, params.seed)
    from transferkit.core.numeric import one_blas_thread

    with one_blas_thread():
        return clf.predict(flat["val"]), clf.predict(flat["test"]), {key: value}, sweep


def _row(name, hyper, sweep, val_pred, test_pred, y, alpha, seconds, side, channels) -> dict:
    val_correct, test_correct = np.asarray(val_pred) == y["val"], np.asarray(test_pred) == y["test"]
    row = {
        "name": name,
        "kind": "no-transfer",
        "description": DESCRIPTIONS[name],
        "strategy": name,
        "model": f"{name} @ {side}px x{channels}",
        "hyper": hyper,
        "sweep": sweep,
        "val_accuracy": round(float(val_correct.mean()), 6),
        "test_accuracy": round(float(test_correct.mean()), 6),
        "seconds": round(seconds, 3),
        **chance_check(val_correct, y["val"], alpha),
        "val_correct": val_correct,
        "test_correct": test_correct,
    }
    return row
