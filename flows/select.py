"""The `select` stage as a Prefect flow that scores candidates in parallel through a task runner.

    transferkit select --target data/target --out runs/sel --runner thread     # threads, one machine
    transferkit select --target data/target --out runs/sel --runner dask       # Dask LocalCluster processes
    transferkit select ... --runner dask --set select.dask_address=tcp://scheduler:8786   # a real cluster
    python -m transferkit.flows.select --target data/target --out runs/sel      # select_flow on Prefect's default task runner

One `score` task per candidate (mapped), each a call of `transferkit.select.rank.score_candidate` with plain
inputs (paths, md5, params dict) so Dask can ship it to other processes or machines; ranking, the
optional `--confirm` fine-tunes and writing ranking.json are `transferkit.select.rank.finish`, the same code
the sequential `run_select` uses, so every runner writes the same file.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from transferkit.core.config import params_from


@task(name="score", cache_policy=NO_CACHE)
def score_task(spec: str, samples: list[tuple[str, int]], data_md5: str, params: dict, progress: bool) -> dict:
    from transferkit.select.rank import score_candidate

    return score_candidate(spec, [(Path(p), int(y)) for p, y in samples], data_md5, params_from(params), progress)


def task_runner(kind: str, workers: int = 2, address: str | None = None):
    """`thread` (default: one machine) or `dask` (a LocalCluster of `workers` processes, or `address`)."""
    if kind == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        # one thread per worker process: torch already parallelises inside a forward pass
        return DaskTaskRunner(
            cluster_class="distributed.LocalCluster",
            cluster_kwargs={
                "n_workers": workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": ":0",
            },
        )
    from transferkit.core.config import ConfigError

    raise ConfigError(f"select.runner must be thread or dask for the flow; got {kind!r}")


@flow(name="select", log_prints=True)
def select_flow(
    target: str,
    out: str,
    params: dict | None = None,
    candidates: list[str] | None = None,
    confirm: int | None = None,
    progress: bool = False,
) -> dict:
    """Score every available candidate in parallel, rank, optionally confirm, write OUT/ranking.json."""
    from transferkit.select.rank import finish, prepare

    p = params_from(params)
    plan = prepare(Path(target), p, candidates)
    samples = [(str(path), int(y)) for path, y in plan.samples]
    futures = score_task.map(
        plan.available,
        unmapped(samples),
        unmapped(plan.data_md5),
        unmapped(p.model_dump(mode="json")),
        unmapped(progress),
    )
    rows = [f.result() for f in futures]
    return finish(rows, plan, Path(out), p, confirm, progress=progress)


def run_select_flow(
    target: Path,
    out: Path,
    params,
    candidates: list[str] | None = None,
    confirm: int | None = None,
    progress: bool = False,
) -> dict:
    """The runner choice of the select stage, made here in the orchestration layer: `select.runner` sequential
    scores one candidate after the other in this process (transferkit.select.rank.run_select, no Prefect);
    thread or dask run `select_flow` on that task runner. Both write the same ranking.json."""
    import os

    s = params.select
    if s.runner == "sequential":
        from transferkit.select.rank import run_select

        return run_select(Path(target), Path(out), params, candidates, progress=progress, confirm=confirm)
    runner = task_runner(s.runner, s.workers, s.dask_address)
    shared = s.runner == "dask" and not s.dask_address and _share_ephemeral_api()
    try:
        return select_flow.with_options(task_runner=runner)(
            target=str(target),
            out=str(out),
            params=params.model_dump(mode="json"),
            candidates=candidates,
            confirm=confirm,
            progress=progress,
        )
    finally:
        if shared:
            os.environ.pop("PREFECT_API_URL", None)


def _share_ephemeral_api() -> bool:
    """Without a Prefect server configured, LocalCluster worker processes would each start their own
    temporary one (minutes on a small machine); they inherit os.environ, so point them at ours."""
    import os

    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() or os.environ.get("PREFECT_API_URL"):
        return False
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the same singleton this process's client uses in ephemeral mode
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    return True


if __name__ == "__main__":
    from transferkit.flows.entry import main

    main(select_flow)
