"""Adapt a source model to the target task: feature extraction or fine-tuning, with a scratch baseline.

    transferkit train --target data/target --model mobilenetv2_100 --strategy auto --out runs/demo/train

Strategies (`--strategy`, or `train.strategy`)
  linear-probe  frozen backbone; a linear head trained on cached penultimate features (seconds)
  partial       the top `train.unfreeze_blocks` timm stages (model.group_matcher(coarse=True)) and the head
                train; lower stages are frozen, their BatchNorm statistics included
  full          fine-tune every layer at `train.lr` (10x below scratch), the head included
  lp-ft         linear probe first, then fine-tune everything from that head at `train.lr` (Kumar et al.
                2022: a random head distorts pretrained features early in fine-tuning; most under shift)
  scratch       same architecture from random init, same epochs: the baseline transfer must beat
Options: `train.layer_decay` (layer-wise LR decay through timm's param_groups_layer_decay: each stage's LR is
the one above it times the decay, the head keeps its own), and AdaBN (`train.adabn`): BatchNorm statistics
re-estimated on (unlabelled) target train+val images before training, for the frozen parts of a model.

`auto` is a measured choice (search_configs), `train.search_mode: evidence` by default: the first configuration of
`train.search` (the linear probe: seconds on cached features) is trained, then the fine-tunes (default: full) only
when the evidence says one can win (finetune_evidence): more than `train.linear_probe_max_per_class` labels per
class, or the probe not above the best no-transfer baseline on the same val images beyond noise (then the gate
would refuse it anyway). The first is kept and a later one replaces it only when better on the same val images
beyond noise (paired interval at `train.search_confidence` above 0). A fine-tune stops at half its epochs when it
is `train.search_prune` below the best so far. Work is bounded by epochs, never by a clock, so the same data,
params and seed ship the same model on an idle or a loaded machine. `strategy_reason` and metrics.json `search`
list every configuration's val accuracy, epochs, seconds, paired gain and the evidence. `search_mode: all` trains
every configuration; a killed search starts its configurations over.
With `train.search_mode: rule`, `auto` is the fixed rule (choose_strategy), in order:
  1. labels per class <= `train.linear_probe_max_per_class` -> linear-probe: too few labels to move millions
     of weights without overfitting;
  2. measured shift is severe (drift.json) -> lp-ft: the features need to adapt, and starting from a
     trained head keeps fine-tuning from wrecking them;
  3. a large model (>= `train.partial_min_params` million parameters) with timm stage structure -> partial;
  4. otherwise full.
  AdaBN (`train.adabn`, off by default): `auto` applies it when drift.json says shift was detected, the
  model has BatchNorm and some of it stays frozen (linear-probe, partial). It is not on by default because
  bench/transfer.py measured it costing a linear probe accuracy: the head is retrained on the target
  anyway, and statistics from a few hundred small target images are a worse normaliser than ImageNet's.

BatchNorm while fine-tuning (`train.bn_stats`): precise (default) re-estimates the statistics of the
BatchNorms that train on the train images before each validation (Wu & Johnson 2021). With 100 images an
epoch is 4 batches, and the running average (`update`) lagged so far behind the weights that val accuracy
swung 0.07-0.6 on digits-10; `frozen` (the source's statistics) diverged at LR 1e-3.

Regularisation: dropout before the head (`train.drop_rate`), stochastic depth in the residual blocks
(`train.drop_path_rate`, off by default), AdamW weight decay, label smoothing,
augmentation (timm transforms, no flips) and early stopping on validation loss (never before
`train.min_epochs`); the best epoch is the checkpoint that ships.

Devices: CUDA when present (bf16 autocast, channels_last, pinned-memory loaders), otherwise CPU with every
core we were given (or OMP_NUM_THREADS). Seeded; deterministic algorithms where the device has them.

Resume: fine-tuning writes OUT/checkpoint.pt atomically after every epoch (model, best state, optimizer,
scheduler, early-stopping state, history and every RNG state; read back with weights_only=True). Started
again with the same arguments (same fingerprint) after a crash or SIGKILL, a run continues from the
last finished epoch and ends with the same result as an uninterrupted one; a finished run removes it.

Outputs in OUT: model.safetensors, metrics.json, history.csv (DVC plots), params.yaml, and no_transfer.json (the
no-transfer baselines on the same splits: the search's evidence and validate's gate read it).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.config import Params, dump_params
from transferkit.errors import TransferkitError

STRATEGIES = ("auto", "linear-probe", "partial", "full", "lp-ft", "scratch")


class StrategyError(TransferkitError, ValueError):
    """A strategy that cannot apply to this model or these params (names the field)."""


def choose_strategy(
    params: Params,
    labels_per_class: int,
    drift: dict | None,
    n_params: int | None = None,
    has_stages: bool = True,
) -> tuple[str, str]:
    """The `auto` rule (module docstring); returns (strategy, plain-words reason)."""
    t = params.train
    severity = (drift or {}).get("severity")
    shift = f"; measured shift: {severity}" if drift is not None else ""
    if labels_per_class <= t.linear_probe_max_per_class:
        return "linear-probe", (
            f"{labels_per_class} labels per class (<= {t.linear_probe_max_per_class}): too few to fine-tune the "
            f"whole network without overfitting, so the pretrained features are kept frozen and a linear head "
            f"is trained{shift}"
        )
    if severity == "severe":
        return "lp-ft", (
            f"{labels_per_class} labels per class (> {t.linear_probe_max_per_class}) and a severe domain shift: "
            f"the features must adapt, so the network is fine-tuned (LR {t.lr:g}) starting from a linear-probed "
            f"head, which distorts the pretrained features less than a random head (LP-FT)"
        )
    if n_params is not None and n_params >= t.partial_min_params * 1e6 and has_stages:
        return "partial", (
            f"{labels_per_class} labels per class and a large model ({n_params / 1e6:.1f} M parameters >= "
            f"{t.partial_min_params:g} M): only the top {t.unfreeze_blocks} stages and the head are fine-tuned"
            f"{shift}"
        )
    return "full", (
        f"{labels_per_class} labels per class (> {t.linear_probe_max_per_class}): enough to fine-tune every layer "
        f"with a small learning rate ({t.lr:g}, {t.scratch_lr / t.lr:g}x below scratch){shift}"
    )


def stage_groups(model) -> list[list[str]]:
    """Parameter names per timm stage (a CNN stage, a transformer block), input side first, the classifier
    excluded (timm's group_matcher; a final norm stays with the top block: transferkit.arch.block_groups)."""
    from transferkit.arch import block_groups

    return block_groups(model)


def set_trainable(model, strategy: str, unfreeze_blocks: int) -> dict:
    """Set requires_grad for `strategy`; returns what trains. Frozen BatchNorms are handled by _freeze_bn."""
    head = {id(p) for p in model.get_classifier().parameters()}
    if strategy == "linear-probe":
        train_names = set()
    elif strategy == "partial":
        stages = stage_groups(model)
        if len(stages) < 2:
            raise StrategyError(
                f"strategy 'partial' needs a timm model with stage structure (group_matcher); "
                f"{type(model).__name__} has none: use full or linear-probe"
            )
        if unfreeze_blocks >= len(stages):
            raise StrategyError(
                f"train.unfreeze_blocks={unfreeze_blocks} but the model has {len(stages)} stages: "
                f"use at most {len(stages) - 1}, or --strategy full"
            )
        train_names = {n for g in stages[-unfreeze_blocks:] for n in g}
    else:
        train_names = {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in head or name in train_names)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    return {"trainable_params": n_train, "frozen_params": n_all - n_train}


def _freeze_bn(model, all_stats: bool = False) -> None:
    """BatchNorms whose weights are frozen keep their running statistics too (eval mode); `all_stats`
    keeps every BatchNorm's statistics (its affine weights still train)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    for m in model.modules():
        if isinstance(m, _BatchNorm) and (all_stats or not any(p.requires_grad for p in m.parameters(recurse=False))):
            m.eval()


def _precise_bn(model, samples, transform, batch_size: int) -> None:
    """Re-estimate the statistics of the BatchNorms that train (precise BN, Wu & Johnson 2021)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    frozen = [
        (m, {k: v.clone() for k, v in m.state_dict().items()})
        for m in model.modules()
        if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters(recurse=False))
    ]
    adapt_batchnorm(model, samples, transform, batch_size)
    for m, state in frozen:
        m.load_state_dict(state)


