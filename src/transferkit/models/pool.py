"""Embed a large unlabelled pool (drift monitoring, self-training, label suggestions) on Dask, shard by shard.

    transferkit embed-pool --pool data/pool --model mobilenetv2_100                  # this process
    transferkit embed-pool --pool data/pool --model mobilenetv2_100 --runner dask --workers 4
    transferkit embed-pool --pool data/pool --model mobilenetv2_100 --runner dask --dask-address tcp://sched:8786

The output is the pipeline's embedding cache (transferkit.models.embed): the file drift, select and train read for
the same folder, model and input size, so a later `transferkit drift --current data/pool` embeds nothing.
The pool's images (in the order the data loader lists them) are cut into shards of `shard_size` images, a
multiple of the batch size: every batch holds the same images as in one process over the whole pool, so
the features are bit-identical to one process, whatever ran where (one torch thread per Dask worker; Dask's
nanny sets OMP_NUM_THREADS=1). Each worker loads the model once (embed.source_model is memoised per
process) and writes each finished shard atomically next to the cache file (CACHE/<key>.shards/); a re-run
reuses every valid shard and embeds only the rest, so a killed driver or worker loses at most the shards in
flight. `max_shards` stops after that many new shards (a job slot's share of a huge pool; decided by count,
never by the clock). Once all shards exist they are merged in order into the cache file (rows the file
already held for other images are kept) and the shard folder is removed. A changed pool (another md5)
is a new cache key: its shards start over.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from transferkit.core.errors import InputError

RUNNERS = ("local", "dask")


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    return [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]


def embed_shard(spec: str, image_size, batch_size: int, samples: list, out: str) -> str:
    """Embed SAMPLES and write OUT (features[, logits], keys) atomically; runs on a Dask worker or here."""
    import io

    from transferkit.core.io import atomic_write_bytes
    from transferkit.models.embed import forward, row_key, source_model

    lm = source_model(spec, image_size)  # once per worker process
    arrays = forward(lm, [(Path(p), y) for p, y in samples], batch_size, False, spec)
    arrays["keys"] = np.array([row_key(Path(p)) for p, _ in samples])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _load_shard(path: Path, keys: list[str]) -> dict | None:
    """A finished shard for exactly these rows, else None (missing, damaged or stale: recomputed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return None
    return arrays if "keys" in arrays and arrays["keys"].tolist() == keys else None


def _run_local(jobs: list, bar) -> list[int]:
    done = []
    for i, args in jobs:
        embed_shard(*args)
        done.append(i)
        bar.update(1)
    return done


def _run_dask(jobs: list, bar, workers: int, address: str | None) -> list[int]:
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if address is None:  # one thread per worker process: torch parallelises inside a forward pass
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    done = []
    try:
        with Client(address or cluster) as client:
            futures = {client.submit(embed_shard, *args, pure=False): i for i, args in jobs}
            for fut in as_completed(futures):
                fut.result()  # a shard's error stops the run; finished shards stay on disk
                done.append(futures[fut])
                bar.update(1)
    finally:
        if cluster is not None:
            cluster.close()
    return sorted(done)


def embed_pool(
    pool: Path,
    spec: str,
    image_size: int | str | None = None,
    batch_size: int = 64,
    shard_size: int | None = None,
    runner: str = "local",
    workers: int = 2,
    address: str | None = None,
    max_shards: int | None = None,
    progress: bool = True,
) -> dict:
    """Embed every image of POOL (module docstring); returns what was done: images, shards, which shards were
    computed now and which reused, whether the cache file is complete, its path."""
    from tqdm import tqdm

    from transferkit.data.folder import load_dataset
    from transferkit.models.embed import cache_dir, cache_key, row_key, source_model

    if runner not in RUNNERS:
        raise InputError(f"--runner must be one of {', '.join(RUNNERS)}; got {runner!r}")
    shard_size = shard_size or 16 * batch_size
    if shard_size % batch_size:
        raise InputError(f"--shard-size {shard_size} must be a multiple of the batch size {batch_size}")
    t0 = time.perf_counter()
    ds = load_dataset(pool, require_labels=False, split_missing=False)
    samples = ds.all_samples() + [(p, -1) for p in ds.unlabelled]
    lm = source_model(spec, image_size)
    size = int(lm.data_config["input_size"][-1])
    cache = cache_dir() / f"{cache_key(spec, lm.weights_sha256, ds.md5, size)}.npz"
    shard_dir = cache.with_suffix(".shards")
    ranges = shard_ranges(len(samples), shard_size)
    keys = [row_key(p) for p, _ in samples]
    report = {"images": len(samples), "shards": len(ranges), "data_md5": ds.md5, "cache": str(cache)}
    if _cached_rows(cache, keys):
        return report | {"computed": [], "reused": [], "complete": True, "seconds": time.perf_counter() - t0}
    shard_dir.mkdir(parents=True, exist_ok=True)
    path = [shard_dir / f"{i:06d}.npz" for i in range(len(ranges))]
    missing = [i for i, (a, b) in enumerate(ranges) if _load_shard(path[i], keys[a:b]) is None]
    todo = missing[:max_shards] if max_shards is not None else missing
    shard = lambda i: [(str(p), y) for p, y in samples[slice(*ranges[i])]]  # noqa: E731 - plain paths ship to Dask
    jobs = [(i, (spec, image_size, batch_size, shard(i), str(path[i]))) for i in todo]
    reused = len(ranges) - len(missing)
    with tqdm(total=len(ranges), initial=reused, desc=f"embed pool {spec}", unit="shard", disable=not progress) as bar:
        done = _run_local(jobs, bar) if runner == "local" else _run_dask(jobs, bar, workers, address)
    report |= {"computed": done, "reused": sorted(set(range(len(ranges))) - set(missing))}
    complete = len(todo) == len(missing)
    if complete:
        _merge(cache, [_load_shard(path[i], keys[a:b]) for i, (a, b) in enumerate(ranges)])
        shutil.rmtree(shard_dir, ignore_errors=True)
    return report | {"complete": complete, "seconds": round(time.perf_counter() - t0, 2)}


def _cached_rows(cache: Path, keys: list[str]) -> bool:
    """The cache file already holds every key (a finished earlier run, or drift/select embedded them)."""
    if not cache.is_file():
        return False
    try:
        with np.load(cache, allow_pickle=False) as z:
            have = set(z["keys"].tolist())
    except (OSError, ValueError, KeyError):
        return False
    return have.issuperset(keys)


def _merge(cache: Path, shards: list[dict]) -> None:
    """The shards in order, after the rows the cache file held for other images, written atomically."""
    import io

    from transferkit.core.io import atomic_write_bytes

    new = {k: np.concatenate([s[k] for s in shards]) for k in shards[0]}
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as z:
                old = {k: z[k] for k in z.files}
        except (OSError, ValueError):
            old = {}
        if set(old) == set(new):
            keep = ~np.isin(old["keys"], new["keys"])
            new = {k: np.concatenate([old[k][keep], new[k]]) for k in new}
    buf = io.BytesIO()
    np.savez(buf, **new)
    atomic_write_bytes(cache, buf.getvalue())
