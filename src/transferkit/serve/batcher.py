"""Dynamic batching: single requests' images collected into one onnxruntime call."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class Batcher:
    """Collect single requests' images into one onnxruntime call: up to max_batch_size images, waiting at
    most max_queue_delay for batch-mates after the first arrives. One inference thread per model version
    (a ServedModel: its run(), name and version)."""

    def __init__(self, model, max_batch: int, max_delay_s: float, on_batch=None):
        self.model, self.max_batch, self.max_delay = model, max_batch, max_delay_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{model.name}-{model.version}")
        self.on_batch = on_batch
        self.task = asyncio.get_running_loop().create_task(self._loop())
        self._carry = None

    async def submit(self, x: np.ndarray) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((x, fut))
        return await fut

    async def _loop(self) -> None:
        while True:
            items = [(x, f) for x, f in await self._collect() if not f.cancelled()]
            if items:
                await self._run(items)

    async def _collect(self) -> list:
        """The next batch: the first request waiting, and those that arrive within max_delay and fit."""
        loop = asyncio.get_running_loop()
        first = self._carry or await self.queue.get()
        self._carry = None
        items, n = [first], len(first[0])
        deadline = loop.time() + self.max_delay
        while n < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if n + len(item[0]) > self.max_batch:
                self._carry = item  # starts the next batch
                break
            items.append(item)
            n += len(item[0])
        return items

    async def _run(self, items: list) -> None:
        batch = np.concatenate([x for x, _ in items]) if len(items) > 1 else items[0][0]
        try:
            out = await asyncio.get_running_loop().run_in_executor(self.pool, self.model.run, batch)
        except Exception as e:  # the whole batch fails; each request reports it
            for _, f in items:
                if not f.done():
                    f.set_exception(e)
            return
        if self.on_batch:
            self.on_batch(self.model, len(batch))
        i = 0
        for x, f in items:
            if not f.done():
                f.set_result(out[i : i + len(x)])
            i += len(x)

    def close(self) -> None:
        self.task.cancel()
        self.pool.shutdown(wait=False)
