"""Serve: the models of a repository over HTTP on onnxruntime, following REPO/<name>/latest with hot swap.

    transferkit serve --repo models --port 8000                  # every model with a `latest` pointer
    curl -F file=@digit.png localhost:8000/v1/models/digits/predict?top_k=3

Endpoints (FastAPI; OpenAPI at /docs):
  POST /v1/models/{name}/predict  multipart image files (any field name), a JSON batch
                                  {"images": [<base64>, ...]}, or one raw image/* body. Answers
                                  {"model", "version", "provider", "predictions": [{"top_k": [...]}]};
                                  the version is also in the X-Model-Version header.
  GET  /v1/models[/{name}]        what is loaded, swap history, last load failure
  GET  /healthz /readyz /metrics  liveness; readiness (every model loaded and warmed up); Prometheus
  GET  /                          a small upload page
  /v2/...                         the Open Inference Protocol (KServe V2 / Triton HTTP): oip.py

How a version goes live (the watcher polls `latest` every `poll_interval_s`): promote.check_version
(complete, sha256 as recorded), the ONNX file's embedded metadata equal to metadata.json, graph input/output
shapes as the metadata says, a warm-up at batch 1 and max batch, and batch-vs-single parity within the
version's own `parity.atol`. Only then does one reference assignment switch the model; requests already
holding the old model finish on it (every response is from exactly one version) and the old session is
dropped when its last request ends. A version that fails any step is never served; the old one stays and
the failure is reported in /v1/models/{name} and transferkit_model_load_failures_total.

Preprocessing is zoo.eval_transform's (timm eval, crop_pct 1.0) in numpy/PIL, so the image needs no torch:
RGB as data.load_rgb makes it, resize the shorter side to H with the metadata's interpolation (torchvision's
size rule), centre crop HxW, /255, (x - mean) / std, NCHW float32. tests/test_serve.py checks it against
the torch transform and the predictions against an offline onnxruntime run of the same file.

Limits answer 4xx with {"detail": "..."}: 413 body / image pixels / image side / batch size, 415 content
type or image format, 400 malformed input, 401 missing or wrong bearer token (when a token is set), 404
unknown model, 503 not ready. Images are size-checked from their header before any pixel is decoded.

Monitoring: each model keeps a reservoir sample (Algorithm R, bounded count) of served images, downscaled,
in MONITOR/<name>/images/ (PNG) with MONITOR/<name>/reservoir.json; flows/monitor.py runs `drift` on it.
"""

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from transferkit.numeric import softmax

log = logging.getLogger("transferkit.serve")

ALLOWED_TYPES = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/gif": "GIF",
    "image/tiff": "TIFF",
}
OCTET = "application/octet-stream"  # a client that does not know: the decoded format must still be allowed
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
        from transferkit.export import check_model_name

        for name in v or []:
            check_model_name(name)
        return v

    @model_validator(mode="after")
    def _budget_fits(self) -> "ServeConfig":
        need = 2 * self.max_body_bytes + decode_cost(self.max_image_pixels, "I;16")
        if self.max_inflight_bytes < need:
            raise ValueError(
                f"max_inflight_bytes {self.max_inflight_bytes} cannot hold one request at the limits "
                f"(2 x max_body_bytes + the decode cost of max_image_pixels = {need})"
            )
        return self


def decode_cost(pixels: int, mode: str) -> int:
    """Bytes load_rgb holds at once for an image of this size and PIL mode: the decoded planes, the
    intermediate conversions (16-bit via float64, alpha via RGBA) and the RGB result."""
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        per = 4 + 8 + 1 + 3
    elif mode in ("RGBA", "LA", "PA", "La", "RGBa", "P"):
        per = 4 * 3 + 3
    else:
        per = len(mode) + 3 if mode.isalpha() and mode.isupper() else 8
    return int(pixels) * per


class RequestError(Exception):
    """A client error: its status code and one readable message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class LoadError(ValueError):
    """A version that must not serve."""


# --------------------------------------------------------------------------- preprocessing

_INTERP = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}  # PIL codes


def probe_image(
    data: bytes, cfg: ServeConfig, where: str, content_type: str | None = None
) -> tuple[int, int, str, str]:
    """(width, height, format, mode) from the header alone, refusing bombs and formats outside ALLOWED_TYPES."""
    from PIL import Image, UnidentifiedImageError

    if content_type is not None:
        ct = content_type.split(";")[0].strip().lower()
        if ct not in ALLOWED_TYPES and ct != OCTET:
            raise RequestError(
                415,
                f"{where}: content type {ct[:80] or 'none'} not accepted "
                f"(accepted: {', '.join(sorted(ALLOWED_TYPES))})",
            )
    if not data:
        raise RequestError(400, f"{where}: empty image")
    formats = sorted(set(ALLOWED_TYPES.values()))
    try:
        with Image.open(io.BytesIO(data), formats=formats) as im:  # reads the header only
            w, h, fmt, mode = im.size[0], im.size[1], im.format, im.mode
    except UnidentifiedImageError:
        raise RequestError(415, f"{where}: not an image in an accepted format ({', '.join(formats)})") from None
    except Image.DecompressionBombError as e:  # PIL's own guard, from the header: far above our limits too
        raise RequestError(
            413, f"{where}: {e}; limits are {cfg.max_image_side} px a side and {cfg.max_image_pixels} pixels"
        ) from e
    except Exception as e:  # any plugin's parse error on hostile bytes is the client's
        raise RequestError(400, f"{where}: cannot read image header ({type(e).__name__}: {str(e)[:200]})") from None
    if max(w, h) > cfg.max_image_side or w * h > cfg.max_image_pixels:
        raise RequestError(
            413,
            f"{where}: image is {w}x{h} px; limits are {cfg.max_image_side} px a side and "
            f"{cfg.max_image_pixels} pixels",
        )
    if w < 1 or h < 1:
        raise RequestError(400, f"{where}: image has no pixels ({w}x{h})")
    return w, h, fmt, mode


def decode_image(data: bytes, cfg: ServeConfig, where: str, content_type: str | None = None):
    """Bytes -> (RGB PIL image, format), after probe_image's checks."""
    from PIL import Image

    from transferkit.data import load_rgb

    _, _, fmt, _ = probe_image(data, cfg, where, content_type)
    try:
        return load_rgb(io.BytesIO(data)), fmt
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise RequestError(400, f"{where}: cannot decode {fmt} image ({type(e).__name__}: {str(e)[:200]})") from None
    except Exception as e:  # a decoder bug on hostile bytes: still the input's fault, never a 500
        raise RequestError(400, f"{where}: cannot decode {fmt} image ({type(e).__name__})") from None


