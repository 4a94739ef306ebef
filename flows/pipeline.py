"""The transfer-learning pipeline as a Prefect flow: drift -> select -> train -> validate -> export.

    transferkit run --reference data/reference --target data/target --out runs/demo --repo models
    python -m transferkit.flows.pipeline transfer_pipeline --target data/target --out runs/demo   # the same flow
    python -m transferkit.flows.pipeline retrain --help                                            # what deployments run

Tasks are named like the stages, CLI verbs and DVC stages; each calls one library function and
passes only paths and plain dicts (stage contracts are files in the run folder). Key tables are
published as Prefect markdown artifacts. A run the validation gate refuses stops before export and completes
with its verdict (`refused: true` in the result): a "no" is an answer, not a crash.
The folders come from transferkit.orchestration.workspace.stage_dirs, the table dvc.yaml is written from. In a DVC workspace
the flow holds DVC's lock, and the `dvc` task records each new version (dvc commit of the stages it reproduced,
the model repository, `dvc push` if asked) before `promote` moves `latest` (docs/operations.md, "DVC").

`retrain` (flow "transferkit-retrain") is what the deployments in flows/deployments.py run, on a cron
schedule and on `transferkit.dataset.updated` / `transferkit.drift.detected` events: it checks the data
version it was started for (`data_md5`, DVC's md5 from the event), resolves params.yaml + `overrides`
into the run folder, skips when the live model was already built from this data, params and code, and runs
`transfer_pipeline` as a subflow (which records, pushes if asked, and promotes), queueing up to `wait_s` for the
DVC workspace while another run holds it.

Failure states (a refused gate is not one: that run completes, nothing exported): StaleData (the folder
changed after the event; the newer event starts its own run), anything else is a bug or bad input and
fails the run with the library's one-line message; WorkspaceBusy: another DVC process held the workspace
longer than `wait_s`. Only I/O tasks retry (export, dvc, promote, check_data), with exponential back-off
and only on OSError/subprocess errors: a deterministic ValueError would fail identically on every retry.

Caching: DVC is the cache, not Prefect's result cache. Stage outputs are files (checkpoints, ONNX,
reports) that a cached task *return value* cannot restore, and a cache hit would hand back paths into a
run folder that may be gone. `dvc repro` skips stages whose deps/params md5s are unchanged and restores
outputs from .dvc/cache; the flow's own guard is `skip_unchanged` (data md5 + params + git rev of the
live model), and the expensive embeddings are cached by (model, weights, data md5, size) in transferkit.models.embed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from transferkit.core.config import params_from
from transferkit.orchestration.policy import (
    HELD_WORKSPACES,
    live_if_unchanged,
    make_run_folder,
    reproduced_stages,
    resolve_params,
    retry_on_io_error,
)
from transferkit.orchestration.render import (
    StageClock,
    errors_line,
    md_cell,
    publish_errors_link,
    publish_markdown,
    publish_select_ranking,
    report_shipped,
    report_skipped,
    run_summary,
)
from transferkit.orchestration.watch import StaleData

IO_RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)


@task(name="drift", cache_policy=NO_CACHE)
def drift_task(reference: str, target: str, out: str, params: dict, progress: bool) -> dict:
    from transferkit.drift.detect import run_drift

    r = run_drift(Path(reference), Path(target), Path(out), params_from(params), progress=progress)
    rows = "\n".join(
        f"| {f['feature']} | {f.get('stattest', '')} | {f.get('score', f.get('p_value', ''))} | {f['drifted']} |"
        for f in r.get("per_feature", [])
    )
    publish_markdown(
        "drift",
        f"## Domain shift: **{r['severity']}** (detected: {r['drift_detected']})\n\n"
        f"method `{r['method']}`, score {r['score']:.3f} (threshold {r['threshold']}), "
        f"n = {r['n_reference']} / {r['n_current']}. Report: `{Path(out) / 'drift.html'}`\n\n"
        f"| feature | test | score | drifted |\n|---|---|---|---|\n{rows}\n",
        "Evidently drift verdict",
    )
    from prefect.artifacts import create_link_artifact

    html = (Path(out) / "drift.html").resolve()
    create_link_artifact(
        key="drift-report",
        link=html.as_uri(),
        link_text="Evidently drift report (HTML)",
        description="Open on the machine that ran the flow",
    )
    return r


@task(name="select", cache_policy=NO_CACHE)
def select_task(target: str, out: str, params: dict, candidates: list[str] | None, progress: bool) -> dict:
    """`select.runner: sequential` scores inside this task; thread/dask run flows/select.py as a subflow of
    it, one `score` task per candidate on that task runner (the same ranking.json either way)."""
    from transferkit.flows.select import run_select_flow

    r = run_select_flow(Path(target), Path(out), params_from(params), candidates, progress=progress)
    publish_select_ranking(r)
    return r


@task(name="train", cache_policy=NO_CACHE)
def train_task(target: str, out: str, params: dict, model: str, drift: str | None, progress: bool) -> dict:
    """`train.nproc_per_node` > 1: DDP in that many torchrun processes (transferkit.train.distributed)."""
    from transferkit.train.distributed import launch_train, should_launch
    from transferkit.train.stage import run_train

    p, drift_path = params_from(params), Path(drift) if drift else None
    if should_launch(p.train.nproc_per_node):
        return launch_train(Path(target), Path(out), p, model, drift=drift_path, progress=progress)
    return run_train(Path(target), Path(out), p, model, drift=drift_path, progress=progress)


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(run: str, params: dict, progress: bool) -> dict:
    from transferkit.core.io import read_json
    from transferkit.core.results import GateResult
    from transferkit.validate.stage import run_validate

    r = run_validate(Path(run), params_from(params), progress=progress)
    rep = read_json(Path(run) / "report.json")
    reasons = "\n".join(f"- {x}" for x in r["reasons"]) or "- none"
    warnings = "\n".join(f"- {x}" for x in r["warnings"]) or "- none"
    flag = {(True, True): "FAILED", (True, False): "warning", (False, True): "ok", (False, False): "ok"}
    checks = "\n".join(
        f"| {c['name']} | {c['value']} | {c['threshold']} | {flag[(c['failed'], c['blocking'])]} | {md_cell(c['message'])} |"
        for c in r["checks"]
    )

    transfer = "\n".join(GateResult.from_validation(r).markdown("###"))
    per_class = "\n".join(
        f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
        for c, m in rep["per_class"].items()
    )
    plots = ", ".join(f"`{Path(run) / p}`" for p in rep["plots"].values())
    publish_markdown(
        "validate",
        f"## Gate: **{'passed' if r['passed'] else 'FAILED'}** ({r['strategy']}, {r['model']})\n\n"
        f"Reasons:\n{reasons}\n\nWarnings:\n{warnings}\n\n"
        f"### Overfitting checks\n\n| check | value | threshold | result | detail |\n|---|---|---|---|---|\n{checks}\n\n"
        f"{transfer}\n\n"
        f"### Test split: {rep['n']} images, accuracy {rep['accuracy']:.3f}, macro F1 {rep['macro_f1']:.3f}, "
        f"ECE {rep['ece']:.3f} ({rep['ece_bins']} bins)\n\n"
        f"| class | precision | recall | F1 | support |\n|---|---|---|---|---|\n{per_class}\n\nPlots: {plots}\n"
        + errors_line(Path(run), r.get("errors_report")),
        "Validation gate, overfitting checks, baselines and per-class quality",
    )
    publish_errors_link(Path(run), r.get("errors_report"))
    return r


@task(name="export", cache_policy=NO_CACHE, retry_condition_fn=retry_on_io_error, **IO_RETRIES)
def export_task(run: str, repo: str, params: dict, force: bool, progress: bool, promote: bool = True) -> dict:
    from transferkit.export.stage import run_export

    m = run_export(Path(run), Path(repo), params_from(params), force=force, progress=progress, promote=promote)
    q, par = m["int8"], m["parity"]
    publish_markdown(
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


@task(name="dvc", cache_policy=NO_CACHE, retry_condition_fn=retry_on_io_error, **IO_RETRIES)
def dvc_task(root: str, stages: list[str], repo: str | None, push: bool, why: str) -> dict:
    """Record in DVC what the flow made, inside the workspace lock the flow holds: `dvc commit` of the
    dvc.yaml stages it reproduced exactly, the model repository (its owning stage, else REPO.dvc), and
    `dvc push` if asked."""
    ws = HELD_WORKSPACES[root]
    committed = ws.commit_stages(stages)
    own = repo and ws.owner_of(repo) not in committed
    recorded = ws.record(repo) if own else None
    pushed = ws.push() if push else None
    lines = [f"- `dvc commit` {', '.join(committed)} (dvc.lock)" if committed else "- no dvc.yaml stage reproduced"]
    if recorded:
        lines.append(f"- model repository `{repo}` recorded by {recorded}")
    elif own:
        lines.append(f"- model repository `{repo}` not recorded: git ignores it, so DVC cannot track it")
        print(f"warning: {repo} is git-ignored in the DVC workspace {root}: the model is exported but not versioned")
    if pushed is not None:
        lines.append(f"- `dvc push`: {pushed} file(s) sent to the default remote")
    publish_markdown("dvc", f"## DVC: {why}\n\nWorkspace `{root}`\n\n" + "\n".join(lines) + "\n", "DVC records")
    return {"committed": committed, "recorded": recorded, "pushed": pushed}


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
    push: bool = False,
    wait_s: float = 0.0,
    reason: str = "",
) -> dict:
    """Adapt the best source model to `target`, export it to `repo` if it passes the gate, record it in DVC
    (and push it, `push`) and only then make it live.

    In a DVC workspace (REPO inside a folder with .dvc/) the run holds DVC's lock throughout: a second run,
    `dvc repro` or `dvc exp run` there is refused (WorkspaceBusy) or, with wait_s > 0, waits that long."""
    from transferkit.orchestration.workspace import Workspace, WorkspaceError, find_root, under_dvc_stage

    root = None if under_dvc_stage() else find_root(repo)
    if root is None:
        if push:
            raise WorkspaceError(f"push: the model repository {repo} is not inside a DVC workspace (no .dvc/ above it)")
        return _transfer(target, out, reference, candidates, repo, params, force, progress, None, False, reason)
    with Workspace(root, wait_s=wait_s) as ws:
        HELD_WORKSPACES[str(root)] = ws
        try:
            return _transfer(target, out, reference, candidates, repo, params, force, progress, root, push, reason)
        finally:
            HELD_WORKSPACES.pop(str(root), None)


def _transfer(target, out, reference, candidates, repo, params, force, progress, root, push, reason) -> dict:
    from transferkit.core.config import dump_params
    from transferkit.orchestration.workspace import stage_dirs

    clock = StageClock()
    p = params_from(params)
    pj = p.model_dump(mode="json")
    dirs = stage_dirs(out)
    dump_params(p, Path(out) / "params.yaml")  # the resolved config, saved per run: a record, never an input
    stages = reproduced_stages(root, target, out, repo, reference, p, not candidates and not force) if root else []
    drift, ranking, metrics, validation = _adapt(target, reference, candidates, dirs, pj, progress, clock)
    if not validation["passed"] and not force:
        clock("dvc", _refuse_record, root, stages, repo)
        timings = clock.record(out, ranking, metrics)
        print(f"validation gate refused the model, nothing exported: {'; '.join(validation['reasons'])}")
        return {
            **run_summary(drift, ranking, metrics, validation, None, None),
            "validation": validation,
            "seconds": timings["seconds"],
            "started": clock.started,
            "timings": timings,
        }
    meta, promoted, dvc = _publish(
        str(dirs["train"]), repo, pj, force, progress, root, stages, push, reason or f"run {out}", clock
    )
    timings = clock.record(out, ranking, metrics)
    return {
        **run_summary(drift, ranking, metrics, validation, meta, promoted),
        "dvc": {"root": str(root), "stages": stages, "pushed": push, **(dvc or {})} if root else None,
        "seconds": timings["seconds"],
        "started": clock.started,
        "timings": timings,
    }


def _adapt(target, reference, candidates, dirs: dict[str, Path], pj: dict, progress: bool, clock: StageClock) -> tuple:
    """drift (with a reference) -> select -> train -> validate, each stage in its folder: their four results."""
    drift = clock("drift", drift_task, reference, target, str(dirs["drift"]), pj, progress) if reference else None
    ranking = clock("select", select_task, target, str(dirs["select"]), pj, candidates, progress)
    drift_json = str(dirs["drift"] / "drift.json") if drift else None
    metrics = clock("train", train_task, target, str(dirs["train"]), pj, ranking["selected"], drift_json, progress)
    validation = clock("validate", validate_task, str(dirs["train"]), pj, progress)
    return drift, ranking, metrics, validation


def _refuse_record(root: Path | None, stages: list[str], repo: str) -> None:
    """The gate said no: nothing is exported; the verdict is recorded like `dvc repro` records it
    (export --skip-refused: nothing new). The run then completes with the verdict."""
    if stages:
        Path(repo).mkdir(parents=True, exist_ok=True)
        dvc_task(str(root), stages, None, False, "gate refused: verdict recorded, nothing exported")


def _publish(train: str, repo: str, pj: dict, force, progress, root, stages, push, reason, clock: StageClock) -> tuple:
    """Export without promoting, record the version in DVC (push if asked), then make it live: (meta, promoted,
    the last DVC record or None outside a workspace)."""
    meta = clock("export", export_task, train, repo, pj, force, progress, promote=False)
    name, version = meta["name"], meta["version"]
    dvc = None
    if root:  # the version is in the DVC cache (and on the remote) before latest moves to it
        dvc = clock("dvc", dvc_task, str(root), stages, repo, push, f"{name} v{version} recorded before promotion")
    promoted = clock("promote", promote_task, repo, name, version, reason)
    if root:  # latest and the promotion history, recorded the same way
        dvc = clock("dvc", dvc_task, str(root), [], repo, push, f"{name} v{version} live")
    return meta, promoted, dvc


# --------------------------------------------------------------------------- retrain (what deployments run)


@task(name="check_data", cache_policy=NO_CACHE, retry_condition_fn=retry_on_io_error, **IO_RETRIES)
def check_data_task(dataset: str, data_md5: str | None) -> dict:
    """DVC's record of DATASET (<dataset>.dvc); StaleData if it no longer has the md5 the run is for."""
    from transferkit.orchestration.watch import dvc_md5

    out = dvc_md5(Path(dataset))
    if data_md5 and out["md5"] != data_md5:
        raise StaleData(
            f"{out['dvc_file']} now records md5 {out['md5']}, this run was started for {data_md5}: "
            "the data changed again, and that change starts its own run"
        )
    return out


