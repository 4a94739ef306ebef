"""What every route shares: the config, the model registry, the metrics, the in-flight budget, the decode
threads, and the bearer-token check."""

from __future__ import annotations

import hmac
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from transferkit.serve.config import ServeConfig
from transferkit.serve.errors import Unauthorized
from transferkit.serve.limits import Budget, Held
from transferkit.serve.metrics import Metrics
from transferkit.serve.registry import Registry


@dataclass
class Context:
    cfg: ServeConfig
    metrics: Metrics
    registry: Registry
    budget: Budget
    decode_pool: ThreadPoolExecutor

    @classmethod
    def make(cls, cfg: ServeConfig) -> Context:
        metrics = Metrics()
        threads = cfg.decode_threads or min(4, os.cpu_count() or 1)
        return cls(
            cfg,
            metrics,
            Registry(cfg, metrics),
            Budget(cfg.max_inflight_bytes, metrics.inflight_bytes),
            ThreadPoolExecutor(threads, thread_name_prefix="decode"),
        )

    def auth(self, request) -> None:
        """401 unless the request carries the bearer token (when one is set)."""
        if not self.cfg.token:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode("utf-8", "replace"), self.cfg.token.encode()
        ):
            raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <token>)")

    def held(self) -> Held:
        """A request's share of the in-flight budget, waiting at most queue_timeout_s for room."""
        return Held(self.budget, self.cfg.queue_timeout_s)

    def close(self) -> None:
        for s in self.registry.slots.values():
            if s.current and s.current.batcher:
                s.current.batcher.close()
        self.decode_pool.shutdown(wait=False)
