"""The transfer-learning pipeline as a Prefect flow: drift -> select -> train -> validate -> export.

    transferkit run --reference data/reference --target data/target --out runs/demo --repo models
    python -m flows.pipeline --help        # same flow, for `prefect deploy` / workers

Tasks are named like the stages, CLI verbs and DVC stages; each calls one library function and
passes only paths and plain dicts (stage contracts are files in the run folder). Key tables are
published as Prefect markdown artifacts. A failed validation gate raises `GateFailed` before export.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE


class GateFailed(RuntimeError):
    def __init__(self, validation: dict):
        super().__init__("validation gate failed: " + "; ".join(validation["reasons"]))
        self.validation = validation


def _params(params: dict[str, Any] | None):
    from transferkit.config import Params

    return Params.model_validate(params or {})


def _artifact(key: str, markdown: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=key, markdown=markdown, description=description)


@task(name="drift", cache_policy=NO_CACHE)
def drift_task(reference: str, target: str, out: str, params: dict, progress: bool) -> dict:
    from transferkit.drift import run_drift

    r = run_drift(Path(reference), Path(target), Path(out), _params(params), progress=progress)
    rows = "\n".join(
        f"| {f['feature']} | {f.get('stattest', '')} | {f.get('score', f.get('p_value', ''))} | {f['drifted']} |"
        for f in r.get("per_feature", [])
    )
    _artifact(
        "drift",
        f"## Domain shift: **{r['severity']}** (detected: {r['drift_detected']})\n\n"
        f"method `{r['method']}`, score {r['score']:.3f} (threshold {r['threshold']}), "
        f"n = {r['n_reference']} / {r['n_current']}. Report: `{Path(out) / 'drift.html'}`\n\n"
        f"| feature | test | score | drifted |\n|---|---|---|---|\n{rows}\n",
        "Evidently drift verdict",
    )
    from prefect.artifacts import create_link_artifact

    html = (Path(out) / "drift.html").resolve()
    create_link_artifact(key="drift-report", link=html.as_uri(), link_text="Evidently drift report (HTML)",
                         description="Open on the machine that ran the flow")  # fmt: skip
    return r


@task(name="select", cache_policy=NO_CACHE)
def select_task(target: str, out: str, params: dict, candidates: list[str] | None, progress: bool) -> dict:
    from transferkit.select import run_select

    r = run_select(Path(target), Path(out), _params(params), candidates, progress=progress)
    rows = "\n".join(
        f"| {c['model']} | {c['logme']:.4f} | {c['leep'] if c['leep'] is None else round(c['leep'], 4)} | "
        f"{c['knn']:.3f} | {c['seconds']:.1f} |"
        for c in r["candidates"]
    )
    _artifact(
        "select",
        f"## Source model: **{r['selected']}** (by {r['metric']})\n\n"
        f"| model | LogME | LEEP | kNN acc | seconds |\n|---|---|---|---|---|\n{rows}\n"
        + (f"\n> {r['warning']}\n" if r["warning"] else ""),
        "Candidate ranking",
    )
    return r


@task(name="train", cache_policy=NO_CACHE)
def train_task(target: str, out: str, params: dict, model: str, drift: str | None, progress: bool) -> dict:
    from transferkit.train import run_train

    return run_train(Path(target), Path(out), _params(params), model, drift=Path(drift) if drift else None,
                     progress=progress)  # fmt: skip


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(run: str, params: dict, progress: bool) -> dict:
    from transferkit.io import read_json
    from transferkit.validate import run_validate

    r = run_validate(Path(run), _params(params), progress=progress)
    rep = read_json(Path(run) / "report.json")
    reasons = "\n".join(f"- {x}" for x in r["reasons"]) or "- none"
    warnings = "\n".join(f"- {x}" for x in r["warnings"]) or "- none"
    flag = {(True, True): "FAILED", (True, False): "warning", (False, True): "ok", (False, False): "ok"}
    checks = "\n".join(
        f"| {c['name']} | {c['value']} | {c['threshold']} | {flag[(c['failed'], c['blocking'])]} | {c['message'].replace('|', '&#124;')} |"
        for c in r["checks"]
    )
    base = "\n".join(
        f"| {b['strategy']} ({b['model']}) | "
        + (f"{b['test_accuracy']:.3f} | {b['gain']:+.3f} |" if b.get("test_accuracy") is not None else "n/a | n/a |")
        for b in r["baselines"]
    )
    per_class = "\n".join(
        f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
        for c, m in rep["per_class"].items()
    )
    plots = ", ".join(f"`{Path(run) / p}`" for p in rep["plots"].values())
    _artifact(
        "validate",
        f"## Gate: **{'passed' if r['passed'] else 'FAILED'}** ({r['strategy']}, {r['model']})\n\n"
        f"Reasons:\n{reasons}\n\nWarnings:\n{warnings}\n\n"
        f"### Overfitting checks\n\n| check | value | threshold | result | detail |\n|---|---|---|---|---|\n{checks}\n\n"
        f"### Baselines (same budget)\n\n| baseline | test accuracy | run gain |\n|---|---|---|\n"
        f"| **this run** | {r['test_accuracy']:.3f} | |\n{base}\n\n"
        f"### Test split: {rep['n']} images, accuracy {rep['accuracy']:.3f}, macro F1 {rep['macro_f1']:.3f}, "
        f"ECE {rep['ece']:.3f} ({rep['ece_bins']} bins)\n\n"
        f"| class | precision | recall | F1 | support |\n|---|---|---|---|---|\n{per_class}\n\nPlots: {plots}\n",
        "Validation gate, overfitting checks, baselines and per-class quality",
    )
    return r


@task(name="export", cache_policy=NO_CACHE)
def export_task(run: str, repo: str, params: dict, force: bool, progress: bool) -> dict:
    from transferkit.export import run_export

    m = run_export(Path(run), Path(repo), _params(params), force=force, progress=progress)
    q, par = m["int8"], m["parity"]
    _artifact(
        "export",
        f"## Exported **{m['name']} v{m['version']}**" + (" (forced)" if m["forced"] else "") + "\n\n"
        f"`{m['path']}`, opset {m['opset']} ({m['exporter']}), provider `{m['provider']}`\n\n"
        f"Parity: max abs diff {par['max_abs_diff']:.2e}, top-1 agreement {par['top1_agreement']:.4f} "
        f"on {par['n_images']} test images\n\n"
        f"int8: {'kept' if q['kept'] else 'not kept'}: {q['reason']}\n\n"
        f"Triton: `{Path(m['path']).parent / 'config.pbtxt'}`\n",
        "ONNX export",
    )
    return m


@flow(name="transferkit-run", log_prints=True)
def transfer_pipeline(
    target: str,
    out: str,
    reference: str | None = None,
    candidates: list[str] | None = None,
    repo: str = "models",
    params: dict | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Adapt the best source model to `target` and export it to `repo` if it passes the gate."""
    from transferkit.config import dump_params

    t0 = time.perf_counter()
    p = _params(params)
    pj = p.model_dump(mode="json")
    run = Path(out)
    dump_params(p, run / "params.yaml")  # the resolved config, saved per run
    drift = None
    if reference:
        drift = drift_task(reference, target, str(run / "drift"), pj, progress)
    ranking = select_task(target, str(run / "select"), pj, candidates, progress)
    metrics = train_task(target, str(run / "train"), pj, ranking["selected"],
                         str(run / "drift" / "drift.json") if drift else None, progress)  # fmt: skip
    validation = validate_task(str(run / "train"), pj, progress)
    if not validation["passed"] and not force:
        raise GateFailed(validation)
    meta = export_task(str(run / "train"), repo, pj, force, progress)
    return {
        "drift": drift,
        "selected": ranking["selected"],
        "ranking_metric": ranking["metric"],
        "strategy": metrics["strategy"],
        "strategy_reason": metrics["strategy_reason"],
        "test_accuracy": metrics["test_accuracy"],
        "baseline_accuracy": validation["baseline"]["test_accuracy"],
        "transfer_gain": validation["transfer_gain"],
        "passed": validation["passed"],
        "onnx": str(Path(meta["path"]) / "model.onnx"),
        "parity": meta["parity"],
        "version": meta.get("version"),
        "seconds": time.perf_counter() - t0,
    }


if __name__ == "__main__":
    from transferkit.cli import app

    app(["run", "--help"])
