"""Deployments of the retrain and monitor flows on a process work pool (`transferkit server` registers them).

    transferkit server                                   # starts server + worker and runs this module
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m transferkit.flows.deployments --pool transferkit-process

Two deployments of one flow (flows/pipeline.py `retrain`):
  transferkit-retrain/nightly      cron (default 03:00 UTC daily), and a trigger on
                                   `transferkit.drift.detected` from the serving monitor for resource
                                   `transferkit.model.<model>`: drift on served inputs starts a retrain;
  transferkit-retrain/on-new-data  DeploymentEventTrigger on `transferkit.dataset.updated` matched on
                                   resource id `transferkit.dataset.<dataset>` (what `transferkit data add`
                                   and `transferkit watch` emit); the event's md5 becomes the `data_md5`
                                   parameter through a Jinja template rendered by the server.
  transferkit-monitor/served-drift every 30 minutes (--monitor-cron): flows/monitor.py runs `drift` on the
                                   model server's reservoir of served images (--monitor-dir) vs the live
                                   model's training data and emits `transferkit.drift.detected` on drift,
                                   which starts transferkit-retrain/nightly: the closed loop.

Runs in one workspace are serialised on DVC's own repository lock: a retrain holds it while it trains,
records the new version in DVC (and, with --push, pushes it) before promoting; a second run (the other
deployment, `dvc repro`) queues for it up to the flow parameter `wait_s` (default 1 hour), then fails with
WorkspaceBusy. Parallel retrains need separate workspaces (one clone per worker). A worker without a git
checkout works in a folder made with `dvc init --no-scm`.

The flow code is loaded from this checkout (`flow.from_source(<repo root>)`: the worker changes into the
root, so relative data paths in the parameters resolve there). For Docker/Kubernetes pools the same
deployments take an image instead: see deploy/prefect/README.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from transferkit.core.events import EVENT_DATASET_UPDATED, EVENT_DRIFT_DETECTED, dataset_resource, model_resource

ROOT = Path(__file__).resolve().parents[1]
FLOW = "flows/pipeline.py:retrain"
MONITOR_FLOW = "flows/monitor.py:monitor_flow"
DEFAULT_CRON = "0 3 * * *"
DEFAULT_MONITOR_CRON = "*/30 * * * *"


def build(
    root: str | Path = ROOT,
    dataset: str = "data",
    dataset_name: str | None = None,
    model: str = "target",
    parameters: dict[str, Any] | None = None,
    cron: str = DEFAULT_CRON,
    timezone: str = "UTC",
    monitor_cron: str | None = DEFAULT_MONITOR_CRON,
    monitor_parameters: dict[str, Any] | None = None,
) -> list:
    """The RunnerDeployments (not yet registered): retrain nightly + on new data (`parameters` are their
    flow defaults), and the served-drift monitor (`monitor_parameters`; monitor_cron None = leave it out)."""
    from prefect import Flow

    params = {"dataset": dataset, **(parameters or {})}
    flow = Flow.from_source(source=str(Path(root).resolve()), entrypoint=FLOW)
    out = _retrain_deployments(flow, model, dataset_name or Path(dataset).name, params, cron, timezone)
    if monitor_cron:
        mparams = {"repo": params.get("repo", "models"), "name": model, "monitor_dir": "monitor"}
        out.append(_monitor_deployment(root, model, {**mparams, **(monitor_parameters or {})}, monitor_cron, timezone))
    return out


def _retrain_deployments(flow, model: str, dataset_name: str, params: dict, cron: str, timezone: str) -> list:
    """transferkit-retrain/nightly (cron + drift trigger) and transferkit-retrain/on-new-data (data trigger)."""
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    on_drift = DeploymentEventTrigger(
        name=f"retrain {model} on drift",
        expect={EVENT_DRIFT_DETECTED},
        match={"prefect.resource.id": model_resource(model)},
        parameters={"reason": "drift detected on served inputs of {{ event.resource.id }} (event {{ event.id }})"},
    )
    on_data = DeploymentEventTrigger(
        name=f"retrain on new {dataset_name} data",
        expect={EVENT_DATASET_UPDATED},
        match={"prefect.resource.id": dataset_resource(dataset_name)},
        parameters={
            "data_md5": "{{ event.payload.md5 }}",
            "reason": "new data: {{ event.resource.id }} md5 {{ event.payload.md5 }} (event {{ event.id }})",
        },
    )
    nightly = flow.to_deployment(
        name="nightly",
        schedules=[Cron(cron, timezone=timezone, slug="nightly-retrain")],
        parameters=params,
        triggers=[on_drift],
        description="Scheduled retrain; also started by transferkit.drift.detected from the serving monitor.",
        tags=["transferkit", "retrain", "schedule"],
    )
    new_data = flow.to_deployment(
        name="on-new-data",
        parameters=params,
        triggers=[on_data],
        description=f"Retrain when transferkit.dataset.{dataset_name} is updated (data add / watch).",
        tags=["transferkit", "retrain", "event"],
    )
    return [nightly, new_data]


def _monitor_deployment(root: str | Path, model: str, params: dict, cron: str, timezone: str):
    """transferkit-monitor/served-drift: drift of the served inputs on a schedule (emits the drift event)."""
    from prefect import Flow
    from prefect.schedules import Cron

    monitor = Flow.from_source(source=str(Path(root).resolve()), entrypoint=MONITOR_FLOW)
    return monitor.to_deployment(
        name="served-drift",
        schedules=[Cron(cron, timezone=timezone, slug="served-drift")],
        parameters=params,
        description=f"Drift of {model}'s served inputs vs its training data; on drift emits "
        f"{EVENT_DRIFT_DETECTED}, which starts transferkit-retrain/nightly.",
        tags=["transferkit", "monitor", "schedule"],
    )


def register(deployments: list, pool: str) -> list[str]:
    """Register (create or update) the deployments on POOL; returns their ids."""
    from prefect import deploy

    ids = deploy(
        *deployments, work_pool_name=pool, build=False, push=False, print_next_steps_message=False, ignore_warnings=True
    )
    return [str(i) for i in ids]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", default="transferkit-process")
    ap.add_argument("--dataset", default="data", help="the DVC-tracked folder whose updates trigger a retrain")
    ap.add_argument("--target", default="data/target")
    ap.add_argument("--reference", default="data/reference")
    ap.add_argument("--model", default="target", help="model name in the repository (drift events name it)")
    ap.add_argument("--repo", default="models")
    ap.add_argument("--cron", default=DEFAULT_CRON)
    ap.add_argument(
        "--monitor-cron", default=DEFAULT_MONITOR_CRON, help="schedule of the served-drift monitor; '' = none"
    )
    ap.add_argument("--monitor-dir", default="monitor", help="`transferkit serve --monitor-dir` of the model server")
    ap.add_argument(
        "--monitor-parameters",
        default="{}",
        help='more monitor flow defaults as JSON, e.g. \'{"params": {"drift": {"min_samples": 50}}}\'',
    )
    ap.add_argument("--push", action="store_true", help="dvc push after each gated run")
    ap.add_argument(
        "--parameters", default="{}", help='more flow defaults as JSON, e.g. \'{"overrides": {"train.epochs": 40}}\''
    )
    a = ap.parse_args(argv)
    params = {
        "target": a.target,
        "reference": a.reference or None,
        "repo": a.repo,
        "push": a.push,
        **json.loads(a.parameters),
    }
    deps = build(
        ROOT,
        a.dataset,
        model=a.model,
        parameters=params,
        cron=a.cron,
        monitor_cron=a.monitor_cron or None,
        monitor_parameters={"repo": params["repo"], "monitor_dir": a.monitor_dir, **json.loads(a.monitor_parameters)},
    )
    for d, i in zip(deps, register(deps, a.pool)):
        print(f"deployment {d.flow_name}/{d.name} ({i}) on pool {a.pool}")


if __name__ == "__main__":
    main()
