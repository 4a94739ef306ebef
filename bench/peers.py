"""transferkit against its peers and the no-transfer baselines, on the same splits, in one run (issue 19).

    .venv/bin/python bench/peers.py                                   # every target, method, seeds 0,1,2
    .venv/bin/python bench/peers.py --targets digits10,clipart10 --methods timm-loop,fastai,pixels,small-cnn
    .venv/bin/python bench/peers.py --methods transferkit-run,transferkit-auto --remeasure   # after a product change
    .venv/bin/python bench/peers.py --quick                           # smoke run: 1 seed, 2 epochs, own JSON
    .venv/bin/python bench/peers.py --report                          # only rewrite the tables from the JSON
    (fastai: `pip install -e ".[bench]"`, keeping torch/torchvision as they are)

Targets: folders written by `transferkit data builtin` (the same splits as bench/transfer.py and
bench/baselines.py; clipart10 as `make data` writes it):
  digits10    sklearn digits 32 px, 10 train / 20 val / 140 test per class (100 / 200 / 1,400)
  fashion10   Fashion-MNIST 32 px, 10 / 20 / 100 per class (100 / 200 / 1,000)
  fashion100  Fashion-MNIST 32 px, 100 / 20 / 100 per class (1,000 / 200 / 1,000)
  clipart10   openclipart 64 px colour, 10 / 10 / 30 per class (100 / 100 / 300)
Methods (MobileNetV2 ImageNet weights from the zoo's packaged file for every transfer method):
  transferkit-run   `transferkit run --target DIR` through the CLI, from an empty folder (no params.yaml:
                    the built-in defaults a user outside the repository gets); test accuracy of the trained
                    model whether or not the gate exported it (`exported` says which)
  transferkit-auto  `transferkit train --model mobilenetv2_100 --strategy auto`, same conditions
  transferkit-pretrain  digits10 only, the close-domain route: `transferkit data builtin mnist --size 8 --fit`
                    (5,000 MNIST digits at the target's 8 px, size-normalised as sklearn's are), `transferkit
                    pretrain` MobileNetV2 on it (64 px, 3 epochs),
                    then the same `transferkit run` as transferkit-run: its defaults' `zoo:*` candidate ranks the
                    registered source beside the ImageNet ones. Wall = all three steps (`steps` splits it)
  timm-loop         the bare ~30-line timm full fine-tune: 96 px, AdamW 1e-3, wd 0.05, label smoothing 0.1,
                    batch 32, constant LR, 20 epochs, no augmentation, the last epoch tested (val unused)
  fastai            fastai `vision_learner(dls, "mobilenetv2_100")` + `fine_tune(20)`, its default recipe
                    (no augmentation, Resize(96)) but batch 16 (see FASTAI_BS), the packaged weights loaded
                    into its timm body
  pixels            raw-pixel logistic regression / kNN / RBF SVM (transferkit.models.baselines; deterministic:
                    one run per target, shown with every seed)
  small-cnn         the small CNN from scratch (transferkit.models.baselines), per seed
Every cell runs in its own process (CLI or `bench/peers.py --cell`); wall time is that process's, start-up
and imports included, on this machine's cores (`machine` in the JSON). Each cell has its own empty feature
cache and model registry (TRANSFERKIT_CACHE, TRANSFERKIT_ZOO), as a new user has. Cells are cached in the JSON by
(target, method, seed), with the git revision they ran at: a killed run resumes, and `--remeasure` re-runs
only the methods named. Writes bench/results/peers.json and bench/results/peers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this folder heads sys.path and its select.py would shadow the stdlib's select (which
# subprocess imports): subprocess is imported in the functions, after this line.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "peers"
RESULTS = ROOT / "bench" / "results"

# (builtin, `data builtin` options): the first three are bench/transfer.py's TARGETS at 32 px
TARGETS = {
    "digits10": ("digits", dict(per_class=170, train_per_class=10, val_per_class=20, size=32)),
    "fashion10": ("fashion-mnist", dict(per_class=130, train_per_class=10, val_per_class=20, size=32)),
    "fashion100": ("fashion-mnist", dict(per_class=220, train_per_class=100, val_per_class=20, size=32)),
    "clipart10": ("clipart", dict(per_class=50, train_per_class=10, val_per_class=10, size=64)),
}
TRANSFERKIT = ("transferkit-run", "transferkit-auto", "transferkit-pretrain")
RUNS = ("transferkit-run", "transferkit-pretrain")  # methods that run the whole pipeline (a gate, an export)
# transferkit-pretrain's source per target: (builtin, `data builtin` options, pretrain --set overrides). MNIST is
# another dataset than sklearn's digits (a real shift: an MNIST classifier gets ~15% on them); at 8 px it has the
# target's resolution, and `--fit` gives it their size normalisation (test 0.949 with plain resizing, 0.957 with it:
# pretrain, then the val-better of full fine-tune and linear probe, seeds 0-2). Fashion targets have no close
# source here that is not their own dataset.
SOURCES = {
    "digits10": (
        "mnist",
        dict(per_class=500, size=8, fit=True),
        ["data.image_size=64", "train.epochs=3", "train.min_epochs=0"],
    )
}
PEERS = ("timm-loop", "fastai")
NO_TRANSFER = ("pixels", "small-cnn")
# The 20-line alternative (issue 29): frozen features of one packaged model + scikit-learn logistic regression,
# C on val. `fprobe-ARCH-SIDE`: SIDE 128 (transferkit's default side) or `own` (the model's pretrained side, as
# timm's resolve_data_config gives it: 224/224/240/260). Deterministic: one run per target serves every seed.
FPROBE_MODELS = {
    "mnv2": "mobilenetv2_100",
    "lite0": "tf_efficientnet_lite0",
    "lite1": "tf_efficientnet_lite1",
    "lite2": "tf_efficientnet_lite2",
}
FPROBE = tuple(f"fprobe-{m}-{side}" for m in FPROBE_MODELS for side in ("128", "own"))
FPROBE_C = (0.01, 0.1, 1.0, 10.0)
DETERMINISTIC = ("pixels", *FPROBE)
METHODS = (*TRANSFERKIT, *PEERS, *FPROBE, *NO_TRANSFER)
PIXEL_NAMES = ("pixels-logreg", "pixels-knn", "pixels-svm")
MODEL = "mobilenetv2_100"
SIZE = 96  # the peers' input side (transferkit chooses its own)
EPOCHS = 20
# fastai's default batch of 64 with drop_last is ONE step per epoch on 100 train images (36 never seen): 21
# steps in all, and digits-10 ended at chance (test 0.136, val 0.130). A user would lower it; 16 = 6 steps.
FASTAI_BS = 16
GOALS = {"digits10": 0.95, "fashion10": 0.75, "fashion100": 0.85}  # the issue's; clipart10: best peer + 3


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("DO_NOT_TRACK", "1")
    # one Prefect database for the bench (its migrations run once), away from the user's and other runs'
    env["PREFECT_HOME"] = str(WORK / "prefect")
    return env


def dataset(name: str) -> Path:
    """The target folder, written once by the CLI as a user would (`transferkit data builtin ...`)."""
    import subprocess

    builtin, kw = TARGETS[name]
    out = WORK / "data" / name
    if not (out / "test").is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)  # a fresh clone has no bench/.work yet
        tmp = out.with_name(name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [str(Path(sys.executable).with_name("transferkit")), "data", "builtin", builtin, "--out", str(tmp), "-q"]
        for k, v in kw.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        subprocess.run(cmd, check=True, env=_env(), cwd=WORK)
        tmp.rename(out)
    return out


# --------------------------------------------------------------------------- cells (one process each)


def _threads() -> None:
    from transferkit.models.embed import torch_threads

    torch_threads()  # the cores transferkit itself uses


def _epochs(quick: bool) -> int:
    return 2 if quick else EPOCHS


def cell_timm_loop(data: Path, seed: int, quick: bool) -> dict:
    """What a user writes in 30 lines: timm model + packaged weights, plain AdamW loop, no tricks."""
    import torch
    import torch.nn.functional as F
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    from transferkit.models.zoo import create_model

    _threads()
    torch.manual_seed(seed)
    train = ImageFolder(data / "train")
    lm = create_model(MODEL, num_classes=len(train.classes), seed=seed)
    model, cfg = lm.model, lm.data_config
    tf = transforms.Compose(
        [
            transforms.Resize((SIZE, SIZE)),
            transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.ToTensor(),
            transforms.Normalize(cfg["mean"], cfg["std"]),
        ]
    )
    train.transform = tf
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for _ in range(_epochs(quick)):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def accuracy(split: str) -> float:
        ds = ImageFolder(data / split, tf)
        model.eval()
        right = 0
        with torch.inference_mode():
            for x, y in torch.utils.data.DataLoader(ds, batch_size=128):
                right += int((model(x).argmax(1) == y).sum())
        return right / len(ds)

    return {"val_accuracy": accuracy("val"), "test_accuracy": accuracy("test"), "image_size": SIZE}


def cell_fastai(data: Path, seed: int, quick: bool) -> dict:
    """fastai's documented recipe, defaults kept; pretrained=False builds the timm body offline, then the
    packaged ImageNet weights go into it (strict) and ImageNet normalisation is added as pretrained=True would."""
    from fastai.vision.all import (
        ImageDataLoaders,
        Normalize,
        Resize,
        accuracy,
        get_image_files,
        imagenet_stats,
        set_seed,
        vision_learner,
    )

    from transferkit.models.zoo import create_model

    _threads()
    set_seed(seed, reproducible=True)
    dls = ImageDataLoaders.from_folder(
        data,
        train="train",
        valid="val",
        item_tfms=Resize(SIZE),
        batch_tfms=Normalize.from_stats(*imagenet_stats),
        seed=seed,
        num_workers=0,
        bs=FASTAI_BS,
    )
    learn = vision_learner(dls, MODEL, pretrained=False, metrics=accuracy)
    state = {k: v for k, v in create_model(MODEL).model.state_dict().items() if not k.startswith("classifier.")}
    learn.model[0].model.load_state_dict(state, strict=True)
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(_epochs(quick))
        val_acc = float(learn.validate()[1])
        test = learn.dls.test_dl(get_image_files(data / "test"), with_labels=True)
        preds, targs = learn.get_preds(dl=test)
    return {
        "val_accuracy": val_acc,
        "test_accuracy": float((preds.argmax(1) == targs).float().mean()),
        "image_size": SIZE,
        "batch_size": dls.bs,
        "train_steps_per_epoch": len(dls.train),
    }


def cell_feature_probe(data: Path, method: str) -> dict:
    """The 20-line alternative a user writes first: a packaged model's frozen penultimate features, scikit-learn
    LogisticRegression on them (standardised), C chosen on val from FPROBE_C, test read once."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    from transferkit.models.zoo import create_model

    _threads()
    _, arch, side = method.split("-")
    lm = create_model(FPROBE_MODELS[arch])  # the packaged ImageNet weights
    model, cfg = lm.model.eval(), lm.data_config
    size = int(cfg["input_size"][-1]) if side == "own" else int(side)
    tf = transforms.Compose(
        [
            transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize(cfg["mean"], cfg["std"]),
        ]
    )

    def features(split: str):
        xs, ys = [], []
        with torch.inference_mode():
            for x, y in torch.utils.data.DataLoader(ImageFolder(data / split, tf), batch_size=64):
                xs.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
                ys.append(y.numpy())
        return np.concatenate(xs), np.concatenate(ys)

    (xt, yt), (xv, yv), (xs, ys) = features("train"), features("val"), features("test")
    with threadpool_limits(1):  # BLAS threads on top of torch's stalled scikit-learn for minutes on 2 cores
        fits = [make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(xt, yt) for c in FPROBE_C]
        best = max(fits, key=lambda f: f.score(xv, yv))  # ties: the smaller C
        return {"val_accuracy": best.score(xv, yv), "test_accuracy": best.score(xs, ys), "image_size": size}