def has_batchnorm(model) -> bool:
    from transferkit.arch import has_batchnorm as any_bn

    return any_bn(model)


def adapt_batchnorm(model, samples, transform, batch_size: int, progress: bool = False) -> int:
    """AdaBN (Li et al. 2016): replace BatchNorm running statistics with the target images' statistics.

    Only the statistics change (cumulative average over all given images); weights stay as they are.
    Returns the number of images used.
    """
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm
    from tqdm import tqdm

    from transferkit.data import make_loader

    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches, not an exponential one
        m.train()
    dev = next(model.parameters()).device
    n = 0
    with torch.no_grad():
        for xb, _ in tqdm(
            make_loader(samples, transform, batch_size), desc="adabn", unit="batch", disable=not progress, leave=False
        ):
            model(xb.to(dev))
            n += len(xb)
    for m, (mom, tr) in zip(bns, saved):
        m.momentum = mom
        m.train(tr)
    model.eval()
    return n


def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _correct(logits, labels) -> np.ndarray:
    """Per image: is the top-1 prediction right (the search compares configurations on the same val images)."""
    return (logits.argmax(1) == labels).cpu().numpy()


def _share(correct: np.ndarray) -> float:
    return float(correct.mean()) if len(correct) else float("nan")


def _accuracy(logits, labels) -> float:
    return _share(_correct(logits, labels))


class _EarlyStop:
    def __init__(self, patience: int, min_epochs: int = 0):
        self.patience, self.min_epochs, self.best, self.best_epoch, self.bad = patience, min_epochs, math.inf, 0, 0

    def step(self, val_loss: float, epoch: int) -> tuple[bool, bool]:
        """(improved, stop)"""
        if val_loss < self.best - 1e-6:
            self.best, self.best_epoch, self.bad = val_loss, epoch, 0
            return True, False
        self.bad += 1
        return False, self.bad >= self.patience and epoch >= self.min_epochs


def _features(lm, samples, ds, params: Params, progress: bool, adapted: bool) -> np.ndarray:
    """Penultimate features of `samples`: from the shared embedding cache, unless AdaBN changed the backbone
    (`adapted`): then computed here from the adapted model (the cache holds the source's)."""
    from transferkit.embed import embeddings, forward

    if adapted:
        return forward(lm, samples, params.data.batch_size, progress, f"{lm.spec.spec}+adabn")["features"]
    return embeddings(lm.spec.spec, samples, ds.md5, params.data, progress)["features"]


def _probe_features(lm, ds, params: Params, progress: bool, adapted: bool, splits=("train", "val", "test")) -> dict:
    """{split: (features, labels)} as tensors (_features)."""
    import torch

    out = {}
    for s in splits:
        labels = torch.tensor([lbl for _, lbl in ds.splits[s]], dtype=torch.long)
        out[s] = (torch.from_numpy(_features(lm, ds.splits[s], ds, params, progress, adapted)), labels)
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


def _linear_probe(
    lm, ds, params: Params, progress: bool, adapted: bool, test: bool = True
) -> tuple[dict, list[dict], int, dict]:
    """Train a linear head on frozen features (`train.probe`); returns (split accuracies, history, best
    epoch, what the probe did). `test=False` leaves the test split out (finish_test adds it if the fit ships)."""
    import torch

    data = _probe_features(lm, ds, params, progress, adapted, ("train", "val", "test") if test else ("train", "val"))
    _seed_everything(params.seed)  # after embedding: loading a model may consume the global RNG
    if params.train.probe == "sgd":
        head = lm.model.get_classifier()
        acc, history, best, val_correct = _sgd_probe(head, data, params)
        with torch.no_grad():
            test_logits = head(data["test"][0]).numpy() if "test" in data else None
        return acc, history, best, {"method": "sgd", "val_correct": val_correct, "test_logits": test_logits}
    return _lbfgs_probe(lm, ds, data, params, progress, adapted)


