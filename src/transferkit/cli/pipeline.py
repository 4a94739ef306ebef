"""Commands that run the stages together: `run` (the whole Prefect flow, with its summary and timings), `dvc-yaml` (the same wiring as a DVC pipeline) and `server` (a Prefect server, worker and the retrain deployments)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.cli.apps import ParamsOpt, QuietOpt, SearchOpt, SetOpt, app, fail, guard, resolve_params
from transferkit.cli.stages import report_gate


@app.command("run")
@guard
def run_cmd(
    target: Annotated[Path, typer.Option(help="labelled target dataset")],
    out: Annotated[Path, typer.Option(help="run folder (one sub-folder per stage)")],
    reference: Annotated[Optional[Path], typer.Option(help="source-domain images for the drift stage")] = None,
    candidates: Annotated[Optional[str], typer.Option(help="comma-separated model specs (default: params)")] = None,
    repo: Annotated[Path, typer.Option(help="model repository")] = Path("models"),
    strategy: Annotated[Optional[str], typer.Option(help="override train.strategy")] = None,
    search: SearchOpt = None,
    force: Annotated[bool, typer.Option(help="export even if validation fails")] = False,
    push: Annotated[bool, typer.Option(help="dvc push the new version before it goes live (DVC workspace)")] = False,
    wait: Annotated[
        float, typer.Option(help="seconds to wait while another run holds the DVC workspace (0: refuse at once)")
    ] = 0.0,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
):
    """Run the whole Prefect flow: drift -> select -> train -> validate -> export -> DVC record -> promote."""
    import time

    from transferkit.core.errors import EXIT_REFUSED
    from transferkit.orchestration.prefect import start_prefect_early

    t_cli = time.time()
    server = start_prefect_early()  # its start-up overlaps the imports below (and applies the Prefect defaults)
    from transferkit.flows.pipeline import transfer_pipeline

    if server is not None:
        server.join()
    p = resolve_params(params, [*(set_ or []), *([f"train.search_mode={search}"] if search else [])])
    if strategy:
        p.train.strategy = strategy
    cands = [c.strip() for c in candidates.split(",") if c.strip()] if candidates else None
    summary = transfer_pipeline(  # errors (WorkspaceBusy: exit 75) reach guard; a refusal is a result
        target=str(target),
        out=str(out),
        reference=str(reference) if reference else None,
        candidates=cands,
        repo=str(repo),
        params=p.model_dump(mode="json"),
        force=force,
        progress=not quiet,
        push=push,
        wait_s=wait,
    )
    if summary["refused"]:
        report_gate(summary["validation"])
        _print_timings(summary.get("timings"), t_cli)
        typer.secho(
            "validation gate failed: nothing exported (use --force to export anyway)", fg=typer.colors.RED, err=True
        )
        raise typer.Exit(EXIT_REFUSED)
    _print_summary(summary)
    _print_timings(summary.get("timings"), t_cli)


def _print_timings(t: dict | None, t_cli: float) -> None:
    """Where the run's time went: start-up (imports, the Prefect server) and each stage, in seconds."""
    import time

    if not t:
        return
    parts = [f"start-up {t['started_unix'] - t_cli:.0f}"] + [f"{k} {v:.0f}" for k, v in t["stages"].items()]
    typer.echo(f"  time      : {time.time() - t_cli:.0f} s = " + ", ".join(parts) + " (timings.json)")


