"""Reproducibility and crash resume: seeding every RNG, the run fingerprint, and the per-epoch fine-tune state (model, optimizer, scheduler, early stopping, history, RNG states) written atomically to OUT/checkpoint.pt and read back with weights_only=True."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np

from transferkit.train.evaluation import EarlyStop


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def resume_fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_resume(path: Path, state: dict) -> None:
    import torch

    from transferkit.core.io import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_resume(path: Path, fingerprint: str) -> dict | None:
    """The checkpoint of an interrupted run with the same fingerprint, else None (with the reason on stderr)."""
    import torch

    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint means starting over, not failing
        print(f"train: ignoring unreadable {path} ({type(e).__name__}); starting from epoch 1", file=sys.stderr)
        return None
    if state.get("fingerprint") != fingerprint:
        print(f"train: {path} belongs to a run with other arguments; starting from epoch 1", file=sys.stderr)
        return None
    return state


def _rng_state(loader_gen) -> dict:
    import random

    import torch

    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "loader": loader_gen.get_state(),
    }


def _set_rng_state(state: dict, loader_gen) -> None:
    import random

    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    loader_gen.set_state(state["loader"])


class FinetuneRun:
    """The mutable state of one fine-tune, as checkpointed after every epoch (`save`, `resume`)."""

    def __init__(self, t):
        self.stop = EarlyStop(t.patience, t.min_epochs)
        self.history, self.best_state, self.done, self.start, self.stopped = [], None, False, 1, ""
        self.half = max(1, t.epochs // 2)  # where the search's prune compares; the schedule half annealed

    def end_epoch(self, row: dict, model, prune) -> None:
        """Record the epoch, keep the weights if val loss improved, decide whether training ends here (early
        stopping, or the search's `prune` on the history). No clock takes part: the same inputs stop at the same
        epoch on an idle or a loaded machine."""
        self.history.append(row)
        improved, self.done = self.stop.step(row["val_loss"], row["epoch"])
        if prune is not None and not self.done and prune(self.history):
            self.done, self.stopped = True, "pruned"
        if improved:
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def save(self, ckpt: Path, fingerprint: str, model, opt, sched, loader_gen) -> None:
        epoch = self.history[-1]["epoch"]
        state = {"fingerprint": fingerprint, "epoch": epoch, "done": self.done, "model": model.state_dict()}
        state |= {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "stop": dict(self.stop.__dict__)}
        state |= {"history": self.history, "best": self.best_state, "rng": _rng_state(loader_gen)}
        _save_resume(ckpt, state)

    def resume(self, state: dict, model, opt, sched, loader_gen) -> int:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        self.stop.__dict__.update(state["stop"])
        self.history, self.best_state, self.done = state["history"], state["best"], state["done"]
        _set_rng_state(state["rng"], loader_gen)
        self.start = int(state["epoch"]) + 1
        return self.start
