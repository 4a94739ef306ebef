"""The serving monitor as a Prefect flow: drift of served inputs vs the model's training data -> an event.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m transferkit.flows.monitor --repo models --name digits --monitor-dir monitor
    # schedulable like any flow: monitor_flow.serve(name="monitor", cron="*/30 * * * *", parameters={...})

`transferkit serve --monitor-dir MONITOR` keeps a bounded reservoir sample of served images in
MONITOR/<name>/images/. This flow runs the `drift` stage (the pipeline's own drift task) with
  reference = the model's training data: REPO/<name>/<latest>/metadata.json "run" -> metrics.json "target"
              (or the `reference` parameter when the run folder is not on this machine),
  current   = the reservoir,
and, when drift is detected, emits the Prefect event `transferkit.drift.detected` for resource
`transferkit.model.<name>` with the drift summary as payload. The retrain deployment's trigger
(flows/deployments.py) listens for it; the retrained model still has to pass `validate` and export's
parity gate before it can be promoted. Too few served images is a skip, not a verdict.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from transferkit.flows.pipeline import drift_task

from transferkit.core.events import EVENT_DRIFT_DETECTED, model_resource

SUMMARY_KEYS = ("drift_detected", "severity", "method", "score", "threshold", "n_reference", "n_current")


def training_reference(repo: Path, name: str) -> Path:
    """The dataset the promoted version was trained on, from its metadata and train run."""
    from transferkit.core.io import read_json
    from transferkit.modelrepo.repository import latest_version

    model_dir = Path(repo) / name
    version = latest_version(model_dir)
    if version is None:
        raise FileNotFoundError(f"{model_dir / 'latest'}: no promoted version of {name!r}")
    meta = read_json(model_dir / str(version) / "metadata.json")
    run = Path(meta.get("run") or "")
    metrics = read_json(run / "metrics.json") if run.name else {}
    target = metrics.get("target")
    if not target or not Path(target).is_dir():
        raise FileNotFoundError(
            f"training data of {name} v{version} not found (run {run or '?'}, target {target!r}); "
            "pass the `reference` parameter"
        )
    return Path(target)


def drift_event(name: str, version: int | None, drift: dict[str, Any], report: str) -> dict[str, Any]:
    """Keyword arguments of prefect.events.emit_event for a drift verdict."""
    return {
        "event": EVENT_DRIFT_DETECTED,
        "resource": {
            "prefect.resource.id": model_resource(name),
            "prefect.resource.name": name,
            "transferkit.model.version": str(version),
        },
        "payload": {
            **{k: drift.get(k) for k in SUMMARY_KEYS},
            "model": name,
            "version": version,
            "report": report,
            "views": {k: v.get("drifted") for k, v in (drift.get("views") or {}).items() if isinstance(v, dict)},
        },
    }


@flow(name="transferkit-monitor", log_prints=True)
def monitor_flow(
    repo: str = "models",
    name: str = "target",
    monitor_dir: str = "monitor",
    reference: str | None = None,
    out: str = "runs/monitor",
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Drift of MONITOR/<name>/images vs the training data; emits transferkit.drift.detected on drift."""
    from transferkit.core.config import params_from
    from transferkit.modelrepo.repository import latest_version

    logger = get_run_logger()
    p = params_from(params)
    current = Path(monitor_dir) / name / "images"
    n = len(list(current.glob("*.png"))) if current.is_dir() else 0
    version = latest_version(Path(repo) / name)
    if n < p.drift.min_samples:
        logger.info(
            "only %d served images of %s in %s (drift.min_samples %d): skipped", n, name, current, p.drift.min_samples
        )
        return {"status": "skipped", "model": name, "version": version, "n_current": n, "event": None}
    ref = Path(reference) if reference else training_reference(Path(repo), name)
    run_out = Path(out) / name / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    drift = drift_task(str(ref), str(current), str(run_out), p.model_dump(mode="json"), False)
    summary = {
        "status": "drift" if drift["drift_detected"] else "ok",
        "model": name,
        "version": version,
        "reference": str(ref),
        "out": str(run_out),
        **{k: drift[k] for k in SUMMARY_KEYS},
        "event": None,
    }
    if drift["drift_detected"]:
        from prefect.events import emit_event

        ev = emit_event(**drift_event(name, version, drift, str(run_out / "drift.html")))
        summary["event"] = str(ev.id) if ev else None
        logger.warning(
            "drift on served inputs of %s v%s (%s): emitted %s", name, version, drift["severity"], EVENT_DRIFT_DETECTED
        )
    return summary


if __name__ == "__main__":
    from transferkit.flows.entry import main

    main(monitor_flow)
