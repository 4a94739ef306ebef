"""One trained configuration: build the model, settle the strategy (the rule for `auto`), freeze, apply AdaBN and class weights, fingerprint the run, and train it by probe or fine-tune into a Fit."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transferkit.core.config import Params
from transferkit.train.finetune import run_finetune
from transferkit.train.freezing import adapt_batchnorm, has_batchnorm, set_trainable, stage_groups
from transferkit.train.head import linear_probe
from transferkit.train.resume import resume_fingerprint, seed_everything
from transferkit.train.strategy import choose_strategy


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


def fit_configuration(
    ds, params: Params, model: str, drift_report, progress: bool, strategy: str, out: Path, **limits
) -> Fit:
    """Build the model, settle the strategy (the rule for `auto`), train it; `limits` go to run_finetune."""
    from transferkit.models import zoo
    from transferkit.models.arch import describe

    t, t0 = params.train, time.perf_counter()
    scratch_spec = strategy == "scratch" and not model.startswith("scratch:")
    spec = f"scratch:{zoo.parse_spec(model).arch}" if scratch_spec else model
    seed_everything(params.seed)
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
    fingerprint = resume_fingerprint(
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
        acc, history, best, info["probe"] = linear_probe(lm, ds, params, progress, adapted=adapted, test=test)
        info["val_correct"] = info["probe"].pop("val_correct")
        info["test_logits"] = info["probe"].pop("test_logits")
        return acc, history, best, info
    if strategy == "lp-ft":  # phase 1 trains the head on frozen features (seconds; re-run on resume)
        lp_acc, lp_hist, lp_best, probe = linear_probe(lm, ds, _lpft_params(params), progress, adapted=adapted)
        probe.pop("val_correct"), probe.pop("test_logits")
        info["linear_probe_phase"] = {
            "val_accuracy": lp_acc["val"],
            "test_accuracy": lp_acc["test"],
            "best_epoch": lp_best,
            "epochs": len(lp_hist),
            "probe": probe,
        }
    acc, history, best, info["resumed_from_epoch"], info["stopped"], info["val_correct"], info["test_logits"] = (
        run_finetune(lm, ds, params, strategy, progress, out, fingerprint, test=test, **limits)
    )
    return acc, history, best, info


def _lpft_params(params: Params) -> Params:
    """LP-FT's phase 1 head: the epoch-wise probe. The optimal L-BFGS head is confident, and once fine-tuning
    and precise BatchNorm move the features, the first epoch's val loss from it is many times that from the SGD
    head (worse than starting from a random head)."""
    p = params.model_copy(deep=True)
    p.train.probe = "sgd"
    return p


def _imbalance(ds, params: Params) -> dict:
    """Whether the loss is class-weighted and which metric the gate judges (transferkit.imbalance.decide)."""
    from transferkit.core.imbalance import decide

    t = params.train
    return decide([y for _, y in ds.splits["train"]], len(ds.classes), t.class_weights, t.imbalance_ratio)


def _maybe_adabn(lm, ds, params: Params, strategy: str, drift_report, progress: bool) -> dict:
    """AdaBN when `train.adabn` asks for it (module docstring); returns what was done."""
    from transferkit.data.loader import subsample
    from transferkit.models import zoo

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
