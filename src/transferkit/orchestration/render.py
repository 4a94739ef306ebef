"""What a pipeline run reports: markdown tables published as Prefect artifacts (select ranking, error-analysis link, timings), per-stage seconds (StageClock and timings.json), the run summary the flow returns, and the retrain.json record of a skipped or shipped retrain. Prefect is imported lazily, only prefect.artifacts inside publish_markdown and publish_errors_link."""

from __future__ import annotations

import time
from pathlib import Path

from transferkit.core.results import md_cell  # noqa: F401  (the flows render their tables with it)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=key, markdown=markdown, description=description)


def publish_select_ranking(r: dict) -> None:
    def num(v, nd):
        return "n/a" if v is None else f"{v:.{nd}f}"

    rows = "\n".join(
        f"| {c['model']} | {num(c.get('logme'), 4)} | {num(c.get('leep'), 4)} | {num(c.get('knn'), 3)} | "
        f"{num(c.get('probe'), 3)} | {c['seconds']:.1f} |"
        for c in r["candidates"]
    )
    publish_markdown(
        "select",
        f"## Source model: **{r['selected']}** (by {r.get('selected_by', r['metric'])})\n\n"
        f"| model | LogME | LEEP | kNN acc | probe acc | seconds |\n|---|---|---|---|---|---|\n{rows}\n"
        + (f"\n> {r['warning']}\n" if r.get("warning") else ""),
        "Candidate ranking",
    )


def errors_line(run: Path, rep: dict | None) -> str:
    """The validate artifact's pointer to the error-analysis page (transferkit.report)."""
    if not rep:
        return ""
    pairs = ", ".join(f"{md_cell(t)} -> {md_cell(p)} ({n})" for t, p, n in rep.get("confused_pairs") or []) or "none"
    return (
        f"\nError analysis: `{run / rep['path']}` (most confused: {pairs}; "
        f"label-error candidates in train: {rep.get('label_doubts', 0)})\n"
    )


def publish_errors_link(run: Path, rep: dict | None) -> None:
    if not rep:
        return
    from prefect.artifacts import create_link_artifact

    create_link_artifact(
        key="validate-errors",
        link=(run / rep["path"]).resolve().as_uri(),
        link_text="Error analysis: highest-loss images, confused pairs, doubted labels (HTML)",
        description="Open on the machine that ran the flow",
    )


class StageClock:
    """Seconds per stage of one run (wall time around each task call): reported, never used to decide."""

    def __init__(self):
        self.started, self.t0, self.stages = time.time(), time.perf_counter(), {}

    def __call__(self, stage: str, fn, *args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.stages[stage] = round(self.stages.get(stage, 0.0) + time.perf_counter() - t, 2)

    def record(self, out: str, ranking: dict | None = None, metrics: dict | None = None) -> dict:
        """OUT/timings.json and its Prefect artifact: per stage, per select candidate, per search configuration.
        Kept out of the stage files DVC hashes (ranking.json, metrics.json keep their own `seconds`)."""
        from transferkit.core.io import write_json

        doc = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "started_unix": round(self.started, 3),
            "seconds": round(time.perf_counter() - self.t0, 2),
            "stages": self.stages,
            "select": _select_timings(ranking),
            "train": _train_timings(metrics),
        }
        write_json(Path(out) / "timings.json", doc)
        rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in self.stages.items())
        detail = "\n".join(f"| {k} | {v:.1f} |" for k, v in {**doc["select"], **doc["train"]}.items())
        publish_markdown(
            "timings",
            f"## Where the time went: {doc['seconds']:.0f} s\n\n| stage | seconds |\n|---|---|\n{rows}\n\n"
            f"| step | seconds |\n|---|---|\n{detail}\n",
            "Seconds per stage, select candidate and search configuration",
        )
        return doc


def _select_timings(ranking: dict | None) -> dict:
    if not ranking:
        return {}
    out = {f"select {c['model']}": c["seconds"] for c in ranking["candidates"]}
    if ranking.get("confirm"):
        out["select confirm"] = ranking["confirm"]["seconds"]
    return out


def _train_timings(metrics: dict | None) -> dict:
    if not metrics:
        return {}
    rows = (metrics.get("search") or {}).get("candidates") or []
    out = {f"train {r['strategy']}": r["seconds"] for r in rows if r.get("val_accuracy") is not None}
    out |= {f"train {k}": v for k, v in (metrics.get("timings") or {}).items() if k != "fit" or not rows}
    return out


def run_summary(
    drift, ranking: dict, metrics: dict, validation: dict, meta: dict | None, promoted: dict | None
) -> dict:
    """The run's summary from each stage's result (the flow's return value, retrain.json's `summary`); a run
    the gate refused has no export (`refused`, and None for what export and promote give)."""
    meta, promoted = meta or {}, promoted or {}
    return {
        "drift": drift,
        "selected": ranking["selected"],
        "ranking_metric": ranking["metric"],
        "strategy": metrics["strategy"],
        "strategy_reason": metrics["strategy_reason"],
        "test_accuracy": metrics["test_accuracy"],
        "baseline_accuracy": validation["baseline"]["test_accuracy"],
        "baseline_name": validation["baseline"].get("name"),
        "transfer_gain": validation["transfer_gain"],
        "gain_interval": validation.get("gain_interval"),
        "gain_p_value": validation.get("gain_p_value"),
        "verdict": validation.get("verdict"),
        "baselines": [
            {
                "name": b.get("name", b["strategy"]),
                "test_accuracy": b["test_accuracy"],
                "broken": b.get("broken", False),
            }
            for b in validation["baselines"]
            if b.get("test_accuracy") is not None
        ],
        "passed": validation["passed"],
        "refused": not meta,
        "onnx": str(Path(meta["path"]) / "model.onnx") if meta else None,
        "parity": meta.get("parity"),
        "name": meta.get("name"),
        "version": meta.get("version"),
        "live": promoted.get("live"),
    }


def report_skipped(run: Path, record: dict, name: str, version: int, md5: str | None) -> dict:
    """The live VERSION was built from this data, params and code: say so in retrain.json and an artifact."""
    from transferkit.core.io import write_json

    msg = (
        f"{name} v{version} is live and was built from this data, params and code: retraining would "
        "rebuild the same model; new labelled data (`transferkit data add`), other params or code start a new one"
    )
    print(msg)
    write_json(run / "retrain.json", {**record, "skipped": True, "skip_reason": msg, "version": version})
    publish_markdown("retrain", f"## Skipped\n\n{msg} (data md5 `{md5}`)\n", "Retrain decision")
    return {**record, "skipped": True, "version": version, "run": str(run)}


def report_shipped(run: Path, record: dict, name: str, summary: dict, push: bool) -> dict:
    """retrain.json and the flow's result after transfer_pipeline ran: the version it made and what is live."""
    from transferkit.core.io import write_json

    result = {
        **record,
        "skipped": False,
        "run": str(run),
        "name": name,
        "version": summary["version"],
        "live": summary["live"],
        "pushed": push,
        "refused": summary["refused"],
        "summary": summary,
    }
    write_json(run / "retrain.json", result)
    return result
