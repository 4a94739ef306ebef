"""The transfer-learning pipeline as a Prefect flow: drift -> select -> train -> validate -> export.

    transferkit run --reference data/reference --target data/target --out runs/demo --repo models
    python -m flows.pipeline transfer_pipeline --target data/target --out runs/demo   # the same flow
    python -m flows.pipeline retrain --help                                            # what deployments run

Tasks are named like the stages, CLI verbs and DVC stages; each calls one library function and
passes only paths and plain dicts (stage contracts are files in the run folder). Key tables are
published as Prefect markdown artifacts. A run the validation gate refuses stops before export and completes
with its verdict (`refused: true` in the result): a "no" is an answer, not a crash.
The folders come from transferkit.workspace.stage_dirs, the table dvc.yaml is written from. In a DVC workspace
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
live model), and the expensive embeddings are cached by (model, weights, data md5, size) in transferkit.embed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from transferkit.config import params_from
from transferkit.watch import StaleData

IO_RETRIES = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)


def _io_error(task, task_run, state) -> bool:
    """Retry condition: only transient I/O errors; a ValueError (bad input, parity, gate) fails at once."""
    import subprocess

    try:
        state.result()
    except (OSError, subprocess.SubprocessError):
        return True
    except BaseException:
        return False
    return False


def _cell(text: str) -> str:
    """Text for a markdown table cell: a literal | would end the cell (the UI shows HTML entities as typed)."""
    return str(text).replace("|", "\\|")


def _artifact(key: str, markdown: str, description: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key=key, markdown=markdown, description=description)


@task(name="drift", cache_policy=NO_CACHE)
def drift_task(reference: str, target: str, out: str, params: dict, progress: bool) -> dict:
    from transferkit.drift import run_drift

    r = run_drift(Path(reference), Path(target), Path(out), params_from(params), progress=progress)
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
    from transferkit.select import run_select

    r = run_select(Path(target), Path(out), params_from(params), candidates, progress=progress)
    _select_artifact(r)
    return r


def _select_artifact(r: dict) -> None:
    def num(v, nd):
        return "n/a" if v is None else f"{v:.{nd}f}"

    rows = "\n".join(
        f"| {c['model']} | {num(c.get('logme'), 4)} | {num(c.get('leep'), 4)} | {num(c.get('knn'), 3)} | "
        f"{num(c.get('probe'), 3)} | {c['seconds']:.1f} |"
        for c in r["candidates"]
    )
    _artifact(
        "select",
        f"## Source model: **{r['selected']}** (by {r.get('selected_by', r['metric'])})\n\n"
        f"| model | LogME | LEEP | kNN acc | probe acc | seconds |\n|---|---|---|---|---|---|\n{rows}\n"
        + (f"\n> {r['warning']}\n" if r.get("warning") else ""),
        "Candidate ranking",
    )


@task(name="train", cache_policy=NO_CACHE)
def train_task(target: str, out: str, params: dict, model: str, drift: str | None, progress: bool) -> dict:
    """`train.nproc_per_node` > 1: DDP in that many torchrun processes (transferkit.distributed)."""
    from transferkit.distributed import launch_train, should_launch
    from transferkit.train import run_train

    p, drift_path = params_from(params), Path(drift) if drift else None
    if should_launch(p.train.nproc_per_node):
        return launch_train(Path(target), Path(out), p, model, drift=drift_path, progress=progress)
    return run_train(Path(target), Path(out), p, model, drift=drift_path, progress=progress)


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(run: str, params: dict, progress: bool) -> dict:
    from transferkit.io import read_json
    from transferkit.validate import run_validate

    r = run_validate(Path(run), params_from(params), progress=progress)
    rep = read_json(Path(run) / "report.json")
    reasons = "\n".join(f"- {x}" for x in r["reasons"]) or "- none"
    warnings = "\n".join(f"- {x}" for x in r["warnings"]) or "- none"
    flag = {(True, True): "FAILED", (True, False): "warning", (False, True): "ok", (False, False): "ok"}
    checks = "\n".join(
        f"| {c['name']} | {c['value']} | {c['threshold']} | {flag[(c['failed'], c['blocking'])]} | {_cell(c['message'])} |"
        for c in r["checks"]
    )

    def base_row(b: dict) -> str:
        if b.get("test_accuracy") is None:
            return f"| {b['strategy']} ({b['model']}) | n/a | n/a | n/a | n/a | n/a |"
        iv, pv = b.get("interval"), b.get("p_value")
        broken = " **broken** (at chance)" if b.get("broken") else ""
        return (
            f"| {_cell(b.get('description', b['strategy']))} (`{_cell(b['model'])}`){broken} | "
            f"{b['val_accuracy']:.3f} | {b['test_accuracy']:.3f} | {b['gain']:+.3f} | "
            + (f"[{iv[0]:+.3f}, {iv[1]:+.3f}] | {pv:.2g} |" if iv else "- | - |")
        )

    base = "\n".join(base_row(b) for b in r["baselines"])
    rec = r.get("recommendation") or {}
    advice = (
        "\n\n" + "\n".join(f"- {_cell(x)}" for x in [f"likely reason: {rec['likely_reason']}", *rec["options"]])
        if rec
        else ""
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
        f"### Transfer vs no transfer: **{r.get('verdict')}**\n\n{_cell(r.get('verdict_message', ''))}{advice}\n\n"
        f"| baseline | val | test | gain of this run | interval | McNemar p |\n|---|---|---|---|---|---|\n"
        f"| **this run** | {r.get('val_accuracy', float('nan')):.3f} | {r['test_accuracy']:.3f} | | | |\n{base}\n\n"
        f"### Test split: {rep['n']} images, accuracy {rep['accuracy']:.3f}, macro F1 {rep['macro_f1']:.3f}, "
        f"ECE {rep['ece']:.3f} ({rep['ece_bins']} bins)\n\n"
        f"| class | precision | recall | F1 | support |\n|---|---|---|---|---|\n{per_class}\n\nPlots: {plots}\n"
        + _errors_line(Path(run), r.get("errors_report")),
        "Validation gate, overfitting checks, baselines and per-class quality",
    )
    _errors_artifact(Path(run), r.get("errors_report"))
    return r


def _errors_line(run: Path, rep: dict | None) -> str:
    """The validate artifact's pointer to the error-analysis page (transferkit.report)."""
    if not rep:
        return ""
    pairs = ", ".join(f"{_cell(t)} -> {_cell(p)} ({n})" for t, p, n in rep.get("confused_pairs") or []) or "none"
    return (
        f"\nError analysis: `{run / rep['path']}` (most confused: {pairs}; "
        f"label-error candidates in train: {rep.get('label_doubts', 0)})\n"
    )


