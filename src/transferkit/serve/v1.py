"""The /v1 routes (predict on images, model status) and the probes, metrics and upload page."""

import time
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, Field

from transferkit.core.numeric import softmax
from transferkit.serve.decode import ALLOWED_TYPES, decode_cost, decode_image, probe_image
from transferkit.serve.errors import PayloadTooLarge, error_responses
from transferkit.serve.parsing import ImageBytes, PredictJSON, request_images

if TYPE_CHECKING:
    from transferkit.serve.context import Context
    from transferkit.serve.limits import Held
    from transferkit.serve.model import ServedModel
    from transferkit.serve.registry import Slot


class ErrorBody(BaseModel):
    detail: str = Field(..., description="one readable message")


class TopK(BaseModel):
    label: str
    index: int
    probability: float


class Prediction(BaseModel):
    top_k: list[TopK]
    logits: list[float] | None = None


class PredictAnswer(BaseModel):
    model: str
    version: int
    provider: str
    predictions: list[Prediction]


# an 8x8 grey PNG: the example a schema-driven fuzzer sends as a real image
_EXAMPLE_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAAEElEQVR4nGNgYGD4j4YZGAAyNgT8/pvfSQAAAABJRU5ErkJggg=="


def _openapi_predict_body(max_images: int) -> dict:
    raw = {"schema": {"type": "string", "format": "binary"}}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        **PredictJSON.model_json_schema(),
                        "properties": {
                            "images": {
                                "type": "array",
                                "minItems": 1,
                                "maxItems": max_images,
                                "items": {"type": "string", "format": "byte"},
                            }
                        },
                    },
                    "example": {"images": [_EXAMPLE_PNG]},
                },
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                },
                **{ct: raw for ct in sorted(ALLOWED_TYPES)},
            },
        }
    }


def _errors(*codes: int) -> dict:
    return error_responses(ErrorBody, _ERROR_TEXT, *codes)


_ERROR_TEXT = {
    400: "malformed input (JSON, base64, multipart, image data)",
    401: "missing or wrong bearer token",
    404: "no such model",
    408: "the body did not arrive within body_timeout_s",
    413: "over a limit: body bytes, image pixels or side, pixels per request, images per request",
    415: "content type or image format not accepted",
    422: "a query parameter out of range",
    503: "not ready, or busy (concurrency / in-flight budget): retry later",
}


# --------------------------------------------------------------------------- routes


def add_routes(app, ctx: "Context") -> None:
    _predict_route(app, ctx)
    _status_routes(app, ctx)
    _probe_routes(app, ctx)


def _predict_route(app, ctx: "Context") -> None:
    from fastapi import Query, Request
    from fastapi.responses import JSONResponse

    @app.post(
        "/v1/models/{name}/predict",
        response_model=PredictAnswer,
        openapi_extra=_openapi_predict_body(ctx.cfg.max_images),
        responses=_errors(400, 401, 404, 408, 413, 415, 422, 503),
    )
    async def predict(
        name: str,
        request: Request,
        top_k: int | None = Query(None, ge=1, le=1000, description="labels per image (default 5, at most all)"),
        logits: bool = Query(False, description="also return the raw logits"),
    ):
        t0 = time.perf_counter()
        ctx.auth(request)
        slot = ctx.registry.lookup(name)
        model, out, thumbs = await _classify(ctx, slot, request)
        if slot.reservoir is not None:
            # only requests that were served: a rejected upload is not traffic the model saw
            await _offer(slot.reservoir, thumbs, model.version)
        k = min(top_k or ctx.cfg.default_top_k, len(model.classes))
        preds = _predictions(model, out, k, logits)
        ctx.metrics.answered(name, len(out), t0)
        body = {"model": name, "version": model.version, "provider": model.provider, "predictions": preds}
        return JSONResponse(body, headers={"X-Model-Version": str(model.version)})


