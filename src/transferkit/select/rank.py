"""Source-model selection: rank candidates from one forward pass each, then (optionally) confirm the top K.

    transferkit select --target data/target --out runs/demo/select [--confirm 2] [--runner thread|dask]

Scores (higher is better), computed on cached penultimate features of the labelled target images
(train + val; test is never looked at):
  logme  LogME, You et al. ICML 2021: mean over classes of the per-sample log marginal evidence of a
         Bayesian linear regression from features to the one-hot label, alpha/beta by fixed point.
  leep   LEEP, Nguyen et al. ICML 2020: log expected empirical prediction through the source head
         (only for candidates that keep a source classifier: ImageNet and `zoo:` models).
  knn    leave-one-out k-NN accuracy (cosine) on the same features: the sanity baseline.
  probe  3-fold cross-validated accuracy of a logistic-regression probe on the same features.
Two controls take part and are never selected: `scratch:ARCH` (random-init features) and `pixels` (the raw
pixels themselves, as the no-transfer baselines of `validate` see them). When a control scores higher than
every pretrained candidate, ranking.json says so before any training: no source model beats no transfer.
`select.confirm` K > 0 trains the top K as the train stage starts (by default its linear probe, fitted on the
features cached here) and selects by validation accuracy: no score ranked candidates reliably enough in
bench/results/select.md to trust it alone.

Pipeline: prepare (data + candidates) -> score_candidate per model -> finish (rank, confirm, write);
run_select does it in-process, flows/select.py maps the scoring over a Prefect task runner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.core.config import Params
from transferkit.core.numeric import softmax


def logme_evidence(features: np.ndarray, target: np.ndarray, alpha: float, beta: float) -> float:
    """Log marginal evidence log p(t | F, alpha, beta) of Bayesian linear regression, per sample.

    t = F w + e with w ~ N(0, I/alpha), e ~ N(0, I/beta); evaluated on one thin SVD of F. The D - k
    directions with zero singular value contribute -(D - k)/2 log(alpha) + D/2 log(alpha) = k/2 log(alpha).
    """
    f = np.asarray(features, dtype=np.float64)
    _, sigma, vt = np.linalg.svd(f, full_matrices=False)
    return _evidence(f, np.asarray(target, dtype=np.float64), sigma**2, vt, alpha, beta)[0] / f.shape[0]


def _evidence(f, t, s, vt, alpha: float, beta: float) -> tuple[float, float, float, float]:
    """(evidence, gamma, |m|^2, |t - F m|^2) at (alpha, beta); m = posterior mean of the weights."""
    n, d = f.shape
    k = s.shape[0]
    m = vt.T @ ((vt @ (f.T @ t)) * beta / (alpha + beta * s))
    alpha_de = float(m @ m)
    beta_de = float(((t - f @ m) ** 2).sum())
    gamma = float((beta * s / (alpha + beta * s)).sum())  # effective number of well-determined weights
    evidence = (
        d / 2.0 * np.log(alpha)
        + n / 2.0 * np.log(beta)
        - 0.5 * np.sum(np.log(alpha + beta * s))
        - 0.5 * (d - k) * np.log(alpha)  # log|A| over the null space of F
        - beta / 2.0 * beta_de
        - alpha / 2.0 * alpha_de
        - n / 2.0 * np.log(2 * np.pi)
    )
    return float(evidence), gamma, alpha_de, beta_de


def logme_fixed_point(
    features: np.ndarray, target: np.ndarray, max_iter: int = 11, tol: float = 1e-2
) -> tuple[float, float]:
    """MacKay's fixed point for (alpha, beta), as in You et al. 2021 Alg. 1: alpha = gamma/|m|^2,
    beta = (n - gamma)/|t - F m|^2, i.e. the stationarity conditions of the evidence."""
    f = np.asarray(features, dtype=np.float64)
    _, sigma, vt = np.linalg.svd(f, full_matrices=False)
    return _fixed_point(f, np.asarray(target, dtype=np.float64), sigma**2, vt, max_iter, tol)


def _fixed_point(f, t, s, vt, max_iter: int, tol: float) -> tuple[float, float]:
    n = f.shape[0]
    alpha, beta = 1.0, 1.0
    for _ in range(max_iter):
        _, gamma, alpha_de, beta_de = _evidence(f, t, s, vt, alpha, beta)
        new_alpha = gamma / (alpha_de + 1e-12)
        new_beta = (n - gamma) / (beta_de + 1e-12)
        done = abs(new_alpha / new_beta - alpha / beta) <= tol * (alpha / beta)
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return alpha, beta


def logme(features: np.ndarray, labels: np.ndarray, max_iter: int = 11, tol: float = 1e-2) -> float:
    """LogME (You et al., ICML 2021): per class, the one-vs-rest target's log evidence per sample at
    the fixed-point (alpha, beta), averaged over classes. One thin SVD of the features serves every
    class and iteration, so N << D (few labels, wide features) is cheap. Higher = more transferable.
    Defaults follow the paper's code (at most 11 updates, stop when alpha/beta moves < 1%); unlike it,
    the evidence is evaluated with the posterior mean of the final (alpha, beta), not the previous one.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    _, sigma, vt = np.linalg.svd(f, full_matrices=False)  # vt: [k, D], k = min(N, D)
    s = sigma**2
    evidences = []
    for c in np.unique(y):
        t = (y == c).astype(np.float64)
        alpha, beta = _fixed_point(f, t, s, vt, max_iter, tol)
        evidences.append(_evidence(f, t, s, vt, alpha, beta)[0] / f.shape[0])
    return float(np.mean(evidences))


