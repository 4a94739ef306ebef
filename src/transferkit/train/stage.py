"""The train stage's entry point run_train: validate the request, fit the requested strategy or run the search, fit the no-transfer baselines, and write the run folder."""

from __future__ import annotations

import time
from pathlib import Path

from transferkit.core.config import Params
from transferkit.train.fit import fit_configuration
from transferkit.train.outputs import build_metrics, write_run
from transferkit.train.search import NoTransferBaselines, run_search
from transferkit.train.strategy import STRATEGIES, StrategyError


def run_train(
    target: Path,
    out: Path,
    params: Params,
    model: str,
    strategy: str | None = None,
    drift: Path | None = None,
    progress: bool = True,
    baselines: bool = True,
) -> dict:
    """Train `model` on `target` and write the run folder (see module docstring).

    `baselines`: also fit the no-transfer baselines into OUT/no_transfer.json (the bar the search's evidence
    and validate's gate measure against; validate reuses the file). Off for select's confirm runs and
    validate's own linear-probe baseline, which are compared, not gated."""
    from transferkit.models.embed import torch_threads
    from transferkit.train import distributed

    t_start = time.perf_counter()
    out, strategy = distributed.rank_out(Path(out)), strategy or params.train.strategy  # rank 0 alone writes OUT
    ds, drift_report = _inputs(target, params, model, strategy, drift)
    torch_threads()
    fit_args = dict(ds=ds, params=params, model=model, drift_report=drift_report, progress=progress)
    bar = NoTransferBaselines(out, ds, params, progress) if baselines else None
    if strategy == "auto" and params.train.search_mode != "rule":
        fit, search = run_search(fit_args, out, bar)
    else:
        fit, search = fit_configuration(**fit_args, strategy=strategy, out=out), None
    if fit.info["imbalance"]["skewed"] or fit.info["imbalance"]["weighted"]:
        fit.reason += f"; imbalance: {fit.info['imbalance']['reason']}"
    timings = {"fit": fit.seconds}
    if bar is not None:
        bar.rows()  # fitted now unless the search's evidence already needed them
        timings["no_transfer"] = bar.seconds
    metrics = build_metrics(fit, ds, params, target, fit.model or model, drift, drift_report, search)
    metrics["timings"] = {k: round(v, 2) for k, v in timings.items()}
    metrics["distributed"] = distributed.summary()
    write_run(out, fit, ds, params, fit.model or model, metrics, t_start)
    return metrics


def _inputs(target: Path, params: Params, model: str, strategy: str, drift: Path | None):
    """The validated request: the dataset and the drift report (if any)."""
    from transferkit.core.io import read_json
    from transferkit.data.folder import DataError, load_with_params

    if strategy not in STRATEGIES:
        raise StrategyError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if strategy != "scratch" and model.startswith("scratch:"):
        raise DataError(f"model {model!r} has no pretrained weights; use --strategy scratch")
    ds = load_with_params(target, params)
    return ds, (read_json(drift) if drift else None)
