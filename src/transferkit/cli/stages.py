"""One command per pipeline stage, each a thin wrapper over the library module of the same name: `drift`, `select`, `train` (also under torchrun for DDP), `validate` and `export`. Also holds `report_gate`, the printout of a validation verdict that `run` shows too."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.cli.apps import ParamsOpt, QuietOpt, SearchOpt, SetOpt, app, fail, guard, resolve_params

# --------------------------------------------------------------------------- stages


@app.command()
@guard
def drift(
    reference: Annotated[Path, typer.Option(help="source/reference images (labelled or not)")],
    current: Annotated[Path, typer.Option(help="target/current images (labelled or not)")],
    out: Annotated[Path, typer.Option(help="folder for drift.json and drift.html")],
    params: ParamsOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
):
    """Detect domain shift between two image folders (Evidently): drift.json + drift.html."""
    from transferkit.drift.detect import run_drift

    r = run_drift(reference, current, out, resolve_params(params, set_), progress=not quiet)
    typer.echo(
        f"drift: detected={r['drift_detected']} severity={r['severity']} method={r['method']} "
        f"score={r['score']:.3f} -> {out / 'drift.json'}"
    )


@app.command()
@guard
def select(
    target: Annotated[Path, typer.Option(help="labelled target dataset")],
    out: Annotated[Path, typer.Option(help="folder for ranking.json")],
    candidates: Annotated[Optional[str], typer.Option(help="comma-separated model specs (default: params)")] = None,
    confirm: Annotated[
        Optional[int],
        typer.Option(help="fine-tune the top K briefly, keep the best by val accuracy (default: select.confirm)"),
    ] = None,
    runner: Annotated[
        Optional[str],
        typer.Option(
            help="sequential | thread | dask: score candidates in parallel via a Prefect task runner (default: select.runner)"
        ),
    ] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
):
    """Rank source models on the target without fine-tuning (LogME, LEEP, kNN), optionally confirm the top K."""
    from transferkit.orchestration.prefect import use_prefect_defaults

    use_prefect_defaults()  # before the flow module imports Prefect
    from transferkit.flows.select import run_select_flow

    p = resolve_params(params, [*(set_ or []), *([f"select.runner={runner}"] if runner is not None else [])])
    if confirm is not None and confirm < 0:
        fail(f"--confirm must be >= 0, got {confirm}")
    cands = [c.strip() for c in candidates.split(",") if c.strip()] if candidates else None
    r = run_select_flow(target, out, p, cands, progress=not quiet, confirm=confirm)
    for row in r["candidates"]:
        score = "n/a" if row["score"] is None else f"{row['score']:.4f}"
        leep = "  leep=n/a (no source classifier)" if row["leep"] is None else f"  leep={row['leep']:.3f}"
        typer.echo(f"  {row['model']:<26} {r['metric']}={score}  knn={row['knn']:.3f}{leep}  {row['seconds']:.1f}s")
    for u in r["unavailable"]:
        typer.secho(f"  {u['model']:<26} skipped: {u['reason']}", fg=typer.colors.YELLOW)
    if "confirm" in r:
        for c in r["confirm"]["runs"]:
            typer.echo(
                f"  confirm {c['model']:<18} {c['strategy']} {c['epochs']} epochs: val_accuracy={c['val_accuracy']:.3f}"
            )
    typer.echo(f"selected: {r['selected']} (by {r['selected_by']})")
    if r["warning"]:
        typer.secho(f"warning: {r['warning']}", fg=typer.colors.YELLOW)


@app.command()
@guard
def train(
    target: Annotated[Path, typer.Option(help="labelled target dataset")],
    out: Annotated[Path, typer.Option(help="run folder")],
    model: Annotated[Optional[str], typer.Option(help="model spec (see `transferkit zoo list`)")] = None,
    ranking: Annotated[
        Optional[Path], typer.Option(help="ranking.json from `select`: train its selected model")
    ] = None,
    strategy: Annotated[
        Optional[str], typer.Option(help="auto | linear-probe | partial | full | lp-ft | scratch (default: params)")
    ] = None,
    drift_json: Annotated[
        Optional[Path], typer.Option("--drift", help="drift.json to inform the auto strategy")
    ] = None,
    search: SearchOpt = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
    nproc_per_node: Annotated[
        Optional[int], typer.Option(min=1, help="fine-tune with DDP in N torchrun processes (train.nproc_per_node)")
    ] = None,
    nnodes: Annotated[int, typer.Option(min=1, help="machines in the DDP job; each runs this same command")] = 1,
    node_rank: Annotated[Optional[int], typer.Option(min=0, help="this machine's rank (torchrun --node-rank)")] = None,
    rdzv_endpoint: Annotated[Optional[str], typer.Option(help="HOST:PORT where the nodes meet (--nnodes > 1)")] = None,
):
    """Train on the target: feature extraction or fine-tuning (or the scratch baseline)."""
    from transferkit.core.io import read_json
    from transferkit.train import distributed
    from transferkit.train.stage import run_train

    if (model is None) == (ranking is None):
        fail("give exactly one of --model or --ranking")
    model = model or read_json(ranking)["selected"]
    nproc = [f"train.nproc_per_node={nproc_per_node}"] if nproc_per_node else []
    p = resolve_params(params, [*(set_ or []), *([f"train.search_mode={search}"] if search else []), *nproc])
    if distributed.should_launch(p.train.nproc_per_node, nnodes):  # re-run this command under torchrun
        m = distributed.launch_train(
            target, out, p, model, strategy, drift_json, not quiet, nnodes, node_rank, rdzv_endpoint
        )
        if m is None:
            typer.echo("train: this node's ranks finished (rank 0, on another node, wrote the run folder)")
        return  # rank 0 reported
    else:  # one process, or one rank inside torchrun (rank 0 reports)
        progress = not quiet and distributed.is_main()
        m = distributed.in_group(run_train, target, out, p, model, strategy, drift_json, progress=progress)
        if not distributed.is_main():
            return
    typer.echo(
        f"train: {m['model']} strategy={m['strategy']} val={m['val_accuracy']:.3f} "
        f"test={m['test_accuracy']:.3f} best_epoch={m['best_epoch']}/{m['epochs']} ({m['strategy_reason']})"
    )


@app.command()
@guard
def validate(
    run: Annotated[Path, typer.Option(help="train run folder")],
    baseline: Annotated[Optional[Path], typer.Option(help="an existing scratch run to compare against")] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    record: Annotated[
        bool,
        typer.Option(help="exit 0 when the gate refuses: the verdict is recorded in validation.json (the DVC stage)"),
    ] = False,
    quiet: QuietOpt = False,
):
    """Gate a trained run: overfitting checks, negative transfer vs scratch/linear-probe baselines, quality report."""
    from transferkit.core.errors import EXIT_REFUSED
    from transferkit.validate.stage import run_validate

    # ./params.yaml (or --params) + --set, like every stage: RUN/params.yaml is train's record, never an input
    r = run_validate(run, resolve_params(params, set_), baseline, progress=not quiet)
    report_gate(r)
    if r.get("errors_report"):
        typer.echo(f"  error analysis: {run / r['errors_report']['path']}")
    if not r["passed"] and not record:
        raise typer.Exit(EXIT_REFUSED)


def report_gate(r: dict) -> None:
    from transferkit.core.results import GateResult

    status = "PASSED" if r["passed"] else "FAILED"
    base = r["baseline"]
    vs = (
        f"best no-transfer={base['test_accuracy']:.3f} ({base.get('name', base['strategy'])})  "
        f"gain={r['transfer_gain']:+.3f}"
        if base.get("test_accuracy") is not None
        else "no working baseline"
    )
    typer.echo(f"validate: {status}  gap={r['train_val_gap']:.3f}  test={r['test_accuracy']:.3f}  {vs}")
    gate = GateResult.from_validation(r)
    if gate.interval is not None:
        typer.echo(f"  verdict: {gate.verdict_line()}")
    for reason in r["reasons"]:
        typer.secho(f"  - {reason}", fg=typer.colors.RED, err=True)
    for warning in r.get("warnings", []):
        typer.secho(f"  ! {warning}", fg=typer.colors.YELLOW, err=True)
    for b in r.get("baselines", []):
        if b.get("test_accuracy") is not None:
            broken = "  BROKEN (at chance, not the bar)" if b.get("broken") else ""
            typer.echo(
                f"  {b.get('name', b['strategy']):<14} val={b['val_accuracy']:.3f} test={b['test_accuracy']:.3f} "
                f"gain={b['gain']:+.3f}{broken}"
            )
    if not r["passed"]:
        for line in gate.advice():
            typer.secho(f"  {line}", err=True)
    if "report" in r:
        rep = r["report"]
        bal = f" balanced_accuracy={rep['balanced_accuracy']:.3f}" if "balanced_accuracy" in rep else ""
        typer.echo(f"  report: macro_f1={rep['macro_f1']:.3f}{bal} ece={rep['ece']:.3f}")


@app.command()
@guard
def export(
    run: Annotated[Path, typer.Option(help="validated train run folder")],
    repo: Annotated[Path, typer.Option(help="model repository (writes REPO/<name>/<version>/)")],
    force: Annotated[bool, typer.Option(help="export even if validation failed (recorded)")] = False,
    skip_refused: Annotated[
        bool, typer.Option(help="a run the gate refused exports nothing and exits 0 (the DVC stage)")
    ] = False,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
):
    """Export to ONNX with a parity check against torch, into a versioned model repository."""
    from transferkit.core.io import read_json
    from transferkit.export.stage import run_export

    p = resolve_params(params, set_)  # ./params.yaml (or --params) + --set; RUN/params.yaml is a record only
    verdict = run / "validation.json"
    if skip_refused and not force and verdict.is_file() and read_json(verdict).get("passed") is not True:
        repo.mkdir(parents=True, exist_ok=True)  # the stage's out exists, unchanged
        typer.echo(f"export: skipped, the gate refused {run} ({verdict}): nothing exported")
        return
    r = run_export(run, repo, p, force=force, progress=not quiet)
    typer.echo(
        f"export: {r['path']}  parity max_abs_diff={r['parity']['max_abs_diff']:.2e} "
        f"top1_agreement={r['parity']['top1_agreement']:.4f}"
    )