def _print_summary(s: dict) -> None:
    typer.echo("")
    typer.secho("transferkit run summary", bold=True)
    if s.get("drift"):
        d = s["drift"]
        typer.echo(
            f"  shift     : detected={d['drift_detected']} severity={d['severity']} ({d['method']}, score {d['score']:.3f})"
        )
    typer.echo(f"  selected  : {s['selected']} ({s['ranking_metric']})")
    typer.echo(f"  strategy  : {s['strategy']} - {s['strategy_reason']}")
    if s.get("baseline_accuracy") is not None:
        lo, hi = s["gain_interval"]
        typer.echo(
            f"  accuracy  : test {s['test_accuracy']:.3f} vs best no-transfer {s['baseline_accuracy']:.3f} "
            f"({s['baseline_name']}): gain {s['transfer_gain']:+.3f}, CI [{lo:+.3f}, {hi:+.3f}], "
            f"p = {s['gain_p_value']:.2g}; {s['verdict']}; gate {'passed' if s['passed'] else 'FORCED'}"
        )
    else:
        typer.echo(
            f"  accuracy  : test {s['test_accuracy']:.3f} (no working no-transfer baseline); "
            f"gate {'passed' if s['passed'] else 'FORCED'}"
        )
    for b in s.get("baselines", []):
        typer.echo(
            f"  baseline  : {b['name']:<14} test {b['test_accuracy']:.3f}" + ("  (broken)" if b.get("broken") else "")
        )
    typer.echo(f"  onnx      : {s['onnx']}")
    typer.echo(
        f"  parity    : max_abs_diff {s['parity']['max_abs_diff']:.2e}, top1 agreement {s['parity']['top1_agreement']:.4f}"
    )
    if s.get("live") is not None:
        typer.echo(f"  live      : {s['name']} v{s['live']}")
    d = s.get("dvc")
    typer.echo(
        f"  dvc       : {d['root']}: stages {', '.join(d['stages']) or 'none'} committed, model repository "
        f"recorded{', pushed' if d['pushed'] else ''} before promotion"
        if d
        else "  dvc       : the model repository is not in a DVC workspace: the version is not versioned by DVC"
    )


@app.command("dvc-yaml")
@guard
def dvc_yaml(
    target: Annotated[str, typer.Option(help="labelled target dataset (relative to the DVC root)")] = "data/clipart",
    out: Annotated[str, typer.Option(help="run folder")] = "runs/dvc",
    repo: Annotated[str, typer.Option(help="model repository (the export stage's out)")] = "models",
    reference: Annotated[Optional[str], typer.Option(help="source-domain images: adds the drift stage")] = None,
    write: Annotated[Optional[Path], typer.Option(help="write here (e.g. dvc.yaml) instead of printing")] = None,
):
    """The DVC pipeline for a target: the same stage wiring as the flow (the repository's dvc.yaml is the default)."""
    from transferkit.core.io import atomic_write_text
    from transferkit.orchestration.workspace import dvc_yaml_text

    text = dvc_yaml_text(target, out, repo, reference)
    if write:
        atomic_write_text(write, text)
        typer.echo(f"wrote {write}")
    else:
        typer.echo(text, nl=False)


@app.command()
@guard
def server(
    host: Annotated[str, typer.Option(help="bind address (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 4200,
    pool: Annotated[str, typer.Option(help="process work pool to create and poll")] = "transferkit-process",
    deploy: Annotated[bool, typer.Option(help="register flows/deployments.py (cron + event triggers)")] = True,
    home: Annotated[Optional[Path], typer.Option(help="PREFECT_HOME (its SQLite db); default: the user's")] = None,
    database: Annotated[
        Optional[str],
        typer.Option(help="postgresql://USER:PASSWORD@HOST:PORT/DB for concurrent flow runs (default: SQLite)"),
    ] = None,
    limit: Annotated[
        Optional[int], typer.Option(min=1, help="flow runs the worker runs at once (default: 1 on SQLite, 4 else)")
    ] = None,
):
    """Start a Prefect server (UI + API), register the retrain deployments and run a process worker."""
    from transferkit.orchestration import database as db
    from transferkit.orchestration.prefect import serve_forever

    env = {db.ENV: db.check(database)} if database else None  # one line and exit 1 when it cannot work
    limit = limit or (4 if database else 1)
    try:
        serve_forever(host, port, pool, deploy, Path.cwd(), str(home) if home else None, typer.echo, env, limit)
    except (RuntimeError, TimeoutError) as e:
        fail(str(e))
