"""Commands that use and ship exported ONNX models: `predict` (locally or through a server), `serve` (the HTTP server, with its options turned into a ServeConfig), and `promote`/`rollback` (move `latest`, then wait for live servers)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.cli.apps import (
    NameOpt,
    PromoteTokenOpt,
    QuietOpt,
    ReasonOpt,
    RepoOpt,
    ServerOpt,
    WaitOpt,
    app,
    fail,
    guard,
)


@app.command()
@guard
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
    from transferkit.tools import predict as pr

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


@app.command()
@guard
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
    from transferkit.export.promote import promote as run_promote

    _move_latest("promote", run_promote, repo, name, server, token_file, version=version, reason=reason, wait=wait)


@app.command()
@guard
def rollback(
    repo: RepoOpt,
    name: NameOpt,
    reason: ReasonOpt = "",
    server: ServerOpt = None,
    wait: WaitOpt = 60.0,
    token_file: PromoteTokenOpt = None,
):
    """Return REPO/NAME/latest to the version that was live before the current one."""
    from transferkit.export.promote import rollback as run_rollback

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
@guard
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
        fail(f"model repository not found: {repo} (run `transferkit export` first)")
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
        fail(f"{token_file}: the token file is not UTF-8 text")
    if token_file and not token:
        fail(f"{token_file}: empty token file")
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
        fail(source + err["msg"].removeprefix("Value error, "))
