"""Errors -> status codes: the two error types, the error object's shape per protocol, the app's handlers."""

from __future__ import annotations

import json

from transferkit.errors import TransferkitError


class RequestError(Exception):
    """A client error: its status code and one readable message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class LoadError(TransferkitError, ValueError):
    """A version that must not serve."""


def error_key(path: str) -> str:
    """The error object's key: the Open Inference Protocol's "error" under /v2, else {"detail"}."""
    return "error" if path == "/v2" or path.startswith("/v2/") else "detail"


def raw_error(status: int, detail: str, headers: list[tuple[bytes, bytes]] = (), path: str = "") -> tuple[dict, dict]:
    """The two ASGI messages of an error answer, for layers outside FastAPI (the Guard middleware)."""
    body = json.dumps({error_key(path): detail}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    return {"type": "http.response.start", "status": status, "headers": hdrs}, {
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
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        if e.status == 503:
            headers = {"Retry-After": "1"}
        return JSONResponse({error_key(request.url.path): e.message}, status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        return JSONResponse({error_key(request.url.path): _validation_message(e)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)[:200]
        if e.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.url.path[:80]!r} (see /docs)"
        return JSONResponse(
            {error_key(request.url.path): detail}, status_code=e.status_code, headers=getattr(e, "headers", None)
        )
