"""The linear probe solved to its optimum, and self-training on the target's unlabelled images.

    from transferkit.train.probe import fit_probe
    fit = fit_probe(features, labels, grid=[0.01, 0.1, 1.0], pool=unlabelled_features)

A linear head on frozen features is a convex problem: multinomial logistic regression (L-BFGS, scikit-learn)
on features standardised with the train split's mean and std (each std floored at the median feature's),
its L2 strength C picked on validation
(accuracy, ties to the lower val loss). This is the probe of the literature (CLIP's, Kornblith et al. 2019)
and it beats an SGD head stopped early: on the same cached features the epoch-wise AdamW head scored lower,
as validation loss stopped it after one or two epochs (docs/stages.md, Training strategies).

Self-training (curriculum labelling, Cascante-Bonilla et al. 2021): the fitted probe labels the pool; each
round keeps, per predicted class, the most confident `fraction` of the pool's share of that class, and
refits from scratch on labelled + pseudo-labelled features with the same C (the pseudo-labels of a round
come from the previous round's model). The round with the best validation accuracy ships (round 0 is the
plain probe, so self-training is kept only when validation says it helps). Test images are never read.
Measured it is within noise of the plain probe (docs/stages.md), so `train.self_training` is off by default.

The returned weights act on raw features (the standardisation is folded in), so the head exports as one
nn.Linear.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CURRICULUM = (0.2, 0.4, 0.6, 0.8, 1.0)  # share of the pool pseudo-labelled per round


@dataclass
class ProbeFit:
    """A fitted probe: logits = features @ weight.T + bias, on raw (unstandardised) features."""

    weight: np.ndarray  # [classes, features]
    bias: np.ndarray  # [classes]
    C: float
    grid: list[dict]  # per C: train/val accuracy and loss
    rounds: list[dict] = field(default_factory=list)  # self-training: per round, pseudo-labels and val
    kept_round: int = 0
    class_weight: dict | None = (
        None  # {class: loss weight} when the fit was class-weighted (transferkit.core.imbalance)
    )

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.weight.T + self.bias


def _scores(fit: ProbeFit, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy in nats) of `fit` on (x, y); a class-weighted fit is scored with every class
    of y weighing the same (balanced accuracy, class-averaged loss): C is then chosen for the minority too."""
    from transferkit.core.numeric import softmax

    p = softmax(fit.logits(x))
    nll = -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))
    if fit.class_weight is None or not len(y):
        return float(np.mean(p.argmax(1) == y)), float(np.mean(nll))
    from transferkit.core.imbalance import balanced_accuracy

    w = 1.0 / np.bincount(y)[y]  # each class's images weigh 1 in all
    return balanced_accuracy(p.argmax(1) == y, y), float(np.sum(w * nll) / w.sum())


def _solve(
    x: np.ndarray, y: np.ndarray, C: float, n_classes: int, mean, std, warm=None, class_weight=None
) -> tuple[ProbeFit, object]:
    """Logistic regression at C on standardised x; the weights mapped back to raw features, and the solver.

    `warm`: a LogisticRegression already fitted on the same x at another C, refitted from its solution (the
    optimum is the same, convex problem; L-BFGS gets there in fewer steps). `class_weight`: {class: weight}."""
    from sklearn.linear_model import LogisticRegression

    clf = (
        warm
        if warm is not None
        else LogisticRegression(max_iter=2000, tol=1e-6, warm_start=True, class_weight=class_weight)
    )
    clf.set_params(C=C)
    clf.fit((x - mean) / std, y)
    coef, icpt = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2:  # binary: scikit-learn keeps one row; the softmax equivalent is +-row/2
        coef, icpt = np.stack([-coef[0], coef[0]]) / 2, np.array([-icpt[0], icpt[0]]) / 2
    w = np.zeros((n_classes, x.shape[1]))
    b = np.full(n_classes, -1e4)  # a class absent from the fit never wins
    w[clf.classes_] = coef / std
    b[clf.classes_] = icpt - w[clf.classes_] @ mean
    return ProbeFit(w, b, C, [], class_weight=class_weight), clf