async def _classify(ctx: "Context", slot: "Slot", request) -> "tuple[ServedModel, np.ndarray, list]":
    """The request's images through one version (the one serving when decoding starts, even if a swap lands
    meanwhile): (that version, logits, thumbnails for the reservoir)."""
    async with ctx.held() as held:
        images = await request_images(request, ctx.cfg, held)
        await _reserve_decode(ctx, images, held)
        model = slot.current
        with model.in_use():
            x, thumbs = await _decode_all(ctx, model, images, keep=slot.reservoir is not None)
            await held.give_back()  # decoded and preprocessed: the rest is a few kB per image
            return model, await ctx.registry.infer(model, x), thumbs


async def _reserve_decode(ctx: "Context", images: list[ImageBytes], held: "Held") -> None:
    """Sizes from the headers first: nothing is decoded unless the whole request is within the limits; then
    the budget for the largest image's decode (images are decoded one after the other)."""
    import asyncio

    loop = asyncio.get_running_loop()
    probes = [
        await loop.run_in_executor(ctx.decode_pool, probe_image, data, ctx.cfg, where, ct) for data, where, ct in images
    ]
    pixels = sum(w * h for w, h, _, _ in probes)
    if pixels > ctx.cfg.max_request_pixels:
        raise PayloadTooLarge(
            f"{len(images)} images of {pixels} pixels in all; the limit is {ctx.cfg.max_request_pixels} pixels per request",
        )
    await held.take(max(decode_cost(w * h, mode) for w, h, _, mode in probes))


async def _decode_all(ctx: "Context", model: "ServedModel", images: list[ImageBytes], keep: bool):
    """(NCHW batch, thumbnails or Nones): each image decoded and preprocessed on the decode threads."""
    import asyncio

    px = ctx.cfg.monitor_px

    def prep(data, where, ct):
        img = decode_image(data, ctx.cfg, where, ct)[0]
        x = model.preprocess(img)
        if keep:  # the reservoir stores thumbnails: never hold the full decode longer than this
            img.thumbnail((px, px))
            return x, img
        return x, None

    loop = asyncio.get_running_loop()
    done = [await loop.run_in_executor(ctx.decode_pool, prep, *im) for im in images]
    return np.stack([d[0] for d in done]), [d[1] for d in done]


async def _offer(reservoir, thumbs: list, version: int) -> None:
    from starlette.concurrency import run_in_threadpool

    await run_in_threadpool(lambda: [reservoir.offer(t, version) for t in thumbs])


def _predictions(model: "ServedModel", out: np.ndarray, k: int, logits: bool) -> list[dict]:
    probs = softmax(out)
    preds = []
    for row, p in zip(out, probs):
        idx = np.argsort(-p, kind="stable")[:k]
        pred: dict[str, Any] = {
            "top_k": [{"label": model.classes[i], "index": int(i), "probability": float(p[i])} for i in idx]
        }
        if logits:
            pred["logits"] = [float(v) for v in row]
        preds.append(pred)
    return preds


def _status_routes(app, ctx: "Context") -> None:
    from fastapi import Request

    registry = ctx.registry

    @app.get("/v1/models", responses=_errors(401))
    async def models(request: Request):
        ctx.auth(request)
        return {"models": [registry.status(n) for n in sorted(registry.slots)]}

    @app.get("/v1/models/{name}", responses=_errors(401, 404))
    async def model_status(name: str, request: Request):
        ctx.auth(request)
        if name not in registry.slots:
            raise registry.unknown(name)
        return registry.status(name)


def _probe_routes(app, ctx: "Context") -> None:
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from transferkit.serve.page import PAGE

    registry = ctx.registry

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz", responses={503: {"description": "not ready: no version of some model serves"}})
    async def readyz():
        ok, why = registry.ready()
        versions = {n: (s.current.version if s.current else None) for n, s in registry.slots.items()}
        fallback = {n: s.fallback for n, s in registry.slots.items() if s.fallback}
        return JSONResponse(
            {"ready": ok, "detail": why, "versions": versions, "fallback": fallback}, status_code=200 if ok else 503
        )

    prometheus_doc = {
        "description": "Prometheus text exposition format",
        "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
    }

    @app.get("/metrics", response_class=Response, responses={200: prometheus_doc})
    async def prometheus():
        return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE)