def _lbfgs_probe(lm, ds, data: dict, params: Params, progress: bool, adapted: bool):
    """transferkit.probe on the cached features (with self-training on the unlabelled pool); one history row:
    the shipped fit (a convex problem has no epochs; the C sweep and the rounds are in the returned info)."""
    import torch

    from transferkit.probe import fit_probe

    t = params.train
    from transferkit.imbalance import loss_weights

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
            acc[s], loss[s] = _accuracy(logits[s], y), float(torch.nn.functional.cross_entropy(logits[s], y))
    val_correct = _correct(logits["val"], data["val"][1])
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
    return _features(lm, [(p, -1) for p in ds.unlabelled], ds, params, progress, adapted)


def _sgd_probe(head, data: dict, params: Params) -> tuple[dict, list[dict], int, np.ndarray]:
    """The epoch-wise AdamW head (train.probe: sgd), early-stopped on val loss like a fine-tune."""
    import torch
    import torch.nn.functional as F

    t = params.train
    torch.nn.init.zeros_(head.weight)  # a zero head starts at the uniform prediction
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=t.head_lr, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    g = torch.Generator().manual_seed(params.seed)
    stop, history, best_state = _EarlyStop(t.patience, t.min_epochs), [], None
    (xt, yt), (xv, yv) = data["train"], data["val"]
    from transferkit.imbalance import loss_weights

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
                "train_accuracy": _accuracy(tr_logits, yt),
                "val_loss": val_loss,
                "val_accuracy": _accuracy(va_logits, yv),
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
        acc = {s: _accuracy(head(x), y) for s, (x, y) in data.items()}
        val_correct = _correct(head(xv), yv)
    return acc, history, stop.best_epoch, val_correct


def param_groups(model, lr: float, head_lr: float, weight_decay: float, layer_decay: float | None) -> list[dict]:
    """Optimizer groups over the trainable parameters: discriminative LRs (body `lr`, head `head_lr`),
    optionally with layer-wise decay (timm's param_groups_layer_decay: lr * decay^(depth from the top))."""
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    head = [p for p in trainable if id(p) in head_ids]
    if layer_decay is None:
        body = [p for p in trainable if id(p) not in head_ids]
        groups = [{"params": body, "lr": lr, "weight_decay": weight_decay}] if body else []
    else:
        from timm.optim import param_groups_layer_decay

        groups = []
        for g in param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay):
            ps = [p for p in g["params"] if id(p) not in head_ids]
            if ps:
                groups.append({"params": ps, "lr": lr * g["lr_scale"], "weight_decay": g["weight_decay"]})
    groups.append({"params": head, "lr": head_lr, "weight_decay": weight_decay})
    return groups


def _fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_resume(path: Path, state: dict) -> None:
    import torch

    from transferkit.io import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_resume(path: Path, fingerprint: str) -> dict | None:
    """The checkpoint of an interrupted run with the same fingerprint, else None (with the reason on stderr)."""
    import torch

    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint means starting over, not failing
        print(f"train: ignoring unreadable {path} ({type(e).__name__}); starting from epoch 1", file=sys.stderr)
        return None
    if state.get("fingerprint") != fingerprint:
        print(f"train: {path} belongs to a run with other arguments; starting from epoch 1", file=sys.stderr)
        return None
    return state


def _rng_state(loader_gen) -> dict:
    import random

    import torch

    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "loader": loader_gen.get_state(),
    }


def _set_rng_state(state: dict, loader_gen) -> None:
    import random

    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    loader_gen.set_state(state["loader"])


def _loaders(lm, ds, params: Params):
    """The shuffled (augmented) train loader and unshuffled eval loaders for every split."""
    from transferkit import distributed, zoo
    from transferkit.data import make_loader

    cfg, bs = lm.data_config, params.data.batch_size
    aug = zoo.train_transform(cfg) if params.train.augment else zoo.eval_transform(cfg)
    if distributed.active():  # this rank's share of each global batch (transferkit.distributed)
        train = distributed.train_loader(ds.splits["train"], aug, bs, params.seed, params.data.num_workers)
    else:
        train = make_loader(
            ds.splits["train"], aug, bs, shuffle=True, seed=params.seed, num_workers=params.data.num_workers
        )
    return train, {s: make_loader(ds.splits[s], zoo.eval_transform(cfg), bs) for s in ("train", "val", "test")}


def _optimizer(model, t, strategy: str, steps: int):
    """AdamW over discriminative groups and a warmup + cosine schedule over `steps` optimizer steps."""
    import torch

    lr = t.scratch_lr if strategy == "scratch" else t.lr
    # partial: a fresh head on mostly frozen features learns fast at head_lr. full: at the body's LR, as in a
    # bare timm loop (10x faster made val accuracy swing on 100 images); LP-FT's head is trained already
    head_lr = max(lr, t.head_lr) if strategy == "partial" else lr
    groups = param_groups(model, lr, head_lr, t.weight_decay, t.layer_decay if strategy != "scratch" else None)
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.15
    )
    return opt, sched


def _autocast(dev):
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)


