"""Limits every request shares: the in-flight byte budget, and the outermost ASGI layer (concurrency limit,
per-answer counting, no traceback for any input)."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING

from transferkit.serve.errors import InternalError, InvalidInput, PayloadTooLarge, RequestError, ServerBusy, raw_error

if TYPE_CHECKING:
    from transferkit.serve.config import ServeConfig
    from transferkit.serve.metrics import Metrics
    from transferkit.serve.registry import Registry

log = logging.getLogger("transferkit.serve")


class Budget:
    """The process's in-flight byte budget (bodies + decoding), shared by all requests on the event loop."""

    def __init__(self, total: int, gauge=None):
        self.total, self.used, self.gauge = total, 0, gauge
        self._cond: asyncio.Condition | None = None

    async def acquire(self, n: int, timeout: float) -> None:
        if n <= 0:
            return
        if n > self.total:
            raise PayloadTooLarge(f"request needs {n} bytes of the in-flight budget, more than its {self.total}")
        self._cond = self._cond or asyncio.Condition()
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self.used + n <= self.total), timeout)
            except asyncio.TimeoutError:
                raise ServerBusy(
                    f"server busy: {self.used} of {self.total} in-flight bytes held for {timeout:g} s; retry later"
                ) from None
            self.used += n
            if self.gauge is not None:
                self.gauge.set(self.used)

    async def release(self, n: int) -> None:
        if n <= 0:
            return
        async with self._cond:
            self.used -= n
            if self.gauge is not None:
                self.gauge.set(self.used)
            self._cond.notify_all()


class Held:
    """What one request holds of the budget; released whole when the request ends (`async with`)."""

    def __init__(self, budget: Budget, timeout: float):
        self.budget, self.timeout, self.n = budget, timeout, 0

    async def take(self, n: int) -> None:
        await self.budget.acquire(n, self.timeout)
        self.n += n

    async def __aenter__(self) -> Held:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.give_back()

    async def give_back(self, n: int | None = None) -> None:
        n = self.n if n is None else min(n, self.n)
        self.n -= n
        await self.budget.release(n)


def _local_location(key: bytes, value: bytes, host: bytes) -> tuple[bytes, bytes]:
    """A redirect's Location as a path on this server: Starlette's slash redirect builds an absolute URL
    `scheme://<the request's Host header><path>`, and the Host header is the client's to choose (a cache in
    front would hand the redirect to others). Leading slashes are collapsed: `//evil.example` would be a
    protocol-relative URL to another host."""
    if key.lower() != b"location":
        return key, value
    from urllib.parse import urlsplit

    for scheme in (b"http://", b"https://"):
        if host and value.startswith(scheme + host):
            return key, b"/" + value[len(scheme + host) :].lstrip(b"/")
    u = urlsplit(value.decode("latin-1"))
    return key, ("/" + u.path.lstrip("/") + (f"?{u.query}" if u.query else "")).encode("latin-1")


PROBES = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
_MODEL_PATH = re.compile(r"/v[12]/models/([^/]+)")


class Guard:
    """Outermost ASGI layer: the concurrency limit (503 at once beyond it), one count per answered request
    with bounded labels, and no traceback for any input: an unexpected exception is a counted, logged 500
    with the documented {"detail"} shape."""

    def __init__(self, app, cfg: ServeConfig, metrics: Metrics, registry: Registry):
        self.app, self.cfg, self.metrics, self.registry = app, cfg, metrics, registry
        self.inflight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        m = _MODEL_PATH.match(path)
        model = m.group(1) if m and m.group(1) in self.registry.slots else ""
        probe = path in PROBES
        status = []
        # an answer sent before the body was read (401, 404, 413, 422 on headers, 503) ends the connection:
        # say so (Connection: close), or a client reuses it and meets the reset of the unread body
        hdrs = dict(scope.get("headers") or [])
        body_left = [hdrs.get(b"content-length", b"0").strip() not in (b"", b"0") or b"transfer-encoding" in hdrs]

        async def receive_tracked():
            msg = await receive()
            if msg["type"] == "http.request" and not msg.get("more_body", False):
                body_left[0] = False
            return msg

        async def send_counted(msg):
            if msg["type"] == "http.response.start":
                status.append(msg["status"])
                if 300 <= msg["status"] < 400:
                    host = hdrs.get(b"host", b"")
                    msg = {**msg, "headers": [_local_location(k, v, host) for k, v in msg.get("headers", ())]}
                if body_left[0]:
                    msg = {**msg, "headers": [*msg.get("headers", ()), (b"connection", b"close")]}
            await send(msg)

        if b"content-length" in hdrs and b"transfer-encoding" in hdrs:
            # RFC 9112 6.3: ambiguous framing; a proxy in front may have read the body the other way, so
            # what follows it on this connection could be a smuggled request: answer once and close (the
            # body is unread, so send_counted adds Connection: close and h11 ends the connection)
            ambiguous = "Content-Length and Transfer-Encoding in one request: ambiguous body framing (RFC 9112 6.3)"
            await self._answer(send_counted, send, InvalidInput(ambiguous), path)
        elif not probe and self.inflight >= self.cfg.max_concurrency:
            busy = f"server busy: {self.inflight} requests in flight (limit {self.cfg.max_concurrency}); retry later"
            await self._answer(send_counted, send, ServerBusy(busy), path)
        else:
            await self._pass(scope, receive_tracked, send_counted, send, status, path)
        if not probe:
            self._count(model, str(status[0] if status else 500))

    async def _pass(self, scope, receive, send_counted, send, status: list, path: str) -> None:
        self.inflight += 1
        self.metrics.inflight.set(self.inflight)
        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), path[:200])
            if not status:
                await self._answer(send_counted, send, InternalError("internal error (logged on the server)"), path)
        finally:
            self.inflight -= 1
            self.metrics.inflight.set(self.inflight)

    @staticmethod
    async def _answer(send_start, send, error: RequestError, path: str) -> None:
        start, body = raw_error(error, path)
        await send_start(start)
        await send(body)

    def _count(self, model: str, code: str) -> None:
        self.metrics.requests.labels(model, code).inc()
        if not code.startswith(("1", "2", "3")):
            self.metrics.errors.labels(model, code).inc()
