"""Small helpers for the processes transferkit starts (servers, workers): a free loopback port."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on HOST that is free at the time of asking."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
