"""Imbalanced classes benchmark: does the class-weighted probe (train.class_weights auto) beat the plain one on a
skewed target?

    OMP_NUM_THREADS=2 .venv/bin/python bench/imbalance.py              # ~10 min on 2 busy cores
    .venv/bin/python bench/imbalance.py --datasets fashion --ratio 10 --seeds 0 1 2

Protocol, per dataset and seed (real data, `transferkit data builtin ... --imbalance RATIO`, a different draw per
seed): train class sizes decay geometrically from `train_per_class` (first class) to train_per_class / RATIO (last);
val (10 per class) and test stay balanced. The linear probe train ships (transferkit.train.probe.fit_probe on the cached
features of the source, C on val) is fitted twice on the same features: class-weighted (balanced weights, what
`train.class_weights: auto` does at this skew) and plain (`off`). Reported: test accuracy (= balanced accuracy on
the balanced test split), macro F1 and the recall of the three smallest train classes, mean +- sd over seeds, and
the gain of weighting: per seed, mean +- sd with the 95% t interval over seeds, and the per-image balanced-accuracy
interval (transferkit.core.imbalance.balanced_comparison) on every seed's test images together.
Writes bench/results/imbalance.json and bench/results/imbalance.md. Wall times are measured under load.
"""

from __future__ import annotations

import sys

# Run as a script, this file's folder heads sys.path and bench/select.py would shadow the stdlib `select`.
sys.path = [p for p in sys.path if p != __file__.rsplit("/", 1)[0]]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "imbalance"
RESULTS = ROOT / "bench" / "results"
# name: (builtin, size px, per_class, train_per_class (largest class), val_per_class)
DATASETS = {
    "clipart": ("clipart", 64, 55, 20, 10),
    "fashion": ("fashion-mnist", 32, 60, 20, 10),
    "digits": ("digits", 32, 60, 20, 10),
}
MINORITY = 3  # the smallest train classes whose recall is reported


