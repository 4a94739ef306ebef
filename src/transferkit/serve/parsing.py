"""Request parsing: the body read within its byte and time limits, JSON documents validated into one
readable 400, and the images of a predict request (multipart files, a JSON base64 batch, or one raw body)."""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, ValidationError

from transferkit.serve.decode import ALLOWED_TYPES, OCTET
from transferkit.serve.errors import InvalidInput, PayloadTooLarge, RequestTimeout, UnsupportedMediaType

if TYPE_CHECKING:
    from transferkit.serve.config import ServeConfig
    from transferkit.serve.limits import Held


class PredictJSON(BaseModel):
    """The JSON form of a predict request."""

    images: list[str] = Field(
        ...,
        min_length=1,
        fail_fast=True,  # one error, not one per item: 8 MB of [0,0,...] made 2.8M error objects (3.3 GB)
        description="base64 images (PNG, JPEG, WebP, BMP, GIF, TIFF); a data: URL prefix is accepted",
        json_schema_extra={"items": {"type": "string", "format": "byte", "contentEncoding": "base64"}},
    )


def json_cost(raw: bytes) -> int:
    """Bytes of the in-flight budget a JSON document may cost while parsed, on top of the body itself:
    pydantic-core's parse tree plus the Python objects it becomes (an error's `input` converts the whole
    subtree). Per element (a comma or colon) ~80 B however short ("0," costs 64 B), per object/array ~100 B
    more (`{},` costs 137 B: 46x its bytes), strings ~3x their bytes. Counted in C in a few ms per 8 MB."""
    elements = raw.count(b",") + raw.count(b":") + 1
    return 4 * len(raw) + 80 * elements + 96 * (raw.count(b"{") + raw.count(b"["))


def parse_json(model: type[BaseModel], raw: bytes, what: str, wrong: str, where: str | None = None):
    """`raw` validated as `model` by pydantic-core's parser (bounded nesting depth: no RecursionError); a 400
    saying "<what> is not valid JSON", or `wrong` formatted with the first error's {loc} and {msg}."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise InvalidInput(f"{what} is not valid JSON ({err['msg'][:200]})") from None
        loc = ".".join(str(x) for x in err["loc"]) or where or what
        raise InvalidInput(wrong.format(loc=loc, msg=err["msg"][:200])) from None


async def read_body(request, cfg: ServeConfig, held: Held) -> bytes:
    """The whole body, through Starlette's public stream, within max_body_bytes and body_timeout_s; the
    in-flight budget holds twice its size (the body and its parsed copies: base64, multipart parts)."""
    import anyio
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise InvalidInput(f"Content-Length {declared[:40]!r} is not a number")
        if int(declared) > cfg.max_body_bytes:
            raise PayloadTooLarge(f"request body is {int(declared)} bytes; the limit is {cfg.max_body_bytes}")
        await held.take(2 * int(declared))
    chunks, total = [], 0
    try:
        with anyio.fail_after(cfg.body_timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > cfg.max_body_bytes:
                    raise PayloadTooLarge(f"request body exceeds the limit of {cfg.max_body_bytes} bytes")
                if declared is None:
                    await held.take(2 * len(chunk))
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"request body not complete within {cfg.body_timeout_s:g} s ({total} bytes received)"
        ) from None
    except ClientDisconnect:
        raise InvalidInput(f"client disconnected after {total} bytes of the body") from None
    return b"".join(chunks)


INLINE_JSON = 256 << 10  # larger JSON bodies are parsed on a thread, not the event loop
ImageBytes = tuple[bytes, str, str | None]  # bytes, where (for messages), content type if the request gave one


async def request_images(request, cfg: ServeConfig, held: Held) -> list[ImageBytes]:
    """(bytes, where, content type) of each image in a predict request, within the count limit."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, cfg, held)
    if ctype == "multipart/form-data":
        out = await _form_images(request, body, cfg)
    elif ctype == "application/json":
        await held.take(json_cost(body))
        if len(body) > INLINE_JSON:
            out = await asyncio.get_running_loop().run_in_executor(None, _json_images, body, cfg)
        else:
            out = _json_images(body, cfg)
    elif ctype in ALLOWED_TYPES or ctype == OCTET:
        out = [(body, "request body", ctype)]
    else:
        raise UnsupportedMediaType(
            f"content type {ctype[:80] or 'none'} not accepted: send multipart/form-data, "
            f'application/json {{"images": [base64]}}, or one image/* body',
        )
    if not out:
        raise InvalidInput("no image in the request")
    if len(out) > cfg.max_images:
        raise PayloadTooLarge(f"{len(out)} images in one request; the limit is {cfg.max_images}")
    return out


async def _form_images(request, body: bytes, cfg: ServeConfig) -> list[ImageBytes]:
    """The file parts of a multipart body already read: Starlette's form parser runs on a request whose
    receive channel replays those bytes (the original channel is spent)."""
    from starlette.requests import Request

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(
            max_files=cfg.max_images + 1, max_fields=cfg.max_images + 16, max_part_size=cfg.max_body_bytes
        )
    except Exception as e:
        raise InvalidInput(f"malformed multipart body ({str(getattr(e, 'detail', e))[:200]})") from None
    try:
        out = []
        for key, value in form.multi_items():
            if isinstance(value, str):
                continue  # plain fields (e.g. top_k from a form) are not images
            out.append((await value.read(), f"file {(value.filename or key)[:80]!r}", value.content_type or OCTET))
        return out
    finally:
        await form.close()


def _json_images(body: bytes, cfg: ServeConfig) -> list[ImageBytes]:
    doc = parse_json(PredictJSON, body, "body", 'JSON body must be {{"images": ["<base64>", ...]}} ({loc}: {msg})')
    if len(doc.images) > cfg.max_images:
        raise PayloadTooLarge(f"{len(doc.images)} images in one request; the limit is {cfg.max_images}")
    out = []
    for i, b64 in enumerate(doc.images):
        if b64.startswith("data:"):  # a data URL from a browser
            b64 = b64.partition(",")[2]
        try:
            out.append((base64.b64decode(b64, validate=True), f"images[{i}]", None))
        except (binascii.Error, ValueError):
            raise InvalidInput(f"images[{i}]: not valid base64") from None
    return out
