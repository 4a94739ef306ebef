"""The PNG plots of the quality report under RUN/plots/: the test confusion matrix, the reliability diagram (calibration) and the learning curves. Matplotlib runs on the Agg backend, so no display is needed."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def write_plots(folder: Path, report: dict, metrics: dict) -> None:
    """PNG confusion matrix, reliability diagram and learning curves (matplotlib, Agg: no display)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from transferkit.core.io import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)

    def save(fig, name: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        atomic_write_bytes(folder / f"{name}.png", buf.getvalue())

    save(_confusion_figure(plt, report), "confusion")
    save(_reliability_figure(plt, report), "reliability")
    save(_learning_curves_figure(plt, metrics), "learning_curves")


def _confusion_figure(plt, report: dict):
    """The test confusion matrix with counts in the non-empty cells."""
    classes, cm = report["classes"], np.asarray(report["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * len(classes), 0.8 + 0.5 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (i, j), n in np.ndenumerate(cm):
        if n:
            ax.text(j, i, str(n), ha="center", va="center", color="white" if n > cm.max() / 2 else "black", fontsize=8)
    ax.set_title(f"test confusion (accuracy {report['accuracy']:.3f}, macro F1 {report['macro_f1']:.3f})")
    return fig


def _reliability_figure(plt, report: dict):
    """Accuracy per confidence bin against the diagonal of perfect calibration."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    rows = [r for r in report["reliability"] if r["count"]]
    width = rows[0]["upper"] - rows[0]["lower"] if rows else 0.1
    ax.bar(
        [r["lower"] for r in rows],
        [r["accuracy"] for r in rows],
        width=width,
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.scatter(
        [r["confidence"] for r in rows],
        [r["accuracy"] for r in rows],
        color="red",
        s=12,
        zorder=3,
        label="bin mean confidence",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {report['ece']:.3f}, {report['ece_bins']} bins)")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def _learning_curves_figure(plt, metrics: dict):
    """Train and val loss and accuracy per epoch, the best epoch marked."""
    hist = metrics.get("history") or []
    ep = [h["epoch"] for h in hist]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, ax in (("loss", a1), ("accuracy", a2)):
        ax.plot(ep, [h[f"train_{key}"] for h in hist], label=f"train {key}")
        ax.plot(ep, [h[f"val_{key}"] for h in hist], label=f"val {key}")
        ax.axvline(metrics["best_epoch"], color="grey", ls=":", label=f"best epoch {metrics['best_epoch']}")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
    fig.suptitle(f"{metrics['model']} ({metrics['strategy']})")
    return fig
