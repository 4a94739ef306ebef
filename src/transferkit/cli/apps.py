"""The Typer applications (`app` and its `data` and `zoo` sub-apps), the option types the commands share (--params, --set, --search, --quiet, the promote/rollback options), and the error handling every command goes through: `guard` turns expected errors (TransferkitError, OSError) into one red line and the exit code from `errors.EXIT_CODES`, `fail` prints one and exits. It registers no commands itself."""

from __future__ import annotations

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


def resolve_params(path: Optional[Path], overrides: Optional[list[str]]):
    from transferkit.core.config import default_params_path, load_params

    return load_params(path or default_params_path(), overrides or [])


def fail(msg: str, code: int = 1) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def guard(fn):
    """Turn expected errors into one readable line and their exit code from `errors.EXIT_CODES` (no
    traceback): the stages' TransferkitError (bad params arrive as ConfigError), Busy and OSError (a missing
    or unreadable file). Nothing broader: any other exception is a bug and keeps its traceback."""
    import functools

    from transferkit.core.errors import TransferkitError, exit_code

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (TransferkitError, OSError) as e:
            fail(str(e), exit_code(e))

    return wrapper
