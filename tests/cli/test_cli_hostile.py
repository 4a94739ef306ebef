"""Hostile datasets and params through the real CLI (issue 34): a named pipe among the images, a class folder
that is a link to another class, a seed outside numpy's range, `true` for a number.

    .venv/bin/pytest -q tests/cli/test_cli_hostile.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _tk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "transferkit.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture
def dataset(tiny_target, tmp_path) -> Path:
    out = tmp_path / "digits"
    shutil.copytree(tiny_target, out)
    return out


def test_a_named_pipe_among_the_images_is_skipped_and_listed(dataset):
    """7: `pipe.png` (a FIFO) in a class folder made `data check` and `train` hang with no message."""
    os.mkfifo(dataset / "train" / "3" / "pipe.png")
    r = _tk("data", "check", str(dataset), timeout=60)  # a hang is a TimeoutExpired here
    assert r.returncode == 0, r.stderr
    assert "pipe.png" in r.stdout and "not a regular file (named pipe, socket or device)" in r.stdout


def test_a_class_folder_linked_to_another_class_is_refused(dataset):
    """Smaller: a class folder that is a symlink to another class put the same images under two labels."""
    (dataset / "train" / "3b").symlink_to(dataset / "train" / "3", target_is_directory=True)
    r = _tk("data", "check", str(dataset))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "class folders '3' and '3b' are one folder (a link)" in r.stderr and str(dataset / "train") in r.stderr
    (dataset / "train" / "3b").unlink()
    (dataset / "train" / "3b").symlink_to(dataset / "test" / "3", target_is_directory=True)  # not a class here
    assert _tk("data", "check", str(dataset)).returncode == 0


@pytest.mark.parametrize(
    "override, field, why",
    [
        ("seed=-1", "seed", "greater than or equal to 0"),
        ("seed=4294967296", "seed", "less than or equal to 4294967295"),
        ("train.epochs=true", "train.epochs", "must be a number, not true/false"),
        ("data.batch_size=false", "data.batch_size", "must be a number, not true/false"),
    ],
)
def test_seed_range_and_booleans_for_numbers_are_one_line_errors(dataset, tmp_path, override, field, why):
    """8: `--set seed=-1` or a seed above 2**32 passed validation, then train and select died in numpy;
    smaller: `epochs: true` was taken as 1 epoch."""
    for cmd in (("train", "--model", "mobilenetv2_100"), ("select",)):
        r = _tk(*cmd, "--target", str(dataset), "--out", str(tmp_path / "out"), "--set", override)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"params field {field!r}" in r.stderr and why in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_true_for_a_number_in_a_params_file_names_the_file_field(tmp_path):
    from transferkit.core.config import ConfigError, load_params

    (tmp_path / "params.yaml").write_text("train:\n  epochs: true\n  augment: false\n")
    with pytest.raises(ConfigError, match=r"params field 'train.epochs': .*not true/false \(got True\)"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 3\n  augment: false\nselect:\n  probe: true\n")
    p = load_params(tmp_path / "params.yaml")  # bool fields still take YAML booleans
    assert p.train.epochs == 3 and p.train.augment is False and p.select.probe is True
