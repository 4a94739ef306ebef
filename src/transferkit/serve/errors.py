"""Errors -> status codes, in one table (the KServe way): the server raises typed errors, `STATUS` maps each type
to its HTTP code and `HEADERS` to the headers its answer carries; the error object's shape per protocol; the
app's handlers. No code path chooses a number."""

from __future__ import annotations

import json
from http import HTTPStatus

from transferkit.core.errors import TransferkitError


class RequestError(Exception):
    """A client error with one readable message; its type says which (`STATUS`)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @property
    def status(self) -> int:
        return next(STATUS[t] for t in type(self).__mro__ if t in STATUS)

    @property
    def headers(self) -> dict[str, str]:
        return next((HEADERS[t] for t in type(self).__mro__ if t in HEADERS), {})


class InvalidInput(RequestError):
    """The request cannot be read or does not fit the model: bad image bytes, tensor, field, framing."""


class InvalidParameter(RequestError):
    """A path or query parameter out of its declared range (FastAPI's validation)."""


class Unauthorized(RequestError):
    """The bearer token is missing or wrong."""


class NotFound(RequestError):
    """No such model, version or route."""


class RequestTimeout(RequestError):
    """The request's headers or body did not arrive in time."""


class PayloadTooLarge(RequestError):
    """Over a size limit: body, image pixels, images per request, batch, in-flight budget."""


class UnsupportedMediaType(RequestError):
    """Not an image format the server decodes."""


class HeadersTooLarge(RequestError):
    """Request line + headers over the limit."""


class InternalError(RequestError):
    """A bug on the server's side (logged), answered in the same shape."""


class ServerBusy(RequestError):
    """Over a concurrency or budget limit for now, or nothing of the model is loaded yet: retry later."""


STATUS: dict[type[RequestError], int] = {
    InvalidInput: 400,
    Unauthorized: 401,
    NotFound: 404,
    RequestTimeout: 408,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidParameter: 422,
    HeadersTooLarge: 431,
    InternalError: 500,
    ServerBusy: 503,
}
HEADERS: dict[type[RequestError], dict[str, str]] = {
    Unauthorized: {"WWW-Authenticate": "Bearer"},
    ServerBusy: {"Retry-After": "1"},
}


def reason(error: RequestError) -> str:
    """The status line's reason phrase."""
    return HTTPStatus(error.status).phrase


class LoadError(TransferkitError, ValueError):
    """A version that must not serve."""


def error_key(path: str) -> str:
    """The error object's key: the Open Inference Protocol's "error" under /v2, else {"detail"}."""
    return "error" if path == "/v2" or path.startswith("/v2/") else "detail"


def raw_error(error: RequestError, path: str = "") -> tuple[dict, dict]:
    """The two ASGI messages of an error answer, for layers outside FastAPI (the Guard middleware)."""
    body = json.dumps({error_key(path): error.message}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    return {"type": "http.response.start", "status": error.status, "headers": hdrs}, {
        "type": "http.response.body",
        "body": body,
    }


def error_responses(model, texts: dict[int, str], *codes: int) -> dict:
    """OpenAPI `responses` for these codes: the protocol's error object and what each code means."""
    return {c: {"model": model, "description": texts[c]} for c in codes}


def _validation_message(e) -> str:
    parts = []
    for err in e.errors()[:3]:
        loc = [str(x) for x in err.get("loc", ())]
        where = f"{loc[0]} parameter {'.'.join(loc[1:])!r}" if len(loc) > 1 else ".".join(loc) or "request"
        parts.append(f"{where}: {err.get('msg')} (got {str(err.get('input'))[:40]!r})")
    return "; ".join(parts)


def add_handlers(app) -> None:
    """Every error the app raises answers its status with one string under the path's error key."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestError)
    async def _request_error(request, e: RequestError):
        return JSONResponse({error_key(request.url.path): e.message}, status_code=e.status, headers=e.headers or None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return await _request_error(request, InvalidParameter(_validation_message(e)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)[:200]
        if e.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.url.path[:80]!r} (see /docs)"
        return JSONResponse(
            {error_key(request.url.path): detail}, status_code=e.status_code, headers=getattr(e, "headers", None)
        )
