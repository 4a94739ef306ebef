"""Label suggestions benchmark: does labelling the N images `transferkit suggest` picks teach the model more than
labelling N random pool images?

    OMP_NUM_THREADS=2 .venv/bin/python bench/suggest.py                 # ~10 min on 2 busy cores
    .venv/bin/python bench/suggest.py --datasets clipart --seeds 0 1 2 --budgets 20

Protocol, per dataset and seed (real data via `transferkit data builtin`, a different draw per seed):
  start   `train_per_class` labels per class in train, 10 per class in val, the rest of `per_class` in test,
          and `unlabelled_per_class` per class in TARGET/unlabelled/ (shuffled, nameless). The pool's true labels
          come back from write_builtin (`unlabelled_labels`) and stay here: the bench plays the labeller.
  pick    N pool images by each strategy through `transferkit.tools.suggest.run_suggest` (the CLI's code: the linear
          probe on the cached source features of train, C on val), N in `--budgets`; `random` is drawn
          `--random-draws` times per seed (its seed varies) and averaged, the control.
  retrain the linear probe train ships (transferkit.train.probe.fit_probe, C on val) on train + the N labelled picks.
  measure test accuracy and balanced accuracy on the untouched test split.
Reported per dataset, budget and strategy: mean +- sd over seeds, and the gain over random: per seed (strategy -
mean of the random draws), mean +- sd with the 95% t interval over seeds, and the per-image paired interval
(transferkit.models.baselines.paired_comparison) of the strategy against the first random draw on every seed's test
images together (independent test draws). Writes bench/results/suggest.json and bench/results/suggest.md.
Wall times are measured on a machine shared with other jobs.
"""

from __future__ import annotations

import sys

# Run as a script, this file's folder heads sys.path and bench/select.py would shadow the stdlib `select`.
sys.path = [p for p in sys.path if p != __file__.rsplit("/", 1)[0]]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "suggest"
RESULTS = ROOT / "bench" / "results"
# name: (builtin, size px, per_class, train_per_class, val_per_class, unlabelled_per_class)
DATASETS = {
    "clipart": ("clipart", 64, 30, 2, 10, 25),
    "fashion": ("fashion-mnist", 32, 42, 2, 10, 40),
    "digits": ("digits", 32, 42, 2, 10, 40),
}
STRATEGIES = ("uncertain-diverse", "uncertain", "diverse", "typical")


def _probe_accuracy(feats: dict, y: dict, add_x, add_y, n_classes: int, params) -> tuple[np.ndarray, float]:
    from transferkit.core.imbalance import balanced_accuracy, loss_weights
    from transferkit.train.probe import fit_probe

    xt = np.concatenate([feats["train"], add_x]) if len(add_x) else feats["train"]
    yt = np.concatenate([y["train"], add_y]) if len(add_y) else y["train"]
    w = loss_weights(yt, n_classes, params.train)
    fit = fit_probe((xt, yt), (feats["val"], y["val"]), n_classes, params.train.probe_c, None, w)
    correct = fit.logits(feats["test"]).argmax(1) == y["test"]
    return correct, balanced_accuracy(correct, y["test"])


