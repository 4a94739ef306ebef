"""The overfitting checks on RUN/metrics.json's history: train-val accuracy and loss gaps, a diverging val-loss tail, wasted epochs and the test-val gap. Each becomes a {name, value, threshold, failed, blocking, message} record in validation.json `checks`; whether an overfitting sign finally blocks is decided by the gate (gate.generalisation_rule)."""

from __future__ import annotations

from transferkit.core.config import Params

OVERFIT_CHECKS = ("accuracy_gap", "loss_gap", "divergence")


# --------------------------------------------------------------------------------------------------
# overfitting checks


def _check(name: str, value, threshold, failed: bool, blocking: bool, message: str) -> dict:
    return {
        "name": name,
        "value": value,
        "threshold": threshold,
        "failed": bool(failed),
        "blocking": blocking,
        "message": message,
    }


def divergence_streak(history: list[dict]) -> tuple[int, int, int]:
    """Longest run of consecutive epochs with val loss above its best so far while train loss is below its
    value at that best epoch; returns (length, first epoch, last epoch), (0, 0, 0) if none."""
    best_val, train_at_best = float("inf"), float("inf")
    longest, cur, start, span = 0, 0, 0, (0, 0)
    for h in history:
        vl, tl, ep = float(h["val_loss"]), float(h["train_loss"]), int(h["epoch"])
        if vl < best_val:
            best_val, train_at_best, cur = vl, tl, 0
            continue
        if tl < train_at_best:
            cur += 1
            start = ep if cur == 1 else start
            if cur > longest:
                longest, span = cur, (start, ep)
        else:
            cur = 0
    return longest, span[0], span[1]


def overfitting_checks(metrics: dict, params: Params) -> list[dict]:
    """The five history checks described in the module docstring, in a fixed order."""
    v, patience = params.validate, params.train.patience
    history = metrics.get("history") or []
    tr, va, te = (float(metrics[k]) for k in ("train_accuracy", "val_accuracy", "test_accuracy"))
    best, last = int(metrics["best_epoch"]), int(metrics["epochs"])
    return [
        _accuracy_gap_check(tr, va, v.max_gap),
        _loss_gap_check(history, best, v.max_loss_gap),
        _divergence_check(history, patience),
        _wasted_epochs_check(best, last, patience),
        _test_val_gap_check(te, va, v.max_test_val_gap),
    ]


def _accuracy_gap_check(tr: float, va: float, max_gap: float) -> dict:
    gap = tr - va
    bad = gap > max_gap
    return _check(
        "accuracy_gap",
        round(gap, 6),
        max_gap,
        bad,
        True,
        f"overfitting: train accuracy {tr:.3f} exceeds validation accuracy {va:.3f} by {gap:.3f} "
        f"(> validate.max_gap {max_gap})"
        if bad
        else f"train-val accuracy gap {gap:.3f} <= validate.max_gap {max_gap}",
    )


def _loss_gap_check(history: list[dict], best: int, max_loss_gap: float) -> dict:
    at_best = next((h for h in history if int(h["epoch"]) == best), None)
    if at_best is None:
        return _check("loss_gap", None, max_loss_gap, False, True, "no history entry for the best epoch")
    lgap = float(at_best["val_loss"]) - float(at_best["train_loss"])
    bad = lgap > max_loss_gap
    return _check(
        "loss_gap",
        round(lgap, 6),
        max_loss_gap,
        bad,
        True,
        f"overfitting: at the best epoch {best} validation loss {at_best['val_loss']:.3f} exceeds training "
        f"loss {at_best['train_loss']:.3f} by {lgap:.3f} nats (> validate.max_loss_gap {max_loss_gap})"
        if bad
        else f"val-train loss gap {lgap:.3f} at the best epoch <= validate.max_loss_gap {max_loss_gap}",
    )


def _divergence_check(history: list[dict], patience: int) -> dict:
    streak, first, end = divergence_streak(history)
    bad = streak > patience
    return _check(
        "divergence",
        streak,
        patience,
        bad,
        True,
        f"overfitting: validation loss rose while training loss fell for {streak} consecutive epochs "
        f"({first}-{end}; > train.patience {patience}): the network memorises the training images"
        if bad
        else f"longest val-loss-rising/train-loss-falling streak {streak} <= train.patience {patience}",
    )


def _wasted_epochs_check(best: int, last: int, patience: int) -> dict:
    wasted = last - best
    if wasted > patience:
        msg = (
            f"{wasted} epochs after the best epoch {best} of {last} were wasted (> train.patience {patience}): "
            "train.min_epochs kept training past the point early stopping would have ended it"
        )
    elif wasted == 0:
        msg = f"best epoch is the last ({last}): validation loss was still improving; more epochs may help"
    else:
        msg = f"best epoch {best} of {last}: {wasted} epochs after it (<= train.patience {patience})"
    return _check("wasted_epochs", wasted, patience, wasted > patience, False, msg)


def _test_val_gap_check(te: float, va: float, max_test_val_gap: float) -> dict:
    tv = abs(te - va)
    bad = tv > max_test_val_gap
    return _check(
        "test_val_gap",
        round(tv, 6),
        max_test_val_gap,
        bad,
        False,
        f"selection bias? test accuracy {te:.3f} vs validation {va:.3f} differ by {tv:.3f} "
        f"(> validate.max_test_val_gap {max_test_val_gap}); the val set may be too small or unrepresentative"
        if bad
        else f"test accuracy {te:.3f} vs validation {va:.3f}: |gap| {tv:.3f} <= {max_test_val_gap}",
    )
