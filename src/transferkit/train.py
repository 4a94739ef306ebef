"""Adapt a source model to the target task: feature extraction or fine-tuning, with a scratch baseline.

    transferkit train --target data/target --model mobilenetv2_100 --strategy auto --out runs/demo/train

Strategies
  linear-probe  frozen backbone; a linear head trained on cached penultimate features (seconds)
  full          fine-tune every layer; backbone LR `train.lr` (10x below scratch), head LR `train.head_lr`
  scratch       same architecture from random init, same epochs: the baseline transfer must beat
  auto          linear-probe when the smallest class has <= `train.linear_probe_max_per_class` labels
                (too few to move millions of weights without overfitting), else full fine-tuning.

Regularisation: dropout before the head (`train.drop_rate`), AdamW weight decay, label smoothing,
augmentation (timm transforms, no flips) and early stopping on validation loss; the best epoch is the
checkpoint that ships. Outputs in OUT: model.safetensors, metrics.json, history.csv, params.yaml.
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

import numpy as np

from transferkit.config import Params, dump_params


def choose_strategy(params: Params, labels_per_class: int, drift: dict | None) -> tuple[str, str]:
    """The `auto` rule; returns (strategy, plain-words reason)."""
    shift = ""
    if drift is not None:
        shift = f"; measured shift: {drift.get('severity', 'unknown')}"
    limit = params.train.linear_probe_max_per_class
    if labels_per_class <= limit:
        return "linear-probe", (
            f"{labels_per_class} labels per class (<= {limit}): too few to fine-tune the whole network "
            f"without overfitting, so the pretrained features are kept frozen and a linear head is trained{shift}"
        )
    return "full", (
        f"{labels_per_class} labels per class (> {limit}): enough to fine-tune every layer with a small "
        f"learning rate ({params.train.lr:g}, {params.train.scratch_lr / params.train.lr:g}x below scratch){shift}"
    )


def _seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _accuracy(logits, labels) -> float:
    return float((logits.argmax(1) == labels).float().mean().item()) if len(labels) else float("nan")


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


def _linear_probe(lm, ds, params: Params, progress: bool, out: Path) -> tuple[dict, list[dict], int]:
    """Train a linear head on frozen features; returns (split accuracies, history, best epoch)."""
    import torch
    import torch.nn.functional as F

    from transferkit.embed import compute_embeddings

    emb = {
        s: compute_embeddings(lm.spec.spec, ds.splits[s], ds.md5, image_size=params.data.image_size,
                              batch_size=params.data.batch_size, progress=progress)
        for s in ("train", "val", "test")
    }  # fmt: skip
    _seed_everything(params.seed)  # after embedding: loading a model may consume the global RNG
    x = {s: torch.from_numpy(e["features"]) for s, e in emb.items()}
    y = {s: torch.from_numpy(e["labels"]) for s, e in emb.items()}
    head = lm.model.get_classifier()
    torch.nn.init.zeros_(head.weight)  # a zero head starts at the uniform prediction
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=params.train.head_lr, weight_decay=params.train.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=params.train.epochs)
    g = torch.Generator().manual_seed(params.seed)
    stop, history, best_state = _EarlyStop(params.train.patience, params.train.min_epochs), [], None
    n, bs = len(y["train"]), params.data.batch_size
    for epoch in range(1, params.train.epochs + 1):
        t0 = time.perf_counter()
        head.train()
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            feats = F.dropout(x["train"][idx], p=params.train.drop_rate, training=True)
            loss = F.cross_entropy(head(feats), y["train"][idx], label_smoothing=params.train.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
        sched.step()
        head.eval()
        with torch.no_grad():
            tr_logits, va_logits = head(x["train"]), head(x["val"])
            val_loss = float(F.cross_entropy(va_logits, y["val"]))
        history.append({
            "epoch": epoch, "train_loss": tot / n, "train_accuracy": _accuracy(tr_logits, y["train"]),
            "val_loss": val_loss, "val_accuracy": _accuracy(va_logits, y["val"]),
            "lr": sched.get_last_lr()[0], "seconds": round(time.perf_counter() - t0, 4),
        })  # fmt: skip
        improved, done = stop.step(val_loss, epoch)
        if improved:
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        if done:
            break
    head.load_state_dict(best_state)
    head.eval()
    with torch.no_grad():
        acc = {s: _accuracy(head(x[s]), y[s]) for s in x}
    return acc, history, stop.best_epoch


def _finetune(lm, ds, params: Params, lr: float, progress: bool, out: Path) -> tuple[dict, list[dict], int]:
    """Train the whole network (fine-tune or scratch) with early stopping; keeps the best epoch."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from transferkit import zoo
    from transferkit.data import make_loader
    from transferkit.embed import device

    dev = device()
    model = lm.model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    cfg, bs = lm.data_config, params.data.batch_size
    aug = zoo.train_transform(cfg) if params.train.augment else zoo.eval_transform(cfg)
    train_loader = make_loader(ds.splits["train"], aug, bs, shuffle=True, seed=params.seed,
                               num_workers=params.data.num_workers)  # fmt: skip
    eval_loaders = {s: make_loader(ds.splits[s], zoo.eval_transform(cfg), bs) for s in ("train", "val", "test")}
    head_params = list(model.get_classifier().parameters())
    head_ids = {id(p) for p in head_params}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    head_lr = max(lr, params.train.head_lr) if lm.spec.pretrained else lr
    opt = torch.optim.AdamW(
        [{"params": body, "lr": lr}, {"params": head_params, "lr": head_lr}], weight_decay=params.train.weight_decay
    )
    steps = params.train.epochs * max(1, len(train_loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, head_lr], total_steps=steps, pct_start=0.15)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def evaluate(loader):
        model.eval()
        logits, labels = [], []
        with torch.inference_mode(), amp:
            for xb, yb in loader:
                logits.append(model(xb.to(dev)).float().cpu())
                labels.append(yb)
        lg, lb = torch.cat(logits), torch.cat(labels)
        return float(F.cross_entropy(lg, lb)), _accuracy(lg, lb)

    stop, history, best_state = _EarlyStop(params.train.patience, params.train.min_epochs), [], None
    _seed_everything(params.seed)  # same dropout/augmentation draws whatever ran before in this process
    bar = tqdm(range(1, params.train.epochs + 1), desc=f"train {lm.spec.spec}", unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        tot, correct, n = 0.0, 0, 0
        for xb, yb in train_loader:
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            with amp:
                logits = model(xb)
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=params.train.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            n += len(yb)
        val_loss, val_acc = evaluate(eval_loaders["val"])
        history.append({
            "epoch": epoch, "train_loss": tot / n, "train_accuracy": correct / n, "val_loss": val_loss,
            "val_accuracy": val_acc, "lr": sched.get_last_lr()[0], "seconds": round(time.perf_counter() - t0, 3),
        })  # fmt: skip
        bar.set_postfix(val_loss=f"{val_loss:.3f}", val_acc=f"{val_acc:.3f}")
        improved, done = stop.step(val_loss, epoch)
        if improved:
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if done:
            break
    model.load_state_dict(best_state)
    model.to("cpu").eval()
    acc = {s: evaluate_cpu(model, loader) for s, loader in eval_loaders.items()}
    return acc, history, stop.best_epoch


def evaluate_cpu(model, loader) -> float:
    import torch

    logits, labels = [], []
    with torch.inference_mode():
        for xb, yb in loader:
            logits.append(model(xb))
            labels.append(yb)
    return _accuracy(torch.cat(logits), torch.cat(labels))


def run_train(
    target: Path,
    out: Path,
    params: Params,
    model: str,
    strategy: str | None = None,
    drift: Path | None = None,
    progress: bool = True,
) -> dict:
    """Train `model` on `target` and write the run folder (see module docstring)."""
    from transferkit import zoo
    from transferkit.data import DataError, load_dataset
    from transferkit.embed import torch_threads
    from transferkit.io import atomic_write_text, read_json, write_json

    t_start = time.perf_counter()
    out = Path(out)
    strategy = strategy or params.train.strategy
    valid = ("auto", "linear-probe", "full", "scratch")
    if strategy not in valid:
        raise ValueError(f"--strategy must be one of {', '.join(valid)}; got {strategy!r}")
    ds = load_dataset(target, seed=params.seed, val_fraction=params.data.val_fraction,
                      test_fraction=params.data.test_fraction)  # fmt: skip
    drift_report = read_json(drift) if drift else None
    per_class = ds.min_per_class("train")
    if strategy == "auto":
        strategy, reason = choose_strategy(params, per_class, drift_report)
    elif strategy == "scratch":
        reason = "baseline: same architecture from random init, same labelled data and epochs"
    else:
        reason = f"requested explicitly ({strategy})"
    spec = model
    if strategy == "scratch" and not model.startswith("scratch:"):
        spec = f"scratch:{zoo.parse_spec(model).arch}"
    if strategy != "scratch" and model.startswith("scratch:"):
        raise DataError(f"model {model!r} has no pretrained weights; use --strategy scratch")

    torch_threads()
    _seed_everything(params.seed)
    lm = zoo.create_model(spec, num_classes=len(ds.classes), drop_rate=params.train.drop_rate,
                          image_size=params.data.image_size, seed=params.seed)  # fmt: skip
    if strategy == "linear-probe":
        acc, history, best = _linear_probe(lm, ds, params, progress, out)
    else:
        lr = params.train.scratch_lr if strategy == "scratch" else params.train.lr
        acc, history, best = _finetune(lm, ds, params, lr, progress, out)

    meta = {
        "arch": lm.arch,
        "num_classes": str(len(ds.classes)),
        "classes": ds.classes,
        "data_config": lm.data_config,
        "source_model": model,
        "source_sha256": lm.weights_sha256 or "",
        "strategy": strategy,
        "data_md5": ds.md5,
    }
    ckpt_sha = zoo.save_checkpoint(lm.model, out / "model.safetensors", meta)
    metrics = {
        "model": model,
        "strategy": strategy,
        "strategy_reason": reason,
        "train_accuracy": acc["train"],
        "val_accuracy": acc["val"],
        "test_accuracy": acc["test"],
        "best_epoch": best,
        "epochs": len(history),
        "seconds": round(time.perf_counter() - t_start, 2),
        "history": history,
        "target": str(target),
        "data_md5": ds.md5,
        "classes": ds.classes,
        "labels_per_class": per_class,
        "n_train": len(ds.splits["train"]),
        "n_val": len(ds.splits["val"]),
        "n_test": len(ds.splits["test"]),
        "image_size": int(lm.data_config["input_size"][-1]),
        "seed": params.seed,
        "checkpoint_sha256": ckpt_sha,
        "skipped_files": len(ds.skipped),
        "device": "cuda" if _cuda() else "cpu",
    }
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0]))
    w.writeheader()
    w.writerows(history)
    atomic_write_text(out / "history.csv", buf.getvalue())
    dump_params(params, out / "params.yaml")
    write_json(out / "metrics.json", metrics)
    return metrics


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