def leep(source_logits: np.ndarray, labels: np.ndarray) -> float:
    """LEEP: mean log of the expected empirical prediction P(y|x) = sum_z P(y|z) theta_z(x)."""
    theta = softmax(source_logits)  # [N, Z] source softmax, float64
    y = np.asarray(labels)
    classes = np.unique(y)
    onehot = (y[:, None] == classes[None, :]).astype(np.float64)  # [N, Y]
    joint = theta.T @ onehot / len(y)  # [Z, Y] empirical joint P(z, y)
    cond = joint / np.clip(joint.sum(axis=1, keepdims=True), 1e-12, None)  # P(y | z)
    p = (theta @ cond)[np.arange(len(y)), np.searchsorted(classes, y)]
    return float(np.mean(np.log(np.clip(p, 1e-12, None))))


def knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy with cosine similarity (majority vote, ties to the nearest)."""
    f = features / np.clip(np.linalg.norm(features, axis=1, keepdims=True), 1e-12, None)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    k = max(1, min(k, len(labels) - 1))
    nn = np.argsort(-sim, axis=1)[:, :k]
    votes = labels[nn]
    correct = 0
    for i in range(len(labels)):
        vals, counts = np.unique(votes[i], return_counts=True)
        best = vals[counts == counts.max()]
        pred = best[0] if len(best) == 1 else next(v for v in votes[i] if v in best)
        correct += int(pred == labels[i])
    return correct / len(labels)


def cv_logreg_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 3, seed: int = 0) -> float:
    """select's `probe` score: stratified k-fold accuracy of a standardised multinomial logistic regression at a
    fixed C. It is a ranking score, not the probe train ships (transferkit.train.probe.fit_probe picks C on the
    val split and may self-train): a score must be cheap for every candidate and use the labelled images alone."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = max(2, min(folds, int(np.bincount(np.unique(labels, return_inverse=True)[1]).min())))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=300))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(clf, features, labels, cv=cv).mean())


SCORES = ("logme", "leep", "knn", "probe")
PIXELS = "pixels"  # the raw-pixel control: no model at all


def _features(spec: str, samples, data_md5: str, params: Params, progress: bool) -> dict[str, np.ndarray]:
    """Penultimate features of a model (embedding cache), or the raw pixels for the `pixels` control."""
    if spec == PIXELS:
        from transferkit.models.baselines import pixel_arrays

        x, _, _ = pixel_arrays({"train": samples}, params.validate.pixel_size)
        return {"features": x["train"].reshape(len(samples), -1), "labels": np.array([y for _, y in samples])}
    from transferkit.models.embed import embeddings

    return embeddings(spec, samples, data_md5, params.data, progress)


