"""The Open Inference Protocol (KServe V2, Triton's HTTP/REST API) on `transferkit serve`, next to /v1.

    GET  /v2/health/live | /v2/health/ready           200 (empty body), or 400 {"error"} when not ready
    GET  /v2                                           server metadata (extensions: binary_tensor_data)
    GET  /v2/models/{name}[/versions/{v}]              tensor names, datatypes and shapes from the ONNX graph
    GET  /v2/models/{name}[/versions/{v}]/ready        200; 400 {"error"} not ready, 404 no such model/version
    POST /v2/models/{name}[/versions/{v}]/infer        JSON tensors, or binary tensors after a JSON header of
                                                       `Inference-Header-Content-Length` bytes

A preprocessed FP32 NCHW tensor goes in, logits come out, from the same ServedModel, Batcher, limits, auth and
metrics as /v1: the same versions (checked, warmed up and reference-replayed before they serve),
one version per response (`model_version`), hot swap on `latest`. A version in the path must be the one
that serves (the repository's `latest`, or the fallback /readyz names); any other is a 404.

Every answer under /v2 but a 200 is the protocol's {"error": "<one readable message>"} (errors.py's handlers
pick the shape by path). Checks, each before any inference: one input, named and typed as the graph says;
shape [N, C, H, W] with H, W, C as the graph's and 1 <= N <= max_batch_size (413 beyond); element count or
binary size equal to the shape's; finite values; requested outputs that exist. A JSON header holds
parsing.json_cost of the in-flight budget while parsed (per element and per object/array, not per byte:
2 bytes of JSON can be 64 of parse tree and Python objects, `{},` 137).
"""

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, Field

from transferkit.serve.errors import InvalidInput, NotFound, PayloadTooLarge, error_responses
from transferkit.serve.parsing import INLINE_JSON, json_cost, parse_json, read_body

if TYPE_CHECKING:
    from transferkit.serve.context import Context
    from transferkit.serve.model import ServedModel

# onnxruntime's element types -> the protocol's datatypes (and the little-endian numpy dtype of their bytes)
_DATATYPES = {
    "tensor(float)": ("FP32", "<f4"),
    "tensor(float16)": ("FP16", "<f2"),
    "tensor(double)": ("FP64", "<f8"),
    "tensor(int8)": ("INT8", "i1"),
    "tensor(int16)": ("INT16", "<i2"),
    "tensor(int32)": ("INT32", "<i4"),
    "tensor(int64)": ("INT64", "<i8"),
    "tensor(uint8)": ("UINT8", "u1"),
    "tensor(uint16)": ("UINT16", "<u2"),
    "tensor(uint32)": ("UINT32", "<u4"),
    "tensor(uint64)": ("UINT64", "<u8"),
    "tensor(bool)": ("BOOL", "?"),
}


# --------------------------------------------------------------------------- protocol objects (OpenAPI too)


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(..., description="-1: any size (the batch dimension)")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class RequestInput(BaseModel):
    name: str = Field(..., max_length=256)
    shape: list[int] = Field(..., max_length=16, fail_fast=True)
    datatype: str = Field(..., max_length=16)
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data_size": bytes after the JSON header}')
    data: list[Any] | None = Field(None, description="row-major values, flat or nested")


class RequestOutput(BaseModel):
    name: str = Field(..., max_length=256)
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data": true} for raw bytes')


class InferenceRequest(BaseModel):
    id: str | None = Field(None, max_length=256)
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data_output": true}: every output raw')
    inputs: list[RequestInput] = Field(..., min_length=1, max_length=16, fail_fast=True)
    outputs: list[RequestOutput] | None = Field(None, max_length=16, fail_fast=True)


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class ErrorObject(BaseModel):
    error: str = Field(..., description="one readable message")


_ERROR_TEXT = {
    400: "malformed request, a tensor that does not match the model's metadata, or the model not ready",
    401: "missing or wrong bearer token",
    404: "no such model or version",
    408: "the body did not arrive within body_timeout_s",
    413: "over a limit: body bytes, batch size (max_batch_size)",
    422: "a header or path parameter of the wrong type",
    503: "not loaded yet, or busy (concurrency / in-flight budget): retry later",
}


