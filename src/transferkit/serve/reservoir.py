"""The monitoring reservoir: a bounded uniform sample of served images on disk, for `drift` to compare."""

from __future__ import annotations

import io
import random
import threading
import time
from pathlib import Path


class Reservoir:
    """A uniform sample of at most `size` served images (Algorithm R), kept on disk across restarts."""

    def __init__(self, folder: Path, size: int, px: int, seed: int = 0):
        from transferkit.core.io import read_json

        self.folder, self.size, self.px = Path(folder), size, px
        self.images = self.folder / "images"
        self.state_path = self.folder / "reservoir.json"
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.seen, self.slots = 0, {}
        try:
            state = read_json(self.state_path)
            self.seen, self.slots = int(state["seen"]), dict(state.get("slots", {}))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            pass

    def offer(self, img, version: int) -> bool:
        """Keep `img` with probability size/seen; returns whether it was stored."""
        from transferkit.core.io import atomic_write_bytes, write_json

        with self.lock:
            self.seen += 1
            slot = self.seen - 1 if self.seen <= self.size else self.rng.randrange(self.seen)
            if slot >= self.size:
                if self.seen % 100 == 0:
                    write_json(self.state_path, self._state())
                return False
            small = img.copy()
            small.thumbnail((self.px, self.px))
            buf = io.BytesIO()
            small.save(buf, format="PNG")
            atomic_write_bytes(self.images / f"{slot:06d}.png", buf.getvalue())
            self.slots[str(slot)] = {"version": version, "time": time.time()}
            write_json(self.state_path, self._state())
            return True

    def _state(self) -> dict:
        return {"seen": self.seen, "size": self.size, "px": self.px, "stored": len(self.slots), "slots": self.slots}