def score_candidate(spec: str, samples, data_md5: str, params: Params, progress: bool = True) -> dict:
    """One candidate's scores on cached features: a forward pass per image (cached), no training.

    `seconds` is the whole cost (embedding + every score); `timings` splits it.
    """
    t0 = time.perf_counter()
    emb = _features(spec, samples, data_md5, params, progress)
    timings = {"embed": time.perf_counter() - t0}
    f, y = emb["features"], emb["labels"]
    row: dict = {"model": spec}
    fns = {
        "logme": lambda: logme(f, y),
        "leep": lambda: leep(emb["logits"], y) if "logits" in emb else None,  # needs a source head
        "knn": lambda: knn_accuracy(f, y, k=params.select.knn_k),
        "probe": lambda: cv_logreg_accuracy(f, y, seed=params.seed),
    }
    from transferkit.core.numeric import one_blas_thread

    for name in SCORES:
        if name == "probe" and not params.select.probe and params.select.metric != "probe":
            row[name] = None  # switched off (select.probe=false)
            continue
        t = time.perf_counter()
        with one_blas_thread():
            row[name] = fns[name]()
        timings[name] = time.perf_counter() - t
    row["feature_dim"] = int(f.shape[1])
    row["control"] = spec.startswith("scratch:") or spec == PIXELS
    row["score"] = row[params.select.metric]
    row["seconds"] = round(time.perf_counter() - t0, 3)
    row["timings"] = {k: round(v, 4) for k, v in timings.items()}
    return row


ZOO_ALL = "zoo:*"  # every source `transferkit pretrain` registered, in name order


def expand_candidates(specs: list[str]) -> list[str]:
    """`zoo:*` becomes one `zoo:NAME` per registered source (none registered: nothing); the rest stay."""
    from transferkit.models import registry

    out: list[str] = []
    for spec in specs:
        out += [f"zoo:{n}" for n in registry.registered_names()] if spec.strip() == ZOO_ALL else [spec]
    return out


@dataclass
class Plan:
    """What a select run scores: the target's labelled images and the candidates that can load here."""

    target: str
    samples: list[tuple[Path, int]]
    data_md5: str
    available: list[str]
    unavailable: list[dict]


def prepare(target: Path, params: Params, candidates: list[str] | None = None) -> Plan:
    """Read the target (train + val; test is never looked at) and sort candidates into loadable or not.

    A spec that names nothing (a typo, an unknown architecture, a missing file or zoo entry) is an
    error; a real model whose weights are not on this machine (hub-only) is recorded as unavailable.
    """
    from transferkit.data.folder import DataError, load_with_params
    from transferkit.models import catalog, registry, zoo

    cands = list(dict.fromkeys(expand_candidates(candidates or params.select.candidates)))  # order kept, no repeats
    if not cands:
        raise DataError("select: no candidate models given")
    available, unavailable = [], []
    for spec in cands:
        if spec == PIXELS:
            available.append(spec)
            continue
        zoo.parse_spec(spec)  # raises ZooError naming the spec
        ok, detail = catalog.availability(spec)
        (available.append(spec) if ok else unavailable.append({"model": spec, "reason": detail}))
    if not available:
        reasons = "; ".join(f"{u['model']}: {u['reason']}" for u in unavailable)
        raise registry.ZooError(f"select: none of the candidates can be loaded here ({reasons})")
    ds = load_with_params(target, params)
    samples = ds.splits["train"] + ds.splits["val"]
    return Plan(str(target), samples, ds.md5, available, unavailable)