def one_seed(name: str, seed: int, ratio: float, model: str, side: int) -> dict:
    from sklearn.metrics import f1_score

    from transferkit.core.config import load_params
    from transferkit.core.imbalance import balanced_weights, decide
    from transferkit.data.builtin import write_builtin
    from transferkit.data.folder import load_with_params
    from transferkit.models.embed import embeddings
    from transferkit.train.probe import fit_probe

    builtin, size, per_class, tpc, vpc = DATASETS[name]
    target = WORK / f"{name}-r{ratio:g}-s{seed}"
    t0 = time.perf_counter()
    write_builtin(builtin, target, per_class, size, tpc, vpc, seed=seed, progress=False, imbalance=ratio)
    params = load_params(None, {"seed": seed, "data.image_size": side})
    ds = load_with_params(target, params)
    k = len(ds.classes)
    x = {s: embeddings(model, ds.splits[s], ds.md5, params.data, progress=False)["features"] for s in ds.splits}
    y = {s: np.array([lbl for _, lbl in v]) for s, v in ds.splits.items()}
    rule = decide(y["train"], k, "auto", params.train.imbalance_ratio)
    minority = np.argsort(np.bincount(y["train"], minlength=k), kind="stable")[:MINORITY]
    row = {"dataset": name, "seed": seed, "train_counts": rule["train_counts"], "auto_weights": rule["weighted"]}
    for label, w in (("weighted", balanced_weights(y["train"], k)), ("plain", None)):
        fit = fit_probe((x["train"], y["train"]), (x["val"], y["val"]), k, params.train.probe_c, None, w)
        pred = fit.logits(x["test"]).argmax(1)
        correct = pred == y["test"]
        recall = [float(correct[y["test"] == c].mean()) for c in range(k)]
        row[label] = {
            "accuracy": float(correct.mean()),
            "balanced_accuracy": float(np.mean(recall)),
            "macro_f1": float(f1_score(y["test"], pred, labels=list(range(k)), average="macro", zero_division=0)),
            "minority_recall": float(np.mean([recall[c] for c in minority])),
            "C": fit.C,
            "correct": "".join("1" if c else "0" for c in correct),
        }
    row["test_labels"] = y["test"].tolist()
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _t95(d: np.ndarray) -> list[float]:
    from scipy.stats import t

    half = float(t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return [round(float(d.mean()) - half, 4), round(float(d.mean()) + half, 4)]


def summarise(rows: list[dict]) -> list[dict]:
    from transferkit.core.imbalance import balanced_comparison

    out = []
    for name in sorted({r["dataset"] for r in rows}):
        rs = [r for r in rows if r["dataset"] == name]
        line = {"dataset": name, "seeds": len(rs), "train_counts_seed0": rs[0]["train_counts"]}
        for label in ("weighted", "plain"):
            for m in ("balanced_accuracy", "macro_f1", "minority_recall"):
                v = np.array([r[label][m] for r in rs])
                line[f"{label}_{m}"] = [round(float(v.mean()), 4), round(float(v.std(ddof=1)) if len(v) > 1 else 0, 4)]
        gain = np.array([r["weighted"]["balanced_accuracy"] - r["plain"]["balanced_accuracy"] for r in rs])
        line["gain_mean_sd"] = [round(float(gain.mean()), 4), round(float(gain.std(ddof=1)) if len(gain) > 1 else 0, 4)]
        line["gain_t95"] = _t95(gain)
        bits = {
            lab: np.concatenate([[c == "1" for c in r[lab]["correct"]] for r in rs]) for lab in ("weighted", "plain")
        }
        labels = np.concatenate([r["test_labels"] for r in rs])
        cmp = balanced_comparison(bits["weighted"], bits["plain"], labels, 0.95)
        line["paired"] = {k: cmp[k] for k in ("gain", "interval", "p_value", "n")}
        rec = np.array([r["weighted"]["minority_recall"] - r["plain"]["minority_recall"] for r in rs])
        line["minority_recall_gain_per_seed"] = [round(float(v), 4) for v in rec]
        out.append(line)
    return out


def markdown(summary: list[dict], meta: dict) -> str:
    def ms(v):
        return f"{v[0]:.3f} +- {v[1]:.3f}"

    lines = [
        "# Imbalanced target: class-weighted vs plain linear probe (bench/imbalance.py)",
        "",
        f"Model {meta['model']} at {meta['image_size']} px, train classes decaying {meta['ratio']:g}:1 "
        f"(`data builtin --imbalance {meta['ratio']:g}`), val and test balanced, seeds {meta['seeds']}. "
        "Balanced accuracy (= accuracy on the balanced test split), macro F1, recall of the 3 smallest train classes.",
        "",
        "| dataset | weighting | balanced accuracy | macro F1 | minority recall |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        for lab in ("weighted", "plain"):
            lines.append(
                f"| {s['dataset']} | {lab} | {ms(s[f'{lab}_balanced_accuracy'])} | {ms(s[f'{lab}_macro_f1'])} "
                f"| {ms(s[f'{lab}_minority_recall'])} |"
            )
    lines += [
        "",
        "| dataset | gain in balanced accuracy | 95% t (seeds) | paired 95% (images) | minority recall gain per seed |",
    ]
    lines.append("|---|---|---|---|---|")
    for s in summary:
        p = s["paired"]
        lines.append(
            f"| {s['dataset']} | {s['gain_mean_sd'][0]:+.3f} +- {s['gain_mean_sd'][1]:.3f} | "
            f"[{s['gain_t95'][0]:+.3f}, {s['gain_t95'][1]:+.3f}] | {p['gain']:+.3f} [{p['interval'][0]:+.3f}, "
            f"{p['interval'][1]:+.3f}] (n={p['n']}) | {', '.join(f'{v:+.3f}' for v in s['minority_recall_gain_per_seed'])} |"
        )
    lines += ["", f"Measured {meta['date']} on {meta['machine']} (shared with other jobs), {meta['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["clipart", "fashion"], choices=sorted(DATASETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--ratio", type=float, default=10.0)
    ap.add_argument("--model", default="mobilenetv2_100")
    ap.add_argument("--image-size", type=int, default=128, help="embedding side (the pipeline's default is 192)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = []
    for name in args.datasets:
        for seed in args.seeds:
            rows.append(one_seed(name, seed, args.ratio, args.model, args.image_size))
            r = rows[-1]
            print(
                f"{name} seed {seed}: weighted {r['weighted']['balanced_accuracy']:.3f} "
                f"(minority {r['weighted']['minority_recall']:.3f}) vs plain {r['plain']['balanced_accuracy']:.3f} "
                f"(minority {r['plain']['minority_recall']:.3f})",
                flush=True,
            )
    summary = summarise(rows)
    meta = {
        "model": args.model,
        "image_size": args.image_size,
        "ratio": args.ratio,
        "seeds": args.seeds,
        "datasets": {k: DATASETS[k] for k in args.datasets},
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": time.perf_counter() - t0,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "imbalance.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    md = markdown(summary, meta)
    (RESULTS / "imbalance.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