def cell_no_transfer(data: Path, seed: int, quick: bool, names: list[str]) -> dict:
    from transferkit.core.config import load_params
    from transferkit.data.folder import load_dataset
    from transferkit.models.baselines import fit_no_transfer

    over = {"seed": seed, "validate.no_transfer": names}
    if quick:
        over["validate.cnn_epochs"] = 2
    rows = fit_no_transfer(load_dataset(data), load_params(None, over), progress=False)
    out = {}
    for r in rows:
        r.pop("test_correct"), r.pop("val_correct", None)
        out[r["name"]] = {k: r[k] for k in ("val_accuracy", "test_accuracy", "hyper", "seconds", "model", "broken")}
    if len(out) == 1:
        return {**next(iter(out.values()))}
    return {"baselines": out}


def run_cell(method: str, data: Path, seed: int, quick: bool) -> dict:
    if method == "timm-loop":
        return cell_timm_loop(data, seed, quick)
    if method == "fastai":
        return cell_fastai(data, seed, quick)
    if method == "pixels":
        return cell_no_transfer(data, seed, quick, list(PIXEL_NAMES))
    if method == "small-cnn":
        return cell_no_transfer(data, seed, quick, ["small-cnn"])
    if method in FPROBE:
        return cell_feature_probe(data, method)
    raise ValueError(f"unknown in-process method {method!r}")