def rank(rows: list[dict], plan: Plan, metric: str) -> dict:
    """The ranking document (pure): candidates best first, the selected model, a control warning.

    The `scratch:` control never gets selected; candidates without the metric (LEEP without a source
    head) rank last. Shared by the sequential path and the Prefect flow (flows/select.py).
    """
    rows = sorted(rows, key=lambda r: (r["score"] is None, -(r["score"] or 0.0)))
    pretrained = [r for r in rows if not r["control"] and r["score"] is not None]
    selected = (pretrained or rows)[0]["model"]
    result = {
        "metric": metric,
        "selected": selected,
        "selected_by": metric,
        "candidates": rows,
        "unavailable": plan.unavailable,
        "n_images": len(plan.samples),
        "data_md5": plan.data_md5,
        "target": plan.target,
        "scoring_seconds": round(sum(r["seconds"] for r in rows), 3),
        "warning": None,
    }
    controls = [r for r in rows if r["control"] and r["score"] is not None]
    if pretrained and controls and controls[0]["score"] > pretrained[0]["score"]:
        what = (
            "raw pixels (no model at all)"
            if controls[0]["model"] == PIXELS
            else f"the random-init control {controls[0]['model']}"
        )
        result["warning"] = (
            f"{what} score higher than every pretrained candidate ({metric} {controls[0]['score']:.3f} vs "
            f"{pretrained[0]['score']:.3f} for {pretrained[0]['model']}): no source model beats no transfer before "
            "training; expect validate to refuse negative transfer (domain shift or task mismatch?)"
        )
    pix = next((r for r in rows if r["model"] == PIXELS and r["score"] is not None), None)
    result["beats_pixels"] = None if pix is None or not pretrained else bool(pretrained[0]["score"] > pix["score"])
    return result


def confirm_strategy(target: Path, params: Params) -> str:
    """How confirm trains its candidates: `select.confirm_strategy`, where `auto` = train.search's first
    (cheapest) configuration when the train stage searches (auto, search_mode evidence or all), else what train's rule
    ships for these labels."""
    from transferkit.data.folder import load_with_params
    from transferkit.train.strategy import choose_strategy

    strategy = params.select.confirm_strategy
    if strategy != "auto":
        return strategy
    if params.train.strategy == "auto" and params.train.search_mode != "rule":
        # fashion-100's 3-epoch fine-tune confirms took 4 of its run's 15 minutes, then the search shipped a
        # linear probe: under a search, compare where it starts
        return params.train.search[0]
    ds = load_with_params(target, params)
    return choose_strategy(params, ds.min_per_class("train"), None)[0]


def confirm_top(result: dict, target: Path, out: Path, params: Params, k: int, progress: bool = True) -> dict:
    """Train the top `k` pretrained candidates as train would start and select the best by validation accuracy.

    A linear probe (the default: train's search starts there) is fitted here, on the features select already
    cached, exactly as train fits it (transferkit.train.probe, C on val): a second or so per candidate. Any other
    `confirm_strategy` is a brief normal train run in OUT/confirm/<model>/. Ties go to the lower validation
    loss at the best epoch, then to the better score. Test accuracy is never used to choose.
    """
    t0 = time.perf_counter()
    top = [r["model"] for r in result["candidates"] if not r["control"]][:k]
    strategy = confirm_strategy(target, params)
    if strategy == "linear-probe" and params.train.probe == "lbfgs" and params.train.adabn == "off":
        runs, epochs = _confirm_probes(top, target, params, progress), 1
    else:
        runs, epochs = _confirm_runs(top, target, out, params, strategy, progress)
    best = max(runs, key=lambda r: (r["val_accuracy"], -(r["val_loss"] or 0.0), -r["score_rank"]))
    return {
        **result,
        "selected": best["model"],
        "selected_by": "confirm",
        "confirm": {
            "k": k,
            "strategy": strategy,
            "epochs": epochs,
            "selected": best["model"],
            "score_selected": result["selected"],
            "runs": runs,
            "seconds": round(time.perf_counter() - t0, 2),
        },
    }


def _confirm_probes(top: list[str], target: Path, params: Params, progress: bool) -> list[dict]:
    """The L-BFGS probe of each candidate on its cached train/val features (train's linear probe, same grid)."""
    from transferkit.data.folder import load_with_params
    from transferkit.models.embed import embeddings
    from transferkit.train.probe import fit_probe

    ds = load_with_params(target, params)
    runs = []
    for order, spec in enumerate(top):
        t0 = time.perf_counter()
        tr, va = (embeddings(spec, ds.splits[s], ds.md5, params.data, progress) for s in ("train", "val"))
        fit = fit_probe(
            (tr["features"], tr["labels"]), (va["features"], va["labels"]), len(ds.classes), params.train.probe_c
        )
        row = next(g for g in fit.grid if g["C"] == fit.C)
        runs.append(
            {
                "model": spec,
                "strategy": "linear-probe",
                "val_accuracy": row["val_accuracy"],
                "val_loss": row["val_loss"],
                "train_accuracy": row["train_accuracy"],
                "epochs": 1,
                "C": fit.C,
                "seconds": round(time.perf_counter() - t0, 3),
                "run": None,
                "score_rank": order + 1,
            }
        )
    return runs