def _errors_artifact(run: Path, rep: dict | None) -> None:
    if not rep:
        return
    from prefect.artifacts import create_link_artifact

    create_link_artifact(
        key="validate-errors",
        link=(run / rep["path"]).resolve().as_uri(),
        link_text="Error analysis: highest-loss images, confused pairs, doubted labels (HTML)",
        description="Open on the machine that ran the flow",
    )


@task(name="export", cache_policy=NO_CACHE, retry_condition_fn=_io_error, **IO_RETRIES)
def export_task(run: str, repo: str, params: dict, force: bool, progress: bool, promote: bool = True) -> dict:
    from transferkit.export import run_export

    m = run_export(Path(run), Path(repo), params_from(params), force=force, progress=progress, promote=promote)
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


# DVC workspaces this process holds (transferkit.workspace.Workspace, keyed by root): an open repository
# and its lock are not task parameters, the root is
_HELD: dict[str, Any] = {}


@task(name="dvc", cache_policy=NO_CACHE, retry_condition_fn=_io_error, **IO_RETRIES)
def dvc_task(root: str, stages: list[str], repo: str | None, push: bool, why: str) -> dict:
    """Record in DVC what the flow made, inside the workspace lock the flow holds: `dvc commit` of the
    dvc.yaml stages it reproduced exactly, the model repository (its owning stage, else REPO.dvc), and
    `dvc push` if asked."""
    ws = _HELD[root]
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
    _artifact("dvc", f"## DVC: {why}\n\nWorkspace `{root}`\n\n" + "\n".join(lines) + "\n", "DVC records")
    return {"committed": committed, "recorded": recorded, "pushed": pushed}


