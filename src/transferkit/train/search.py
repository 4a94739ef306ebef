"""The measured `auto` choice: configurations trained cheapest first, fine-tunes only when the evidence says one can win against the no-transfer baselines, and a later one kept only when better on the same val images beyond noise; the deferred test split of the kept fit."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from transferkit.core.config import Params
from transferkit.train.evaluation import logits_accuracy, logits_cpu
from transferkit.train.fit import Fit, fit_configuration
from transferkit.train.head import penultimate_features
from transferkit.train.strategy import choose_strategy


class NoTransferBaselines:
    """The no-transfer baselines of this run folder, fitted at most once (transferkit.baselines.cached_no_transfer)."""

    def __init__(self, out: Path, ds, params: Params, progress: bool):
        self.out, self.ds, self.params, self.progress = out, ds, params, progress
        self._rows: list[dict] | None = None
        self.seconds = 0.0

    def rows(self) -> list[dict]:
        from transferkit.models.baselines import cached_no_transfer
        from transferkit.train import distributed

        if self._rows is None:  # under DDP rank 0 fits them and every rank gets its rows (same decisions)
            t0 = time.perf_counter()
            mine = distributed.is_main() or not distributed.active()
            rows = cached_no_transfer(self.out, self.ds, self.params, self.progress) if mine else None
            self._rows = distributed.from_main(rows)
            self.seconds = time.perf_counter() - t0
        return self._rows


def run_search(fit_args: dict, out: Path, bar: NoTransferBaselines | None) -> tuple[Fit, dict]:
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
        f = fit_configuration(**args, strategy=strategy, out=out / "search" / strategy, prune=prune, defer_test=True)
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
    from transferkit.models.baselines import best_baseline, paired_comparison

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
            "class, so no fine-tune was tried (a fine-tune costs far more than the probe, for a gain not seen in "
            "that case: docs/stages.md)",
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

    from transferkit.data.loader import make_loader
    from transferkit.models import zoo

    y = torch.tensor([lbl for _, lbl in ds.splits["test"]], dtype=torch.long)
    if fit.strategy == "linear-probe":
        x = penultimate_features(fit.lm, ds.splits["test"], ds, params, progress, fit.info["adabn"]["applied"])
        with torch.no_grad():
            logits = fit.lm.model.get_classifier()(torch.from_numpy(x))
    else:
        loader = make_loader(ds.splits["test"], zoo.eval_transform(fit.lm.data_config), params.data.batch_size)
        logits, y = logits_cpu(fit.lm.model.to("cpu").eval(), loader)
    fit.acc["test"], fit.test_logits = logits_accuracy(logits, y), logits.float().numpy()


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
            from transferkit.models.baselines import paired_comparison

            vs = paired_comparison(f.val_correct, best.val_correct, confidence)
            rows[-1]["vs_kept"] = {"kept": best.strategy, "gain": vs["gain"], "interval": vs["interval"]}
            better = better and vs["interval"][0] > 0
        if better:
            best = f
    return best, rows, why or {"finetune": False, "reason": "one configuration"}