def preprocess(
    img, input_size: list[int], mean: list[float], std: list[float], interpolation: str | None
) -> np.ndarray:
    """zoo.eval_transform (timm eval, crop_pct=1.0) without torch: [3, H, W] float32.

    Where the crop would discard most of the resized image (aspect ratio beyond 4:1), only the source region
    it keeps is resized (PIL's resize `box`: the same filter taps, coefficients within float rounding, so at
    most one level of 255 apart), so a 1x8192 strip costs a 32x32 resize, not a 32x262144 one.
    """
    _, th, tw = (int(v) for v in input_size)
    resample = _INTERP.get(str(interpolation or "bilinear").lower(), 2)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = th, int(th * long / short)  # torchvision's shorter-side rule
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
    if nw * nh > 4 * th * tw:
        sx, sy = w / nw, h / nh
        img = img.resize((tw, th), resample, box=(left * sx, top * sy, (left + tw) * sx, (top + th) * sy))
    else:
        if (nh, nw) != (h, w):
            img = img.resize((nw, nh), resample)
        if (nh, nw) != (th, tw):
            img = img.crop((left, top, left + tw, top + th))
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


# --------------------------------------------------------------------------- a loaded version


@dataclass
class LoadedModel:
    name: str
    version: int
    path: Path
    meta: dict
    sess: Any
    provider: str
    load_seconds: float = 0.0
    reference_diff: float | None = None  # max abs diff vs export's torch logits on its reference images
    inflight: int = 0
    batcher: "Batcher | None" = None

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def preprocess(self, img) -> np.ndarray:
        m = self.meta
        return preprocess(img, m["input_size"], m["mean"], m["std"], m.get("interpolation"))

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run([self.meta.get("output_name", "logits")], {self.meta.get("input_name", "input"): x})[0]


def load_version(model_dir: Path, version: int, cfg: ServeConfig) -> LoadedModel:
    """Load, check against metadata.json, warm up and parity-check one version; LoadError if it must not serve."""
    from transferkit.export import REFERENCE_FILE, read_onnx_metadata
    from transferkit.promote import check_version
    from transferkit.runtime import ort_session

    t0 = time.perf_counter()
    try:
        meta = check_version(model_dir, version, embedded=False)  # every file's sha256, int8 included
    except ValueError as e:
        raise LoadError(str(e)) from None
    vdir = Path(model_dir) / str(version)
    path = vdir / "model.onnx"
    if cfg.int8 and (meta.get("int8") or {}).get("kept"):
        path = vdir / "model.int8.onnx"  # check_version pinned it
    try:
        embedded = read_onnx_metadata(path)
    except Exception as e:
        raise LoadError(f"{path}: not a readable ONNX file ({type(e).__name__}: {str(e)[:200]})") from None
    for key in ("name", "classes", "input_size", "mean", "std", "version"):
        if embedded.get(key) != meta.get(key):
            raise LoadError(
                f"{path}: embedded {key} {embedded.get(key)!r} differs from metadata.json's {meta.get(key)!r}"
            )
    if len(meta["input_size"]) != 3 or meta["input_size"][1] != meta["input_size"][2]:
        raise LoadError(
            f"{vdir / 'metadata.json'}: input_size {meta['input_size']}: only square [3, S, S] inputs are served"
        )
    try:
        sess, provider = ort_session(path, threads=cfg.threads)
    except Exception as e:
        raise LoadError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {str(e)[:300]})") from None
    lm = LoadedModel(model_dir.name, version, path, meta, sess, provider)
    inp, out = sess.get_inputs(), sess.get_outputs()
    want_in, want_out = meta.get("input_name", "input"), meta.get("output_name", "logits")
    if [i.name for i in inp] != [want_in] or want_out not in [o.name for o in out]:
        raise LoadError(
            f"{path}: graph inputs {[i.name for i in inp]} / outputs {[o.name for o in out]}, "
            f"metadata says {want_in} -> {want_out}"
        )
    shape = inp[0].shape
    if len(shape) != 4 or [d for d in shape[1:]] != list(meta["input_size"]):
        raise LoadError(f"{path}: graph input shape {shape}, metadata input_size {meta['input_size']}")
    # Warm-up doubles as a check: finite logits of the right shape, and a batch that agrees with the same
    # images one at a time (dynamic batch dim sound) within the version's own parity tolerance.
    rng = np.random.default_rng(0)
    n = max(2, min(8, cfg.max_batch_size))
    x = rng.standard_normal((n, *meta["input_size"])).astype(np.float32)
    try:
        batched = lm.run(x)
        singles = np.concatenate([lm.run(x[i : i + 1]) for i in range(n)])
        lm.run(np.zeros((cfg.max_batch_size, *meta["input_size"]), np.float32))
    except Exception as e:
        raise LoadError(f"{path}: warm-up inference failed ({type(e).__name__}: {str(e)[:300]})") from None
    if batched.shape != (n, len(meta["classes"])) or not np.isfinite(batched).all():
        raise LoadError(
            f"{path}: warm-up gave logits of shape {batched.shape} (finite: {np.isfinite(batched).all()}), "
            f"expected ({n}, {len(meta['classes'])})"
        )
    atol = float((meta.get("parity") or {}).get("atol") or 1e-4)
    diff = float(np.max(np.abs(batched - singles)))
    if not diff <= atol:
        raise LoadError(f"{path}: batch vs single logits differ by {diff:.3g} (> parity atol {atol:g})")
    if meta.get("reference") and path.name == "model.onnx":  # int8 answers differently by design
        lm.reference_diff = _replay_reference(lm, vdir / REFERENCE_FILE, atol)  # checked by check_version
    lm.load_seconds = time.perf_counter() - t0
    return lm