def one_seed(name: str, seed: int, budgets: list[int], draws: int, model: str, side: int, warm: int = 0) -> dict:
    from transferkit.core.config import load_params
    from transferkit.data.builtin import write_builtin
    from transferkit.data.folder import load_with_params
    from transferkit.models.embed import embeddings
    from transferkit.tools.suggest import run_suggest

    builtin, size, per_class, tpc, vpc, upc = DATASETS[name]
    target = WORK / f"{name}-s{seed}"
    t0 = time.perf_counter()
    info = write_builtin(
        builtin, target, per_class, size, tpc, vpc, seed=seed, progress=False, unlabelled_per_class=upc
    )
    base = {"seed": seed, "data.image_size": side}
    params = load_params(None, base)
    ds = load_with_params(target, params)
    truth = np.array([ds.classes.index(c) for c in info["unlabelled_labels"]])  # names: folders sort by name
    pool_index = {p: i for i, p in enumerate(ds.unlabelled)}
    samples = {s: ds.splits[s] for s in ("train", "val", "test")} | {"pool": [(p, -1) for p in ds.unlabelled]}
    feats = {s: embeddings(model, v, ds.md5, params.data, progress=False)["features"] for s, v in samples.items()}
    y = {s: np.array([lbl for _, lbl in v]) for s, v in samples.items() if s != "pool"}
    k = len(ds.classes)
    start_correct, start_bal = _probe_accuracy(feats, y, [], [], k, params)
    row = {"dataset": name, "seed": seed, "pool": len(truth), "start": {"accuracy": float(start_correct.mean())}}
    row["start"]["balanced_accuracy"] = start_bal
    row["budgets"] = {}
    if warm:
        row["budgets"] = _warm_budgets(feats, y, truth, k, params, budgets, draws, warm, seed)
        row["start"] = row["budgets"].pop("start")
        budgets = []
    for n in budgets:
        res = {}
        runs = [(s, {"suggest.strategy": s}) for s in STRATEGIES]
        runs += [(f"random-{d}", {"suggest.strategy": "random", "seed": 1000 * seed + d}) for d in range(draws)]
        for label, over in runs:
            p = load_params(None, {**base, **over})
            t1 = time.perf_counter()
            r = run_suggest(target, WORK / "out" / f"{name}-s{seed}-{label}", p, model=model, n=n, progress=False)
            secs = time.perf_counter() - t1
            idx = np.array([pool_index[target / s["path"]] for s in r["suggestions"]])
            correct, bal = _probe_accuracy(feats, y, feats["pool"][idx], truth[idx], k, params)
            res[label] = {
                "accuracy": float(correct.mean()),
                "balanced_accuracy": bal,
                "correct": "".join("1" if c else "0" for c in correct),
                "classes_labelled": int(len(set(truth[idx].tolist()))),
                "suggest_seconds": round(secs, 2),
            }
        row["budgets"][str(n)] = res
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _warm_budgets(feats, y, truth, k, params, budgets, draws, warm, seed) -> dict:
    """--warm K: K random pool images per class count as labelled first (a later labelling round); the strategies
    then rank the rest with transferkit.tools.suggest.rank_pool on the probe refitted with them, as run_suggest does on a
    folder (here on arrays: moving files would re-embed the whole changed dataset)."""
    from transferkit.core.imbalance import loss_weights
    from transferkit.core.numeric import softmax
    from transferkit.tools.suggest import rank_pool
    from transferkit.train.probe import fit_probe

    first = np.random.default_rng([seed, 7]).choice(len(truth), warm * k, replace=False)
    rest = np.setdiff1d(np.arange(len(truth)), first)
    xl, yl = np.concatenate([feats["train"], feats["pool"][first]]), np.concatenate([y["train"], truth[first]])
    w = loss_weights(yl, k, params.train)
    fit = fit_probe((xl, yl), (feats["val"], y["val"]), k, params.train.probe_c, None, w)
    probs = softmax(fit.logits(feats["pool"][rest]))
    lab = np.concatenate([xl, feats["val"]])
    counts = np.bincount(np.concatenate([yl, y["val"]]), minlength=k)
    correct, bal = _probe_accuracy(feats, y, feats["pool"][first], truth[first], k, params)
    out = {"start": {"accuracy": float(correct.mean()), "balanced_accuracy": bal, "warm": warm * k}}
    for n in budgets:
        res = {}
        runs = [(s, s, seed) for s in STRATEGIES] + [(f"random-{d}", "random", 1000 * seed + d) for d in range(draws)]
        for label, strategy, sd in runs:
            picks = rank_pool(probs, feats["pool"][rest], lab, counts, n, strategy, params.suggest.balance, sd)
            idx = np.concatenate([first, rest[[p["index"] for p in picks]]])
            correct, bal = _probe_accuracy(feats, y, feats["pool"][idx], truth[idx], k, params)
            res[label] = {
                "accuracy": float(correct.mean()),
                "balanced_accuracy": bal,
                "correct": "".join("1" if c else "0" for c in correct),
            }
        out[str(n)] = res
    return out


