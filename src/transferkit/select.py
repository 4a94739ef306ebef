"""Source-model selection: rank candidates from one forward pass each, no fine-tuning.

    transferkit select --target data/target --out runs/demo/select

Scores (higher is better), computed on cached penultimate features of the labelled target images
(train + val; test is never looked at):
  logme  LogME, You et al. ICML 2021: mean over classes of the per-sample log marginal evidence of a
         Bayesian linear regression from features to the one-hot label, alpha/beta by fixed point.
  leep   LEEP, Nguyen et al. ICML 2020: log expected empirical prediction through the source head
         (only for candidates that keep a source classifier: the ImageNet models).
  knn    leave-one-out k-NN accuracy (cosine) on the same features: the sanity baseline.
`scratch:` candidates take part as a control; the selected model is the best-scoring pretrained one,
and a warning is written when the control scores higher than every pretrained candidate.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from transferkit.config import Params


def logme(features: np.ndarray, labels: np.ndarray, max_iter: int = 11, tol: float = 1e-2) -> float:
    """LogME evidence per sample, averaged over classes (one thin SVD of the features).

    Same fixed point as the paper's reference code, written for the thin SVD so that N << D is cheap:
    the D - k directions with zero singular value contribute -(D - k)/2 log(alpha) to the evidence.
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    n, d = f.shape
    _, sigma, vt = np.linalg.svd(f, full_matrices=False)  # vt: [k, D]
    s = sigma**2
    k = s.shape[0]
    evidences = []
    for c in np.unique(y):
        t = (y == c).astype(np.float64)
        proj = vt @ (f.T @ t)  # [k]
        alpha, beta = 1.0, 1.0
        lam = alpha / beta
        for _ in range(max_iter):
            gamma = float((s / (s + lam)).sum())
            m = vt.T @ (proj * beta / (alpha + beta * s))  # posterior mean of the weights
            alpha_de = float(m @ m)
            alpha = gamma / (alpha_de + 1e-12)
            beta_de = float(((t - f @ m) ** 2).sum())
            beta = (n - gamma) / (beta_de + 1e-12)
            new_lam = alpha / beta
            done = abs(new_lam - lam) / lam < tol
            lam = new_lam
            if done:
                break
        evidence = (
            d / 2.0 * np.log(alpha)
            + n / 2.0 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * s))
            - 0.5 * (d - k) * np.log(alpha)
            - beta / 2.0 * beta_de
            - alpha / 2.0 * alpha_de
            - n / 2.0 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def leep(source_logits: np.ndarray, labels: np.ndarray) -> float:
    """LEEP: mean log of the expected empirical prediction P(y|x) = sum_z P(y|z) theta_z(x)."""
    z = source_logits - source_logits.max(axis=1, keepdims=True)
    theta = np.exp(z)
    theta /= theta.sum(axis=1, keepdims=True)  # [N, Z] source softmax
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


def score_candidate(spec: str, samples, data_md5: str, params: Params, progress: bool = True) -> dict:
    from transferkit.embed import compute_embeddings

    t0 = time.perf_counter()
    emb = compute_embeddings(
        spec, samples, data_md5, image_size=params.data.image_size, batch_size=params.data.batch_size,
        progress=progress,
    )  # fmt: skip
    f, y = emb["features"], emb["labels"]
    row = {
        "model": spec,
        "logme": logme(f, y),
        "knn": knn_accuracy(f, y),
        "leep": leep(emb["logits"], y) if "logits" in emb else None,
        "feature_dim": int(f.shape[1]),
        "control": spec.startswith("scratch:"),
    }
    row["score"] = row[params.select.metric]
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def run_select(
    target: Path, out: Path, params: Params, candidates: list[str] | None = None, progress: bool = True
) -> dict:
    """Score every candidate on the target's labelled images and write ranking.json (best first)."""
    from transferkit import zoo
    from transferkit.data import DataError, load_dataset
    from transferkit.io import write_json

    ds = load_dataset(target, seed=params.seed, val_fraction=params.data.val_fraction,
                      test_fraction=params.data.test_fraction)  # fmt: skip
    samples = ds.splits["train"] + ds.splits["val"]
    cands = candidates or params.select.candidates
    if not cands:
        raise DataError("select: no candidate models given")
    rows, unavailable = [], []
    for spec in cands:
        ok, detail = zoo.availability(spec)
        if not ok:
            unavailable.append({"model": spec, "reason": detail})
            continue
        rows.append(score_candidate(spec, samples, ds.md5, params, progress=progress))
    if not rows:
        raise zoo.ZooError(f"select: none of the candidates can be loaded here: {unavailable}")
    rows.sort(key=lambda r: r["score"], reverse=True)
    pretrained = [r for r in rows if not r["control"]]
    selected = (pretrained or rows)[0]["model"]
    result = {
        "metric": params.select.metric,
        "selected": selected,
        "candidates": rows,
        "unavailable": unavailable,
        "n_images": len(samples),
        "data_md5": ds.md5,
        "target": str(target),
        "warning": None,
    }
    controls = [r for r in rows if r["control"]]
    if pretrained and controls and controls[0]["score"] > pretrained[0]["score"]:
        result["warning"] = (
            f"the random-init control {controls[0]['model']} scores higher than every pretrained candidate: "
            "the source features may not transfer to this task (task mismatch?)"
        )
    out = Path(out)
    write_json(out / "ranking.json", result)
    return result
