"""Distributed fine-tuning: PyTorch DistributedDataParallel in processes started by torchrun.

    transferkit train --target data/t --model mobilenetv2_100 --strategy full --out runs/ddp --nproc-per-node 2
    # the same, started by hand (one line per node for several machines):
    torchrun --nproc-per-node 2 --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m transferkit.cli train --target data/t --model mobilenetv2_100 --strategy full --out runs/ddp

`train.nproc_per_node` > 1 (or `--nproc-per-node`, `--nnodes`) makes `transferkit train` and the Prefect train
task re-launch the same train command through `torch.distributed.run` (launch_train). Inside torchrun's
processes (RANK/WORLD_SIZE in the environment) train joins the process group (gloo on CPU, NCCL on GPU, one
GPU per local rank) and only the fine-tuning loop is split:

- Batches: `data.batch_size` is the global batch, as in one process. Each epoch one seeded permutation (the
  same on every rank, from the loader's generator, so resume restores it) is cut into global batches; rank r
  takes positions r, r + world, ... of each. Every train image is seen exactly once per epoch: no padding
  (DistributedSampler repeats images to even out ranks) and no drop_last. A last global batch with fewer
  than 2 images per rank is folded into the one before it, so every rank takes the same number of steps
  and BatchNorm never sees a batch of one. DDP averages the ranks' mean losses: exact for equal shares;
  when a global batch does not split evenly, the ranks' shares differ by one image.
- BatchNorm: on GPU SyncBatchNorm normalises with the statistics of the whole global batch. SyncBatchNorm
  has no CPU path, so on CPU each rank normalises with its own share of the batch (per-rank statistics, as
  any data-parallel BN without sync); each rank's running statistics take its own share, and DDP
  (`broadcast_buffers`, its default) copies rank 0's to every rank at the start of each forward. With `train.bn_stats: precise` (the default) every rank re-estimates the
  statistics on all train images before validating, so the shipped statistics are the same as in one process.
- Everything else (the linear probe, the no-transfer baselines, validation, the search's decisions) runs the
  same seeded computation on every rank, so all ranks take the same decisions; rank 0 alone writes the run
  folder: checkpoint.pt after every epoch (atomic), model.safetensors, metrics.json. Ranks > 0 write into a
  scratch folder in TMPDIR that is removed at exit, starting from a copy of rank 0's checkpoint.pt so that a resumed
  run resumes on every rank from the same epoch. A killed rank stops the whole job (torchrun tears the
  others down); the same command again resumes from the last epoch rank 0 finished.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from transferkit.core.errors import TransferkitError


class DistributedError(TransferkitError, RuntimeError):
    """A distributed launch that cannot work (batch too small for the ranks, a failed rank)."""


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Inside a torchrun process (any world size)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def active() -> bool:
    """Inside a process group of more than one rank."""
    import torch.distributed as dist

    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def should_launch(nproc_per_node: int, nnodes: int = 1) -> bool:
    return (nproc_per_node > 1 or nnodes > 1) and not launched()


def init() -> str | None:
    """Join torchrun's process group (the backend's name), or None outside a multi-process launch."""
    import torch
    import torch.distributed as dist

    if world_size() <= 1 or dist.is_initialized():
        return dist.get_backend() if dist.is_initialized() else None
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank())  # "cuda" means this rank's GPU from here on
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_backend()


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def summary() -> dict | None:
    """metrics.json `distributed`: how the fine-tune was split, or None in one process."""
    import torch.distributed as dist

    if not active():
        return None
    return {
        "world_size": world_size(),
        "backend": dist.get_backend(),
        "nnodes": int(os.environ.get("GROUP_WORLD_SIZE", "1")),
    }


def in_group(fn, *args, **kwargs):
    """fn(*args, **kwargs) as a member of torchrun's process group (when launched by it)."""
    init()
    try:
        return fn(*args, **kwargs)
    finally:
        shutdown()


def rank_out(out: Path) -> Path:
    """Where this rank writes: OUT on rank 0; elsewhere a scratch folder (removed at exit, and at the next start
    when a killed run left it) holding a copy of rank 0's checkpoint.pt, so that every rank resumes from the
    same epoch."""
    import atexit
    import hashlib
    import shutil

    out = Path(out)
    if world_size() <= 1 or is_main():
        return out
    tag = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]
    scratch = Path(tempfile.gettempdir()) / f"transferkit-rank{rank()}-{tag}"
    if scratch.is_symlink():
        scratch.unlink()
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    atexit.register(shutil.rmtree, scratch, True)
    if (out / "checkpoint.pt").is_file():
        shutil.copyfile(out / "checkpoint.pt", scratch / "checkpoint.pt")
    return scratch


