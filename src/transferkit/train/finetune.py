"""The fine-tune loop (partial, full, lp-ft, scratch): discriminative/layer-decayed optimizer groups, loaders, bf16 autocast on CUDA, DDP wrapping, one epoch, validation with precise BatchNorm, per-epoch checkpoints, and the best epoch restored at the end."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from transferkit.core.config import Params
from transferkit.train.evaluation import logits_accuracy, logits_cpu, mean_correct, per_image_correct
from transferkit.train.freezing import freeze_batchnorm, has_batchnorm, precise_batchnorm
from transferkit.train.resume import FinetuneRun, load_resume, seed_everything


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


def _loaders(lm, ds, params: Params):
    """The shuffled (augmented) train loader and unshuffled eval loaders for every split."""
    from transferkit.data.loader import make_loader
    from transferkit.models import zoo
    from transferkit.train import distributed

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
    # bare timm loop (a faster head made val accuracy swing on small val splits); LP-FT's head is trained already
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
    return float(F.cross_entropy(lg, lb)), logits_accuracy(lg, lb)


def _train_epoch(model, loader, opt, sched, dev, t, weight=None) -> dict:
    """One pass over the train loader; returns the epoch's mean loss and (train-mode) accuracy. `weight`: per-class
    loss weights (transferkit.imbalance), or None."""
    import torch
    import torch.nn.functional as F

    from transferkit.train import distributed

    model.train()
    freeze_batchnorm(model, all_stats=t.bn_stats == "frozen")
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

    from transferkit.train import distributed

    model = model.to(dev, memory_format=torch.channels_last) if dev.type == "cuda" else model.to(dev)
    return model, distributed.wrap(model, dev)


def run_finetune(
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

    from transferkit.core.imbalance import loss_weights
    from transferkit.models import zoo
    from transferkit.models.embed import device

    t, dev = params.train, device()
    model, step_model = _on_device(lm.model, dev)
    train_loader, eval_loaders = _loaders(lm, ds, params)
    weight = loss_weights([y for _, y in ds.splits["train"]], len(ds.classes), t)
    weight = None if weight is None else torch.as_tensor(weight, dtype=torch.float32, device=dev)
    opt, sched = _optimizer(model, t, strategy, t.epochs * max(1, len(train_loader)))
    run, ckpt, resumed = FinetuneRun(t), out / "checkpoint.pt", 0
    state = load_resume(ckpt, fingerprint) if t.resume else None
    if state is not None:
        resumed = run.resume(state, model, opt, sched, train_loader.generator)
        print(f"train: resuming {out} from epoch {resumed} ({ckpt})", file=sys.stderr)
    else:
        seed_everything(params.seed)  # same dropout draws whatever ran before in this process (crops: ImageList)
    bar = _epoch_bar(run, t.epochs, f"train {strategy} {lm.spec.spec}", progress)
    for epoch in bar:
        if run.done:
            break
        t0 = time.perf_counter()
        train_loader.dataset.set_epoch(epoch)  # each image's crop: (seed, epoch, index), resumed runs included
        row = {"epoch": epoch, **_train_epoch(step_model, train_loader, opt, sched, dev, t, weight)}
        if t.bn_stats == "precise" and has_batchnorm(model):  # current weights' statistics, not a lagging average
            precise_batchnorm(model, ds.splits["train"], zoo.eval_transform(lm.data_config), params.data.batch_size)
        row["val_loss"], row["val_accuracy"] = _evaluate(model, eval_loaders["val"], dev)
        row |= {"lr": sched.get_last_lr()[0], "seconds": round(time.perf_counter() - t0, 3)}
        bar.set_postfix(val_loss=f"{row['val_loss']:.3f}", val_acc=f"{row['val_accuracy']:.3f}")
        run.end_epoch(row, model, prune)
        run.save(ckpt, fingerprint, model, opt, sched, train_loader.generator)
    bar.close()
    model.load_state_dict(run.best_state)
    model.to("cpu").eval()
    out = {s: logits_cpu(model, loader) for s, loader in eval_loaders.items() if test or s != "test"}
    correct = {s: per_image_correct(logits, labels) for s, (logits, labels) in out.items()}
    acc = {s: mean_correct(c) for s, c in correct.items()}
    test_logits = out["test"][0].float().numpy() if test else None
    return acc, run.history, run.stop.best_epoch, resumed, run.stopped, correct["val"], test_logits
