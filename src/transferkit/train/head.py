"""The linear head on frozen penultimate features (`linear-probe`, and LP-FT's phase 1): features from the shared embedding cache (or the AdaBN-adapted model), the L-BFGS probe of transferkit.probe, and the epoch-wise AdamW head (`train.probe: sgd`, fit_sgd_head)."""

from __future__ import annotations

import time

import numpy as np

from transferkit.core.config import Params
from transferkit.train.evaluation import EarlyStop, logits_accuracy, per_image_correct
from transferkit.train.resume import seed_everything


def penultimate_features(lm, samples, ds, params: Params, progress: bool, adapted: bool) -> np.ndarray:
    """Penultimate features of `samples`: from the shared embedding cache, unless AdaBN changed the backbone
    (`adapted`): then computed here from the adapted model (the cache holds the source's)."""
    from transferkit.models.embed import embeddings, forward

    if adapted:
        return forward(lm, samples, params.data.batch_size, progress, f"{lm.spec.spec}+adabn")["features"]
    return embeddings(lm.spec.spec, samples, ds.md5, params.data, progress)["features"]


def _probe_features(lm, ds, params: Params, progress: bool, adapted: bool, splits=("train", "val", "test")) -> dict:
    """{split: (features, labels)} as tensors (penultimate_features)."""
    import torch

    out = {}
    for s in splits:
        labels = torch.tensor([lbl for _, lbl in ds.splits[s]], dtype=torch.long)
        out[s] = (torch.from_numpy(penultimate_features(lm, ds.splits[s], ds, params, progress, adapted)), labels)
    return out


def _probe_epoch(head, opt, x, y, perm, t, batch_size: int, weight=None) -> float:
    """One epoch of the linear head over cached features (dropout on the features); the mean loss.
    `weight`: per-class loss weights (transferkit.imbalance), or None."""
    import torch.nn.functional as F

    head.train()
    tot = 0.0
    for i in range(0, len(y), batch_size):
        idx = perm[i : i + batch_size]
        loss = F.cross_entropy(
            head(F.dropout(x[idx], p=t.drop_rate, training=True)),
            y[idx],
            weight=weight,
            label_smoothing=t.label_smoothing,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        tot += loss.item() * len(idx)
    return tot / len(y)


def linear_probe(
    lm, ds, params: Params, progress: bool, adapted: bool, test: bool = True
) -> tuple[dict, list[dict], int, dict]:
    """Train a linear head on frozen features (`train.probe`); returns (split accuracies, history, best
    epoch, what the probe did). `test=False` leaves the test split out (finish_test adds it if the fit ships)."""
    import torch

    data = _probe_features(lm, ds, params, progress, adapted, ("train", "val", "test") if test else ("train", "val"))
    seed_everything(params.seed)  # after embedding: loading a model may consume the global RNG
    if params.train.probe == "sgd":
        head = lm.model.get_classifier()
        acc, history, best, val_correct = fit_sgd_head(head, data, params)
        with torch.no_grad():
            test_logits = head(data["test"][0]).numpy() if "test" in data else None
        return acc, history, best, {"method": "sgd", "val_correct": val_correct, "test_logits": test_logits}
    return _lbfgs_probe(lm, ds, data, params, progress, adapted)


def _lbfgs_probe(lm, ds, data: dict, params: Params, progress: bool, adapted: bool):
    """transferkit.probe on the cached features (with self-training on the unlabelled pool); one history row:
    the shipped fit (a convex problem has no epochs; the C sweep and the rounds are in the returned info)."""
    import torch

    from transferkit.train.probe import fit_probe

    t = params.train
    from transferkit.core.imbalance import loss_weights

    pool = _pool_features(lm, ds, params, progress, adapted) if t.self_training == "auto" else None
    (xt, yt), (xv, yv) = data["train"], data["val"]
    t0 = time.perf_counter()
    weights = loss_weights(yt.numpy(), len(ds.classes), t)
    fit = fit_probe(
        (xt.numpy(), yt.numpy()), (xv.numpy(), yv.numpy()), len(ds.classes), t.probe_c, pool, class_weight=weights
    )
    head = lm.model.get_classifier()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(fit.weight).to(head.weight.dtype))
        head.bias.copy_(torch.from_numpy(fit.bias).to(head.bias.dtype))
    head.eval()
    acc, loss, logits = {}, {}, {}
    with torch.no_grad():
        for s, (x, y) in data.items():
            logits[s] = head(x)
            acc[s], loss[s] = logits_accuracy(logits[s], y), float(torch.nn.functional.cross_entropy(logits[s], y))
    val_correct = per_image_correct(logits["val"], data["val"][1])
    test_logits = logits["test"].numpy() if "test" in logits else None
    row = {"epoch": 1, "train_loss": loss["train"], "train_accuracy": acc["train"], "val_loss": loss["val"]}
    row |= {"val_accuracy": acc["val"], "lr": 0.0, "seconds": round(time.perf_counter() - t0, 4)}
    info = {"method": "lbfgs", "C": fit.C, "grid": fit.grid, "val_correct": val_correct, "test_logits": test_logits}
    if fit.rounds:
        info["self_training"] = {"pool": len(pool), "kept_round": fit.kept_round, "rounds": fit.rounds}
    return {s: acc[s] for s in data}, [row], 1, info


def _pool_features(lm, ds, params: Params, progress: bool, adapted: bool):
    """Features of the target's unlabelled/ images (None when it has none), from the same cache as the splits."""
    if not ds.unlabelled:
        return None
    return penultimate_features(lm, [(p, -1) for p in ds.unlabelled], ds, params, progress, adapted)


def fit_sgd_head(head, data: dict, params: Params) -> tuple[dict, list[dict], int, np.ndarray]:
    """The epoch-wise AdamW head (train.probe: sgd), early-stopped on val loss like a fine-tune."""
    import torch
    import torch.nn.functional as F

    t = params.train
    torch.nn.init.zeros_(head.weight)  # a zero head starts at the uniform prediction
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=t.head_lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    g = torch.Generator().manual_seed(params.seed)
    stop, history, best_state = EarlyStop(t.patience, t.min_epochs), [], None
    (xt, yt), (xv, yv) = data["train"], data["val"]
    from transferkit.core.imbalance import loss_weights

    w = loss_weights(yt.numpy(), head.out_features, t)
    w = None if w is None else torch.as_tensor(w, dtype=torch.float32)
    for epoch in range(1, t.epochs + 1):
        t0 = time.perf_counter()
        perm = torch.randperm(len(yt), generator=g)
        loss = _probe_epoch(head, opt, xt, yt, perm, t, params.data.batch_size, weight=w)
        sched.step()
        head.eval()
        with torch.no_grad():
            tr_logits, va_logits = head(xt), head(xv)
            val_loss = float(F.cross_entropy(va_logits, yv))
        history.append(
            {
                "epoch": epoch,
                "train_loss": loss,
                "train_accuracy": logits_accuracy(tr_logits, yt),
                "val_loss": val_loss,
                "val_accuracy": logits_accuracy(va_logits, yv),
                "lr": sched.get_last_lr()[0],
                "seconds": round(time.perf_counter() - t0, 4),
            }
        )
        improved, done = stop.step(val_loss, epoch)
        if improved:
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        if done:
            break
    head.load_state_dict(best_state)
    head.eval()
    with torch.no_grad():
        acc = {s: logits_accuracy(head(x), y) for s, (x, y) in data.items()}
        val_correct = per_image_correct(head(xv), yv)
    return acc, history, stop.best_epoch, val_correct
