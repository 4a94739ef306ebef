"""The ASGI app: a Context shared by the /v1 and /v2 routes, the error handlers, the Guard outside them,
and the model watcher in the lifespan."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from transferkit.serve import v1, v2
from transferkit.serve.config import ServeConfig, with_env_token
from transferkit.serve.context import Context
from transferkit.serve.errors import add_handlers
from transferkit.serve.limits import Guard


def create_app(cfg: ServeConfig):
    """The FastAPI app serving cfg.repo; the model watcher runs in its lifespan."""
    from fastapi import FastAPI

    ctx = Context.make(with_env_token(cfg))

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.get_running_loop().create_task(ctx.registry.watch())
        yield
        task.cancel()
        ctx.close()

    app = FastAPI(title="transferkit serve", version="1", lifespan=lifespan)
    app.state.registry, app.state.cfg = ctx.registry, ctx.cfg
    add_handlers(app)
    v1.add_routes(app, ctx)
    v2.add_routes(app, ctx)
    app.add_middleware(Guard, cfg=ctx.cfg, metrics=ctx.metrics, registry=ctx.registry)
    return app
