"""The HTTP/1.1 protocol under the app: uvicorn's h11 one, bounded in header size and header time.
Imported only when a server starts (uvicorn and h11 are not needed to build the app)."""

from __future__ import annotations

import json
import sys

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from transferkit.serve.errors import HeadersTooLarge, InvalidInput, RequestError, RequestTimeout, reason


def bounded_h11(cfg) -> type:
    """The protocol class uvicorn instantiates per connection, with cfg's (a ServeConfig) header limits."""
    return type(
        "BoundedH11Protocol",
        (BoundedH11Protocol,),
        {"max_header_bytes": cfg.max_header_bytes, "header_timeout_s": cfg.header_timeout_s},
    )


def _raw(error: RequestError) -> bytes:
    body = json.dumps({"detail": error.message}).encode()
    return (
        f"HTTP/1.1 {error.status} {reason(error)}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for the request line + headers (uvicorn has none: a client
    trickling a header would hold its connection forever) and a real header-size limit.

    Neither parser limits headers that arrive whole: httptools has no limit, and h11's
    max_incomplete_event_size only bounds a header block still incomplete in its buffer (a 20 KB header
    in one packet passes a 16 KB setting). So the bytes before the blank line are counted here, as they
    arrive, and a request past max_header_bytes is answered 431 without being parsed further.
    """

    max_header_bytes = 64 << 10  # set per server by bounded_h11
    header_timeout_s = 10.0
    _header_timer = None
    _head = 0  # bytes of the current request head seen so far
    _counting = True  # between requests: counting head bytes until the blank line
    _tail = b""

    def data_received(self, data: bytes) -> None:
        if self._counting:
            seen = self._tail + data
            end = seen.find(b"\r\n\r\n")
            self._head += len(data) if end < 0 else end + 4 - len(self._tail)
            self._tail = seen[-3:]
            if self._head > self.max_header_bytes:
                self._refuse(HeadersTooLarge(f"request line + headers exceed {self.max_header_bytes} bytes"))
                return
            if end >= 0:
                self._counting, self._head, self._tail = False, 0, b""
        super().data_received(data)

    def _refuse(self, error: RequestError) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(_raw(error))
            self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        if self.conn.our_state is h11.IDLE:
            self._refuse(RequestTimeout(f"request headers not complete within {self.header_timeout_s:g} s"))

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # an h11.Request: the headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY:  # answered before the body came (408, 413): no reuse
            self.transport.close()
        elif not self.transport.is_closing():
            self._counting, self._head, self._tail = True, 0, b""
            self._arm()  # the next request's headers get the same deadline (idle: keep-alive closes first)

    def send_400_response(self, msg: str) -> None:
        exc = sys.exc_info()[1]  # called inside uvicorn's `except h11.RemoteProtocolError`
        status = getattr(exc, "error_status_hint", 400) if isinstance(exc, h11.RemoteProtocolError) else 400
        if status == 431:  # h11's own hint
            self._refuse(HeadersTooLarge(f"request line + headers exceed {self.max_header_bytes} bytes"))
        else:
            self._refuse(InvalidInput(f"invalid HTTP request ({str(exc)[:120] if exc else msg})"))
