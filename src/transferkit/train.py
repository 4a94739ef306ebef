"""Adapt a source model to the target task: feature extraction or fine-tuning, with a scratch baseline.

    transferkit train --target data/target --model mobilenetv2_100 --strategy auto --out runs/demo/train

Strategies (`--strategy`, or `train.strategy`)
  linear-probe  frozen backbone; a linear head trained on cached penultimate features (seconds)
  partial       the top `train.unfreeze_blocks` timm stages (model.group_matcher(coarse=True)) and the head
                train; lower stages are frozen, their BatchNorm statistics included
  full          fine-tune every layer; backbone LR `train.lr` (10x below scratch), head LR `train.head_lr`
  lp-ft         linear probe first, then fine-tune everything from that head at `train.lr` (Kumar et al.
                2022: a random head distorts pretrained features early in fine-tuning; most under shift)
  scratch       same architecture from random init, same epochs: the baseline transfer must beat
Options: `train.layer_decay` (layer-wise LR decay through timm's param_groups_layer_decay: each stage's LR is
the one above it times the decay, the head keeps its own), and AdaBN (`train.adabn`): BatchNorm statistics
re-estimated on (unlabelled) target train+val images before training, for the frozen parts of a model.

The `auto` rule (choose_strategy), in order; bench/transfer.py is the evidence behind it:
  1. labels per class <= `train.linear_probe_max_per_class` -> linear-probe: too few labels to move millions
     of weights without overfitting;
  2. measured shift is severe (drift.json) -> lp-ft: the features need to adapt, and starting from a
     trained head keeps fine-tuning from wrecking them;
  3. a large model (>= `train.partial_min_params` million parameters) with timm stage structure -> partial;
  4. otherwise full.
  AdaBN (`train.adabn`, off by default): `auto` applies it when drift.json says shift was detected, the
  model has BatchNorm and some of it stays frozen (linear-probe, partial). It is not on by default because
  bench/transfer.py measured it costing a linear probe 12-24 points: the head is retrained on the target
  anyway, and statistics from a few hundred small target images are a worse normaliser than ImageNet's.

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

Outputs in OUT: model.safetensors, metrics.json, history.csv (DVC plots), params.yaml.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import sys
import time
from pathlib import Path

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
    """Parameter names per timm stage, input side first, the classifier excluded (timm's group_matcher)."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        return []
    head = {id(p) for p in model.get_classifier().parameters()}
    layer = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters():
        if id(p) not in head:
            groups.setdefault(layer[name], []).append(name)
    return [groups[k] for k in sorted(groups)]


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


def _freeze_bn(model) -> None:
    """BatchNorms whose weights are frozen keep their running statistics too (eval mode)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    for m in model.modules():
        if isinstance(m, _BatchNorm) and not any(p.requires_grad for p in m.parameters(recurse=False)):
            m.eval()


def has_batchnorm(model) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) for m in model.modules())


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


def _linear_probe(lm, ds, params: Params, progress: bool, adapted: bool) -> tuple[dict, list[dict], int]:
    """Train a linear head on frozen features; returns (split accuracies, history, best epoch).

    Features come from the shared embedding cache, unless AdaBN changed the backbone (`adapted`): then
    they are computed here from the adapted model (the cache holds the source model's features).
    """
    import torch
    import torch.nn.functional as F

    from transferkit.embed import compute_embeddings, forward

    def features(split):
        if adapted:
            return forward(lm, ds.splits[split], params.data.batch_size, progress, f"{lm.spec.spec}+adabn")
        return compute_embeddings(
            lm.spec.spec,
            ds.splits[split],
            ds.md5,
            image_size=params.data.image_size,
            batch_size=params.data.batch_size,
            progress=progress,
        )

    emb = {s: features(s) for s in ("train", "val", "test")}
    _seed_everything(params.seed)  # after embedding: loading a model may consume the global RNG
    x = {s: torch.from_numpy(e["features"]) for s, e in emb.items()}
    y = {s: torch.tensor([lbl for _, lbl in ds.splits[s]], dtype=torch.long) for s in emb}
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
        history.append(
            {
                "epoch": epoch,
                "train_loss": tot / n,
                "train_accuracy": _accuracy(tr_logits, y["train"]),
                "val_loss": val_loss,
                "val_accuracy": _accuracy(va_logits, y["val"]),
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
        acc = {s: _accuracy(head(x[s]), y[s]) for s in x}
    return acc, history, stop.best_epoch


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


def _finetune(
    lm, ds, params: Params, strategy: str, progress: bool, out: Path, fingerprint: str
) -> tuple[dict, list[dict], int, int]:
    """Fine-tune (partial/full/lp-ft) or train from scratch with early stopping; keeps the best epoch.

    Returns (split accuracies, history, best epoch, epoch resumed from or 0)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from transferkit import zoo
    from transferkit.data import make_loader
    from transferkit.embed import device

    t = params.train
    dev = device()
    model = lm.model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    cfg, bs = lm.data_config, params.data.batch_size
    aug = zoo.train_transform(cfg) if t.augment else zoo.eval_transform(cfg)
    train_loader = make_loader(
        ds.splits["train"], aug, bs, shuffle=True, seed=params.seed, num_workers=params.data.num_workers
    )
    eval_loaders = {s: make_loader(ds.splits[s], zoo.eval_transform(cfg), bs) for s in ("train", "val", "test")}
    lr = t.scratch_lr if strategy == "scratch" else t.lr
    # a fresh head learns fast at head_lr; an LP-FT head is already trained and moves as gently as the body
    head_lr = max(lr, t.head_lr) if strategy in ("partial", "full") else lr
    groups = param_groups(model, lr, head_lr, t.weight_decay, t.layer_decay if strategy != "scratch" else None)
    opt = torch.optim.AdamW(groups)
    steps = t.epochs * max(1, len(train_loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[g["lr"] for g in groups], total_steps=steps, pct_start=0.15
    )
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def evaluate(loader):
        model.eval()
        logits, labels = [], []
        with torch.inference_mode(), amp:
            for xb, yb in loader:
                logits.append(model(xb.to(dev, non_blocking=True)).float().cpu())
                labels.append(yb)
        lg, lb = torch.cat(logits), torch.cat(labels)
        return float(F.cross_entropy(lg, lb)), _accuracy(lg, lb)

    stop, history, best_state = _EarlyStop(t.patience, t.min_epochs), [], None
    ckpt, start, resumed, done = out / "checkpoint.pt", 1, 0, False
    state = _load_resume(ckpt, fingerprint) if t.resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        stop.__dict__.update(state["stop"])
        history, best_state, done = state["history"], state["best"], state["done"]
        _set_rng_state(state["rng"], train_loader.generator)
        start = resumed = int(state["epoch"]) + 1
        print(f"train: resuming {out} from epoch {start} ({ckpt})", file=sys.stderr)
    else:
        _seed_everything(params.seed)  # same dropout/augmentation draws whatever ran before in this process
    bar = tqdm(
        range(start, t.epochs + 1),
        desc=f"train {strategy} {lm.spec.spec}",
        unit="epoch",
        initial=start - 1,
        total=t.epochs,
        disable=not progress or done,
    )
    for epoch in bar:
        if done:
            break
        t0 = time.perf_counter()
        model.train()
        _freeze_bn(model)
        tot, correct, n = 0.0, 0, 0
        for xb, yb in train_loader:
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            if dev.type == "cuda":
                xb = xb.contiguous(memory_format=torch.channels_last)
            with amp:
                logits = model(xb)
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=t.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(yb)
            correct += int((logits.argmax(1) == yb).sum())
            n += len(yb)
        val_loss, val_acc = evaluate(eval_loaders["val"])
        history.append(
            {
                "epoch": epoch,
                "train_loss": tot / n,
                "train_accuracy": correct / n,
                "val_loss": val_loss,
                "val_accuracy": val_acc,
                "lr": sched.get_last_lr()[0],
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        bar.set_postfix(val_loss=f"{val_loss:.3f}", val_acc=f"{val_acc:.3f}")
        improved, done = stop.step(val_loss, epoch)
        if improved:
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        _save_resume(
            ckpt,
            {
                "fingerprint": fingerprint,
                "epoch": epoch,
                "done": done,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "stop": dict(stop.__dict__),
                "history": history,
                "best": best_state,
                "rng": _rng_state(train_loader.generator),
            },
        )
    bar.close()
    model.load_state_dict(best_state)
    model.to("cpu").eval()
    acc = {s: evaluate_cpu(model, loader) for s, loader in eval_loaders.items()}
    return acc, history, stop.best_epoch, resumed


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
    t = params.train
    strategy = strategy or t.strategy
    if strategy not in STRATEGIES:
        raise StrategyError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if strategy != "scratch" and model.startswith("scratch:"):
        raise DataError(f"model {model!r} has no pretrained weights; use --strategy scratch")
    ds = load_dataset(
        target, seed=params.seed, val_fraction=params.data.val_fraction, test_fraction=params.data.test_fraction
    )
    drift_report = read_json(drift) if drift else None
    per_class = ds.min_per_class("train")
    spec = (
        f"scratch:{zoo.parse_spec(model).arch}" if strategy == "scratch" and not model.startswith("scratch:") else model
    )

    torch_threads()
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
    drop_path_blocks = sum(1 for m in lm.model.modules() if float(getattr(m, "drop_prob", 0) or 0) > 0)
    if strategy == "auto":
        strategy, reason = choose_strategy(params, per_class, drift_report, n_params, len(stage_groups(lm.model)) > 1)
    elif strategy == "scratch":
        reason = "baseline: same architecture from random init, same labelled data and epochs"
    else:
        reason = f"requested explicitly ({strategy})"
    trainable = set_trainable(lm.model, "full" if strategy in ("lp-ft", "scratch") else strategy, t.unfreeze_blocks)

    adabn = {"applied": False, "images": 0}
    frozen_bn = strategy in ("linear-probe", "partial")
    if t.adabn == "on" or (t.adabn == "auto" and frozen_bn and bool((drift_report or {}).get("drift_detected"))):
        if strategy == "scratch" or not has_batchnorm(lm.model):
            adabn["reason"] = "not applicable: " + (
                "scratch has no source statistics" if strategy == "scratch" else "the model has no BatchNorm"
            )
        else:
            from transferkit.data import subsample

            pool = subsample(ds.splits["train"] + ds.splits["val"], t.adabn_max_images, params.seed)
            adabn["images"] = adapt_batchnorm(
                lm.model, pool, zoo.eval_transform(lm.data_config), params.data.batch_size, progress
            )
            adabn["applied"] = True
            reason += f"; AdaBN: BatchNorm statistics re-estimated on {adabn['images']} unlabelled target images"

    fingerprint = _fingerprint(
        model=model,
        spec=spec,
        strategy=strategy,
        data=ds.md5,
        weights=lm.weights_sha256,
        params=params.model_dump(mode="json"),
    )
    resumed, lp = 0, None
    if strategy == "linear-probe":
        acc, history, best = _linear_probe(lm, ds, params, progress, adapted=adabn["applied"])
    else:
        if strategy == "lp-ft":  # phase 1 trains the head on frozen features (seconds; re-run on resume)
            lp_acc, lp_hist, lp_best = _linear_probe(lm, ds, params, progress, adapted=adabn["applied"])
            lp = {
                "val_accuracy": lp_acc["val"],
                "test_accuracy": lp_acc["test"],
                "best_epoch": lp_best,
                "epochs": len(lp_hist),
            }
        acc, history, best, resumed = _finetune(lm, ds, params, strategy, progress, out, fingerprint)

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
        "model_params": n_params,
        **trainable,
        "layer_decay": t.layer_decay if strategy in ("partial", "full", "lp-ft") else None,
        "adabn": adabn,
        "drop_path": {"rate": t.drop_path_rate, "blocks": drop_path_blocks},  # blocks that really drop
        "shift": shift_summary(drift_report, drift),
        "linear_probe_phase": lp,
        "resumed_from_epoch": resumed,
    }
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0]))
    w.writeheader()
    w.writerows(history)
    atomic_write_text(out / "history.csv", buf.getvalue())
    dump_params(params, out / "params.yaml")
    write_json(out / "metrics.json", metrics)
    (out / "checkpoint.pt").unlink(missing_ok=True)  # finished: nothing left to resume
    return metrics


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