class GlobalBatchSampler:
    """This rank's share of each global batch of one seeded permutation per epoch (module docstring)."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int, generator):
        if batch_size < 2 * world:
            raise DistributedError(
                f"data.batch_size={batch_size} is the global batch: it needs at least 2 images for each of {world} ranks"
            )
        if n < 2 * world:
            raise DistributedError(f"{n} train images cannot give each of {world} ranks 2 images per step")
        self.n, self.batch_size, self.rank, self.world, self.generator = n, batch_size, rank, world, generator

    def global_batches(self, perm: list[int]) -> list[list[int]]:
        b = [perm[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if len(b) > 1 and len(b[-1]) < 2 * self.world:
            tail = b.pop()
            b[-1] = b[-1] + tail
        return b

    def __iter__(self):
        import torch

        perm = torch.randperm(self.n, generator=self.generator).tolist()
        for batch in self.global_batches(perm):
            yield batch[self.rank :: self.world]

    def __len__(self) -> int:
        return len(self.global_batches(list(range(self.n))))


def train_loader(samples: list, transform, batch_size: int, seed: int, num_workers: int = 0):
    """The shuffled train loader of this rank; `loader.generator` drives the permutation (resume state)."""
    import torch

    from transferkit.data.loader import ImageList

    g = torch.Generator()
    g.manual_seed(seed)
    sampler = GlobalBatchSampler(len(samples), batch_size, rank(), world_size(), g)
    return torch.utils.data.DataLoader(
        ImageList(samples, transform, seed),
        batch_sampler=sampler,
        generator=g,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )


def wrap(model, dev):
    """`model` for the training steps: DDP over the process group (SyncBatchNorm on GPU), else `model`.
    Parameters and buffers are shared with `model`, which stays the one to evaluate and save."""
    import torch

    if not active():
        return model
    if dev.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the BN children in place
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index or torch.cuda.current_device()])
    return torch.nn.parallel.DistributedDataParallel(model)  # buffers synced from rank 0 at each forward


def all_sum(*values: float) -> tuple[float, ...]:
    """Sums over ranks (e.g. an epoch's loss and counts), unchanged in one process."""
    import torch
    import torch.distributed as dist

    if not active():
        return values
    dev = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return tuple(t.cpu().tolist())


def from_main(obj):
    """Rank 0's `obj` on every rank (a picklable value: rows of numbers), unchanged in one process."""
    import torch.distributed as dist

    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch_command(
    train_args: list[str], nproc_per_node: int, nnodes: int = 1, node_rank: int | None = None, rdzv_endpoint=None
) -> list[str]:
    """torchrun (`python -m torch.distributed.run`) running `transferkit train TRAIN_ARGS` on every rank.
    One node: c10d rendezvous on localhost:0 (a free port: parallel jobs never clash). Several: every node
    runs the same command with the same --rdzv-endpoint HOST:PORT (a port open on HOST)."""
    if nnodes > 1 and not rdzv_endpoint:
        raise DistributedError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}"]
    cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint or 'localhost:0'}", "--rdzv-id=transferkit"]
    if node_rank is not None:
        cmd.append(f"--node-rank={node_rank}")
    return [*cmd, "-m", "transferkit.cli", "train", *train_args]


def launch_train(
    target: Path,
    out: Path,
    params,
    model: str,
    strategy: str | None = None,
    drift: Path | None = None,
    progress: bool = True,
    nnodes: int = 1,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
) -> dict | None:
    """Run `transferkit train` under torchrun with `params.train.nproc_per_node` ranks on this node; returns
    rank 0's metrics.json (None on a node without rank 0). Each rank gets cores / ranks OpenMP threads unless
    OMP_NUM_THREADS is set."""
    from transferkit.core.config import dump_params
    from transferkit.core.io import read_json

    nproc = params.train.nproc_per_node
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="transferkit-launch-") as tmp:
        pfile = Path(tmp) / "params.yaml"
        dump_params(params, pfile)
        args = ["--target", str(target), "--out", str(out), "--model", model, "--params", str(pfile)]
        args += [*(["--strategy", strategy] if strategy else []), *(["--drift", str(drift)] if drift else [])]
        args += [] if progress else ["-q"]
        env = dict(os.environ)
        if "OMP_NUM_THREADS" not in env:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
        rc = subprocess.run(launch_command(args, nproc, nnodes, node_rank, rdzv_endpoint), env=env).returncode
    if rc != 0:
        raise DistributedError(f"distributed train exited with {rc} (a rank failed; its error is above)")
    return read_json(out / "metrics.json") if (out / "metrics.json").is_file() else None
