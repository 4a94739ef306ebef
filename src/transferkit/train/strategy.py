"""The `auto` strategy policy: the strategies train accepts, the error for one that cannot apply, and the fixed rule (choose_strategy) that `train.search_mode: rule` uses and the search reports as its prior."""

from __future__ import annotations

from transferkit.core.config import Params
from transferkit.core.errors import TransferkitError

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