def _replay_reference(lm: LoadedModel, ref_path: Path, atol: float) -> float:
    """Export's reference test images through this server's preprocessing and session, against the torch
    logits export recorded; LoadError beyond the parity tolerance or on another top-1. Returns the max diff."""
    from PIL import Image

    try:
        with np.load(ref_path, allow_pickle=False) as z:
            want = z["logits"]
            imgs = [z[f"image{i}"] for i in range(len(want))]
        x = np.stack([lm.preprocess(Image.fromarray(a)) for a in imgs])
        got = lm.run(x)
    except Exception as e:
        raise LoadError(
            f"{ref_path}: cannot replay the reference images ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    if got.shape != want.shape:
        raise LoadError(f"{ref_path}: logits of shape {got.shape} for reference logits of shape {want.shape}")
    diff = float(np.max(np.abs(got - want)))
    if not diff <= atol or (got.argmax(1) != want.argmax(1)).any():
        raise LoadError(
            f"{ref_path}: served logits differ from export's torch logits by {diff:.3g} on its "
            f"{len(want)} reference images (parity atol {atol:g})"
        )
    return diff


# --------------------------------------------------------------------------- dynamic batching


class Batcher:
    """Collect single requests' images into one onnxruntime call: up to max_batch_size images, waiting at
    most max_queue_delay for batch-mates after the first arrives. One inference thread per model version."""

    def __init__(self, model: LoadedModel, max_batch: int, max_delay_s: float, on_batch=None):
        self.model, self.max_batch, self.max_delay = model, max_batch, max_delay_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{model.name}-{model.version}")
        self.on_batch = on_batch
        self.task = asyncio.get_running_loop().create_task(self._loop())
        self._carry = None

    async def submit(self, x: np.ndarray) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((x, fut))
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = self._carry or await self.queue.get()
            self._carry = None
            items, n = [first], len(first[0])
            deadline = loop.time() + self.max_delay
            while n < self.max_batch:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                if n + len(item[0]) > self.max_batch:
                    self._carry = item  # starts the next batch
                    break
                items.append(item)
                n += len(item[0])
            items = [(x, f) for x, f in items if not f.cancelled()]
            if not items:
                continue
            batch = np.concatenate([x for x, _ in items]) if len(items) > 1 else items[0][0]
            try:
                out = await loop.run_in_executor(self.pool, self.model.run, batch)
            except Exception as e:  # the whole batch fails; each request reports it
                for _, f in items:
                    if not f.done():
                        f.set_exception(e)
                continue
            if self.on_batch:
                self.on_batch(self.model, len(batch))
            i = 0
            for x, f in items:
                if not f.done():
                    f.set_result(out[i : i + len(x)])
                i += len(x)

    def close(self) -> None:
        self.task.cancel()
        self.pool.shutdown(wait=False)


# --------------------------------------------------------------------------- monitoring reservoir


class Reservoir:
    """A uniform sample of at most `size` served images (Algorithm R), kept on disk across restarts."""

    def __init__(self, folder: Path, size: int, px: int, seed: int = 0):
        from transferkit.io import read_json

        self.folder, self.size, self.px = Path(folder), size, px
        self.images = self.folder / "images"
        self.state_path = self.folder / "reservoir.json"
        self.lock = threading.Lock()
        self.rng = random.Random(seed)
        self.seen, self.slots = 0, {}
        try:
            state = read_json(self.state_path)
            self.seen, self.slots = int(state["seen"]), dict(state.get("slots", {}))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            pass

    def offer(self, img, version: int) -> bool:
        """Keep `img` with probability size/seen; returns whether it was stored."""
        from transferkit.io import atomic_write_bytes, write_json

        with self.lock:
            self.seen += 1
            slot = self.seen - 1 if self.seen <= self.size else self.rng.randrange(self.seen)
            if slot >= self.size:
                if self.seen % 100 == 0:
                    write_json(self.state_path, self._state())
                return False
            small = img.copy()
            small.thumbnail((self.px, self.px))
            buf = io.BytesIO()
            small.save(buf, format="PNG")
            atomic_write_bytes(self.images / f"{slot:06d}.png", buf.getvalue())
            self.slots[str(slot)] = {"version": version, "time": time.time()}
            write_json(self.state_path, self._state())
            return True

    def _state(self) -> dict:
        return {"seen": self.seen, "size": self.size, "px": self.px, "stored": len(self.slots), "slots": self.slots}


# --------------------------------------------------------------------------- the model registry


@dataclass
class Slot:
    """One model name: the version serving now, and what happened to the others."""

    name: str
    current: LoadedModel | None = None
    # version -> (fingerprint of latest + the version's files when it failed, why it is not served): a
    # re-promote or a repaired file changes the fingerprint, and the version is tried again
    failed: dict[int, tuple[tuple, str]] = field(default_factory=dict)
    swaps: list[dict] = field(default_factory=list)
    reservoir: Reservoir | None = None
    fallback: dict | None = None  # serving an older version from the history because `latest` is broken
    latest_error: str | None = None  # `latest` unreadable: stays on what serves


def _fingerprint(model_dir: Path, version: int) -> tuple:
    """What a failed load depended on: the pointer file (a re-promote replaces it) and the version's files."""

    def st(p: Path) -> tuple:
        try:
            s = p.stat()
            return (p.name, s.st_ino, s.st_size, s.st_mtime_ns)
        except OSError:
            return (p.name, None)

    vdir = model_dir / str(version)
    try:
        files = sorted(vdir.iterdir()) if vdir.is_dir() else []
    except OSError:
        files = []
    return (st(model_dir / "latest"), st(vdir), *(st(p) for p in files))


class Registry:
    def __init__(self, cfg: ServeConfig, metrics: "Metrics"):
        self.cfg, self.metrics = cfg, metrics
        self.slots: dict[str, Slot] = {}
        self.load_pool = ThreadPoolExecutor(1, thread_name_prefix="load")
        self.infer_pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="infer")
        self.started = False  # first scan done
        repo = Path(cfg.repo)
        self._prefixes = sorted(
            {str(repo) + os.sep, str(repo.absolute()) + os.sep, str(repo.resolve()) + os.sep}, key=len, reverse=True
        )

    def public(self, msg: str) -> str:
        """A message for public responses: repository paths relative to it, no other absolute path."""
        for p in self._prefixes:
            msg = msg.replace(p, "")
        return _ABS_PATH.sub(lambda m: m.group(1) + ".../" + m.group(2), msg)

    def names(self) -> list[str]:
        from transferkit.export import _NAME_RE

        repo = Path(self.cfg.repo)
        if self.cfg.models:
            return list(self.cfg.models)
        if not repo.is_dir():
            return []
        # only names export could have made, and only folders with a pointer (valid or not: a broken one is
        # reported, not hidden)
        return sorted(
            p.name
            for p in repo.iterdir()
            if _NAME_RE.fullmatch(p.name) and not p.is_symlink() and (p / "latest").is_file()
        )

    def ready(self) -> tuple[bool, str]:
        if not self.started:
            return False, "loading"
        if not self.slots:
            return False, "no model with a `latest` pointer in the repository"
        missing = [n for n, s in self.slots.items() if s.current is None]
        if missing:
            return False, f"not loaded: {', '.join(missing)} " + "; ".join(
                f"{n}: {self.slots[n].latest_error or next(iter(r for _, r in self.slots[n].failed.values()), 'pending')}"
                for n in missing
            )
        degraded = [
            f"{n} serves version {s.fallback['version']} from the promotion history: latest "
            f"({s.fallback['latest']}) refused"
            for n, s in self.slots.items()
            if s.fallback
        ]
        degraded += [f"{n}: {s.latest_error}" for n, s in self.slots.items() if s.latest_error]
        return True, ("degraded: " + "; ".join(degraded)) if degraded else "ready"

    async def _load(self, model_dir: Path, version: int) -> LoadedModel:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.load_pool, load_version, model_dir, version, self.cfg)

    def _refused(self, slot: Slot, model_dir: Path, version: int, e: Exception) -> None:
        why = self.public(str(e))
        slot.failed[version] = (_fingerprint(model_dir, version), why)
        self.metrics.load_failures.labels(slot.name).inc()
        log.error("model %s version %s not served: %s", slot.name, version, e)
        slot.swaps.append(
            {
                "from": slot.current.version if slot.current else None,
                "to": version,
                "ok": False,
                "error": why,
                "time": time.time(),
            }
        )
        del slot.swaps[:-20]

    async def refresh(self) -> None:
        """One poll: load any model whose `latest` moved to a version not yet tried (or changed since it failed)."""
        from transferkit.export import read_latest

        for name in self.names():
            slot = self.slots.get(name)
            if slot is None:
                slot = self.slots[name] = Slot(name)
                self.metrics.fallback.labels(name).set(0)
                if self.cfg.monitor_dir:
                    slot.reservoir = Reservoir(
                        Path(self.cfg.monitor_dir) / name, self.cfg.monitor_size, self.cfg.monitor_px, self.cfg.seed
                    )
            model_dir = Path(self.cfg.repo) / name
            try:
                want = read_latest(model_dir)
                slot.latest_error = None
            except (ValueError, OSError) as e:
                slot.latest_error = self.public(str(e))
                want = None
            if want is None:
                if slot.current is None and slot.latest_error:
                    await self._fall_back(slot, model_dir, None, slot.latest_error)
                continue
            if slot.current and slot.current.version == want:
                if slot.fallback:  # `latest` was pointed back at what serves
                    slot.fallback = None
                    self.metrics.fallback.labels(name).set(0)
                continue
            if want in slot.failed and slot.failed[want][0] == _fingerprint(model_dir, want):
                continue
            t0 = time.perf_counter()
            try:
                new = await self._load(model_dir, want)
            except LoadError as e:
                self._refused(slot, model_dir, want, e)
                if slot.current is None:
                    await self._fall_back(slot, model_dir, want, slot.failed[want][1])
                continue
            self._switch(slot, new, time.perf_counter() - t0)
            slot.failed.pop(want, None)
            if slot.fallback:
                slot.fallback = None
                self.metrics.fallback.labels(name).set(0)

    async def _fall_back(self, slot: Slot, model_dir: Path, latest: int | None, why: str) -> None:
        """Nothing serves and `latest` is broken: serve the newest earlier live version (promotion history)
        that loads, and say so in /readyz, /v1/models/<name> and transferkit_model_fallback."""
        from transferkit.promote import _stack, read_history

        try:
            history = _stack(read_history(model_dir))
        except OSError:
            history = []
        tried = 0
        for v in reversed(history):
            if v == latest or tried >= 5:
                continue
            if v in slot.failed and slot.failed[v][0] == _fingerprint(model_dir, v):
                continue
            tried += 1
            t0 = time.perf_counter()
            try:
                new = await self._load(model_dir, v)
            except LoadError as e:
                self._refused(slot, model_dir, v, e)
                continue
            self._switch(slot, new, time.perf_counter() - t0)
            slot.fallback = {"version": v, "latest": latest, "reason": why}
            self.metrics.fallback.labels(slot.name).set(1)
            log.error(
                "model %s: latest (%s) refused, serving version %s from the promotion history", slot.name, latest, v
            )
            return

    def _switch(self, slot: Slot, new: LoadedModel, seconds: float) -> None:
        if self.cfg.batching:
            new.batcher = Batcher(new, self.cfg.max_batch_size, self.cfg.max_queue_delay_ms / 1000, self.metrics.batch)
        old, slot.current = slot.current, new  # the switch: one reference assignment on the event loop
        slot.swaps.append(
            {
                "from": old.version if old else None,
                "to": new.version,
                "ok": True,
                "seconds": seconds,
                "provider": new.provider,
                "time": time.time(),
            }
        )
        del slot.swaps[:-20]
        self.metrics.version.labels(slot.name).set(new.version)
        self.metrics.swaps.labels(slot.name).inc()
        self.metrics.swap_seconds.labels(slot.name).set(seconds)
        log.warning(
            "model %s now serving version %s (%s, loaded in %.2fs)", slot.name, new.version, new.provider, seconds
        )
        if old is not None:
            asyncio.get_running_loop().create_task(self._retire(old))

    async def _retire(self, old: LoadedModel) -> None:
        """Drop the old version once the requests that hold it are done (at most 60 s)."""
        for _ in range(1200):
            if old.inflight == 0:
                break
            await asyncio.sleep(0.05)
        if old.batcher:
            old.batcher.close()
        old.sess = None

    async def watch(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # the watcher never dies; the next poll tries again
                log.exception("model refresh failed")
            self.started = True
            await asyncio.sleep(self.cfg.poll_interval_s)

    def status(self, name: str) -> dict:
        s = self.slots[name]
        cur = s.current
        return {
            "name": name,
            "version": cur.version if cur else None,
            "provider": cur.provider if cur else None,
            "file": cur.path.name if cur else None,
            "classes": cur.classes if cur else None,
            "input_size": cur.meta["input_size"] if cur else None,
            "sha256": cur.meta.get("sha256") if cur else None,
            "load_seconds": round(cur.load_seconds, 4) if cur else None,
            "reference_diff": cur.reference_diff if cur else None,
            "batching": self.cfg.batching,
            "failed_versions": {str(k): why for k, (_, why) in s.failed.items()},
            "fallback": s.fallback,
            "latest_error": s.latest_error,
            "swaps": s.swaps,
            "monitor": ({"seen": s.reservoir.seen, "stored": len(s.reservoir.slots)} if s.reservoir else None),
        }


_ABS_PATH = re.compile(r"(^|[\s'\"(=:])/(?:[^\s'\"/]+/)+([^\s'\"/]+)")  # /any/abs/path/file -> .../file


# --------------------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics whose labels come from fixed sets only: a model label is a served model's name or
    "" (anything else: unknown names, other routes), a code label an HTTP status this server answered."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "transferkit_requests", "requests answered (every route but the probes)", ["model", "code"], registry=r
        )
        self.latency = Histogram(
            "transferkit_request_seconds",
            "predict latency",
            ["model"],
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.batch_sizes = Histogram(
            "transferkit_batch_size",
            "images per onnxruntime call",
            ["model"],
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.images = Counter("transferkit_images", "images classified", ["model"], registry=r)
        self.errors = Counter("transferkit_errors", "requests answered with an error", ["model", "code"], registry=r)
        self.version = Gauge("transferkit_model_version", "version serving now", ["model"], registry=r)
        self.swaps = Counter("transferkit_model_swaps", "versions switched to", ["model"], registry=r)
        self.swap_seconds = Gauge(
            "transferkit_model_swap_seconds", "load + warm-up + checks of the last swap", ["model"], registry=r
        )
        self.load_failures = Counter(
            "transferkit_model_load_failures", "versions refused at load", ["model"], registry=r
        )
        self.fallback = Gauge(
            "transferkit_model_fallback",
            "1: `latest` is broken and an earlier version from the promotion history serves",
            ["model"],
            registry=r,
        )
        self.inflight = Gauge("transferkit_inflight_requests", "requests in flight", registry=r)
        self.inflight_bytes = Gauge("transferkit_inflight_bytes", "bytes of the in-flight budget held", registry=r)

    def batch(self, model: LoadedModel, n: int) -> None:
        self.batch_sizes.labels(model.name).observe(n)


class Budget:
    """The process's in-flight byte budget (bodies + decoding), shared by all requests on the event loop."""

    def __init__(self, total: int, gauge=None):
        self.total, self.used, self.gauge = total, 0, gauge
        self._cond: asyncio.Condition | None = None

    async def acquire(self, n: int, timeout: float) -> None:
        if n <= 0:
            return
        if n > self.total:
            raise RequestError(413, f"request needs {n} bytes of the in-flight budget, more than its {self.total}")
        self._cond = self._cond or asyncio.Condition()
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(lambda: self.used + n <= self.total), timeout)
            except asyncio.TimeoutError:
                raise RequestError(
                    503, f"server busy: {self.used} of {self.total} in-flight bytes held for {timeout:g} s; retry later"
                ) from None
            self.used += n
            if self.gauge is not None:
                self.gauge.set(self.used)

    async def release(self, n: int) -> None:
        if n <= 0:
            return
        async with self._cond:
            self.used -= n
            if self.gauge is not None:
                self.gauge.set(self.used)
            self._cond.notify_all()


class _Held:
    """What one request holds of the budget; released whole when the request ends."""

    def __init__(self, budget: Budget, timeout: float):
        self.budget, self.timeout, self.n = budget, timeout, 0

    async def take(self, n: int) -> None:
        await self.budget.acquire(n, self.timeout)
        self.n += n

    async def give_back(self, n: int | None = None) -> None:
        n = self.n if n is None else min(n, self.n)
        self.n -= n
        await self.budget.release(n)


PROBES = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
_MODEL_PATH = re.compile(r"/v[12]/models/([^/]+)")


def error_key(path: str) -> str:
    """The error object's key: the Open Inference Protocol's "error" under /v2, else {"detail"}."""
    return "error" if path == "/v2" or path.startswith("/v2/") else "detail"


def _json_response(
    status: int, detail: str, headers: list[tuple[bytes, bytes]] = (), path: str = ""
) -> tuple[dict, dict]:
    body = json.dumps({error_key(path): detail}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    return {"type": "http.response.start", "status": status, "headers": hdrs}, {
        "type": "http.response.body",
        "body": body,
    }


class Guard:
    """Outermost ASGI layer: the concurrency limit (503 at once beyond it), one count per answered request
    with bounded labels, and no traceback for any input: an unexpected exception is a counted, logged 500
    with the documented {"detail"} shape."""

    def __init__(self, app, cfg: ServeConfig, metrics: Metrics, registry: "Registry"):
        self.app, self.cfg, self.metrics, self.registry = app, cfg, metrics, registry
        self.inflight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        m = _MODEL_PATH.match(path)
        model = m.group(1) if m and m.group(1) in self.registry.slots else ""
        probe = path in PROBES
        status = []
        # an answer sent before the body was read (401, 404, 413, 422 on headers, 503) ends the connection:
        # say so (Connection: close), or a client reuses it and meets the reset of the unread body
        hdrs = dict(scope.get("headers") or [])
        body_left = [hdrs.get(b"content-length", b"0").strip() not in (b"", b"0") or b"transfer-encoding" in hdrs]

        async def receive_tracked():
            msg = await receive()
            if msg["type"] == "http.request" and not msg.get("more_body", False):
                body_left[0] = False
            return msg

        async def send_counted(msg):
            if msg["type"] == "http.response.start":
                status.append(msg["status"])
                if body_left[0]:
                    msg = {**msg, "headers": [*msg.get("headers", ()), (b"connection", b"close")]}
            await send(msg)

        if not probe and self.inflight >= self.cfg.max_concurrency:
            start, body = _json_response(
                503,
                f"server busy: {self.inflight} requests in flight (limit {self.cfg.max_concurrency}); retry later",
                [(b"retry-after", b"1")],
                path,
            )
            await send_counted(start)
            await send(body)
        else:
            self.inflight += 1
            self.metrics.inflight.set(self.inflight)
            try:
                await self.app(scope, receive_tracked, send_counted)
            except Exception:
                log.exception("unhandled error on %s %s", scope.get("method"), path[:200])
                if not status:
                    start, body = _json_response(500, "internal error (logged on the server)", path=path)
                    await send_counted(start)
                    await send(body)
            finally:
                self.inflight -= 1
                self.metrics.inflight.set(self.inflight)
        if not probe:
            code = str(status[0] if status else 500)
            self.metrics.requests.labels(model, code).inc()
            if not code.startswith(("1", "2", "3")):
                self.metrics.errors.labels(model, code).inc()


class PredictJSON(BaseModel):
    """The JSON form of a predict request."""

    images: list[str] = Field(
        ...,
        min_length=1,
        description="base64 images (PNG, JPEG, WebP, BMP, GIF, TIFF); a data: URL prefix is accepted",
        json_schema_extra={"items": {"type": "string", "format": "byte", "contentEncoding": "base64"}},
    )


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
    return {c: {"model": ErrorBody, "description": _ERROR_TEXT[c]} for c in codes}


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


# --------------------------------------------------------------------------- the app


def create_app(cfg: ServeConfig):
    """The ASGI app; the model watcher runs in its lifespan."""
    from contextlib import asynccontextmanager

    import anyio
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import ValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    if cfg.token is None and os.environ.get(TOKEN_ENV):
        cfg = ServeConfig.model_validate({**dict(cfg), "token": os.environ[TOKEN_ENV].strip()})
    metrics = Metrics()
    registry = Registry(cfg, metrics)
    budget = Budget(cfg.max_inflight_bytes, metrics.inflight_bytes)
    decode_pool = ThreadPoolExecutor(cfg.decode_threads or min(4, os.cpu_count() or 1), thread_name_prefix="decode")

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.get_running_loop().create_task(registry.watch())
        yield
        task.cancel()
        for s in registry.slots.values():
            if s.current and s.current.batcher:
                s.current.batcher.close()
        decode_pool.shutdown(wait=False)

    app = FastAPI(title="transferkit serve", version="1", lifespan=lifespan)
    app.state.registry, app.state.cfg = registry, cfg

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        if e.status == 503:
            headers = {"Retry-After": "1"}
        return JSONResponse({error_key(request.url.path): e.message}, status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        parts = []
        for err in e.errors()[:3]:
            loc = [str(x) for x in err.get("loc", ())]
            where = f"{loc[0]} parameter {'.'.join(loc[1:])!r}" if len(loc) > 1 else ".".join(loc) or "request"
            parts.append(f"{where}: {err.get('msg')} (got {str(err.get('input'))[:40]!r})")
        return JSONResponse({error_key(request.url.path): "; ".join(parts)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)[:200]
        if e.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.url.path[:80]!r} (see /docs)"
        return JSONResponse(
            {error_key(request.url.path): detail}, status_code=e.status_code, headers=getattr(e, "headers", None)
        )

    def _auth(request: Request) -> None:
        if not cfg.token:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode("utf-8", "replace"), cfg.token.encode()
        ):
            raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")

    def _unknown(name: str) -> RequestError:
        return RequestError(404, f"no model named {name[:64]!r} (serving: {sorted(registry.slots) or 'none'})")

    def _slot(name: str) -> Slot:
        s = registry.slots.get(name)
        if s is None:
            raise _unknown(name)
        if s.current is None:
            raise RequestError(503, f"model {name!r} is not loaded yet ({registry.ready()[1]})")
        return s

    async def _body(request: Request, held: _Held) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise RequestError(400, f"Content-Length {declared[:40]!r} is not a number")
            if int(declared) > cfg.max_body_bytes:
                raise RequestError(413, f"request body is {int(declared)} bytes; the limit is {cfg.max_body_bytes}")
            await held.take(2 * int(declared))  # the body and its parsed copies (base64 / multipart parts)
        chunks, total = [], 0
        try:
            with anyio.fail_after(cfg.body_timeout_s):
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > cfg.max_body_bytes:
                        raise RequestError(413, f"request body exceeds the limit of {cfg.max_body_bytes} bytes")
                    if declared is None:
                        await held.take(2 * len(chunk))
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestError(
                408, f"request body not complete within {cfg.body_timeout_s:g} s ({total} bytes received)"
            ) from None
        except ClientDisconnect:
            raise RequestError(400, f"client disconnected after {total} bytes of the body") from None
        body = b"".join(chunks)
        request._body = body  # starlette's form parser reads this cached body
        return body

    async def _images(request: Request, held: _Held) -> list[tuple[bytes, str, str | None]]:
        """(bytes, where, content type) of each image in the request, within the count limit."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await _body(request, held)
        out: list[tuple[bytes, str, str | None]] = []
        if ctype == "multipart/form-data":
            try:
                form = await request.form(
                    max_files=cfg.max_images + 1, max_fields=cfg.max_images + 16, max_part_size=cfg.max_body_bytes
                )
            except Exception as e:
                raise RequestError(400, f"malformed multipart body ({str(getattr(e, 'detail', e))[:200]})") from None
            for key, value in form.multi_items():
                if isinstance(value, str):
                    continue  # plain fields (e.g. top_k from a form) are not images
                where = f"file {(value.filename or key)[:80]!r}"
                out.append((await value.read(), where, value.content_type or OCTET))
        elif ctype == "application/json":
            try:  # pydantic-core's parser: bounded nesting depth, no RecursionError
                doc = PredictJSON.model_validate_json(body)
            except ValidationError as e:
                err = e.errors()[0]
                if err["type"] == "json_invalid":
                    raise RequestError(400, f"body is not valid JSON ({err['msg'][:200]})") from None
                loc = ".".join(str(x) for x in err["loc"]) or "body"
                raise RequestError(
                    400, f'JSON body must be {{"images": ["<base64>", ...]}} ({loc}: {err["msg"]})'
                ) from None
            if len(doc.images) > cfg.max_images:
                raise RequestError(413, f"{len(doc.images)} images in one request; the limit is {cfg.max_images}")
            for i, b64 in enumerate(doc.images):
                if b64.startswith("data:"):  # a data URL from a browser
                    b64 = b64.partition(",")[2]
                try:
                    out.append((base64.b64decode(b64, validate=True), f"images[{i}]", None))
                except (binascii.Error, ValueError):
                    raise RequestError(400, f"images[{i}]: not valid base64") from None
        elif ctype in ALLOWED_TYPES or ctype == OCTET:
            out.append((body, "request body", ctype))
        else:
            raise RequestError(
                415,
                f"content type {ctype[:80] or 'none'} not accepted: send multipart/form-data, "
                f'application/json {{"images": [base64]}}, or one image/* body',
            )
        if not out:
            raise RequestError(400, "no image in the request")
        if len(out) > cfg.max_images:
            raise RequestError(413, f"{len(out)} images in one request; the limit is {cfg.max_images}")
        return out

    @app.post(
        "/v1/models/{name}/predict",
        response_model=PredictAnswer,
        openapi_extra=_openapi_predict_body(cfg.max_images),
        responses=_errors(400, 401, 404, 408, 413, 415, 422, 503),
    )
    async def predict(
        name: str,
        request: Request,
        top_k: int | None = Query(None, ge=1, le=1000, description="labels per image (default 5, at most all)"),
        logits: bool = Query(False, description="also return the raw logits"),
    ):
        t0 = time.perf_counter()
        _auth(request)
        slot = _slot(name)
        held = _Held(budget, cfg.queue_timeout_s)
        try:
            images = await _images(request, held)
            loop = asyncio.get_running_loop()
            # sizes from the headers first: nothing is decoded unless the whole request is within the limits
            probes = [
                await loop.run_in_executor(decode_pool, probe_image, data, cfg, where, ct) for data, where, ct in images
            ]
            pixels = sum(w * h for w, h, _, _ in probes)
            if pixels > cfg.max_request_pixels:
                raise RequestError(
                    413,
                    f"{len(images)} images of {pixels} pixels in all; the limit is "
                    f"{cfg.max_request_pixels} pixels per request",
                )
            # images are decoded one after the other: the peak is the largest one's decode memory
            await held.take(max(decode_cost(w * h, mode) for w, h, _, mode in probes))
            model = slot.current  # one version for the whole request, even if a swap lands meanwhile
            keep = slot.reservoir is not None

            def prep(data, where, ct):
                img = decode_image(data, cfg, where, ct)[0]
                x = model.preprocess(img)
                if keep:  # the reservoir stores thumbnails: never hold the full decode longer than this
                    img.thumbnail((cfg.monitor_px, cfg.monitor_px))
                    return x, img
                return x, None

            model.inflight += 1
            try:
                done = [await loop.run_in_executor(decode_pool, prep, *im) for im in images]
                x = np.stack([d[0] for d in done])
                await held.give_back()  # decoded and preprocessed: the rest is a few kB per image
                if model.batcher is not None:
                    out = await model.batcher.submit(x)
                else:
                    out = await loop.run_in_executor(registry.infer_pool, model.run, x)
                    metrics.batch(model, len(x))
            finally:
                model.inflight -= 1
        finally:
            await held.give_back()
        if slot.reservoir is not None:
            # only requests that were served: a rejected upload is not traffic the model saw
            await run_in_threadpool(lambda: [slot.reservoir.offer(d[1], model.version) for d in done])
        k = min(top_k or cfg.default_top_k, len(model.classes))
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
        metrics.images.labels(name).inc(len(x))
        metrics.latency.labels(name).observe(time.perf_counter() - t0)
        body = {"model": name, "version": model.version, "provider": model.provider, "predictions": preds}
        return JSONResponse(body, headers={"X-Model-Version": str(model.version)})

    @app.get("/v1/models", responses=_errors(401))
    async def models(request: Request):
        _auth(request)
        return {"models": [registry.status(n) for n in sorted(registry.slots)]}

    @app.get("/v1/models/{name}", responses=_errors(401, 404))
    async def model_status(name: str, request: Request):
        _auth(request)
        if name not in registry.slots:
            raise _unknown(name)
        return registry.status(name)

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

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format",
                "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
            }
        },
    )
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE)

    from transferkit.oip import add_routes

    add_routes(
        app,
        cfg=cfg,
        registry=registry,
        metrics=metrics,
        budget=budget,
        decode_pool=decode_pool,
        auth=_auth,
        slot=_slot,
        body=_body,
        held_factory=lambda: _Held(budget, cfg.queue_timeout_s),
    )
    app.add_middleware(Guard, cfg=cfg, metrics=metrics, registry=registry)
    return app


def _bounded_h11(cfg: ServeConfig):
    """uvicorn's h11 protocol with a deadline for the request line + headers (uvicorn has none: a client
    trickling a header would hold its connection forever) and a real header-size limit.

    Neither parser limits headers that arrive whole: httptools has no limit, and h11's
    max_incomplete_event_size only bounds a header block still incomplete in its buffer (a 20 KB header
    in one packet passes a 16 KB setting). So the bytes before the blank line are counted here, as they
    arrive, and a request past max_header_bytes is answered 431 without being parsed further.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    def raw(status: int, reason: str, detail: str) -> bytes:
        body = json.dumps({"detail": detail}).encode()
        return (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        ).encode() + body

    class BoundedH11Protocol(H11Protocol):
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
                if self._head > cfg.max_header_bytes:
                    self._refuse(
                        431,
                        "Request Header Fields Too Large",
                        f"request line + headers exceed {cfg.max_header_bytes} bytes",
                    )
                    return
                if end >= 0:
                    self._counting, self._head, self._tail = False, 0, b""
            super().data_received(data)

        def _refuse(self, status: int, reason: str, detail: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(raw(status, reason, detail))
                self.transport.close()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(cfg.header_timeout_s, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            if self.conn.our_state is h11.IDLE:
                self._refuse(408, "Request Timeout", f"request headers not complete within {cfg.header_timeout_s:g} s")

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
            import sys

            exc = sys.exc_info()[1]  # called inside uvicorn's `except h11.RemoteProtocolError`
            status = getattr(exc, "error_status_hint", 400) if isinstance(exc, h11.RemoteProtocolError) else 400
            if status == 431:
                self._refuse(
                    431,
                    "Request Header Fields Too Large",
                    f"request line + headers exceed {cfg.max_header_bytes} bytes",
                )
            else:
                self._refuse(400, "Bad Request", f"invalid HTTP request ({str(exc)[:120] if exc else msg})")

    return BoundedH11Protocol


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run one uvicorn process (scale out with replicas, not workers: each holds its own sessions)."""
    import uvicorn

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(cfg),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        http=_bounded_h11(cfg),
        h11_max_incomplete_event_size=cfg.max_header_bytes,
        limit_concurrency=cfg.max_connections,
        timeout_keep_alive=cfg.keep_alive_s,
    )


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>transferkit serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 15px/1.4 system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; padding: 0 1rem; color: #222 }
 fieldset { border: 1px solid #ccc; padding: 1rem } label { display: block; margin: .4rem 0 }
 table { border-collapse: collapse; margin-top: 1rem } td, th { padding: .2rem .8rem; border-bottom: 1px solid #eee; text-align: left }
 #error { color: #b00 } img { max-width: 8rem; image-rendering: pixelated; margin-top: .5rem }
</style></head><body>
<h1>transferkit serve</h1>
<form id="form">
 <fieldset>
  <label>Model <select id="model" name="model"></select></label>
  <label>Image <input id="file" name="file" type="file" accept="image/*" required></label>
  <label>Top k <input id="topk" type="number" min="1" value="3" style="width:4rem"></label>
  <label>Bearer token (if the server needs one) <input id="token" type="password" autocomplete="off"></label>
  <button id="submit" type="submit">Classify</button>
 </fieldset>
</form>
<img id="preview" alt="" hidden>
<p id="status"></p><p id="error" role="alert"></p>
<table id="result" hidden><thead><tr><th>label</th><th>probability</th></tr></thead><tbody></tbody></table>
<script>
const $ = (id) => document.getElementById(id);
function auth() { const t = $("token").value.trim(); return t ? {Authorization: "Bearer " + t} : {}; }
async function loadModels() {
  const r = await fetch("/v1/models", {headers: auth()});
  if (!r.ok) { $("error").textContent = (await r.json()).detail || r.statusText; return; }
  const sel = $("model"); sel.innerHTML = "";
  for (const m of (await r.json()).models) {
    const o = document.createElement("option"); o.value = m.name;
    o.textContent = m.name + (m.version ? " v" + m.version : " (loading)"); sel.appendChild(o);
  }
}
$("token").addEventListener("change", loadModels);
$("file").addEventListener("change", () => {
  const f = $("file").files[0]; if (f) { $("preview").src = URL.createObjectURL(f); $("preview").hidden = false; }
});
$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("error").textContent = ""; $("status").textContent = "classifying..."; $("result").hidden = true;
  const fd = new FormData(); fd.append("file", $("file").files[0]);
  const url = "/v1/models/" + encodeURIComponent($("model").value) + "/predict?top_k=" + encodeURIComponent($("topk").value);
  try {
    const r = await fetch(url, {method: "POST", body: fd, headers: auth()});
    const body = await r.json();
    if (!r.ok) { $("status").textContent = ""; $("error").textContent = r.status + ": " + body.detail; return; }
    const tb = $("result").querySelector("tbody"); tb.innerHTML = "";
    for (const p of body.predictions[0].top_k) {
      const tr = document.createElement("tr");
      tr.innerHTML = "<td class=label></td><td class=prob></td>";
      tr.querySelector(".label").textContent = p.label;
      tr.querySelector(".prob").textContent = (100 * p.probability).toFixed(2) + "%";
      tb.appendChild(tr);
    }
    $("result").hidden = false;
    $("status").textContent = body.model + " version " + body.version + " (" + body.provider + ")";
    $("status").dataset.version = body.version;
  } catch (e) { $("status").textContent = ""; $("error").textContent = String(e); }
});
loadModels();
</script></body></html>
"""
