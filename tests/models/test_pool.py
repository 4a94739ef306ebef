"""embed-pool (transferkit.models.pool): an unlabelled pool of real MNIST digits (32 px) embedded by the packaged
MobileNetV2 in shards on 2 Dask worker processes equals one process bit for bit and in order, reuses the shards
a stopped run finished, loads the model once per worker, and lands in the pipeline's embedding cache."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from transferkit.models.pool import embed_pool

KW = dict(image_size=32, batch_size=8, shard_size=16, progress=False)  # 96 images: 6 shards of 2 batches


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    from transferkit.data.builtin import write_builtin

    tmp = tmp_path_factory.mktemp("pool")
    write_builtin("mnist", tmp / "mnist", per_class=10, size=32, progress=False)
    flat = tmp / "flat"  # unlabelled: images directly in the folder, names that give no label away
    flat.mkdir()
    for i, f in enumerate(sorted((tmp / "mnist").rglob("*.png"))[:96]):
        shutil.copy(f, flat / f"{i:04d}.png")
    return flat


@pytest.fixture(scope="module")
def dask_address():
    from distributed import LocalCluster

    # what `--runner dask` starts itself; shared here so both runs below meet the same two workers
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


def _cache(folder: Path) -> dict:
    (path,) = (folder / "embeddings").glob("*.npz")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_dask_shards_equal_one_process_and_a_stopped_run_reuses_its_shards(pool, dask_address, tmp_path, monkeypatch):
    import torch

    from transferkit.data.folder import load_dataset
    from transferkit.models.embed import compute_embeddings, row_key, source_model

    # one process, one torch thread like each Dask worker (thread count changes oneDNN's sums in the last bits)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "one"))
        one = embed_pool(pool, "mobilenetv2_100", runner="local", **KW)
    finally:
        torch.set_num_threads(threads)
    assert one["computed"] == list(range(6)) and one["complete"]

    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "dask"))
    first = embed_pool(pool, "mobilenetv2_100", runner="dask", address=dask_address, max_shards=2, **KW)
    assert first["computed"] == [0, 1] and not first["complete"]
    assert not list((tmp_path / "dask" / "embeddings").glob("*.npz"))  # no cache file until every shard exists
    shards = sorted(p.name for p in (tmp_path / "dask" / "embeddings").glob("*.shards/*.npz"))
    assert shards == ["000000.npz", "000001.npz"]
    damaged = next((tmp_path / "dask" / "embeddings").glob("*.shards/000001.npz"))
    damaged.write_bytes(b"cut short")  # a shard file that is not whole is recomputed, never trusted

    again = embed_pool(pool, "mobilenetv2_100", runner="dask", address=dask_address, **KW)
    assert again["reused"] == [0] and again["computed"] == [1, 2, 3, 4, 5] and again["complete"]
    assert not list((tmp_path / "dask" / "embeddings").glob("*.shards"))

    a, b = _cache(tmp_path / "one"), _cache(tmp_path / "dask")
    ds = load_dataset(pool, require_labels=False, split_missing=False)
    assert a["keys"].tolist() == b["keys"].tolist() == [row_key(p) for p, _ in ds.splits["train"]]  # pool order
    assert set(a) == {"keys", "features", "logits"} and a["features"].shape == (96, 1280)
    assert np.array_equal(a["features"], b["features"]) and np.array_equal(a["logits"], b["logits"])

    # the model was loaded once on each worker, though each embedded several shards over two runs
    from distributed import Client

    with Client(dask_address) as client:
        loads = client.run(lambda: source_model.cache_info().misses)
    assert sorted(loads.values()) == [1, 1]

    # the pipeline's own embedding call for this folder reads the pool's cache file: nothing left to embed
    before = (tmp_path / "dask" / "embeddings").stat().st_mtime_ns
    emb = compute_embeddings("mobilenetv2_100", ds.splits["train"], ds.md5, image_size=32, progress=False)
    assert np.array_equal(emb["features"], b["features"])
    assert (tmp_path / "dask" / "embeddings").stat().st_mtime_ns == before
    assert os.environ["TRANSFERKIT_CACHE"] == str(tmp_path / "dask")


def test_bad_shard_size_and_runner_are_one_line_errors(pool):
    from transferkit.core.errors import InputError

    with pytest.raises(InputError, match="multiple of the batch size"):
        embed_pool(pool, "mobilenetv2_100", image_size=32, batch_size=8, shard_size=12, progress=False)
    with pytest.raises(InputError, match="--runner must be one of"):
        embed_pool(pool, "mobilenetv2_100", runner="ray", progress=False)