@task(name="promote", cache_policy=NO_CACHE, retry_condition_fn=retry_on_io_error, **IO_RETRIES)
def promote_task(repo: str, name: str, version: int, reason: str) -> dict:
    """Make VERSION live (the flow's export publishes without promoting, so that DVC records it first); never
    demotes a newer version that went live meanwhile."""
    from transferkit.export.promote import promote_unless_newer_live
    from transferkit.modelrepo.repository import latest_version

    model_dir = Path(repo) / name
    action, rec = promote_unless_newer_live(Path(repo), name, version, reason)
    publish_markdown(
        "promote",
        f"## {name} v{version}: {action}\n\nLive: `{model_dir / 'latest'}` = {latest_version(model_dir)}; "
        f"history `{model_dir / 'promotions.jsonl'}`\n\nReason: {reason or '-'}\n",
        "Promotion (REPO/<name>/latest)",
    )
    return {"action": action, "live": latest_version(model_dir), "record": rec}


def _run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    md5 = (p.get("data_md5") or "")[:8]
    return f"retrain-{Path(p.get('target', 'data')).name}" + (f"-{md5}" if md5 else "")


def _provenance(dataset, md5, data_md5, target, reference, overrides, reason) -> dict:
    """What a retrain run was for (the flow run, its deployment, the data and params it used): retrain.json."""
    from prefect.runtime import deployment, flow_run

    return {
        "flow_run_id": str(flow_run.id),
        "deployment": deployment.name,
        "dataset": dataset,
        "data_md5": md5,
        "requested_md5": data_md5,
        "target": target,
        "reference": reference,
        "overrides": overrides or {},
        "reason": reason,
    }


