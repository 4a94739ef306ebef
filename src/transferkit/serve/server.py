"""One uvicorn process running the app, with every connection-level limit of the config."""

from __future__ import annotations

import logging

from transferkit.serve.app import create_app
from transferkit.serve.config import ServeConfig


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run one uvicorn process (scale out with replicas, not workers: each holds its own sessions)."""
    import uvicorn

    from transferkit.serve.protocol import bounded_h11

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(cfg),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        http=bounded_h11(cfg),
        h11_max_incomplete_event_size=cfg.max_header_bytes,
        limit_concurrency=cfg.max_connections,
        timeout_keep_alive=cfg.keep_alive_s,
    )