def _errors(*codes: int) -> dict:
    return error_responses(ErrorObject, _ERROR_TEXT, *codes)


def _infer_body() -> dict:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
                },
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "a JSON inference request of Inference-Header-Content-Length "
                    "bytes, then each binary input's bytes in input order",
                },
            },
        }
    }


# --------------------------------------------------------------------------- tensors


def tensor_metadata(model: "ServedModel") -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) as the protocol reports them, from the graph read at load; symbolic dims are -1."""

    def one(t) -> dict:
        return {
            "name": t.name,
            "datatype": _DATATYPES.get(t.type, (t.type, None))[0],
            "shape": [d if isinstance(d, int) and d >= 0 else -1 for d in t.shape],
        }

    return [one(t) for t in model.inputs], [one(t) for t in model.outputs if t.name == model.output_name]


def _parse_request(raw: bytes) -> InferenceRequest:
    return parse_json(InferenceRequest, raw, "inference request", "inference request {loc}: {msg}", "request")


def input_tensor(req: InferenceRequest, binary: memoryview, model, max_batch: int) -> np.ndarray:
    """The model's input as an array, after every check against the graph's metadata."""
    (meta_in,), _ = tensor_metadata(model)
    name, want_dt, want_shape = meta_in["name"], meta_in["datatype"], meta_in["shape"]
    if len(req.inputs) != 1 or req.inputs[0].name != name:
        got = [i.name[:64] for i in req.inputs]
        raise InvalidInput(f"model {model.name!r} takes one input {name!r} ({want_dt} {want_shape}); got {got}")
    t = req.inputs[0]
    if t.datatype != want_dt:
        raise InvalidInput(f"input {name!r}: datatype {t.datatype[:16]!r}, the model takes {want_dt}")
    shape = t.shape
    if len(shape) != len(want_shape) or any(w >= 0 and s != w for s, w in zip(shape, want_shape)) or min(shape) < 0:
        raise InvalidInput(f"input {name!r}: shape {shape}, the model takes {want_shape}")
    if not 1 <= shape[0]:
        raise InvalidInput(f"input {name!r}: batch size {shape[0]}: at least 1")
    if shape[0] > max_batch:
        raise PayloadTooLarge(f"input {name!r}: batch size {shape[0]}; the limit is {max_batch} (max_batch_size)")
    if want_dt != "FP32":  # every graph export writes is FP32 in; anything else is not a transferkit model
        raise InvalidInput(f"input {name!r}: datatype {want_dt} is not served")
    size = (t.parameters or {}).get("binary_data_size")
    x = _binary_input(t, size, binary) if size is not None else _json_input(t, binary)
    bad = int(np.count_nonzero(~np.isfinite(x)))
    if bad:
        raise InvalidInput(f"input {name!r}: {bad} values are not finite FP32 numbers")
    return x


_FP32 = np.dtype(_DATATYPES["tensor(float)"][1])


def _binary_input(t: RequestInput, size, binary: memoryview) -> np.ndarray:
    """An FP32 input sent as raw bytes after the JSON header (binary tensor data extension)."""
    count, item = int(np.prod(t.shape)), _FP32.itemsize
    if t.data is not None:
        raise InvalidInput(f"input {t.name!r}: both binary_data_size and data")
    if not isinstance(size, int) or isinstance(size, bool) or size != count * item:
        raise InvalidInput(
            f"input {t.name!r}: binary_data_size {str(size)[:32]} for shape {t.shape} "
            f"({count} x {item} bytes = {count * item})",
        )
    if len(binary) != size:
        raise InvalidInput(f"input {t.name!r}: binary_data_size {size}, but {len(binary)} bytes follow the JSON header")
    return np.frombuffer(binary, dtype=_FP32).reshape(t.shape)


def _json_input(t: RequestInput, binary: memoryview) -> np.ndarray:
    """An FP32 input sent as JSON numbers (flat or nested, row-major)."""
    count = int(np.prod(t.shape))
    if len(binary):
        raise InvalidInput(f"{len(binary)} bytes after the JSON header, but no input has binary_data_size")
    if t.data is None:
        raise InvalidInput(f'input {t.name!r}: no data (JSON "data" or binary_data_size)')
    try:
        a = np.asarray(t.data)
    except (ValueError, TypeError):
        raise InvalidInput(f"input {t.name!r}: data is not a regular array of numbers") from None
    if a.dtype.kind not in "iuf":
        what = {"U": "strings", "S": "strings", "b": "booleans"}.get(a.dtype.kind, "values of mixed types")
        raise InvalidInput(f"input {t.name!r}: data holds {what}, not numbers")
    if a.size != count:
        raise InvalidInput(f"input {t.name!r}: {a.size} values for shape {t.shape} ({count})")
    with np.errstate(over="ignore"):
        return a.astype(np.float32).reshape(t.shape)


def _outputs_wanted(req: InferenceRequest, served: str) -> bool:
    """Whether the output goes back as binary; 400 for an output the model does not have."""
    binary = bool((req.parameters or {}).get("binary_data_output", False))
    for o in req.outputs or []:
        if o.name != served:
            raise InvalidInput(f"requested output {o.name[:64]!r}: the model's output is {served!r}")
        if "binary_data" in (o.parameters or {}):
            binary = bool(o.parameters["binary_data"])
    return binary


# --------------------------------------------------------------------------- routes


def add_routes(app, ctx: "Context") -> None:
    """Register the /v2 routes on the app, with the /v1 routes' auth, model registry, body reader and budget."""
    _health_routes(app, ctx)
    _metadata_routes(app, ctx)
    _infer_routes(app, ctx)