def _promotion_reason(reason: str, md5: str | None) -> str:
    from prefect.runtime import flow_run

    why = reason or (f"data {md5}" if md5 else "scheduled retrain")
    return f"retrain {flow_run.name}: {why}"


@flow(name="transferkit-retrain", flow_run_name=_run_name, log_prints=True)
def retrain(
    target: str = "data/target",
    reference: str | None = "data/reference",
    dataset: str | None = "data",
    data_md5: str | None = None,
    out_root: str = "runs/retrain",
    repo: str = "models",
    candidates: list[str] | None = None,
    params_file: str | None = "params.yaml",
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    skip_unchanged: bool = True,
    push: bool = False,
    reason: str = "",
    wait_s: float = 3600.0,
) -> dict:
    """Retrain on the current data and ship it if it passes the gate.

    target/reference: dataset folders (relative to the deployment's working directory, the repo root).
    dataset: the DVC-tracked folder that contains them (<dataset>.dvc); data_md5: its md5 this run is
    for (events pass it; None = whatever is there now). overrides: dotted params, e.g. {"train.epochs": 40},
    on top of params_file. push: `dvc push` of the new version before it goes live, and again after.
    wait_s: how long a run queues for the DVC workspace while another run (or `dvc repro`) holds it.
    """
    from transferkit.modelrepo.repository import sanitize_name

    data = check_data_task(dataset, data_md5) if dataset else None
    md5 = data["md5"] if data else data_md5
    if candidates:  # part of the params, so that skip_unchanged sees a changed candidate list
        overrides = {**(overrides or {}), "select.candidates": list(candidates)}
    p = resolve_params(params_file, overrides)
    name = sanitize_name(p.export.name or Path(target).name)
    run = make_run_folder(out_root, md5, p)
    record = _provenance(dataset, md5, data_md5, target, reference, overrides, reason)
    if skip_unchanged and (live := live_if_unchanged(Path(repo), name, target, p)):
        return report_skipped(run, record, name, live["version"], md5)
    summary = transfer_pipeline(
        target=target,
        out=str(run),
        reference=reference,
        candidates=None,
        repo=repo,
        params=p.model_dump(mode="json"),
        force=force,
        progress=False,
        push=push,
        wait_s=wait_s,
        reason=_promotion_reason(reason, md5),
    )
    return report_shipped(run, record, name, summary, push)


if __name__ == "__main__":
    from transferkit.flows.entry import main

    main(transfer_pipeline, retrain)