def transferkit_cmd(method: str, data: Path, seed: int, quick: bool) -> list[str]:
    """The CLI command a user would type for a transferkit cell (run in the cell's empty folder)."""
    tk = str(Path(sys.executable).with_name("transferkit"))
    sets = [f"seed={seed}"]
    if quick:
        sets += [
            "train.epochs=2",
            "train.min_epochs=0",
            f"select.candidates=[{MODEL}]",
            "select.confirm=0",
            "validate.no_transfer=[pixels-knn]",
            "export.int8=false",
        ]
    opts = [x for s in sets for x in ("--set", s)]
    if method in RUNS:
        return [tk, "run", "--target", str(data), "--out", "run", "--repo", "models", *opts, "-q"]
    return [tk, "train", "--target", str(data), "--model", MODEL, "--strategy", "auto", "--out", "train", *opts, "-q"]


def pretrain_cmds(target: str, seed: int, quick: bool) -> list[list[str]]:
    """transferkit-pretrain's steps before its run: write the source dataset, pretrain and register it."""
    tk = str(Path(sys.executable).with_name("transferkit"))
    builtin, kw, sets = SOURCES[target]
    data = [tk, "data", "builtin", builtin, "--out", "source", "-q"]
    for k, v in kw.items():
        flag = f"--{k.replace('_', '-')}"
        data += [flag] if v is True else [flag, str(v)]
    sets = [*sets, f"seed={seed}"] + (["train.epochs=1"] if quick else [])
    return [
        data,
        [tk, "pretrain", "--data", "source", "--model", MODEL, *(x for s in sets for x in ("--set", s)), "-q"],
    ]