def _served(ctx: "Context", name: str, version: str | None) -> "ServedModel":
    """The version that answers: the slot's current one, which a path version must name."""
    model = ctx.registry.lookup(name).current
    if version is not None and version != str(model.version):
        raise NotFound(
            f"model {name!r} version {version[:32]!r} is not loaded (serving version "
            f"{model.version}; a version serves once `latest` names it)",
        )
    return model


def _metadata(ctx: "Context", name: str, version: str | None) -> dict:
    model = _served(ctx, name, version)
    inputs, outputs = tensor_metadata(model)
    return {
        "name": name,
        "versions": [str(model.version)],
        "platform": "onnxruntime_onnx",
        "inputs": inputs,
        "outputs": outputs,
    }


def _ready(ctx: "Context", name: str, version: str | None):
    from fastapi.responses import Response

    if name not in ctx.registry.slots:
        raise ctx.registry.unknown(name)
    if ctx.registry.slots[name].current is None:
        raise InvalidInput(f"model {name!r} is not ready ({ctx.registry.ready()[1]})")
    _served(ctx, name, version)
    return Response(status_code=200)


async def _read_request(ctx: "Context", request, held, header_len: int | None) -> tuple[InferenceRequest, memoryview]:
    """The JSON inference request and the binary tensor bytes after it."""
    raw = await read_body(request, ctx.cfg, held)
    if header_len is None:
        header_len = len(raw)
    if header_len > len(raw):
        raise InvalidInput(f"Inference-Header-Content-Length {header_len} exceeds the body's {len(raw)} bytes")
    head, binary = raw[:header_len], memoryview(raw)[header_len:]
    await held.take(json_cost(head))
    if len(head) > INLINE_JSON:
        return await asyncio.get_running_loop().run_in_executor(ctx.decode_pool, _parse_request, head), binary
    return _parse_request(head), binary


async def _infer(ctx: "Context", name: str, version: str | None, request, header_len: int | None):
    t0 = time.perf_counter()
    ctx.auth(request)
    _served(ctx, name, version)  # 404 / 503 before the body is read
    async with ctx.held() as held:
        req, binary = await _read_request(ctx, request, held, header_len)
        # one version for the whole request, even if a swap lands meanwhile; held until the answer is made
        model = _served(ctx, name, version)
        with model.in_use():
            x = input_tensor(req, binary, model, ctx.cfg.max_batch_size)
            as_binary = _outputs_wanted(req, model.output_name)
            out = await ctx.registry.infer(model, x)
    answer = _answer(name, model, req, out, as_binary)
    ctx.metrics.answered(name, len(x), t0)
    return answer


