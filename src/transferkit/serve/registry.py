"""The model registry: one slot per model name, following REPO/<name>/latest with checked hot swaps, a
fallback to the promotion history when `latest` is broken, and the batcher and reservoir of each model."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from transferkit.modelrepo.repository import LATEST
from transferkit.serve.batcher import Batcher
from transferkit.serve.errors import LoadError, NotFound, RequestError, ServerBusy
from transferkit.serve.model import ServedModel, load_version
from transferkit.serve.reservoir import Reservoir

if TYPE_CHECKING:
    from transferkit.serve.config import ServeConfig
    from transferkit.serve.metrics import Metrics

log = logging.getLogger("transferkit.serve")

_ABS_PATH = re.compile(r"(^|[\s'\"(=:])/(?:[^\s'\"/]+/)+([^\s'\"/]+)")  # /any/abs/path/file -> .../file


@dataclass
class Slot:
    """One model name: the version serving now, and what happened to the others."""

    name: str
    current: ServedModel | None = None
    # version -> (fingerprint of latest + the version's files when it failed, why it is not served): a
    # re-promote or a repaired file changes the fingerprint, and the version is tried again
    failed: dict[int, tuple[tuple, str]] = field(default_factory=dict)
    swaps: list[dict] = field(default_factory=list)
    reservoir: Reservoir | None = None
    fallback: dict | None = None  # serving an older version from the history because `latest` is broken
    latest_error: str | None = None  # `latest` unreadable: stays on what serves
    latest: int | None = None  # the version `latest` named at the last poll


def _fingerprint(model_dir: Path, version: int) -> tuple:
    """What a failed load depended on: the pointer file (a re-promote replaces it) and the version's files."""

    def st(p: Path) -> tuple:
        try:
            s = p.stat()
            return (p.name, s.st_ino, s.st_size, s.st_mtime_ns)
        except OSError:
            return (p.name, None)

    vdir = model_dir / str(version)
    try:
        files = sorted(vdir.iterdir()) if vdir.is_dir() else []
    except OSError:
        files = []
    return (st(model_dir / LATEST), st(vdir), *(st(p) for p in files))


def _record(slot: Slot, swap: dict) -> None:
    """One entry of the slot's swap history (the last 20 are kept), from the version serving now."""
    slot.swaps.append({"from": slot.current.version if slot.current else None, **swap, "time": time.time()})
    del slot.swaps[:-20]


