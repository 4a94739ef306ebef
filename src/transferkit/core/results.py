"""The gate's result as a typed object, rendered once for every reader.

validate writes the verdict into validation.json (and export copies it into metadata.json as its `transfer`
record). The CLI, the Prefect artifact and the model card all read it through `GateResult`, and they take
the verdict line, the baseline table and the advice from here. So the three cannot disagree on what the
gate said, or on how an interval is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "n/a"


def md_cell(text) -> str:
    """TEXT safe inside a markdown table cell (pipes escaped, newlines as spaces)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


@dataclass(frozen=True)
class BaselineResult:
    """One no-transfer baseline on the same splits, and this run's gain over it."""

    name: str  # short: pixels-logreg, small-cnn, ...
    description: str  # for people: "raw-pixel logistic regression", ...
    model: str
    val_accuracy: float | None
    test_accuracy: float | None
    gain: float | None
    interval: tuple[float, float] | None
    p_value: float | None
    broken: bool

    @classmethod
    def from_dict(cls, b: dict) -> BaselineResult:
        name = b.get("name") or b.get("strategy") or "baseline"
        iv = b.get("interval")
        return cls(
            name=name,
            description=b.get("description") or name,
            model=b.get("model", ""),
            val_accuracy=b.get("val_accuracy"),
            test_accuracy=b.get("test_accuracy"),
            gain=b.get("gain"),
            interval=(float(iv[0]), float(iv[1])) if iv else None,
            p_value=b.get("p_value"),
            broken=bool(b.get("broken")),
        )


@dataclass(frozen=True)
class GateResult:
    """The transfer verdict: this run against the no-transfer baselines, with the interval of the gain."""

    passed: bool | None
    verdict: str | None
    message: str
    gain: float | None
    interval: tuple[float, float] | None
    p_value: float | None
    gain_metric: str
    test_accuracy: float | None
    val_accuracy: float | None
    baselines: list[BaselineResult] = field(default_factory=list)
    better_model: str | None = None
    likely_reason: str | None = None
    options: list[str] = field(default_factory=list)

    @classmethod
    def from_validation(cls, v: dict) -> GateResult:
        """From validation.json (run_validate's result)."""
        return cls._build(v, v.get("verdict_message"), v.get("transfer_gain"), v.get("gain_interval"))._with(
            passed=v.get("passed"), p_value=v.get("gain_p_value")
        )

    @classmethod
    def from_transfer(cls, t: dict) -> GateResult:
        """From the `transfer` record export keeps in metadata.json (the model card's source)."""
        return cls._build(t, t.get("message"), t.get("gain"), t.get("interval"))._with(p_value=t.get("p_value"))

    @classmethod
    def _build(cls, d: dict, message, gain, interval) -> GateResult:
        rec = d.get("recommendation") or {}
        return cls(
            passed=None,
            verdict=d.get("verdict"),
            message=message or "",
            gain=gain,
            interval=(float(interval[0]), float(interval[1])) if interval else None,
            p_value=None,
            gain_metric=d.get("gain_metric") or "accuracy",
            test_accuracy=d.get("test_accuracy"),
            val_accuracy=d.get("val_accuracy"),
            baselines=[BaselineResult.from_dict(b) for b in d.get("baselines", [])],
            better_model=rec.get("better_model"),
            likely_reason=rec.get("likely_reason"),
            options=list(rec.get("options", [])),
        )

    def _with(self, **kw) -> GateResult:
        from dataclasses import replace

        return replace(self, **kw)

    # ------------------------------------------------------------------ renderings (one each)
    def verdict_line(self) -> str:
        """`negative transfer (CI [-0.048, -0.006], p = 0.016)`; the metric named when it is not accuracy."""
        on = " on balanced accuracy (skewed train labels)" if self.gain_metric == "balanced_accuracy" else ""
        if self.interval is None:
            return f"{self.verdict}{on}"
        lo, hi = self.interval
        p = f", p = {self.p_value:.2g}" if self.p_value is not None else ""
        return f"{self.verdict}{on} (CI [{lo:+.3f}, {hi:+.3f}]{p})"

    def advice(self) -> list[str]:
        """What to do about a refusal: the better model, the likely reason, the options."""
        out = [f"better model here: {self.better_model}"] if self.better_model else []
        if self.likely_reason:
            out.append(f"likely reason: {self.likely_reason}")
        return out + [f"option: {o}" for o in self.options]

    def baseline_table(self) -> list[str]:
        """Markdown: this run and every working baseline on the same test split, gains in points."""
        lines = [
            "| model | val | test | gain of this model | interval | McNemar p |",
            "|---|---|---|---|---|---|",
            f"| **this model** | {_pct(self.val_accuracy)} | {_pct(self.test_accuracy)} | | | |",
        ]
        for b in self.baselines:
            if b.test_accuracy is None:
                lines.append(f"| {md_cell(b.description)} (`{md_cell(b.model)}`) | n/a | n/a | n/a | - | - |")
                continue
            broken = " (broken: at chance, not the bar)" if b.broken else ""
            iv = f"[{100 * b.interval[0]:+.1f}, {100 * b.interval[1]:+.1f}]" if b.interval else "-"
            p = f"{b.p_value:.2g}" if b.p_value is not None else "-"
            lines.append(
                f"| {md_cell(b.description)}{broken} | {_pct(b.val_accuracy)} | {_pct(b.test_accuracy)} | "
                f"{100 * b.gain:+.1f} points | {iv} | {p} |"
            )
        return lines

    def markdown(self, heading: str = "###") -> list[str]:
        """The transfer section of the Prefect artifact and of the model card."""
        if self.verdict is None:
            return []
        return [
            f"{heading} Transfer vs no transfer (same splits): **{self.verdict_line()}**",
            "",
            md_cell(self.message),
            *([""] + [f"- {md_cell(a)}" for a in self.advice()] if self.advice() else []),
            "",
            *self.baseline_table(),
        ]