def read_transferkit(method: str, folder: Path, rc: int) -> dict:
    train = folder / ("run/train" if method in RUNS else "train")
    m = json.loads((train / "metrics.json").read_text())
    out = {
        "val_accuracy": m["val_accuracy"],
        "test_accuracy": m["test_accuracy"],
        "model": m["model"],
        "strategy": m["strategy"],
        "strategy_reason": m["strategy_reason"],
        "image_size": m["image_size"],
        "epochs": m["epochs"],
        "best_epoch": m["best_epoch"],
        "train_seconds": m["seconds"],
        "exit_code": rc,
    }
    if method in RUNS:
        out["exported"] = rc == 0
        v = train / "validation.json"
        if v.is_file():
            val = json.loads(v.read_text())
            out["gate"] = {
                "passed": val["passed"],
                "reasons": val.get("reasons", []),
                "baseline": val.get("baseline"),
                "transfer_gain": val.get("transfer_gain"),
            }
            # the validate stage trains the no-transfer baselines itself (fit_no_transfer, same params and seed)
            out["run_baselines"] = {
                b["name"]: {k: b.get(k) for k in ("val_accuracy", "test_accuracy", "seconds", "broken")}
                for b in val.get("baselines", [])
                if b.get("kind") == "no-transfer" and b.get("test_accuracy") is not None
            }
        ranking = folder / "run" / "select" / "ranking.json"
        if ranking.is_file():
            out["selected"] = json.loads(ranking.read_text()).get("selected")
        timings = folder / "run" / "timings.json"  # where the run's time went (issue 29's stage breakdown)
        if timings.is_file():
            t = json.loads(timings.read_text())
            out["stage_seconds"] = {**t["stages"], **t.get("select", {}), **t.get("train", {})}
        out["search"] = m.get("search")
    return out