def _pipeline_stages(root: Path, target: str, out: str, repo: str, reference: str | None, p, exact: bool) -> list:
    """The dvc.yaml stages this run reproduces exactly: same command (paths) and the workspace's own
    params.yaml with nothing on top; those are committed, so dvc.lock says what the flow computed."""
    from transferkit.config import load_params
    from transferkit.workspace import relative_commands

    f = root / "params.yaml"
    if not exact or not f.is_file() or load_params(f).model_dump(mode="json") != p.model_dump(mode="json"):
        return []
    return _HELD[str(root)].matching_stages(relative_commands(root, target, out, repo, reference))


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
    from transferkit.workspace import Workspace, WorkspaceError, find_root, under_dvc_stage

    root = None if under_dvc_stage() else find_root(repo)
    if root is None:
        if push:
            raise WorkspaceError(f"push: the model repository {repo} is not inside a DVC workspace (no .dvc/ above it)")
        return _transfer(target, out, reference, candidates, repo, params, force, progress, None, False, reason)
    with Workspace(root, wait_s=wait_s) as ws:
        _HELD[str(root)] = ws
        try:
            return _transfer(target, out, reference, candidates, repo, params, force, progress, root, push, reason)
        finally:
            _HELD.pop(str(root), None)


class _Clock:
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
        from transferkit.io import write_json

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
        _artifact(
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


def _transfer(target, out, reference, candidates, repo, params, force, progress, root, push, reason) -> dict:
    from transferkit.config import dump_params
    from transferkit.workspace import stage_dirs

    clock = _Clock()
    p = params_from(params)
    pj = p.model_dump(mode="json")
    dirs = stage_dirs(out)
    dump_params(p, Path(out) / "params.yaml")  # the resolved config, saved per run: a record, never an input
    stages = _pipeline_stages(root, target, out, repo, reference, p, not candidates and not force) if root else []
    drift, ranking, metrics, validation = _adapt(target, reference, candidates, dirs, pj, progress, clock)
    if not validation["passed"] and not force:
        clock("dvc", _refuse_record, root, stages, repo)
        timings = clock.record(out, ranking, metrics)
        print(f"validation gate refused the model, nothing exported: {'; '.join(validation['reasons'])}")
        return {
            **_summary(drift, ranking, metrics, validation, None, None),
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
        **_summary(drift, ranking, metrics, validation, meta, promoted),
        "dvc": {"root": str(root), "stages": stages, "pushed": push, **(dvc or {})} if root else None,
        "seconds": timings["seconds"],
        "started": clock.started,
        "timings": timings,
    }


def _adapt(target, reference, candidates, dirs: dict[str, Path], pj: dict, progress: bool, clock: _Clock) -> tuple:
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


def _publish(train: str, repo: str, pj: dict, force, progress, root, stages, push, reason, clock: _Clock) -> tuple:
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


def _summary(drift, ranking: dict, metrics: dict, validation: dict, meta: dict | None, promoted: dict | None) -> dict:
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


# --------------------------------------------------------------------------- retrain (what deployments run)


@task(name="check_data", cache_policy=NO_CACHE, retry_condition_fn=_io_error, **IO_RETRIES)
def check_data_task(dataset: str, data_md5: str | None) -> dict:
    """DVC's record of DATASET (<dataset>.dvc); StaleData if it no longer has the md5 the run is for."""
    from transferkit.watch import dvc_md5

    out = dvc_md5(Path(dataset))
    if data_md5 and out["md5"] != data_md5:
        raise StaleData(
            f"{out['dvc_file']} now records md5 {out['md5']}, this run was started for {data_md5}: "
            "the data changed again, and that change starts its own run"
        )
    return out


@task(name="promote", cache_policy=NO_CACHE, retry_condition_fn=_io_error, **IO_RETRIES)
def promote_task(repo: str, name: str, version: int, reason: str) -> dict:
    """Make VERSION live (the flow's export publishes without promoting, so that DVC records it first); never
    demotes a newer version that went live meanwhile."""
    from transferkit.promote import promote
    from transferkit.repository import latest_version, read_history

    model_dir = Path(repo) / name
    live = latest_version(model_dir)
    if live == version:
        rec = next((r for r in reversed(read_history(model_dir)) if r["version"] == version), None)
        action = "already live (promoted by export)"
    elif live is None or live < version:
        rec = promote(Path(repo), name, version, reason=reason)
        action = f"promoted {live} -> {version}"
    else:
        rec, action = None, f"left alone: newer version {live} is live"
    _artifact(
        "promote",
        f"## {name} v{version}: {action}\n\nLive: `{model_dir / 'latest'}` = {latest_version(model_dir)}; "
        f"history `{model_dir / 'promotions.jsonl'}`\n\nReason: {reason or '-'}\n",
        "Promotion (REPO/<name>/latest)",
    )
    return {"action": action, "live": latest_version(model_dir), "record": rec}


def _resolve(params_file: str | None, overrides: dict | None):
    """params.yaml (if present) with dotted flow-parameter overrides on top: {"train.epochs": 3}."""
    from transferkit.config import load_params

    path = Path(params_file) if params_file else None
    return load_params(path if path and path.is_file() else None, dict(overrides or {}))


def _unchanged(repo: Path, name: str, target: str, p) -> dict | None:
    """metadata.json of the live version if it was built from this target's content, these params, this code."""
    from transferkit.data import DataError, load_with_params
    from transferkit.io import git_rev, read_json
    from transferkit.repository import latest_version

    live = latest_version(repo / name)
    if live is None:
        return None
    meta = read_json(repo / name / str(live) / "metadata.json")
    try:
        ds = load_with_params(target, p)
    except DataError:
        return None  # let the pipeline report it
    code = git_rev(Path(__file__).resolve().parent)
    same = (
        meta.get("data_md5") == ds.md5
        and meta.get("params") == p.model_dump(mode="json")
        and (code is None or meta.get("git_rev") == code)
    )
    return {**meta, "version": live} if same else None


def _run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    md5 = (p.get("data_md5") or "")[:8]
    return f"retrain-{Path(p.get('target', 'data')).name}" + (f"-{md5}" if md5 else "")


def _run_folder(out_root: str, md5: str | None, p) -> Path:
    """out_root/<UTC stamp>[-<md5[:8]>], holding the resolved config of this run (a record)."""
    from transferkit.config import dump_params

    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run = Path(out_root) / (f"{stamp}-{md5[:8]}" if md5 else stamp)
    dump_params(p, run / "params.yaml")
    return run


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


def _skipped(run: Path, record: dict, name: str, version: int, md5: str | None) -> dict:
    """The live VERSION was built from this data, params and code: say so in retrain.json and an artifact."""
    from transferkit.io import write_json

    msg = (
        f"{name} v{version} is live and was built from this data, params and code: retraining would "
        "rebuild the same model; new labelled data (`transferkit data add`), other params or code start a new one"
    )
    print(msg)
    write_json(run / "retrain.json", {**record, "skipped": True, "skip_reason": msg, "version": version})
    _artifact("retrain", f"## Skipped\n\n{msg} (data md5 `{md5}`)\n", "Retrain decision")
    return {**record, "skipped": True, "version": version, "run": str(run)}


def _promotion_reason(reason: str, md5: str | None) -> str:
    from prefect.runtime import flow_run

    why = reason or (f"data {md5}" if md5 else "scheduled retrain")
    return f"retrain {flow_run.name}: {why}"


def _shipped(run: Path, record: dict, name: str, summary: dict, push: bool) -> dict:
    """retrain.json and the flow's result after transfer_pipeline ran: the version it made and what is live."""
    from transferkit.io import write_json

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
    from transferkit.repository import sanitize_name

    data = check_data_task(dataset, data_md5) if dataset else None
    md5 = data["md5"] if data else data_md5
    if candidates:  # part of the params, so that skip_unchanged sees a changed candidate list
        overrides = {**(overrides or {}), "select.candidates": list(candidates)}
    p = _resolve(params_file, overrides)
    name = sanitize_name(p.export.name or Path(target).name)
    run = _run_folder(out_root, md5, p)
    record = _provenance(dataset, md5, data_md5, target, reference, overrides, reason)
    if skip_unchanged and (live := _unchanged(Path(repo), name, target, p)):
        return _skipped(run, record, name, live["version"], md5)
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
    return _shipped(run, record, name, summary, push)


if __name__ == "__main__":
    from flows.entry import main

    main(transfer_pipeline, retrain)