def _confirm_runs(top: list[str], target: Path, out: Path, params: Params, strategy: str, progress: bool):
    """Brief train runs of `strategy` (select.confirm_epochs for fine-tunes), one folder per candidate."""
    from transferkit.modelrepo.repository import sanitize_name
    from transferkit.train.stage import run_train

    p = params.model_copy(deep=True)
    if strategy != "linear-probe":
        p.train.epochs = params.select.confirm_epochs
        p.train.min_epochs = min(p.train.min_epochs, p.train.epochs)
    runs = []
    for order, spec in enumerate(top):
        folder = Path(out) / "confirm" / sanitize_name(spec, lower=False, default="source")
        m = run_train(Path(target), folder, p, spec, strategy=strategy, progress=progress, baselines=False)
        best = m["history"][m["best_epoch"] - 1] if m["history"] and m["best_epoch"] else {}
        runs.append(
            {
                "model": spec,
                "strategy": m["strategy"],
                "val_accuracy": m["val_accuracy"],
                "val_loss": best.get("val_loss"),
                "train_accuracy": m["train_accuracy"],
                "epochs": m["epochs"],
                "seconds": m["seconds"],
                "run": str(folder),
                "score_rank": order + 1,
            }
        )
    return runs, p.train.epochs


def ensemble_spec(rows: list[dict], k: int) -> str | None:
    """The top `k` scored pretrained candidates as one feature ensemble spec (None: k < 2 or fewer than two)."""
    ranked = [r for r in rows if not r["control"] and r["score"] is not None and "+" not in r["model"]]
    ranked.sort(key=lambda r: -r["score"])
    return "+".join(r["model"] for r in ranked[:k]) if k >= 2 and len(ranked) >= 2 else None


def _score_ensemble(spec: str, plan: Plan, params: Params, progress: bool) -> list[dict]:
    """[its row], scored like any candidate from its members' cached features; members that cannot share
    one input make it unavailable (recorded in the plan), never a failed select."""
    from transferkit.models.registry import ZooError

    try:
        return [score_candidate(spec, plan.samples, plan.data_md5, params, progress=progress)]
    except ZooError as e:
        plan.unavailable.append({"model": spec, "reason": str(e)})
        return []


def finish(
    rows: list[dict], plan: Plan, out: Path, params: Params, confirm: int | None = None, progress: bool = True
) -> dict:
    """Rank, optionally confirm by brief fine-tuning, and write OUT/ranking.json (atomically)."""
    from transferkit.core.config import dump_params
    from transferkit.core.io import write_json

    spec = ensemble_spec(rows, params.select.ensemble)
    if spec:
        rows = [*rows, *_score_ensemble(spec, plan, params, progress)]
    result = rank(rows, plan, params.select.metric)
    k = params.select.confirm if confirm is None else confirm
    n_pretrained = sum(not r["control"] for r in rows)
    if k > 0 and n_pretrained >= 2:  # with one pretrained candidate there is nothing to confirm
        result = confirm_top(result, Path(plan.target), out, params, k, progress=progress)
    dump_params(params, Path(out) / "params.yaml")
    write_json(Path(out) / "ranking.json", result)
    return result


def run_select(
    target: Path,
    out: Path,
    params: Params,
    candidates: list[str] | None = None,
    progress: bool = True,
    confirm: int | None = None,
) -> dict:
    """Score every candidate on the target's labelled images and write ranking.json.

    `confirm` (default `select.confirm`) fine-tunes the top K briefly and picks the best validated one.
    This is the sequential path, in this process; `select.runner` thread/dask is chosen by the orchestration
    layer (flows/select.py `run_select_flow`), which calls this function for `sequential`.
    """
    plan = prepare(Path(target), params, candidates)
    rows = [score_candidate(spec, plan.samples, plan.data_md5, params, progress=progress) for spec in plan.available]
    return finish(rows, plan, Path(out), params, confirm, progress=progress)
