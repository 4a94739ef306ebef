"""No-transfer baselines on the transfer benchmark's own splits: the bar transfer has to clear.

    .venv/bin/python bench/baselines.py                 # digits10, fashion10, fashion100; CNN seeds 0,1,2
    .venv/bin/python bench/baselines.py --targets digits10 --seeds 0

Same targets and folders as bench/transfer.py (written deterministically: the same train/val/test images).
Per target: raw-pixel logistic regression, kNN and RBF SVM (deterministic: one run) and the small CNN from
scratch (seeds 0/1/2), each trained on train and tuned on val only (transferkit.models.baselines, the project's
params). Then, against bench/results/transfer.json's best transfer row per target (chosen by mean test
accuracy there, 3 seeds), the "Targets vs no transfer" table: which one wins, by how much, and whether the
difference is outside both rows' seed spread.
Writes bench/results/baselines.json and bench/results/baselines.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def main() -> None:
    import importlib.util

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="digits10,fashion10,fashion100")
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args()
    spec = importlib.util.spec_from_file_location("bench_transfer", ROOT / "bench" / "transfer.py")
    bt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bt)

    from transferkit.core.config import load_params
    from transferkit.data.folder import load_dataset
    from transferkit.models.baselines import fit_no_transfer

    rows = []
    for target in a.targets.split(","):
        ds = load_dataset(bt.dataset(target))
        for seed in [int(s) for s in a.seeds.split(",")]:
            names = ["pixels-logreg", "pixels-knn", "pixels-svm", "small-cnn"] if seed == 0 else ["small-cnn"]
            p = load_params(ROOT / "params.yaml", {"seed": seed, "validate.no_transfer": names})
            t0 = time.perf_counter()
            for r in fit_no_transfer(ds, p, progress=False):
                r.pop("test_correct"), r.pop("val_correct", None)
                rows.append({"target": target, "seed": seed, **r})
                print(
                    f"{target:10s} seed {seed} {r['name']:14s} val {r['val_accuracy']:.3f} test {r['test_accuracy']:.3f} "
                    f"{r['hyper']} {r['seconds']:.1f}s",
                    flush=True,
                )
            print(f"  ({time.perf_counter() - t0:.0f} s)")
    res = {"rows": rows, "targets": summarise(rows)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "baselines.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "baselines.md").write_text(markdown(res))
    print(markdown(res))


def _stats(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def summarise(rows: list[dict]) -> dict:
    transfer = json.loads((RESULTS / "transfer.json").read_text())
    out = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        per = {}
        for r in rows:
            if r["target"] == target:
                per.setdefault(r["name"], []).append(r)
        base = {
            n: {
                "test": _stats([r["test_accuracy"] for r in rs]),
                "val": _stats([r["val_accuracy"] for r in rs]),
                "seeds": len(rs),
                "hyper": rs[0]["hyper"],
                "seconds": statistics.mean(r["seconds"] for r in rs),
            }
            for n, rs in per.items()
        }
        best_nt = max(base, key=lambda n: base[n]["test"][0])
        tr = _best_transfer(transfer, target)
        entry = {"baselines": base, "best_no_transfer": best_nt, "best_transfer": tr}
        if tr:
            d = tr["mean"] - base[best_nt]["test"][0]
            spread = tr["sd"] + base[best_nt]["test"][1]
            entry["gain"] = round(d, 4)
            entry["verdict"] = (
                "transfer wins" if d > spread else "no transfer wins" if -d > spread else "within the seed spread"
            )
        out[target] = entry
    return out


def _best_transfer(transfer: dict, target: str) -> dict | None:
    runs = {k: v for k, v in (transfer.get("targets", {}).get(target) or {}).items() if k != "scratch"}
    if not runs:
        return None
    name = max(runs, key=lambda k: runs[k]["test_accuracy_mean"])
    return {"run": name, "mean": runs[name]["test_accuracy_mean"], "sd": runs[name]["test_accuracy_sd"]}


def markdown(res: dict) -> str:
    lines = [
        "# bench/baselines: no transfer on the transfer benchmark's splits",
        "",
        "Raw-pixel classifiers at the native 32 px (one run: deterministic) and a small CNN from scratch "
        '(mean ± sd over seeds), trained on train and tuned on val only (`transferkit.models.baselines`). "Best" on both '
        "sides is the row with the best mean test accuracy: the strongest alternative as a reader of both tables "
        "would compare them (the gate itself picks its bar on val).",
        "",
    ]
    lines += [
        "## Targets vs no transfer",
        "",
        "| target | best no transfer (test) | best transfer in bench/results/transfer.md (test) | gain | verdict |",
        "|---|---|---|---|---|",
    ]
    for target, e in res["targets"].items():
        b = e["baselines"][e["best_no_transfer"]]
        tr = e["best_transfer"]
        lines.append(
            f"| {target} | {e['best_no_transfer']} {b['test'][0]:.3f} ± {b['test'][1]:.3f} | "
            + (
                f"{tr['run']} {tr['mean']:.3f} ± {tr['sd']:.3f} | {100 * e['gain']:+.1f} points | {e['verdict']} |"
                if tr
                else "n/a | | |"
            )
        )
    for target, e in res["targets"].items():
        lines += [
            "",
            f"## {target}",
            "",
            "| baseline | val | test | chosen on val | seconds |",
            "|---|---|---|---|---|",
        ]
        for n, b in e["baselines"].items():
            sd = f" ± {b['test'][1]:.3f}" if b["seeds"] > 1 else ""
            lines.append(f"| {n} | {b['val'][0]:.3f} | {b['test'][0]:.3f}{sd} | {b['hyper']} | {b['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
