"""Prometheus metrics of the server (prometheus_client, imported when the app is made)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transferkit.serve.model import ServedModel


class Metrics:
    """Prometheus metrics whose labels come from fixed sets only: a model label is a served model's name or
    "" (anything else: unknown names, other routes), a code label an HTTP status this server answered."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "transferkit_requests", "requests answered (every route but the probes)", ["model", "code"], registry=r
        )
        self.latency = Histogram(
            "transferkit_request_seconds",
            "predict latency",
            ["model"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.batch_sizes = Histogram(
            "transferkit_batch_size",
            "images per onnxruntime call",
            ["model"],
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.images = Counter("transferkit_images", "images classified", ["model"], registry=r)
        self.errors = Counter("transferkit_errors", "requests answered with an error", ["model", "code"], registry=r)
        self.version = Gauge("transferkit_model_version", "version serving now", ["model"], registry=r)
        self.swaps = Counter("transferkit_model_swaps", "versions switched to", ["model"], registry=r)
        self.swap_seconds = Gauge(
            "transferkit_model_swap_seconds", "load + warm-up + checks of the last swap", ["model"], registry=r
        )
        self.load_failures = Counter(
            "transferkit_model_load_failures", "versions refused at load", ["model"], registry=r
        )
        self.fallback = Gauge(
            "transferkit_model_fallback",
            "1: `latest` is broken and an earlier version from the promotion history serves",
            ["model"],
            registry=r,
        )
        self.inflight = Gauge("transferkit_inflight_requests", "requests in flight", registry=r)
        self.inflight_bytes = Gauge("transferkit_inflight_bytes", "bytes of the in-flight budget held", registry=r)

    def batch(self, model: ServedModel, n: int) -> None:
        self.batch_sizes.labels(model.name).observe(n)

    def answered(self, name: str, images: int, t0: float) -> None:
        """A served inference request: its images, and its latency since t0 (time.perf_counter)."""
        self.images.labels(name).inc(images)
        self.latency.labels(name).observe(time.perf_counter() - t0)