def measure(target: str, method: str, seed: int, quick: bool) -> dict:
    """Run one cell in a fresh process (and a fresh folder and feature cache); its wall time is the process's."""
    import subprocess

    data = dataset(target)
    folder = WORK / ("quick" if quick else "cells") / target / f"{method}-s{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = _env()
    env["TRANSFERKIT_CACHE"] = str(folder / "cache")  # nothing computed by an earlier cell is reused
    env["TRANSFERKIT_ZOO"] = str(folder / "zoo")  # no source registered by another cell (or by this machine's user)
    if method in TRANSFERKIT:
        cmd = transferkit_cmd(method, data, seed, quick)
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", method, "--target", target]
        cmd += ["--seed", str(seed), "--cell-out", str(folder / "cell.json")] + (["--quick"] if quick else [])
    steps = [*(pretrain_cmds(target, seed, quick) if method == "transferkit-pretrain" else []), cmd]
    load_before = os.getloadavg()[0]
    step_seconds = []
    with (folder / "log.txt").open("w") as log:
        for step in steps:  # stop at the first failing step
            t0 = time.perf_counter()
            p = subprocess.run(step, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
            step_seconds.append(round(time.perf_counter() - t0, 2))
            if p.returncode != 0:
                break
    wall = sum(step_seconds)
    tail = (folder / "log.txt").read_text()[-2000:]
    cell = {"target": target, "method": method, "seed": seed, "wall_seconds": round(wall, 2)}
    if len(steps) > 1:
        cell["steps"] = dict(zip(("source data", "pretrain", "run"), step_seconds))
    # 1-minute load average before and after: on a shared machine, wall times are only as good as this
    cell["load_avg"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    try:
        if method in TRANSFERKIT:
            # exit 3 = the gate refused the model: a measured outcome (the trained model has its test accuracy)
            if p.returncode not in (0, 3):
                raise RuntimeError(f"exit {p.returncode}")
            cell.update(read_transferkit(method, folder, p.returncode))
        else:
            if p.returncode != 0:
                raise RuntimeError(f"exit {p.returncode}")
            cell.update(json.loads((folder / "cell.json").read_text()))
    except (RuntimeError, OSError, KeyError, json.JSONDecodeError) as e:
        why = f"{type(e).__name__}: {e}"
        if p.returncode < 0:  # killed (a time budget ran out): not a failure of the method
            why = f"stopped by signal {-p.returncode} after {wall:.0f} s, unfinished"
        cell.update({"error": why, "log_tail": tail})
    shutil.rmtree(folder / "cache", ignore_errors=True)
    for pattern in ("*.safetensors", "*.onnx", "*.pt"):  # weights: tens of MB per cell, the JSON keeps the numbers
        for f in folder.rglob(pattern):
            f.unlink()
    cell["git_rev"] = _git_rev()
    cell["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cell["command"] = " ".join(cmd[1:]) if method in TRANSFERKIT else f"bench/peers.py --cell {method}"
    return cell


def _git_rev() -> str:
    import subprocess

    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    rev = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src", "flows")
    return rev + ("+dirty" if dirty else "")


# --------------------------------------------------------------------------- cache and report


def load(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"cells": []}


def save(path: Path, res: dict, mine: dict | None = None) -> None:
    """Write the JSON and the tables. `mine`: the cells this process measured, merged into what is on disk
    under a lock, so that two bench processes (say peers and transferkit rows at once) keep each other's cells."""
    import fcntl

    from transferkit.core.io import write_json

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if mine is not None:
            disk = load(path)
            res["cells"] = [c for c in disk["cells"] if _key(c) not in mine] + list(mine.values())
            res["notes"] = list(dict.fromkeys([*disk.get("notes", []), *res.get("notes", [])]))
        _write(path, res, write_json)


def _key(c: dict) -> tuple:
    return c["target"], c["method"], c["seed"]


def _write(path: Path, res: dict, write_json) -> None:
    res["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    res["summary"] = summarise(res["cells"])
    write_json(path, res)
    path.with_suffix(".md").write_text(markdown(res))


def _stats(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def rows_of(cells: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """{target: {row name: [cell-like dicts with test_accuracy, wall_seconds, seed]}}; pixels fan out.

    A small-cnn seed not measured by its own cell is taken from that seed's `transferkit run`, whose validate
    stage trained it (the same function, params and seed); its wall time is then the fit's seconds."""
    out: dict = {}
    own = {(c["target"], c["seed"]) for c in cells if c["method"] == "small-cnn" and "error" not in c}
    for c in cells:
        b = (c.get("run_baselines") or {}).get("small-cnn")
        if c["method"] == "transferkit-run" and b and (c["target"], c["seed"]) not in own and "error" not in c:
            row = {**b, "seed": c["seed"], "wall_seconds": b["seconds"], "from_run": True}
            out.setdefault(c["target"], {}).setdefault("small-cnn", []).append(row)
    for c in cells:
        if "error" in c:
            continue
        t = out.setdefault(c["target"], {})
        if c["method"] == "pixels":
            for name, b in c["baselines"].items():
                t.setdefault(name, []).append({**b, "seed": c["seed"], "wall_seconds": c["wall_seconds"]})
        else:
            t.setdefault(c["method"], []).append(c)
    return out


def summarise(cells: list[dict]) -> dict:
    out = {}
    for target, rows in rows_of(cells).items():
        s = {}
        for name, cs in rows.items():
            acc = _stats([c["test_accuracy"] for c in cs])
            s[name] = {
                "test_mean": round(acc[0], 4),
                "test_sd": round(acc[1], 4),
                "seeds": sorted(c["seed"] for c in cs),
                "wall_mean": round(statistics.fmean(c["wall_seconds"] for c in cs), 1),
                "git_revs": sorted({c.get("git_rev", "?") for c in cs}),
            }
            if any(c.get("from_run") for c in cs):
                s[name]["from_run"] = sum(bool(c.get("from_run")) for c in cs)
            if name in RUNS:
                s[name]["exported"] = f"{sum(bool(c.get('exported')) for c in cs)}/{len(cs)}"
                s[name]["strategies"] = sorted({f"{c['strategy']} @ {c['image_size']}px" for c in cs})
                s[name]["selected"] = sorted({c.get("selected") or "?" for c in cs})
            if any("steps" in c for c in cs):
                s[name]["steps_mean"] = {
                    k: round(statistics.fmean(c["steps"][k] for c in cs), 1) for k in cs[0]["steps"]
                }
            if name == "transferkit-auto":
                s[name]["strategies"] = sorted({f"{c['strategy']} @ {c['image_size']}px" for c in cs})
        tk = s.get("transferkit-run")
        for r in s.values():
            if tk:
                r["vs_run_points"] = round(100 * (r["test_mean"] - tk["test_mean"]), 1)
                r["wall_vs_run"] = round(r["wall_mean"] / tk["wall_mean"], 2) if tk["wall_mean"] else None
        out[target] = {"rows": s, "verdict": verdict(target, s, "transferkit-run")}
        if "transferkit-pretrain" in s:
            out[target]["verdict_pretrain"] = verdict(target, s, "transferkit-pretrain")
    return out


def verdict(target: str, s: dict, route: str) -> dict:
    """Issue 19's bar for one pipeline route (a RUNS method) against the peers and no-transfer rows."""
    tk = s.get(route)
    if not tk:
        return {}
    peers = {n: s[n] for n in PEERS if n in s}
    base = {n: s[n] for n in (*PIXEL_NAMES, "small-cnn") if n in s}
    v: dict = {"route": route}
    if peers:
        bp = max(peers, key=lambda n: peers[n]["test_mean"])
        v["best_peer"] = bp
        v["margin_vs_best_peer_points"] = round(100 * (tk["test_mean"] - peers[bp]["test_mean"]), 1)
        v["beats_best_peer_by_2"] = v["margin_vs_best_peer_points"] >= 2.0
    if base:
        bb = max(base, key=lambda n: base[n]["test_mean"])
        v["best_no_transfer"] = bb
        v["margin_vs_best_no_transfer_points"] = round(100 * (tk["test_mean"] - base[bb]["test_mean"]), 1)
    run_wall = tk.get("steps_mean", {}).get("run", tk["wall_mean"])  # the run itself (a pretrain is done once)
    if "fastai" in s:
        v["run_wall_vs_fastai"] = round(run_wall / s["fastai"]["wall_mean"], 2)
    goal = GOALS.get(target)
    if goal is None and "best_peer" in v:
        goal = round(peers[v["best_peer"]]["test_mean"] + 0.03, 4)
    if goal is not None:
        v["goal"] = goal
        v["goal_met"] = tk["test_mean"] >= goal
    v["run_within_10_minutes"] = run_wall <= 600
    probes = {n: s[n] for n in FPROBE if n in s}
    if probes:  # issue 29's bar: the best 20-line probe by test accuracy, its accuracy and 3x its wall time
        bf = max(probes, key=lambda n: (probes[n]["test_mean"], -probes[n]["wall_mean"]))
        v["best_feature_probe"] = bf
        v["margin_vs_feature_probe_points"] = round(100 * (tk["test_mean"] - probes[bf]["test_mean"]), 1)
        v["run_wall_vs_feature_probe"] = round(run_wall / probes[bf]["wall_mean"], 2)
        v["feature_probe_bar_met"] = (
            tk["test_mean"] >= probes[bf]["test_mean"] and run_wall <= 3 * probes[bf]["wall_mean"]
        )
    return v


LABELS = {
    "transferkit-run": "`transferkit run` (CLI, defaults)",
    "transferkit-pretrain": "`transferkit pretrain` (MNIST 8 px, `--fit`) + `run`",
    "transferkit-auto": "`transferkit train --strategy auto`",
    "timm-loop": "bare timm full fine-tune loop",
    "fastai": "fastai `fine_tune(20)`",
    "pixels-logreg": "raw pixels: logistic regression",
    "pixels-knn": "raw pixels: kNN",
    "pixels-svm": "raw pixels: RBF SVM",
    "small-cnn": "small CNN from scratch",
    **{
        m: f"20-line probe: {FPROBE_MODELS[m.split('-')[1]]} features "
        + ("at 128 px" if m.endswith("128") else "at its own side")
        + " + sklearn LogisticRegression"
        for m in FPROBE
    },
}


def _verdict_row(target: str, route: str, tk: dict, r: dict, v: dict, bp: str | None, bb: str | None) -> str:
    return (
        f"| {target} ({route}) | {tk['test_mean']:.3f} ± {tk['test_sd']:.3f} | "
        + (f"{bp} {r[bp]['test_mean']:.3f} | {v['margin_vs_best_peer_points']:+.1f} | " if bp else "- | - | ")
        + (f"{bb} {r[bb]['test_mean']:.3f} | {v['margin_vs_best_no_transfer_points']:+.1f} | " if bb else "- | - | ")
        + (f"{v['goal']:.3f} | {'yes' if v['goal_met'] else '**no**'} | " if "goal" in v else "- | - | ")
        + (f"{v['run_wall_vs_fastai']:.2f} |" if "run_wall_vs_fastai" in v else "- |")
    )


def markdown(res: dict) -> str:
    summ = res["summary"]
    lines = [
        "# bench/peers: transferkit vs peers and no-transfer baselines (same splits, one run)",
        "",
        "Test accuracy mean ± sd over seeds; wall = seconds of the method's own process (start-up and imports "
        "included), mean over seeds; Δ = points vs `transferkit run`; wall ratio = this row / `transferkit run`. "
        f"MobileNetV2 ImageNet (packaged) for every transfer row; peers at {SIZE} px; "
        f"machine: {res['machine']['cpus']} CPU cores (shared). Pixel baselines are deterministic: one run, "
        "listed with each seed. `bench/peers.py`'s docstring describes each method.",
        "",
        "## Verdicts (issue 19's bar)",
        "",
        "| target | transferkit | best peer | margin | best no-transfer | margin | goal | met | run wall / fastai's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for target, e in summ.items():
        for key in ("verdict", "verdict_pretrain"):
            r, v = e["rows"], e.get(key) or {}
            if not v:
                continue
            tk = r[v["route"]]
            bp, bb = v.get("best_peer"), v.get("best_no_transfer")
            route = "`run`" if v["route"] == "transferkit-run" else "`pretrain` + `run`"
            lines.append(_verdict_row(target, route, tk, r, v, bp, bb))
    lines += [
        "",
        "## Against the 20-line alternative (issue 29's bar)",
        "",
        "The best of the 8 frozen-feature + scikit-learn logistic-regression probes by test accuracy (chosen with "
        "hindsight: a user would have to pick one), against `transferkit run` with defaults: accuracy at least "
        "the probe's and wall time at most 3x its.",
        "",
        "| target | `run` test | best 20-line probe | its test | margin (points) | `run` wall s | probe wall s | ratio | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for target, e in summ.items():
        v, r = e.get("verdict") or {}, e["rows"]
        if "best_feature_probe" not in v:
            continue
        tk, bf = r[v["route"]], r[v["best_feature_probe"]]
        lines.append(
            f"| {target} | {tk['test_mean']:.3f} ± {tk['test_sd']:.3f} | {LABELS[v['best_feature_probe']]} | "
            f"{bf['test_mean']:.3f} | {v['margin_vs_feature_probe_points']:+.1f} | {tk['wall_mean']:.0f} | "
            f"{bf['wall_mean']:.0f} | {v['run_wall_vs_feature_probe']:.2f} | "
            f"{'yes' if v['feature_probe_bar_met'] else '**no**'} |"
        )
    stage_rows = []
    for target in summ:
        cs = [
            c
            for c in res["cells"]
            if c["target"] == target and c["method"] == "transferkit-run" and "stage_seconds" in c
        ]
        if cs:
            keys = [k for k in cs[0]["stage_seconds"] if not k.startswith(("select ", "train "))]
            mean = {k: statistics.fmean(c["stage_seconds"].get(k, 0.0) for c in cs) for k in keys}
            wall = statistics.fmean(c["wall_seconds"] for c in cs)
            startup = wall - sum(mean.values())
            parts = ", ".join(f"{k} {v:.0f}" for k, v in mean.items())
            stage_rows.append(f"| {target} | {wall:.0f} | {startup:.0f} | {parts} | {len(cs)} |")
    if stage_rows:
        lines += [
            "",
            "## Where `transferkit run`'s time goes (seconds, mean over seeds; timings.json of each run)",
            "",
            "| target | wall | start-up, imports, Prefect server | stages | seeds |",
            "|---|---|---|---|---|",
            *stage_rows,
        ]
    for target, e in summ.items():
        lines += [
            "",
            f"## {target}",
            "",
            "| method | test accuracy | seeds | Δ vs run (points) | wall s | wall ratio | notes |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in [n for n in LABELS if n in e["rows"]]:
            r = e["rows"][name]
            note = ", ".join(r.get("strategies", []))
            if "exported" in r:
                note += f"; exported {r['exported']}; selected {', '.join(r.get('selected', []))}"
            if "steps_mean" in r:
                note += "; wall s " + ", ".join(f"{k} {v:.0f}" for k, v in r["steps_mean"].items())
            if name in PIXEL_NAMES:
                note += "wall: one process fits all three pixel baselines"
            if name == "fastai":
                note += f"batch {FASTAI_BS} (its default 64 is 1 step an epoch on 100 images: chance on digits-10)"
            if r.get("from_run"):
                note += f"{r['from_run']} seed(s) from the run's validate stage (wall = fit seconds)"
            d = f"{r['vs_run_points']:+.1f}" if "vs_run_points" in r else "-"
            w = f"{r['wall_vs_run']:.2f}" if r.get("wall_vs_run") is not None else "-"
            lines.append(
                f"| {LABELS[name]} | {r['test_mean']:.3f} ± {r['test_sd']:.3f} | {len(r['seeds'])} | {d} | "
                f"{r['wall_mean']:.0f} | {w} | {note} |"
            )
    errors = [c for c in res["cells"] if "error" in c]
    lines += ["", "## What ran", ""]
    for target in TARGETS:
        tc = [c for c in res["cells"] if c["target"] == target and "error" not in c]
        if not tc:
            lines.append(f"- {target}: not run")
            continue
        per = {}
        for c in tc:
            per.setdefault(c["method"], []).append(c["seed"])
        derived = [r["seed"] for r in rows_of(res["cells"]).get(target, {}).get("small-cnn", []) if r.get("from_run")]
        if derived:
            per["small-cnn (from the run's validate stage)"] = derived
        missing = [
            m
            for m in METHODS
            if m not in per
            and not (m == "small-cnn" and derived)
            and (m != "transferkit-pretrain" or target in SOURCES)
        ]
        lines.append(
            f"- {target}: "
            + "; ".join(f"{m} seeds {','.join(map(str, sorted(s)))}" for m, s in per.items())
            + (f"; not run: {', '.join(missing)}" if missing else "")
        )
    for c in errors:
        lines.append(f"- failed: {c['target']} {c['method']} seed {c['seed']}: {c['error']}")
    lines += [f"- {n}" for n in res.get("notes", [])]
    revs = sorted({c.get("git_rev", "?") for c in res["cells"]})
    lines += ["", f"Cells measured at git revisions: {', '.join(revs)} (per row in peers.json)."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quick", action="store_true", help="smoke run: seed 0, 2 epochs, bench/.work/peers/quick.json")
    ap.add_argument("--remeasure", action="store_true", help="re-run the named methods' cells even if cached")
    ap.add_argument("--report", action="store_true", help="only rewrite the tables from the JSON")
    ap.add_argument("--note", action="append", default=[], help="a line for 'What ran' (kept in the JSON)")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cell-out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cell:  # child process: one in-process method on one target and seed
        from transferkit.core.io import write_json

        write_json(a.cell_out, run_cell(a.cell, WORK / "data" / a.target, a.seed, a.quick))
        return
    targets = [t for t in a.targets.split(",") if t]
    methods = [m for m in a.methods.split(",") if m]
    for name, known in (("target", TARGETS), ("method", METHODS)):
        bad = [x for x in (targets if name == "target" else methods) if x not in known]
        if bad:
            ap.error(f"unknown {name}(s) {', '.join(bad)}; choose from {', '.join(known)}")
    seeds = [0] if a.quick else [int(s) for s in a.seeds.split(",")]
    path = WORK / "quick.json" if a.quick else RESULTS / "peers.json"
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    res = load(path)
    res["notes"] = res.get("notes", []) + a.note
    mine: dict = {}
    if not a.report:
        for target in targets:
            for seed in seeds:
                for method in methods:
                    if method == "transferkit-pretrain" and target not in SOURCES:
                        continue  # no close-domain source for this target
                    s = 0 if method in DETERMINISTIC else seed  # deterministic: one run serves every seed
                    key = (target, method, s)
                    if key in mine:
                        continue
                    old = [c for c in load(path)["cells"] if _key(c) == key]
                    if old and "error" not in old[0] and not a.remeasure:
                        continue
                    cell = measure(target, method, s, a.quick)
                    mine[key] = cell
                    save(path, res, mine)
                    msg = cell.get("error") or f"test {cell.get('test_accuracy', float('nan')):.3f}"
                    if method == "pixels" and "baselines" in cell:
                        msg = " ".join(f"{n} {b['test_accuracy']:.3f}" for n, b in cell["baselines"].items())
                    print(f"{target:10s} {method:16s} seed {s}: {msg} ({cell['wall_seconds']:.0f} s)", flush=True)
    save(path, res, mine)
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