def _answer(name: str, model: "ServedModel", req: InferenceRequest, out: np.ndarray, as_binary: bool):
    from fastapi.responses import JSONResponse, Response

    out = np.ascontiguousarray(out, dtype="<f4")
    if not np.isfinite(out).all():  # JSON has no NaN/inf; never send what a client cannot parse
        raise InvalidInput("these inputs give non-finite logits")
    tensor: dict[str, Any] = {"name": model.output_name, "shape": list(out.shape), "datatype": "FP32"}
    answer: dict[str, Any] = {"model_name": name, "model_version": str(model.version)}
    if req.id is not None:
        answer["id"] = req.id
    answer["outputs"] = [tensor]
    headers = {"X-Model-Version": str(model.version)}
    if not as_binary:
        tensor["data"] = out.ravel().tolist()
        return JSONResponse(answer, headers=headers)
    data = out.tobytes()
    tensor["parameters"] = {"binary_data_size": len(data)}
    head_out = json.dumps(answer, separators=(",", ":")).encode()
    return Response(
        head_out + data,
        media_type="application/octet-stream",
        headers={**headers, "Inference-Header-Content-Length": str(len(head_out))},
    )


def _health_routes(app, ctx: "Context") -> None:
    from fastapi.responses import Response

    @app.get("/v2/health/live", status_code=200, response_class=Response, responses={200: {"description": "live"}})
    async def v2_live():
        return Response(status_code=200)

    @app.get(
        "/v2/health/ready",
        response_class=Response,
        responses={
            200: {"description": "ready as /readyz is (every --model serves, else one found does)"},
            **_errors(400),
        },
    )
    async def v2_ready():
        ok, why = ctx.registry.ready()
        if not ok:
            raise InvalidInput(f"not ready: {why}")
        return Response(status_code=200)


def _metadata_routes(app, ctx: "Context") -> None:
    from fastapi.requests import Request
    from fastapi.responses import Response

    from transferkit import __version__

    @app.get("/v2", response_model=ServerMetadata, responses=_errors(401))
    async def v2_server(request: Request):
        ctx.auth(request)
        return {"name": "transferkit", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{name}", response_model=ModelMetadata, responses=_errors(401, 404, 503))
    async def v2_model(name: str, request: Request):
        ctx.auth(request)
        return _metadata(ctx, name, None)

    @app.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata, responses=_errors(401, 404, 503))
    async def v2_model_version(name: str, version: str, request: Request):
        ctx.auth(request)
        return _metadata(ctx, name, version)

    ready_doc = {200: {"description": "ready"}, **_errors(400, 401, 404)}

    @app.get("/v2/models/{name}/ready", response_class=Response, responses=ready_doc)
    async def v2_model_ready(name: str, request: Request):
        ctx.auth(request)
        return _ready(ctx, name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready", response_class=Response, responses=ready_doc)
    async def v2_model_version_ready(name: str, version: str, request: Request):
        ctx.auth(request)
        return _ready(ctx, name, version)


_INFER_DOC = dict(
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "JSON, or with binary outputs a JSON header of "
            "Inference-Header-Content-Length bytes + the outputs' bytes",
        },
        **_errors(400, 401, 404, 408, 413, 422, 503),
    },
)


def _infer_routes(app, ctx: "Context") -> None:
    from fastapi import Header
    from fastapi.requests import Request

    hcl = Header(
        None,
        alias="Inference-Header-Content-Length",
        ge=0,
        description="bytes of JSON before the binary tensors (binary tensor data extension)",
    )
    doc = dict(response_model=InferenceResponse, openapi_extra=_infer_body(), **_INFER_DOC)

    @app.post("/v2/models/{name}/infer", **doc)
    async def v2_infer(name: str, request: Request, inference_header_content_length: int | None = hcl):
        return await _infer(ctx, name, None, request, inference_header_content_length)

    @app.post("/v2/models/{name}/versions/{version}/infer", **doc)
    async def v2_infer_version(
        name: str, version: str, request: Request, inference_header_content_length: int | None = hcl
    ):
        return await _infer(ctx, name, version, request, inference_header_content_length)
