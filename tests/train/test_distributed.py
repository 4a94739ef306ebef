"""DDP fine-tuning under torchrun (transferkit.train.distributed): 2 CPU processes (gloo, one thread each) on real
digits with the packaged MobileNetV2."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0"]
SETS = {
    "data.image_size": 32,
    "data.batch_size": 16,
    "train.strategy": "full",  # in the params too: the Prefect task's run below must have the same fingerprint
    "train.epochs": 2,
    "train.min_epochs": 2,
    "train.patience": 2,
    "validate.no_transfer": ["pixels-logreg"],  # the bar rank 0 fits; the cheapest one
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """sklearn digits at 32 px: 6 train / 4 val / 20 test images per class (test accuracy to compare)."""
    from transferkit.data.builtin import write_builtin

    out = tmp_path_factory.mktemp("ddp") / "digits"
    write_builtin("digits", out, per_class=30, size=32, train_per_class=6, val_per_class=4, progress=False)
    return out


def _env(tmp: Path) -> dict:
    (tmp / "scratch").mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp / "scratch")}


def test_one_ddp_step_keeps_ranks_identical_and_an_epoch_covers_each_image_once(digits, tmp_path):
    import torch

    script = Path(__file__).parents[1] / "ddp_step.py"
    r = subprocess.run(
        [*TORCHRUN, "--nproc-per-node=2", str(script), str(digits), str(tmp_path)],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1)]
    n_train = sum(1 for p in (digits / "train").rglob("*.png"))
    seen = ranks[0]["seen"] + ranks[1]["seen"]
    assert sorted(seen) == list(range(n_train))  # every train image once per epoch: no padding, none dropped
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])
    assert ranks[0]["batch"] == ranks[1]["batch"] == 8  # a global batch of 16 split in two
    assert ranks[0]["steps"] == ranks[1]["steps"] == math.ceil(n_train / 16)  # 60 images: 4 steps, last 12
    a, b = ranks[0]["state"], ranks[1]["state"]
    weights = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    moved = [k for k in weights if not torch.equal(a[k], ranks[0]["before"][k])]
    assert "classifier.weight" in moved and len(moved) > 100  # the step changed the network ...
    for k in weights:  # ... identically on both ranks, though each saw other images
        assert torch.equal(a[k], b[k]), k
    # CPU BatchNorm (no SyncBatchNorm): each rank's running statistics took its own share of the batch; DDP
    # copies rank 0's to every rank at the next forward (and precise BN re-estimates them before validating)
    assert not torch.equal(a["bn1.running_mean"], b["bn1.running_mean"])


def _train_cmd(target: Path, out: Path, nproc: int) -> list[str]:
    exe = Path(sys.executable).parent / "transferkit"
    cmd = [str(exe), "train", "--target", str(target), "--out", str(out), "--model", "mobilenetv2_100"]
    cmd += ["--strategy", "full", "-q", "--nproc-per-node", str(nproc)]
    for k, v in SETS.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    return cmd


def _rank0(launcher: int):
    import psutil

    for p in psutil.Process(launcher).children(recursive=True):
        try:
            if p.environ().get("RANK") == "0":
                return p
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_two_processes_train_resume_after_rank0_is_killed_and_match_one_process(digits, tmp_path, capfd, monkeypatch):
    import torch
    from transferkit.flows.pipeline import train_task

    from transferkit.core.config import load_params
    from transferkit.train.stage import run_train

    one = run_train(
        digits, tmp_path / "one", load_params(None, SETS), "mobilenetv2_100", strategy="full", progress=False
    )

    out, env = tmp_path / "two", _env(tmp_path)
    # cwd without a params.yaml: the defaults + SETS, as in the 1-process run above
    proc = subprocess.Popen(_train_cmd(digits, out, 2), env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    ckpt, deadline, killed = out / "checkpoint.pt", time.time() + 300, None
    while killed is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if ckpt.is_file() and torch.load(ckpt, weights_only=True)["epoch"] >= 1:
            killed = _rank0(proc.pid)
            if killed is not None:
                killed.send_signal(signal.SIGKILL)
    assert killed is not None, "the run ended before rank 0 could be killed"
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0 and "a rank failed" in err  # torchrun tore rank 1 down with it
    assert not (out / "metrics.json").exists()
    killed_at = torch.load(ckpt, weights_only=True)["epoch"]
    assert killed_at == 1

    # resumed by the Prefect train task (the flow's route: train.nproc_per_node launches torchrun itself)
    for k in ("OMP_NUM_THREADS", "TMPDIR"):
        monkeypatch.setenv(k, env[k])
    params = load_params(None, {**SETS, "train.nproc_per_node": 2}).model_dump(mode="json")
    capfd.readouterr()
    m = train_task.fn(str(digits), str(out), params, "mobilenetv2_100", None, False)
    again = capfd.readouterr()
    assert f"resuming {out} from epoch {killed_at + 1}" in again.err
    assert again.out.count("train: mobilenetv2_100 strategy=") == 1  # rank 0 alone reports
    assert m == json.loads((out / "metrics.json").read_text()) and m["strategy"] == "full"
    assert m["distributed"] == {"world_size": 2, "backend": "gloo", "nnodes": 1}
    assert m["resumed_from_epoch"] == killed_at + 1 and [h["epoch"] for h in m["history"]] == [1, 2]
    assert not ckpt.exists() and sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    assert not list((tmp_path / "scratch").glob("transferkit-rank*"))  # rank 1's scratch folder is gone

    # same global batch, same epochs: test accuracy within sampling noise of one process (3 standard errors)
    n = m["n_test"]
    se = math.sqrt(sum(a * (1 - a) for a in (one["test_accuracy"], m["test_accuracy"])) / n)
    assert abs(m["test_accuracy"] - one["test_accuracy"]) <= 3 * se + 1 / n, (one["test_accuracy"], m["test_accuracy"])
    assert m["test_accuracy"] > 0.1 + 3 * math.sqrt(0.09 / n)  # and it learned: above chance (10 classes)


def test_several_nodes_need_a_rendezvous_endpoint(digits, tmp_path):
    cmd = _train_cmd(digits, tmp_path / "out", 2) + ["--nnodes", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--nnodes > 1 needs --rdzv-endpoint HOST:PORT" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out" / "metrics.json").exists()


def test_global_batches_split_evenly_and_fold_a_short_tail():
    from transferkit.train.distributed import DistributedError, GlobalBatchSampler

    # 37 images, global batch 16, 2 ranks: batches 16, 16, 5 -> 8+8, 8+8, 3+2 (no image twice, none dropped)
    ranks = [GlobalBatchSampler(37, 16, r, 2, None).global_batches(list(range(37))) for r in (0, 1)]
    assert ranks[0] == ranks[1] and [len(b) for b in ranks[0]] == [16, 16, 5]
    # 34 images: the tail of 2 would leave each rank 1 image (BatchNorm needs 2): folded into the batch before
    assert [len(b) for b in GlobalBatchSampler(34, 16, 0, 2, None).global_batches(list(range(34)))] == [16, 18]
    with pytest.raises(DistributedError, match="at least 2 images for each of 4 ranks"):
        GlobalBatchSampler(100, 6, 0, 4, None)