def fit_probe(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    n_classes: int,
    grid: list[float],
    pool: np.ndarray | None = None,
    class_weight: np.ndarray | None = None,
) -> ProbeFit:
    """The val-best probe over `grid`, then self-training on `pool` (None or empty: none). `class_weight`:
    per-class loss weights [n_classes] (transferkit.core.imbalance.loss_weights), or None for the plain loss."""
    from transferkit.core.numeric import one_blas_thread

    cw = None if class_weight is None else {c: float(w) for c, w in enumerate(class_weight) if w > 0}
    with one_blas_thread():
        return _fit_probe(train, val, n_classes, grid, pool, cw)


def _fit_probe(train, val, n_classes: int, grid: list[float], pool, class_weight=None) -> ProbeFit:
    x, y = (np.asarray(a, np.float64) for a in train)
    xv, yv = np.asarray(val[0], np.float64), np.asarray(val[1])
    y = y.astype(int)
    mean, std = x.mean(0), x.std(0)
    # Each std floored at the median feature's: near-constant features (ReLUs that barely fire on the target)
    # scaled to unit variance became very large weights on digits, noise the probe fitted (lower val and test
    # accuracy than floored) and that an ONNX parity check or an LP-FT start cannot absorb.
    std = np.maximum(std, np.median(std) if np.median(std) > 0 else 1.0)
    best, rows, solver = None, [], None
    for C in grid:  # each C starts from the previous one's solution
        fit, solver = _solve(x, y, C, n_classes, mean, std, warm=solver, class_weight=class_weight)
        (tr_acc, tr_loss), (va_acc, va_loss) = _scores(fit, x, y), _scores(fit, xv, yv)
        rows.append(
            {"C": C, "train_accuracy": tr_acc, "train_loss": tr_loss, "val_accuracy": va_acc, "val_loss": va_loss}
        )
        if best is None or (va_acc, -va_loss) > (best[1]["val_accuracy"], -best[1]["val_loss"]):
            best = (fit, rows[-1])
    fit = best[0]
    fit.grid = rows
    if pool is not None and len(pool):
        fit = self_train(fit, (x, y), (xv, yv), np.asarray(pool, np.float64), n_classes, mean, std)
    return fit


def self_train(base: ProbeFit, train, val, pool: np.ndarray, n_classes: int, mean, std) -> ProbeFit:
    """Curriculum pseudo-labelling of `pool` (module docstring); the val-best round, round 0 = `base`."""
    from transferkit.core.numeric import softmax

    (x, y), (xv, yv) = train, val
    va_acc, va_loss = _scores(base, xv, yv)
    rounds = [{"round": 0, "fraction": 0.0, "pseudo_labels": 0, "val_accuracy": va_acc, "val_loss": va_loss}]
    best, best_key, best_round, current = base, (va_acc, -va_loss), 0, base
    per_class = len(pool) / n_classes
    for r, frac in enumerate(CURRICULUM, start=1):
        p = softmax(current.logits(pool))
        pred, conf = p.argmax(1), p.max(1)
        keep = []
        for c in range(n_classes):
            idx = np.flatnonzero(pred == c)
            keep += idx[np.argsort(-conf[idx], kind="stable")][: int(np.ceil(frac * per_class))].tolist()
        keep = np.sort(np.asarray(keep, dtype=int))
        current = _solve(
            np.concatenate([x, pool[keep]]),
            np.concatenate([y, pred[keep]]),
            base.C,
            n_classes,
            mean,
            std,
            class_weight=base.class_weight,
        )[0]
        va_acc, va_loss = _scores(current, xv, yv)
        rounds.append(
            {"round": r, "fraction": frac, "pseudo_labels": len(keep), "val_accuracy": va_acc, "val_loss": va_loss}
        )
        if (va_acc, -va_loss) > best_key:
            best, best_key, best_round = current, (va_acc, -va_loss), r
    best.grid, best.rounds, best.kept_round = base.grid, rounds, best_round
    return best