class Registry:
    def __init__(self, cfg: ServeConfig, metrics: Metrics):
        self.cfg, self.metrics = cfg, metrics
        self.slots: dict[str, Slot] = {}
        self.load_pool = ThreadPoolExecutor(1, thread_name_prefix="load")
        self.infer_pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="infer")
        self.started = False  # first scan done
        repo = Path(cfg.repo)
        self._prefixes = sorted(
            {str(repo) + os.sep, str(repo.absolute()) + os.sep, str(repo.resolve()) + os.sep}, key=len, reverse=True
        )

    def public(self, msg: str) -> str:
        """A message for public responses: repository paths relative to it, no other absolute path."""
        for p in self._prefixes:
            msg = msg.replace(p, "")
        return _ABS_PATH.sub(lambda m: m.group(1) + ".../" + m.group(2), msg)

    def names(self) -> list[str]:
        """The models to serve: those configured, else every folder export could have made with a `latest`
        pointer (valid or not: a broken one is reported, not hidden)."""
        from transferkit.modelrepo.repository import list_models

        return list(self.cfg.models) if self.cfg.models else list_models(self.cfg.repo)

    def unknown(self, name: str) -> RequestError:
        return NotFound(f"no model named {name[:64]!r} (serving: {sorted(self.slots) or 'none'})")

    def lookup(self, name: str) -> Slot:
        """The slot of a model that serves: 404 for an unknown name, 503 while nothing of it is loaded."""
        s = self.slots.get(name)
        if s is None:
            raise self.unknown(name)
        if s.current is None:
            raise ServerBusy(f"model {name!r} is not loaded yet ({self.ready()[1]})")
        return s

    async def infer(self, model: ServedModel, x: np.ndarray) -> np.ndarray:
        """Logits for x from this version: through its batcher, or as one call on the inference pool."""
        if model.batcher is not None:
            return await model.batcher.submit(x)
        out = await asyncio.get_running_loop().run_in_executor(self.infer_pool, model.run, x)
        self.metrics.batch(model, len(x))
        return out

    def ready(self) -> tuple[bool, str]:
        """Ready when every model named with --model serves, or (models found in the repository) when one
        does: a broken folder beside a good model must not take the good one out of a load balancer. What
        does not serve as `latest` says (not loaded, refused, fallback, unreadable) makes it "degraded: ..."."""
        if not self.started:
            return False, "loading"
        if not self.slots:
            return False, "no model with a `latest` pointer in the repository"
        missing = [n for n, s in self.slots.items() if s.current is None]
        why = {n: self._not_loaded(self.slots[n]) for n in missing}
        needed = [n for n in missing if n in (self.cfg.models or ())]
        if needed or len(missing) == len(self.slots):
            return False, f"not loaded: {', '.join(needed or missing)} " + "; ".join(
                f"{n}: {why[n]}" for n in needed or missing
            )
        degraded = [f"{n} not loaded: {why[n]}" for n in missing]
        for n, s in self.slots.items():
            if s.fallback:
                degraded.append(
                    f"{n} serves version {s.fallback['version']} from the promotion history: latest "
                    f"({s.fallback['latest']}) refused"
                )
            elif s.latest_error:
                degraded.append(f"{n}: {s.latest_error}")
            elif s.current and s.latest in s.failed and s.latest != s.current.version:
                degraded.append(
                    f"{n} serves version {s.current.version}: latest ({s.latest}) refused: {s.failed[s.latest][1]}"
                )
        return True, ("degraded: " + "; ".join(degraded)) if degraded else "ready"

    @staticmethod
    def _not_loaded(slot: Slot) -> str:
        return slot.latest_error or next(iter(r for _, r in slot.failed.values()), "pending")

    async def _load(self, model_dir: Path, version: int) -> ServedModel:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.load_pool, load_version, model_dir, version, self.cfg)

    def _refused(self, slot: Slot, model_dir: Path, version: int, e: Exception) -> None:
        why = self.public(str(e))
        slot.failed[version] = (_fingerprint(model_dir, version), why)
        self.metrics.load_failures.labels(slot.name).inc()
        log.error("model %s version %s not served: %s", slot.name, version, e)
        _record(slot, {"to": version, "ok": False, "error": why})

    async def refresh(self) -> None:
        """One poll: load any model whose `latest` moved to a version not yet tried (or changed since it failed)."""
        names = self.names()
        for name in names:
            await self._follow(self.slots.get(name) or self._new_slot(name), Path(self.cfg.repo) / name)
        for name in [n for n, s in self.slots.items() if n not in names and s.current is None]:
            # its folder (or `latest`) is gone and nothing of it serves: forget it, or it is "not loaded"
            # for good. A model that serves keeps serving what it loaded.
            del self.slots[name]
            self.metrics.fallback.remove(name)

    def _new_slot(self, name: str) -> Slot:
        slot = self.slots[name] = Slot(name)
        self.metrics.fallback.labels(name).set(0)
        if self.cfg.monitor_dir:
            slot.reservoir = Reservoir(
                Path(self.cfg.monitor_dir) / name, self.cfg.monitor_size, self.cfg.monitor_px, self.cfg.seed
            )
        return slot

    async def _follow(self, slot: Slot, model_dir: Path) -> None:
        """Serve what `latest` names if it loads; otherwise keep what serves (or fall back if nothing does)."""
        from transferkit.modelrepo.repository import read_latest

        try:
            want = read_latest(model_dir)
            slot.latest_error = None
        except (ValueError, OSError) as e:
            slot.latest_error = self.public(str(e))
            want = None
        slot.latest = want
        if want is None:
            if slot.current is None and slot.latest_error:
                await self._fall_back(slot, model_dir, None, slot.latest_error)
            return
        if slot.current and slot.current.version == want:
            self._clear_fallback(slot)  # `latest` was pointed back at what serves
            return
        if want in slot.failed and slot.failed[want][0] == _fingerprint(model_dir, want):
            return
        t0 = time.perf_counter()
        try:
            new = await self._load(model_dir, want)
        except LoadError as e:
            self._refused(slot, model_dir, want, e)
            if slot.current is None:
                await self._fall_back(slot, model_dir, want, slot.failed[want][1])
            return
        self._switch(slot, new, time.perf_counter() - t0)
        slot.failed.pop(want, None)
        self._clear_fallback(slot)

    def _clear_fallback(self, slot: Slot) -> None:
        if slot.fallback:
            slot.fallback = None
            self.metrics.fallback.labels(slot.name).set(0)

    async def _fall_back(self, slot: Slot, model_dir: Path, latest: int | None, why: str) -> None:
        """Nothing serves and `latest` is broken: serve the newest earlier live version (promotion history)
        that loads, and say so in /readyz, /v1/models/<name> and transferkit_model_fallback."""
        from transferkit.modelrepo.repository import live_stack, read_history

        try:
            history = live_stack(read_history(model_dir))
        except OSError:
            history = []
        tried = 0
        for v in reversed(history):
            if v == latest or tried >= 5:
                continue
            if v in slot.failed and slot.failed[v][0] == _fingerprint(model_dir, v):
                continue
            tried += 1
            t0 = time.perf_counter()
            try:
                new = await self._load(model_dir, v)
            except LoadError as e:
                self._refused(slot, model_dir, v, e)
                continue
            self._switch(slot, new, time.perf_counter() - t0)
            slot.fallback = {"version": v, "latest": latest, "reason": why}
            self.metrics.fallback.labels(slot.name).set(1)
            log.error(
                "model %s: latest (%s) refused, serving version %s from the promotion history", slot.name, latest, v
            )
            return

    def _switch(self, slot: Slot, new: ServedModel, seconds: float) -> None:
        if self.cfg.batching:
            new.batcher = Batcher(new, self.cfg.max_batch_size, self.cfg.max_queue_delay_ms / 1000, self.metrics.batch)
        _record(slot, {"to": new.version, "ok": True, "seconds": seconds, "provider": new.provider})
        old, slot.current = slot.current, new  # the switch: one reference assignment on the event loop
        self.metrics.version.labels(slot.name).set(new.version)
        self.metrics.swaps.labels(slot.name).inc()
        self.metrics.swap_seconds.labels(slot.name).set(seconds)
        log.warning(
            "model %s now serving version %s (%s, loaded in %.2fs)", slot.name, new.version, new.provider, seconds
        )
        if old is not None:
            asyncio.get_running_loop().create_task(self._retire(old))

    async def _retire(self, old: ServedModel) -> None:
        """Drop the old version once the requests that hold it are done (at most 60 s)."""
        for _ in range(1200):
            if old.inflight == 0:
                break
            await asyncio.sleep(0.05)
        if old.batcher:
            old.batcher.close()
        old.sess = None

    async def watch(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # the watcher never dies; the next poll tries again
                log.exception("model refresh failed")
            self.started = True
            await asyncio.sleep(self.cfg.poll_interval_s)

    def status(self, name: str) -> dict:
        s = self.slots[name]
        cur = s.current
        return {
            "name": name,
            "version": cur.version if cur else None,
            "provider": cur.provider if cur else None,
            "file": cur.path.name if cur else None,
            "classes": cur.classes if cur else None,
            "input_size": cur.meta["input_size"] if cur else None,
            "sha256": cur.meta.get("sha256") if cur else None,
            "load_seconds": round(cur.load_seconds, 4) if cur else None,
            "reference_diff": cur.reference_diff if cur else None,
            "batching": self.cfg.batching,
            "failed_versions": {str(k): why for k, (_, why) in s.failed.items()},
            "fallback": s.fallback,
            "latest_error": s.latest_error,
            "swaps": s.swaps,
            "monitor": ({"seen": s.reservoir.seen, "stored": len(s.reservoir.slots)} if s.reservoir else None),
        }