def _evaluate(model, loader, dev) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` in eval mode over `loader`."""
    import torch
    import torch.nn.functional as F

    model.eval()
    logits, labels = [], []
    with torch.inference_mode(), _autocast(dev):
        for xb, yb in loader:
            logits.append(model(xb.to(dev, non_blocking=True)).float().cpu())
            labels.append(yb)
    lg, lb = torch.cat(logits), torch.cat(labels)
    return float(F.cross_entropy(lg, lb)), _accuracy(lg, lb)


def _train_epoch(model, loader, opt, sched, dev, t, weight=None) -> dict:
    """One pass over the train loader; returns the epoch's mean loss and (train-mode) accuracy. `weight`: per-class
    loss weights (transferkit.imbalance), or None."""
    import torch
    import torch.nn.functional as F

    from transferkit import distributed

    model.train()
    _freeze_bn(model, all_stats=t.bn_stats == "frozen")
    tot, correct, n = 0.0, 0, 0
    for xb, yb in loader:
        xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
        if dev.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        with _autocast(dev):
            logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb, weight=weight, label_smoothing=t.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        tot += loss.item() * len(yb)
        correct += int((logits.argmax(1) == yb).sum())
        n += len(yb)
    tot, correct, n = distributed.all_sum(tot, correct, n)  # over every rank's share of the epoch
    return {"train_loss": tot / n, "train_accuracy": correct / n}


class _Run:
    """The mutable state of one fine-tune, as checkpointed after every epoch (`save`, `resume`)."""

    def __init__(self, t):
        self.stop = _EarlyStop(t.patience, t.min_epochs)
        self.history, self.best_state, self.done, self.start, self.stopped = [], None, False, 1, ""
        self.half = max(1, t.epochs // 2)  # where the search's prune compares; the schedule half annealed

    def end_epoch(self, row: dict, model, prune) -> None:
        """Record the epoch, keep the weights if val loss improved, decide whether training ends here (early
        stopping, or the search's `prune` on the history). No clock takes part: the same inputs stop at the same
        epoch on an idle or a loaded machine."""
        self.history.append(row)
        improved, self.done = self.stop.step(row["val_loss"], row["epoch"])
        if prune is not None and not self.done and prune(self.history):
            self.done, self.stopped = True, "pruned"
        if improved:
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def save(self, ckpt: Path, fingerprint: str, model, opt, sched, loader_gen) -> None:
        epoch = self.history[-1]["epoch"]
        state = {"fingerprint": fingerprint, "epoch": epoch, "done": self.done, "model": model.state_dict()}
        state |= {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "stop": dict(self.stop.__dict__)}
        state |= {"history": self.history, "best": self.best_state, "rng": _rng_state(loader_gen)}
        _save_resume(ckpt, state)

    def resume(self, state: dict, model, opt, sched, loader_gen) -> int:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        self.stop.__dict__.update(state["stop"])
        self.history, self.best_state, self.done = state["history"], state["best"], state["done"]
        _set_rng_state(state["rng"], loader_gen)
        self.start = int(state["epoch"]) + 1
        return self.start


def _epoch_bar(run, epochs: int, desc: str, progress: bool):
    """The epochs left to train (from run.start, after a resume), as a progress bar."""
    from tqdm import tqdm

    return tqdm(
        range(run.start, epochs + 1),
        desc=desc,
        unit="epoch",
        initial=run.start - 1,
        total=epochs,
        disable=not progress or run.done,
    )


def _on_device(model, dev):
    """`model` on `dev`, and the module the training steps call: DDP over it under torchrun (SyncBatchNorm on
    GPU: transferkit.distributed); evaluation and checkpoints use `model`, whose weights it shares."""
    import torch

    from transferkit import distributed

    model = model.to(dev, memory_format=torch.channels_last) if dev.type == "cuda" else model.to(dev)
    return model, distributed.wrap(model, dev)


def _finetune(
    lm,
    ds,
    params: Params,
    strategy: str,
    progress: bool,
    out: Path,
    fingerprint: str,
    prune: Callable[[list[dict]], bool] | None = None,
    test: bool = True,
) -> tuple[dict, list[dict], int, int, str, np.ndarray, np.ndarray | None]:
    """Fine-tune (partial/full/lp-ft) or train from scratch with early stopping; keeps the best epoch.

    `prune(history)` true ends it after that epoch (the search's limit). Returns (split accuracies, history,
    best epoch, epoch resumed from or 0, why it stopped early: "" or "pruned", per-image val correctness)."""
    import torch

    from transferkit import zoo
    from transferkit.embed import device
    from transferkit.imbalance import loss_weights

    t, dev = params.train, device()
    model, step_model = _on_device(lm.model, dev)
    train_loader, eval_loaders = _loaders(lm, ds, params)
    weight = loss_weights([y for _, y in ds.splits["train"]], len(ds.classes), t)
    weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float32, device=dev)
    opt, sched = _optimizer(model, t, strategy, t.epochs * max(1, len(train_loader)))
    run, ckpt, resumed = _Run(t), out / "checkpoint.pt", 0
    state = _load_resume(ckpt, fingerprint) if t.resume else None
    if state is not None:
        resumed = run.resume(state, model, opt, sched, train_loader.generator)
        print(f"train: resuming {out} from epoch {resumed} ({ckpt})", file=sys.stderr)
    else:
        _seed_everything(params.seed)  # same dropout/augmentation draws whatever ran before in this process
    bar = _epoch_bar(run, t.epochs, f"train {strategy} {lm.spec.spec}", progress)
    for epoch in bar:
        if run.done:
            break
        t0 = time.perf_counter()
        row = {"epoch": epoch, **_train_epoch(step_model, train_loader, opt, sched, dev, t, weight)}
        if t.bn_stats == "precise" and has_batchnorm(model):  # current weights' statistics, not a lagging average
            _precise_bn(model, ds.splits["train"], zoo.eval_transform(lm.data_config), params.data.batch_size)
        row["val_loss"], row["val_accuracy"] = _evaluate(model, eval_loaders["val"], dev)
        row |= {"lr": sched.get_last_lr()[0], "seconds": round(time.perf_counter() - t0, 3)}
        bar.set_postfix(val_loss=f"{row['val_loss']:.3f}", val_acc=f"{row['val_accuracy']:.3f}")
        run.end_epoch(row, model, prune)
        run.save(ckpt, fingerprint, model, opt, sched, train_loader.generator)
    bar.close()
    model.load_state_dict(run.best_state)
    model.to("cpu").eval()
    out = {s: logits_cpu(model, loader) for s, loader in eval_loaders.items() if test or s != "test"}
    correct = {s: _correct(logits, labels) for s, (logits, labels) in out.items()}
    acc = {s: _share(c) for s, c in correct.items()}
    test_logits = out["test"][0].float().numpy() if test else None
    return acc, run.history, run.stop.best_epoch, resumed, run.stopped, correct["val"], test_logits


def logits_cpu(model, loader):
    """(logits, labels) of `model` over `loader`, as tensors in loader order."""
    import torch

    logits, labels = [], []
    with torch.inference_mode():
        for xb, yb in loader:
            logits.append(model(xb))
            labels.append(yb)
    return torch.cat(logits), torch.cat(labels)


def correct_cpu(model, loader) -> np.ndarray:
    return _correct(*logits_cpu(model, loader))


def evaluate_cpu(model, loader) -> float:
    return _share(correct_cpu(model, loader))


@dataclass
class Fit:
    """One trained configuration: the model and what run_train reports about it."""

    lm: Any
    strategy: str
    reason: str
    acc: dict
    history: list[dict]
    best_epoch: int
    info: dict  # trainable/frozen params, adabn, linear_probe_phase, resumed_from_epoch, ...
    seconds: float = 0.0
    stopped: str = ""  # "" or "pruned" (search only)
    val_correct: Any = None  # per val image: predicted right (np.ndarray of bool), for the search's paired test
    model: str | None = None  # the spec trained, when the search fine-tuned an ensemble's first member
    test_logits: Any = None  # [N_test, C] float32 in split order (OUT/test_logits.npz)


def run_train(
    target: Path,
    out: Path,
    params: Params,
    model: str,
    strategy: str | None = None,
    drift: Path | None = None,
    progress: bool = True,
    baselines: bool = True,
) -> dict:
    """Train `model` on `target` and write the run folder (see module docstring).

    `baselines`: also fit the no-transfer baselines into OUT/no_transfer.json (the bar the search's evidence
    and validate's gate measure against; validate reuses the file). Off for select's confirm runs and
    validate's own linear-probe baseline, which are compared, not gated."""
    from transferkit import distributed
    from transferkit.embed import torch_threads

    t_start = time.perf_counter()
    out, strategy = distributed.rank_out(Path(out)), strategy or params.train.strategy  # rank 0 alone writes OUT
    ds, drift_report = _inputs(target, params, model, strategy, drift)
    torch_threads()
    fit_args = dict(ds=ds, params=params, model=model, drift_report=drift_report, progress=progress)
    bar = _NoTransfer(out, ds, params, progress) if baselines else None
    if strategy == "auto" and params.train.search_mode != "rule":
        fit, search = _search(fit_args, out, bar)
    else:
        fit, search = _fit(**fit_args, strategy=strategy, out=out), None
    if fit.info["imbalance"]["skewed"] or fit.info["imbalance"]["weighted"]:
        fit.reason += f"; imbalance: {fit.info['imbalance']['reason']}"
    timings = {"fit": fit.seconds}
    if bar is not None:
        bar.rows()  # fitted now unless the search's evidence already needed them
        timings["no_transfer"] = bar.seconds
    metrics = _metrics(fit, ds, params, target, fit.model or model, drift, drift_report, search)
    metrics["timings"] = {k: round(v, 2) for k, v in timings.items()}
    metrics["distributed"] = distributed.summary()
    _write_run(out, fit, ds, params, fit.model or model, metrics, t_start)
    return metrics


class _NoTransfer:
    """The no-transfer baselines of this run folder, fitted at most once (transferkit.baselines.cached_no_transfer)."""

    def __init__(self, out: Path, ds, params: Params, progress: bool):
        self.out, self.ds, self.params, self.progress = out, ds, params, progress
        self._rows: list[dict] | None = None
        self.seconds = 0.0

    def rows(self) -> list[dict]:
        from transferkit import distributed
        from transferkit.baselines import cached_no_transfer

        if self._rows is None:  # under DDP rank 0 fits them and every rank gets its rows (same decisions)
            t0 = time.perf_counter()
            mine = distributed.is_main() or not distributed.active()
            rows = cached_no_transfer(self.out, self.ds, self.params, self.progress) if mine else None
            self._rows = distributed.from_main(rows)
            self.seconds = time.perf_counter() - t0
        return self._rows


def _search(fit_args: dict, out: Path, bar: _NoTransfer | None) -> tuple[Fit, dict]:
    """`auto`: the first configuration of `train.search` (the linear probe), then the fine-tunes only when the
    evidence says one can win (finetune_evidence); keep the first unless a later one is better beyond noise
    (search_configs). Returns the kept fit and the table for metrics.json."""
    import shutil

    params, ds = fit_args["params"], fit_args["ds"]
    t = params.train

    def fit(strategy: str, bar_acc: float | None) -> Fit:
        def prune(history: list[dict]) -> bool:  # half-way and still far below the best finished one
            best = max(h["val_accuracy"] for h in history)
            return bar_acc is not None and len(history) >= t.epochs // 2 and best < bar_acc - t.search_prune

        # a fine-tune of a feature ensemble trains every member: its best-ranked member alone fine-tunes at a
        # fraction of the cost, val within noise (docs/stages.md)
        model, p = fit_args["model"], params
        if strategy != "linear-probe":
            model = model.split("+")[0]
            if t.finetune_image_size:  # cheaper per epoch than 224 px; 8-px digits collapsed there (docs/stages.md)
                p = params.model_copy(deep=True)
                p.data.image_size = t.finetune_image_size
        args = {**fit_args, "model": model, "params": p}
        # the test split is read only by the configuration that ships: a large test split through a
        # two-backbone ensemble is wasted time when the fine-tune is kept
        f = _fit(**args, strategy=strategy, out=out / "search" / strategy, prune=prune, defer_test=True)
        f.model = model
        return f

    def evidence(first: Fit) -> dict:
        return finetune_evidence(first, ds.min_per_class("train"), params, bar.rows() if bar else None)

    best, rows, why = search_configs(t.search, fit, evidence, confidence=t.search_confidence)
    shutil.rmtree(out / "search", ignore_errors=True)
    if "test" not in best.acc:
        finish_test(best, ds, params, fit_args["progress"])
    rule, rule_why = choose_strategy(params, ds.min_per_class("train"), fit_args["drift_report"])
    table = ", ".join(_search_row_text(r) for r in rows)
    kept = (
        f"kept {best.strategy}: a later configuration replaces the kept one only when it is better on the same "
        f"validation images beyond noise (paired {t.search_confidence:.0%} interval of the gain above 0)"
        if t.search_confidence
        else f"kept {best.strategy}, the best validation accuracy (ties go to the cheaper, earlier one)"
    )
    best.reason = (
        f"auto: measured on {len(ds.splits['val'])} validation images: {table}; {why['reason']}; {kept}. "
        f"The prior rule would have said {rule}: {rule_why}"
    )
    if best.info["adabn"]["applied"]:
        best.reason += f"; AdaBN: BatchNorm statistics re-estimated on {best.info['adabn']['images']} target images"
    return best, {"mode": t.search_mode, "evidence": why, "selected": best.strategy, "candidates": rows}


def finetune_evidence(first: Fit, labels_per_class: int, params: Params, no_transfer: list[dict] | None) -> dict:
    """Should the search fine-tune after its first (cheapest) configuration? {"finetune", "reason", ...}.

    Yes with `search_mode: all`, with more than `linear_probe_max_per_class` labels per class (enough to move the
    backbone), or when the first configuration does not beat the best no-transfer baseline on the same val
    images beyond noise (paired interval at `search_confidence` above 0): then the frozen features do not fit
    the target (domain shift, task mismatch) and the gate would refuse them, so only a fine-tune can help.
    Otherwise no: with few labels a fine-tune did not beat the probe in any of 18 searches where the probe
    cleared that bar (bench/results/peers.md), and it costs many times the probe."""
    from transferkit.baselines import best_baseline, paired_comparison

    t = params.train
    if t.search_mode == "all":
        return {"finetune": True, "reason": "search_mode all: every configuration runs"}
    if labels_per_class > t.linear_probe_max_per_class:
        return {
            "finetune": True,
            "reason": f"{labels_per_class} labels per class (> {t.linear_probe_max_per_class}): enough to fine-tune",
        }
    best = best_baseline(no_transfer or [])
    if best is None or first.val_correct is None or best.get("val_correct") is None:
        return {"finetune": True, "reason": "no working no-transfer baseline to measure the features against"}
    vs = paired_comparison(first.val_correct, best["val_correct"], t.search_confidence or 0.8)
    lower = vs["interval"][0] if t.search_confidence else vs["gain"]
    detail = {
        "baseline": best["name"],
        "baseline_val_accuracy": best["val_accuracy"],
        "first_val_accuracy": first.acc["val"],
        "gain": vs["gain"],
        "interval": vs["interval"],
    }
    said = (
        f"{first.strategy} val {first.acc['val']:.3f} vs the best no-transfer baseline {best['name']} "
        f"{best['val_accuracy']:.3f} (gain {vs['gain']:+.3f}, interval [{vs['interval'][0]:+.3f}, {vs['interval'][1]:+.3f}])"
    )
    if lower > 0:
        return {
            "finetune": False,
            "reason": f"{said}: the frozen features beat no transfer beyond noise with {labels_per_class} labels per "
            "class, so no fine-tune was tried (it would cost 10-50x the probe for a gain not seen in that case)",
            **detail,
        }
    return {
        "finetune": True,
        "reason": f"{said}: the frozen features do not beat no transfer beyond noise, so the backbone is fine-tuned",
        **detail,
    }


def finish_test(fit: Fit, ds, params: Params, progress: bool) -> None:
    """The test split of the kept configuration, which the search deferred: a probe's features (the same cache)
    through its fitted head, a fine-tune's images through the fine-tuned model."""
    import torch

    from transferkit import zoo
    from transferkit.data import make_loader

    y = torch.tensor([lbl for _, lbl in ds.splits["test"]], dtype=torch.long)
    if fit.strategy == "linear-probe":
        x = _features(fit.lm, ds.splits["test"], ds, params, progress, fit.info["adabn"]["applied"])
        with torch.no_grad():
            logits = fit.lm.model.get_classifier()(torch.from_numpy(x))
    else:
        loader = make_loader(ds.splits["test"], zoo.eval_transform(fit.lm.data_config), params.data.batch_size)
        logits, y = logits_cpu(fit.lm.model.to("cpu").eval(), loader)
    fit.acc["test"], fit.test_logits = _accuracy(logits, y), logits.float().numpy()


def _search_row_text(r: dict) -> str:
    if r["val_accuracy"] is None:
        return f"{r['strategy']} not tried"
    vs = r.get("vs_kept")
    gain = f", gain {vs['gain']:+.3f} [{vs['interval'][0]:+.3f}, {vs['interval'][1]:+.3f}]" if vs else ""
    stopped = f", {r['stopped']}" if r["stopped"] else ""
    return f"{r['strategy']} {r['val_accuracy']:.3f} ({r['epochs']} epochs, {r['seconds']:.0f} s{stopped}{gain})"


def search_configs(configs: list[str], fit: Callable, evidence: Callable, confidence: float = 0.0):
    """Train `configs` in order (cheapest first); return (kept fit, rows, the evidence after the first).

    `fit(config, bar)` trains one configuration, free to give up early when it cannot reach `bar` (the best
    validation accuracy so far). The first config always runs; `evidence(first)` then says whether the others
    run at all ({"finetune": bool, "reason": str}). A later config replaces the kept one when its val accuracy is
    higher and, with `confidence` > 0 and per-image val correctness on both fits, the paired interval of that
    gain (transferkit.baselines.paired_comparison) lies above 0: on 200 val images 3 images are 1.5 points, and
    the cheaper, earlier config is kept within that noise. Nothing here reads a clock: what ships depends on the
    data, params and seed only (`seconds` in the rows is reported, never compared)."""
    best, rows, why = None, [], None
    for config in configs:
        if why is not None and not why["finetune"]:
            rows.append({"strategy": config, "val_accuracy": None, "epochs": 0, "seconds": 0.0, "stopped": "evidence"})
            continue
        t0 = time.perf_counter()
        f = fit(config, None if best is None else best.acc["val"])
        rows.append(
            {
                "strategy": config,
                "model": getattr(f, "model", None),
                "val_accuracy": f.acc["val"],
                "epochs": len(f.history),
                "best_epoch": f.best_epoch,
                "seconds": round(time.perf_counter() - t0, 2),
                "stopped": f.stopped,
            }
        )
        if best is None:
            best, why = f, evidence(f)
            continue
        better = f.acc["val"] > best.acc["val"]
        if confidence and f.val_correct is not None and best.val_correct is not None:
            from transferkit.baselines import paired_comparison

            vs = paired_comparison(f.val_correct, best.val_correct, confidence)
            rows[-1]["vs_kept"] = {"kept": best.strategy, "gain": vs["gain"], "interval": vs["interval"]}
            better = better and vs["interval"][0] > 0
        if better:
            best = f
    return best, rows, why or {"finetune": False, "reason": "one configuration"}


def _inputs(target: Path, params: Params, model: str, strategy: str, drift: Path | None):
    """The validated request: the dataset and the drift report (if any)."""
    from transferkit.data import DataError, load_with_params
    from transferkit.io import read_json

    if strategy not in STRATEGIES:
        raise StrategyError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if strategy != "scratch" and model.startswith("scratch:"):
        raise DataError(f"model {model!r} has no pretrained weights; use --strategy scratch")
    ds = load_with_params(target, params)
    return ds, (read_json(drift) if drift else None)


def _fit(ds, params: Params, model: str, drift_report, progress: bool, strategy: str, out: Path, **limits) -> Fit:
    """Build the model, settle the strategy (the rule for `auto`), train it; `limits` go to _finetune."""
    from transferkit import zoo
    from transferkit.arch import describe

    t, t0 = params.train, time.perf_counter()
    scratch_spec = strategy == "scratch" and not model.startswith("scratch:")
    spec = f"scratch:{zoo.parse_spec(model).arch}" if scratch_spec else model
    _seed_everything(params.seed)
    lm = zoo.create_model(
        spec,
        num_classes=len(ds.classes),
        drop_rate=t.drop_rate,
        image_size=params.data.image_size,
        seed=params.seed,
        drop_path_rate=t.drop_path_rate,
    )
    n_params = sum(p.numel() for p in lm.model.parameters())
    if strategy == "auto":
        has_stages = len(stage_groups(lm.model)) > 1
        strategy, reason = choose_strategy(params, ds.min_per_class("train"), drift_report, n_params, has_stages)
    elif strategy == "scratch":
        reason = "baseline: same architecture from random init, same labelled data and epochs"
    else:
        reason = f"requested explicitly ({strategy})"
    info = set_trainable(lm.model, "full" if strategy in ("lp-ft", "scratch") else strategy, t.unfreeze_blocks)
    info["adabn"] = _maybe_adabn(lm, ds, params, strategy, drift_report, progress)
    info["imbalance"] = _imbalance(ds, params)
    if info["adabn"]["applied"]:
        reason += f"; AdaBN: BatchNorm statistics re-estimated on {info['adabn']['images']} unlabelled target images"
    info |= {"model_params": n_params, "spec": spec, "architecture": describe(lm.model, zoo.parse_spec(spec).arch)}
    fingerprint = _fingerprint(
        model=model,
        spec=spec,
        strategy=strategy,
        data=ds.md5,
        weights=lm.weights_sha256,
        params=params.model_dump(mode="json"),
    )
    fit = Fit(lm, strategy, reason, *_train(lm, ds, params, strategy, progress, out, fingerprint, info, **limits))
    fit.seconds, fit.stopped = round(time.perf_counter() - t0, 2), info.pop("stopped", "")
    fit.val_correct = info.pop("val_correct", None)
    fit.test_logits = info.pop("test_logits", None)
    return fit


def _train(lm, ds, params: Params, strategy: str, progress: bool, out: Path, fingerprint: str, info: dict, **limits):
    """(split accuracies, history, best epoch, info) of `strategy`; info gains the LP-FT phase and resume epoch."""
    adapted = info["adabn"]["applied"]
    info["linear_probe_phase"], info["resumed_from_epoch"] = None, 0
    test = not limits.pop("defer_test", False)
    if strategy == "linear-probe":  # seconds: no limits; a search defers its test split (finish_test)
        acc, history, best, info["probe"] = _linear_probe(lm, ds, params, progress, adapted=adapted, test=test)
        info["val_correct"] = info["probe"].pop("val_correct")
        info["test_logits"] = info["probe"].pop("test_logits")
        return acc, history, best, info
    if strategy == "lp-ft":  # phase 1 trains the head on frozen features (seconds; re-run on resume)
        lp_acc, lp_hist, lp_best, probe = _linear_probe(lm, ds, _lpft_params(params), progress, adapted=adapted)
        probe.pop("val_correct"), probe.pop("test_logits")
        info["linear_probe_phase"] = {
            "val_accuracy": lp_acc["val"],
            "test_accuracy": lp_acc["test"],
            "best_epoch": lp_best,
            "epochs": len(lp_hist),
            "probe": probe,
        }
    acc, history, best, info["resumed_from_epoch"], info["stopped"], info["val_correct"], info["test_logits"] = (
        _finetune(lm, ds, params, strategy, progress, out, fingerprint, test=test, **limits)
    )
    return acc, history, best, info


def _lpft_params(params: Params) -> Params:
    """LP-FT's phase 1 head: the epoch-wise probe. The optimal L-BFGS head is confident, and once fine-tuning
    and precise BatchNorm move the features, the first epoch's val loss was 44 nats from it against 2.0 from
    the SGD head (digits, 6 labels per class, 32 px; full from a random head: 2.1)."""
    p = params.model_copy(deep=True)
    p.train.probe = "sgd"
    return p


def _imbalance(ds, params: Params) -> dict:
    """Whether the loss is class-weighted and which metric the gate judges (transferkit.imbalance.decide)."""
    from transferkit.imbalance import decide

    t = params.train
    return decide([y for _, y in ds.splits["train"]], len(ds.classes), t.class_weights, t.imbalance_ratio)


def _maybe_adabn(lm, ds, params: Params, strategy: str, drift_report, progress: bool) -> dict:
    """AdaBN when `train.adabn` asks for it (module docstring); returns what was done."""
    from transferkit import zoo
    from transferkit.data import subsample

    t, adabn = params.train, {"applied": False, "images": 0}
    frozen_bn = strategy in ("linear-probe", "partial")
    if not (t.adabn == "on" or (t.adabn == "auto" and frozen_bn and bool((drift_report or {}).get("drift_detected")))):
        return adabn
    if strategy == "scratch" or not has_batchnorm(lm.model):
        why = "scratch has no source statistics" if strategy == "scratch" else "the model has no BatchNorm"
        return adabn | {"reason": f"not applicable: {why}"}
    pool = subsample(ds.splits["train"] + ds.splits["val"], t.adabn_max_images, params.seed)
    n = adapt_batchnorm(lm.model, pool, zoo.eval_transform(lm.data_config), params.data.batch_size, progress)
    return {"applied": True, "images": n}


def _metrics(fit: Fit, ds, params: Params, target, model: str, drift, drift_report, search) -> dict:
    """metrics.json (the train contract in docs/stages.md, plus what explains the run)."""
    t, lm = params.train, fit.lm
    drop_path_blocks = sum(1 for m in lm.model.modules() if float(getattr(m, "drop_prob", 0) or 0) > 0)
    info = {k: v for k, v in fit.info.items() if k != "spec"}
    return {
        "model": model,
        "strategy": fit.strategy,
        "strategy_reason": fit.reason,
        "train_accuracy": fit.acc["train"],
        "val_accuracy": fit.acc["val"],
        "test_accuracy": fit.acc["test"],
        "best_epoch": fit.best_epoch,
        "epochs": len(fit.history),
        "history": fit.history,
        "target": str(target),
        "data_md5": ds.md5,
        "classes": ds.classes,
        "labels_per_class": ds.min_per_class("train"),
        "n_train": len(ds.splits["train"]),
        "n_val": len(ds.splits["val"]),
        "n_test": len(ds.splits["test"]),
        "image_size": int(lm.data_config["input_size"][-1]),
        "seed": params.seed,
        "skipped_files": len(ds.skipped),
        "device": "cuda" if _cuda() else "cpu",
        **info,
        "layer_decay": t.layer_decay if fit.strategy in ("partial", "full", "lp-ft") else None,
        "drop_path": {"rate": t.drop_path_rate, "blocks": drop_path_blocks},  # blocks that really drop
        "shift": shift_summary(drift_report, drift),
        "search": search,
    }


def _write_run(out: Path, fit: Fit, ds, params: Params, model: str, metrics: dict, t_start: float) -> None:
    """The run folder: checkpoint (its sha256 into metrics), history.csv, params.yaml, metrics.json."""
    from transferkit import zoo
    from transferkit.io import atomic_write_text, write_json

    lm = fit.lm
    meta = {
        "arch": lm.arch,
        "num_classes": str(len(ds.classes)),
        "classes": ds.classes,
        "data_config": lm.data_config,
        "source_model": model,
        "source_sha256": lm.weights_sha256 or "",
        "strategy": fit.strategy,
        "data_md5": ds.md5,
    }
    metrics["checkpoint_sha256"] = zoo.save_checkpoint(lm.model, out / "model.safetensors", meta)
    if fit.test_logits is not None:
        write_test_logits(out, ds.splits["test"], fit.test_logits, metrics["checkpoint_sha256"])
    metrics["seconds"] = round(time.perf_counter() - t_start, 2)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fit.history[0]))
    w.writeheader()
    w.writerows(fit.history)
    atomic_write_text(out / "history.csv", buf.getvalue())
    dump_params(params, out / "params.yaml")
    write_json(out / "metrics.json", metrics)
    (out / "checkpoint.pt").unlink(missing_ok=True)  # finished: nothing left to resume


TEST_LOGITS = "test_logits.npz"


def write_test_logits(out: Path, samples: list, logits: np.ndarray, checkpoint_sha256: str) -> None:
    """OUT/test_logits.npz: the shipped model's test logits as train computed them, keyed by image, with the
    checkpoint's sha256. validate checks the checkpoint against a sample of them and reuses the rest; export's
    parity compares onnxruntime with them: neither repeats a forward pass over the whole test split."""
    import io

    from transferkit.embed import row_key
    from transferkit.io import atomic_write_bytes

    buf = io.BytesIO()
    keys = np.array([row_key(p) for p, _ in samples])
    np.savez(buf, keys=keys, logits=np.asarray(logits, np.float32), checkpoint_sha256=np.array(checkpoint_sha256))
    atomic_write_bytes(out / TEST_LOGITS, buf.getvalue())


def read_test_logits(run: Path, samples: list, checkpoint_sha256: str | None) -> np.ndarray | None:
    """The stored test logits of `samples` (in their order), or None when absent, damaged, written for another
    checkpoint or missing an image."""
    from transferkit.embed import row_key

    path = Path(run) / TEST_LOGITS
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            keys, logits, sha = z["keys"].tolist(), z["logits"], str(z["checkpoint_sha256"])
    except (OSError, ValueError, KeyError):
        return None
    if checkpoint_sha256 is None or sha != checkpoint_sha256:
        return None
    index = {k: i for i, k in enumerate(keys)}
    rows = [index.get(row_key(p)) for p, _ in samples]
    return None if any(r is None for r in rows) else logits[rows]


def shift_summary(drift_report: dict | None, path: Path | None) -> dict | None:
    """What the drift stage said about this target (carried to the model card), or None if not measured."""
    if not drift_report:
        return None
    keys = (
        "drift_detected",
        "severity",
        "method",
        "score",
        "threshold",
        "n_reference",
        "n_current",
        "task_mismatch",
        "reference",
        "current",
    )
    return {
        **{k: drift_report.get(k) for k in keys},
        "report": str(Path(path).with_name("drift.html")) if path else None,
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
