"""The `transferkit` command line: one Typer app, its commands grouped by concern.

The `transferkit` command line: one verb per pipeline stage, same names as modules, tasks, DVC stages.

Heavy libraries (torch, timm, prefect, evidently) are imported inside the commands so that
`transferkit --help` answers at once. Errors in the input (TransferkitError, OSError) print one line
naming the file or field and exit with status 1; a failed validation gate exits with 3; anything else
is a bug and shows its traceback. `run` and `select --runner thread|dask` start the Prefect flows of
the `flows` package through `transferkit.orchestrate.load_flow` (why there: see FLOW_ENTRYPOINTS).
"""