def _t_interval(d: np.ndarray) -> list[float]:
    from scipy.stats import t

    if len(d) < 2:
        return [float("nan"), float("nan")]
    half = float(t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return [round(float(d.mean()) - half, 4), round(float(d.mean()) + half, 4)]


def summarise(rows: list[dict], draws: int) -> list[dict]:
    from transferkit.models.baselines import paired_comparison

    out = []
    for name in sorted({r["dataset"] for r in rows}):
        rs = [r for r in rows if r["dataset"] == name]
        for n in rs[0]["budgets"]:
            rand = np.array([np.mean([r["budgets"][n][f"random-{d}"]["accuracy"] for d in range(draws)]) for r in rs])
            start = np.array([r["start"]["accuracy"] for r in rs])
            out.append(_line(name, n, "start (no new labels)", start, None, None, len(rs)))
            out.append(_line(name, n, f"random (mean of {draws} draws)", rand, None, None, len(rs)))
            for s in STRATEGIES:
                acc = np.array([r["budgets"][n][s]["accuracy"] for r in rs])
                a = np.concatenate([_bits(r["budgets"][n][s]["correct"]) for r in rs])
                b = np.concatenate([_bits(r["budgets"][n]["random-0"]["correct"]) for r in rs])
                out.append(_line(name, n, s, acc, acc - rand, paired_comparison(a, b, 0.95), len(rs)))
    return out


def _bits(s: str) -> np.ndarray:
    return np.array([c == "1" for c in s], bool)


def _line(name, n, strategy, acc, gain, paired, seeds) -> dict:
    line = {"dataset": name, "budget": int(n), "strategy": strategy, "seeds": seeds}
    line |= {"accuracy_mean": round(float(acc.mean()), 4), "accuracy_sd": round(float(acc.std(ddof=1)), 4)}
    if gain is not None:
        line |= {"gain_mean": round(float(gain.mean()), 4), "gain_sd": round(float(gain.std(ddof=1)), 4)}
        line |= {"gain_t95": _t_interval(gain), "paired_vs_random0": {k: paired[k] for k in ("gain", "interval", "n")}}
    return line


def markdown(summary: list[dict], meta: dict) -> str:
    lines = [
        "# Label suggestions: suggested vs random labels (bench/suggest.py)",
        "",
        f"Model {meta['model']} at {meta['image_size']} px (linear probe on cached features), "
        f"{meta['warm']} random pool labels per class first, seeds {meta['seeds']}, {meta['draws']} random "
        f"draws per seed. Test accuracy after labelling N pool images and refitting; gain = strategy - mean random "
        "per seed (mean +- sd, 95% t interval over seeds); paired = per-image interval vs one random draw, all "
        "seeds' test images together.",
        "",
        "| dataset | N | strategy | test accuracy | gain vs random | 95% t (seeds) | paired 95% (images) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        acc = f"{s['accuracy_mean']:.3f} +- {s['accuracy_sd']:.3f}"
        if "gain_mean" in s:
            g = f"{s['gain_mean']:+.3f} +- {s['gain_sd']:.3f}"
            t = f"[{s['gain_t95'][0]:+.3f}, {s['gain_t95'][1]:+.3f}]"
            p = s["paired_vs_random0"]
            pi = f"{p['gain']:+.3f} [{p['interval'][0]:+.3f}, {p['interval'][1]:+.3f}] (n={p['n']})"
        else:
            g = t = pi = ""
        lines.append(f"| {s['dataset']} | {s['budget']} | {s['strategy']} | {acc} | {g} | {t} | {pi} |")
    lines.append("")
    lines.append(f"Measured {meta['date']} on {meta['machine']} (shared with other jobs), {meta['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["clipart", "fashion"], choices=sorted(DATASETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--budgets", nargs="+", type=int, default=[20])
    ap.add_argument("--random-draws", type=int, default=5)
    ap.add_argument("--model", default="mobilenetv2_100")
    ap.add_argument("--image-size", type=int, default=128, help="embedding side (the pipeline's default is 192)")
    ap.add_argument("--warm", type=int, default=0, help="random pool labels per class before the strategies pick")
    args = ap.parse_args()
    from transferkit.core.numeric import one_blas_thread

    t0 = time.perf_counter()
    rows = []
    with one_blas_thread():
        for name in args.datasets:
            for seed in args.seeds:
                rows.append(
                    one_seed(name, seed, args.budgets, args.random_draws, args.model, args.image_size, args.warm)
                )
                print(
                    f"{name} seed {seed}: {json.dumps({n: {k: round(v['accuracy'], 3) for k, v in b.items()} for n, b in rows[-1]['budgets'].items()})}",
                    flush=True,
                )
    summary = summarise(rows, args.random_draws)
    meta = {
        "model": args.model,
        "image_size": args.image_size,
        "warm": args.warm,
        "seeds": args.seeds,
        "draws": args.random_draws,
        "datasets": {k: DATASETS[k] for k in args.datasets},
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": time.perf_counter() - t0,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"suggest-warm{args.warm}" if args.warm else "suggest"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    md = markdown(summary, meta)
    (RESULTS / f"{stem}.md").write_text(md)
    print(md)
    shutil.rmtree(WORK / "out", ignore_errors=True)


if __name__ == "__main__":
    main()
