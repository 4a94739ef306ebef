"""Distributed fine-tuning benchmark: 1 vs 2 DDP processes (torchrun, gloo on CPU) at the same global batch.

    .venv/bin/python bench/distributed.py             # ~3-5 min on 2 cores
    .venv/bin/python bench/distributed.py --seeds 0 1 --epochs 3

`transferkit train --strategy full --nproc-per-node N` on real digits (sklearn, 64 px, 10 train / 10 val
labels per class), the packaged ImageNet MobileNetV2, global batch 32, the same epochs for N = 1 and 2.
Throughput = train images x epochs / the epochs' seconds (metrics.json history: the train steps, precise
BN over the train images and validation, i.e. what one epoch costs; process start, baselines and the final
test pass excluded). Configurations (processes x torch threads each): 1 x 1, 1 x 2 (both cores in one
process) and 2 x 1 (both cores as two DDP ranks): 2 x 1 does the same arithmetic as 1 x 2 plus gradient
all-reduces, so no speed-up over 1 x 2 is expected on an idle machine; on N GPUs (one per rank) DDP's step
time stays near one GPU's while the global batch is shared N ways.
The machine may be shared during the run: the load average is recorded, figures are "under load" then.
Writes bench/results/distributed.json and bench/results/distributed.md.
"""

from __future__ import annotations

import sys

# Run as a script, this file's folder heads sys.path: bench/select.py would shadow the stdlib `select` and this
# file dask's `distributed`.
sys.path = [p for p in sys.path if p != __file__.rsplit("/", 1)[0]]

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "distributed"
RESULTS = ROOT / "bench" / "results"
TK = str(Path(sys.executable).parent / "transferkit")


def run(target: Path, nproc: int, threads: int, seed: int, epochs: int, size: int) -> dict:
    out = WORK / f"n{nproc}-t{threads}-s{seed}"
    sets = {
        "data.image_size": size,
        "data.batch_size": 32,
        "seed": seed,
        "train.epochs": epochs,
        "train.min_epochs": epochs,
        "train.patience": epochs,
        "train.resume": False,
        "validate.no_transfer": ["pixels-logreg"],
    }
    cmd = [TK, "train", "--target", str(target), "--out", str(out), "--model", "mobilenetv2_100", "--strategy"]
    cmd += ["full", "-q", "--nproc-per-node", str(nproc)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - t0
    m = json.loads((out / "metrics.json").read_text())
    secs = sum(h["seconds"] for h in m["history"])
    return {
        "nproc": nproc,
        "threads_per_process": threads,
        "seed": seed,
        "img_per_s": m["n_train"] * len(m["history"]) / secs,
        "epoch_seconds": secs / len(m["history"]),
        "process_wall_s": round(wall, 1),
        "test_accuracy": m["test_accuracy"],
        "distributed": m.get("distributed"),
        "load_avg_1m": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    a = ap.parse_args()
    from transferkit.data.builtin import write_builtin

    target = WORK / "digits"
    if not target.is_dir():
        write_builtin("digits", target, per_class=40, size=a.size, train_per_class=10, val_per_class=10, progress=False)
    load0 = os.getloadavg()[0]
    configs = [(1, 1), (1, 2), (2, 1)]  # (processes, threads each): 2 x 1 uses the cores 1 x 2 uses
    rows = [run(target, n, t, s, a.epochs, a.size) for s in a.seeds for n, t in configs]

    def pick(n: int, t: int, s: int) -> dict:
        return next(r for r in rows if (r["nproc"], r["threads_per_process"], r["seed"]) == (n, t, s))

    def stat(n: int, t: int, key: str) -> tuple[float, float]:
        xs = [pick(n, t, s)[key] for s in a.seeds]
        return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)

    ratios = {
        f"2x1 over {n}x{t}": [pick(2, 1, s)["img_per_s"] / pick(n, t, s)["img_per_s"] for s in a.seeds]
        for n, t in ((1, 1), (1, 2))
    }
    res = {
        "rows": rows,
        "ratios": {k: {"mean": statistics.mean(v), "per_seed": v} for k, v in ratios.items()},
        "setup": {
            "model": "mobilenetv2_100",
            "strategy": "full",
            "image_size": a.size,
            "global_batch": 32,
            "epochs": a.epochs,
            "cores": len(os.sched_getaffinity(0)),
            "machine": platform.machine(),
            "load_avg_1m_at_start": load0,
            "semantics": "local CPU processes on one machine (gloo); not a GPU cluster",
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        "# distributed benchmark: 1 vs 2 DDP processes (CPU, gloo)",
        "",
        f"mobilenetv2_100 full fine-tune, {a.size} px, global batch 32, {a.epochs} epochs, seeds {a.seeds}; "
        f"{res['setup']['cores']} cores, load average at start {load0:.1f} (shared machine: figures under load)",
        "",
        "| processes x threads | train img/s (mean ± sd) | epoch s | test acc (mean) |",
        "|---|---|---|---|",
    ]
    for n, t in configs:
        (m, sd), (e, _), (acc, _) = stat(n, t, "img_per_s"), stat(n, t, "epoch_seconds"), stat(n, t, "test_accuracy")
        lines.append(f"| {n} x {t} | {m:.1f} ± {sd:.1f} | {e:.2f} | {acc:.3f} |")
    lines.append("")
    for k, v in ratios.items():
        lines.append(f"ratio {k}: {statistics.mean(v):.2f} (per seed {[round(r, 2) for r in v]})")
    lines.append("")
    (RESULTS / "distributed.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
