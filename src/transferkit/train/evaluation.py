"""Scoring shared by the probe, the fine-tune and the search: per-image correctness on the same val images (the search's paired test), accuracy from logits, CPU evaluation of a model over a loader, and the early-stopping rule on validation loss."""

from __future__ import annotations

import math

import numpy as np


def per_image_correct(logits, labels) -> np.ndarray:
    """Per image: is the top-1 prediction right (the search compares configurations on the same val images)."""
    return (logits.argmax(1) == labels).cpu().numpy()


def mean_correct(correct: np.ndarray) -> float:
    return float(correct.mean()) if len(correct) else float("nan")


def logits_accuracy(logits, labels) -> float:
    return mean_correct(per_image_correct(logits, labels))


class EarlyStop:
    def __init__(self, patience: int, min_epochs: int = 0):
        self.patience, self.min_epochs, self.best, self.best_epoch, self.bad = patience, min_epochs, math.inf, 0, 0

    def step(self, val_loss: float, epoch: int) -> tuple[bool, bool]:
        """(improved, stop)"""
        if val_loss < self.best - 1e-6:
            self.best, self.best_epoch, self.bad = val_loss, epoch, 0
            return True, False
        self.bad += 1
        return False, self.bad >= self.patience and epoch >= self.min_epochs


def logits_cpu(model, loader):
    """(logits, labels) of `model` over `loader`, as tensors in loader order."""
    import torch

    logits, labels = [], []
    with torch.inference_mode():
        for xb, yb in loader:
            logits.append(model(xb))
            labels.append(yb)
    return torch.cat(logits), torch.cat(labels)


def correct_cpu(model, loader) -> np.ndarray:
    return per_image_correct(*logits_cpu(model, loader))


def evaluate_cpu(model, loader) -> float:
    return mean_correct(correct_cpu(model, loader))
