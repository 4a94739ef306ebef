"""ServeConfig: every limit and setting of `transferkit serve`, checked at start."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import BaseModel, Field, field_validator, model_validator

from transferkit.serve.decode import decode_cost

TOKEN_ENV = "TRANSFERKIT_SERVE_TOKEN"
TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]{1,4096}=*")


class ServeConfig(BaseModel):
    """Everything `transferkit serve` can set; defaults suit one CPU/GPU replica."""

    repo: Path
    models: list[str] | None = Field(None, description="names to serve (default: every model with a `latest`)")
    batching: bool = Field(True, description="dynamic batching across requests")
    max_batch_size: int = Field(32, ge=1, le=1024)
    # 0: a batch is what queued while the previous one ran (no added latency when alone; batches still form
    # under load). A few ms fill larger batches where a batch costs little more than one image (GPUs).
    max_queue_delay_ms: float = Field(0.0, ge=0, le=1000, description="longest a request waits for batch-mates")
    poll_interval_s: float = Field(1.0, gt=0, description="how often `latest` is checked")
    max_body_bytes: int = Field(8 << 20, ge=1024)
    max_image_pixels: int = Field(16_000_000, ge=1, description="width x height, checked before decoding")
    max_image_side: int = Field(8192, ge=1)
    max_images: int = Field(64, ge=1, description="images per request")
    max_request_pixels: int = Field(32_000_000, ge=1, description="sum of width x height over a request's images")
    max_inflight_bytes: int = Field(
        1 << 30,
        ge=1 << 20,
        description="process budget: request bodies (x2, parsed copies) + the decode memory of the image being "
        "decoded, over all requests in flight; a request that does not fit waits up to queue_timeout_s, then 503",
    )
    max_concurrency: int = Field(64, ge=1, description="requests in flight at once; beyond: 503 at once")
    max_connections: int = Field(1024, ge=1, description="open connections (uvicorn's limit_concurrency)")
    decode_threads: int = Field(0, ge=0, description="threads decoding images (0: min(4, CPUs))")
    queue_timeout_s: float = Field(10.0, gt=0, description="longest wait for the in-flight budget")
    header_timeout_s: float = Field(10.0, gt=0, description="request line + headers must arrive within this")
    body_timeout_s: float = Field(30.0, gt=0, description="the whole body must arrive within this")
    keep_alive_s: int = Field(5, ge=1, description="idle keep-alive connections are closed after this")
    max_header_bytes: int = Field(64 << 10, ge=1024, description="request line + headers (h11's limit)")
    default_top_k: int = Field(5, ge=1)
    token: str | None = Field(None, description=f"bearer token for /v1 (default: ${TOKEN_ENV})", repr=False)
    int8: bool = Field(False, description="serve model.int8.onnx where export kept one")
    threads: int = Field(0, ge=0, description="onnxruntime intra-op threads (0: its default)")
    workers: int = Field(4, ge=1, description="inference threads when batching is off")
    monitor_dir: Path | None = Field(None, description="reservoir of served inputs for drift monitoring")
    monitor_size: int = Field(200, ge=1, le=100_000)
    monitor_px: int = Field(64, ge=8, le=1024, description="longest side of stored monitor images")
    seed: int = 0

    @field_validator("token")
    @classmethod
    def _token_alphabet(cls, v: str | None) -> str | None:
        # RFC 6750 b64token: what every HTTP client can put in a header (non-ASCII cannot be sent portably)
        if v is not None and not TOKEN_RE.fullmatch(v):
            raise ValueError(
                "the bearer token must be 1-4096 characters of A-Z a-z 0-9 - . _ ~ + / "
                "(optionally ending in =): the RFC 6750 alphabet every HTTP client can send"
            )
        return v

    @field_validator("models")
    @classmethod
    def _model_names(cls, v: list[str] | None) -> list[str] | None:
        from transferkit.modelrepo.repository import check_model_name

        for name in v or []:
            check_model_name(name)
        return v

    @model_validator(mode="after")
    def _budget_fits(self) -> ServeConfig:
        need = 2 * self.max_body_bytes + decode_cost(self.max_image_pixels, "I;16")
        if self.max_inflight_bytes < need:
            raise ValueError(
                f"max_inflight_bytes {self.max_inflight_bytes} cannot hold one request at the limits "
                f"(2 x max_body_bytes + the decode cost of max_image_pixels = {need})"
            )
        return self


def with_env_token(cfg: ServeConfig) -> ServeConfig:
    """The config with $TRANSFERKIT_SERVE_TOKEN's token when none was given (how container images pass it)."""
    if cfg.token is None and os.environ.get(TOKEN_ENV):
        return ServeConfig.model_validate({**dict(cfg), "token": os.environ[TOKEN_ENV].strip()})
    return cfg
