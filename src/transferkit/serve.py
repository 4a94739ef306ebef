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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

log = logging.getLogger("transferkit.serve")

ALLOWED_TYPES = {
    "image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/bmp": "BMP",
    "image/gif": "GIF", "image/tiff": "TIFF",
}  # fmt: skip
OCTET = "application/octet-stream"  # a client that does not know: the decoded format must still be allowed
TOKEN_ENV = "TRANSFERKIT_SERVE_TOKEN"


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
    default_top_k: int = Field(5, ge=1)
    token: str | None = Field(None, description=f"bearer token for /v1 (default: ${TOKEN_ENV})", repr=False)
    int8: bool = Field(False, description="serve model.int8.onnx where export kept one")
    threads: int = Field(0, ge=0, description="onnxruntime intra-op threads (0: its default)")
    workers: int = Field(4, ge=1, description="inference threads when batching is off")
    monitor_dir: Path | None = Field(None, description="reservoir of served inputs for drift monitoring")
    monitor_size: int = Field(200, ge=1, le=100_000)
    monitor_px: int = Field(64, ge=8, le=1024, description="longest side of stored monitor images")
    seed: int = 0


class RequestError(Exception):
    """A client error: its status code and one readable message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class LoadError(ValueError):
    """A version that must not serve."""


# --------------------------------------------------------------------------- preprocessing

_INTERP = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}  # PIL codes


def decode_image(data: bytes, cfg: ServeConfig, where: str, content_type: str | None = None):
    """Bytes -> RGB PIL image, refusing bombs by their header and formats outside ALLOWED_TYPES."""
    from PIL import Image, UnidentifiedImageError

    from transferkit.data import load_rgb

    if content_type is not None:
        ct = content_type.split(";")[0].strip().lower()
        if ct not in ALLOWED_TYPES and ct != OCTET:
            raise RequestError(415, f"{where}: content type {ct or 'none'} not accepted "
                                    f"(accepted: {', '.join(sorted(ALLOWED_TYPES))})")  # fmt: skip
    if not data:
        raise RequestError(400, f"{where}: empty image")
    formats = sorted(set(ALLOWED_TYPES.values()))
    try:
        with Image.open(io.BytesIO(data), formats=formats) as im:  # reads the header only
            w, h, fmt = im.size[0], im.size[1], im.format
    except UnidentifiedImageError:
        raise RequestError(415, f"{where}: not an image in an accepted format ({', '.join(formats)})") from None
    except Image.DecompressionBombError as e:  # PIL's own guard, from the header: far above our limits too
        raise RequestError(413, f"{where}: {e}; limits are {cfg.max_image_side} px a side and "
                                f"{cfg.max_image_pixels} pixels")  # fmt: skip
    except (OSError, ValueError, SyntaxError) as e:
        raise RequestError(400, f"{where}: cannot read image header ({e})") from None
    if max(w, h) > cfg.max_image_side or w * h > cfg.max_image_pixels:
        raise RequestError(413, f"{where}: image is {w}x{h} px; limits are {cfg.max_image_side} px a side and "
                                f"{cfg.max_image_pixels} pixels")  # fmt: skip
    if w < 1 or h < 1:
        raise RequestError(400, f"{where}: image has no pixels ({w}x{h})")
    try:
        return load_rgb(io.BytesIO(data)), fmt
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise RequestError(400, f"{where}: cannot decode {fmt} image ({type(e).__name__}: {e})") from None


def preprocess(img, input_size: list[int], mean: list[float], std: list[float], interpolation: str | None) -> np.ndarray:
    """zoo.eval_transform (timm eval, crop_pct=1.0) without torch: [3, H, W] float32."""
    _, th, tw = (int(v) for v in input_size)
    resample = _INTERP.get(str(interpolation or "bilinear").lower(), 2)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = th, int(th * long / short)  # torchvision's shorter-side rule
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), resample)
    if (nh, nw) != (th, tw):
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        img = img.crop((left, top, left + tw, top + th))
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


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


def serve_providers() -> list:
    """export.execution_providers, also in a serving image without torch (which it asks about the GPU).

    Without torch, CUDA is requested whenever onnxruntime lists it: onnxruntime falls back to CPU when no
    GPU or CUDA library is there, and the provider that really runs is what /v1/models reports.
    """
    import importlib.util

    from transferkit.export import execution_providers

    if importlib.util.find_spec("torch") is None:
        return execution_providers(cuda=True)
    return execution_providers()


def load_version(model_dir: Path, version: int, cfg: ServeConfig) -> LoadedModel:
    """Load, check against metadata.json, warm up and parity-check one version; LoadError if it must not serve."""
    from transferkit.export import REFERENCE_FILE, ort_session, read_onnx_metadata
    from transferkit.promote import check_version

    t0 = time.perf_counter()
    try:
        meta = check_version(model_dir, version)
    except ValueError as e:
        raise LoadError(str(e)) from None
    vdir = Path(model_dir) / str(version)
    path = vdir / "model.onnx"
    if cfg.int8 and (meta.get("int8") or {}).get("kept") and (vdir / "model.int8.onnx").is_file():
        path = vdir / "model.int8.onnx"
    try:
        embedded = read_onnx_metadata(path)
    except Exception as e:
        raise LoadError(f"{path}: not a readable ONNX file ({type(e).__name__}: {str(e)[:200]})") from None
    for key in ("classes", "input_size", "mean", "std", "version"):
        if embedded.get(key) != meta.get(key):
            raise LoadError(f"{path}: embedded {key} {embedded.get(key)!r} differs from metadata.json's {meta.get(key)!r}")
    if len(meta["input_size"]) != 3 or meta["input_size"][1] != meta["input_size"][2]:
        raise LoadError(f"{vdir / 'metadata.json'}: input_size {meta['input_size']}: only square [3, S, S] inputs are served")
    try:
        import onnxruntime as ort

        providers = serve_providers()
        if cfg.threads:
            so = ort.SessionOptions()
            so.intra_op_num_threads = cfg.threads
            so.log_severity_level = 3
            sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
            provider = sess.get_providers()[0]
        else:
            sess, provider = ort_session(path, providers)
    except Exception as e:
        raise LoadError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {str(e)[:300]})") from None
    lm = LoadedModel(model_dir.name, version, path, meta, sess, provider)
    inp, out = sess.get_inputs(), sess.get_outputs()
    want_in, want_out = meta.get("input_name", "input"), meta.get("output_name", "logits")
    if [i.name for i in inp] != [want_in] or want_out not in [o.name for o in out]:
        raise LoadError(f"{path}: graph inputs {[i.name for i in inp]} / outputs {[o.name for o in out]}, "
                        f"metadata says {want_in} -> {want_out}")  # fmt: skip
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
        raise LoadError(f"{path}: warm-up gave logits of shape {batched.shape} (finite: {np.isfinite(batched).all()}), "
                        f"expected ({n}, {len(meta['classes'])})")  # fmt: skip
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
        raise LoadError(f"{ref_path}: cannot replay the reference images ({type(e).__name__}: {str(e)[:200]})") from None
    if got.shape != want.shape:
        raise LoadError(f"{ref_path}: logits of shape {got.shape} for reference logits of shape {want.shape}")
    diff = float(np.max(np.abs(got - want)))
    if not diff <= atol or (got.argmax(1) != want.argmax(1)).any():
        raise LoadError(f"{ref_path}: served logits differ from export's torch logits by {diff:.3g} on its "
                        f"{len(want)} reference images (parity atol {atol:g})")  # fmt: skip
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
    failed: dict[int, str] = field(default_factory=dict)  # version -> why it is not served
    swaps: list[dict] = field(default_factory=list)
    reservoir: Reservoir | None = None


class Registry:
    def __init__(self, cfg: ServeConfig, metrics: "Metrics"):
        self.cfg, self.metrics = cfg, metrics
        self.slots: dict[str, Slot] = {}
        self.load_pool = ThreadPoolExecutor(1, thread_name_prefix="load")
        self.infer_pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="infer")
        self.started = False  # first scan done

    def names(self) -> list[str]:
        from transferkit.export import latest_version

        repo = Path(self.cfg.repo)
        if self.cfg.models:
            return list(self.cfg.models)
        if not repo.is_dir():
            return []
        return sorted(p.name for p in repo.iterdir() if p.is_dir() and latest_version(p) is not None)

    def ready(self) -> tuple[bool, str]:
        if not self.started:
            return False, "loading"
        if not self.slots:
            return False, f"no model with a `latest` pointer in {self.cfg.repo}"
        missing = [n for n, s in self.slots.items() if s.current is None]
        if missing:
            return False, f"not loaded: {', '.join(missing)} " + "; ".join(
                f"{n}: {next(iter(self.slots[n].failed.values()), 'pending')}" for n in missing
            )
        return True, "ready"

    async def refresh(self) -> None:
        """One poll: load any model whose `latest` moved to a version not yet tried."""
        from transferkit.export import latest_version

        loop = asyncio.get_running_loop()
        for name in self.names():
            slot = self.slots.get(name)
            if slot is None:
                slot = self.slots[name] = Slot(name)
                if self.cfg.monitor_dir:
                    slot.reservoir = Reservoir(Path(self.cfg.monitor_dir) / name, self.cfg.monitor_size,
                                               self.cfg.monitor_px, self.cfg.seed)  # fmt: skip
            model_dir = Path(self.cfg.repo) / name
            want = latest_version(model_dir)
            if want is None or (slot.current and slot.current.version == want) or want in slot.failed:
                continue
            t0 = time.perf_counter()
            try:
                new = await loop.run_in_executor(self.load_pool, load_version, model_dir, want, self.cfg)
            except LoadError as e:
                slot.failed[want] = str(e)
                self.metrics.load_failures.labels(name).inc()
                log.error("model %s version %s not served: %s", name, want, e)
                slot.swaps.append({"from": slot.current.version if slot.current else None, "to": want,
                                   "ok": False, "error": str(e), "time": time.time()})  # fmt: skip
                continue
            if self.cfg.batching:
                new.batcher = Batcher(new, self.cfg.max_batch_size, self.cfg.max_queue_delay_ms / 1000, self.metrics.batch)
            old, slot.current = slot.current, new  # the switch: one reference assignment on the event loop
            slot.failed.pop(want, None)
            seconds = time.perf_counter() - t0
            slot.swaps.append({"from": old.version if old else None, "to": want, "ok": True, "seconds": seconds,
                               "provider": new.provider, "time": time.time()})  # fmt: skip
            del slot.swaps[:-20]
            self.metrics.version.labels(name).set(want)
            self.metrics.swaps.labels(name).inc()
            self.metrics.swap_seconds.labels(name).set(seconds)
            log.warning("model %s now serving version %s (%s, loaded in %.2fs)", name, want, new.provider, seconds)
            if old is not None:
                loop.create_task(self._retire(old))

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
            "failed_versions": {str(k): v for k, v in s.failed.items()},
            "swaps": s.swaps,
            "monitor": ({"folder": str(s.reservoir.folder), "seen": s.reservoir.seen,
                         "stored": len(s.reservoir.slots)} if s.reservoir else None),  # fmt: skip
        }


# --------------------------------------------------------------------------- metrics


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("transferkit_requests", "predict requests", ["model", "code"], registry=r)
        self.latency = Histogram("transferkit_request_seconds", "predict latency", ["model"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))  # fmt: skip
        self.batch_sizes = Histogram("transferkit_batch_size", "images per onnxruntime call", ["model"], registry=r,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))  # fmt: skip
        self.images = Counter("transferkit_images", "images classified", ["model"], registry=r)
        self.errors = Counter("transferkit_errors", "requests answered with an error", ["model", "code"], registry=r)
        self.version = Gauge("transferkit_model_version", "version serving now", ["model"], registry=r)
        self.swaps = Counter("transferkit_model_swaps", "versions switched to", ["model"], registry=r)
        self.swap_seconds = Gauge("transferkit_model_swap_seconds", "load + warm-up + checks of the last swap",
                                  ["model"], registry=r)  # fmt: skip
        self.load_failures = Counter("transferkit_model_load_failures", "versions refused at load", ["model"], registry=r)

    def batch(self, model: LoadedModel, n: int) -> None:
        self.batch_sizes.labels(model.name).observe(n)


# --------------------------------------------------------------------------- the app


def create_app(cfg: ServeConfig):
    """The ASGI app; the model watcher runs in its lifespan."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.concurrency import run_in_threadpool

    if cfg.token is None and os.environ.get(TOKEN_ENV):
        cfg = cfg.model_copy(update={"token": os.environ[TOKEN_ENV]})
    metrics = Metrics()
    registry = Registry(cfg, metrics)

    @asynccontextmanager
    async def lifespan(app):
        task = asyncio.get_running_loop().create_task(registry.watch())
        yield
        task.cancel()
        for s in registry.slots.values():
            if s.current and s.current.batcher:
                s.current.batcher.close()

    app = FastAPI(title="transferkit serve", version="1", lifespan=lifespan)
    app.state.registry, app.state.cfg = registry, cfg

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, e: RequestError):
        name = request.path_params.get("name", "")
        metrics.errors.labels(name, str(e.status)).inc()
        metrics.requests.labels(name, str(e.status)).inc()
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse({"detail": e.message}, status_code=e.status, headers=headers)

    def _auth(request: Request) -> None:
        if not cfg.token:
            return
        got = request.headers.get("authorization", "")
        scheme, _, value = got.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), cfg.token.encode()):
            raise RequestError(401, "missing or wrong bearer token (Authorization: Bearer <token>)")

    def _slot(name: str) -> Slot:
        s = registry.slots.get(name)
        if s is None:
            raise RequestError(404, f"no model named {name!r} (serving: {sorted(registry.slots) or 'none'})")
        if s.current is None:
            raise RequestError(503, f"model {name!r} is not loaded yet ({registry.ready()[1]})")
        return s

    async def _body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise RequestError(413, f"request body is {int(declared)} bytes; the limit is {cfg.max_body_bytes}")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > cfg.max_body_bytes:
                raise RequestError(413, f"request body exceeds the limit of {cfg.max_body_bytes} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        request._body = body  # starlette's form parser reads this cached body
        return body

    async def _images(request: Request) -> list[tuple[bytes, str, str | None]]:
        """(bytes, where, content type) of each image in the request, within the count limit."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await _body(request)
        out: list[tuple[bytes, str, str | None]] = []
        if ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=cfg.max_images + 1, max_fields=cfg.max_images + 16,
                                          max_part_size=cfg.max_body_bytes)  # fmt: skip
            except Exception as e:
                raise RequestError(400, f"malformed multipart body ({getattr(e, 'detail', e)})") from None
            for key, value in form.multi_items():
                if isinstance(value, str):
                    continue  # plain fields (e.g. top_k from a form) are not images
                out.append((await value.read(), f"file {value.filename or key!r}", value.content_type or OCTET))
        elif ctype == "application/json":
            try:
                doc = json.loads(body)
            except ValueError as e:
                raise RequestError(400, f"body is not valid JSON ({e})") from None
            images = doc.get("images") if isinstance(doc, dict) else None
            if not isinstance(images, list):
                raise RequestError(400, 'JSON body must be {"images": ["<base64>", ...]}')
            if len(images) > cfg.max_images:
                raise RequestError(413, f"{len(images)} images in one request; the limit is {cfg.max_images}")
            for i, b64 in enumerate(images):
                if not isinstance(b64, str):
                    raise RequestError(400, f"images[{i}]: expected a base64 string, got {type(b64).__name__}")
                if b64.startswith("data:"):  # a data URL from a browser
                    b64 = b64.partition(",")[2]
                try:
                    out.append((base64.b64decode(b64, validate=True), f"images[{i}]", None))
                except (binascii.Error, ValueError):
                    raise RequestError(400, f"images[{i}]: not valid base64") from None
        elif ctype in ALLOWED_TYPES or ctype == OCTET:
            out.append((body, "request body", ctype))
        else:
            raise RequestError(415, f"content type {ctype or 'none'} not accepted: send multipart/form-data, "
                                    f"application/json {{\"images\": [base64]}}, or one image/* body")  # fmt: skip
        if not out:
            raise RequestError(400, "no image in the request")
        if len(out) > cfg.max_images:
            raise RequestError(413, f"{len(out)} images in one request; the limit is {cfg.max_images}")
        return out

    @app.post("/v1/models/{name}/predict")
    async def predict(
        name: str,
        request: Request,
        top_k: int | None = Query(None, ge=1, le=1000, description="labels per image (default 5, at most all)"),
        logits: bool = Query(False, description="also return the raw logits"),
    ):
        t0 = time.perf_counter()
        _auth(request)
        slot = _slot(name)
        images = await _images(request)
        model = slot.current  # one version for the whole request, even if a swap lands meanwhile
        model.inflight += 1
        try:

            def prep() -> tuple[np.ndarray, list]:
                decoded = [decode_image(data, cfg, where, ct)[0] for data, where, ct in images]
                return np.stack([model.preprocess(img) for img in decoded]), decoded

            x, decoded = await run_in_threadpool(prep)
            if model.batcher is not None:
                out = await model.batcher.submit(x)
            else:
                out = await asyncio.get_running_loop().run_in_executor(registry.infer_pool, model.run, x)
                metrics.batch(model, len(x))
        finally:
            model.inflight -= 1
        if slot.reservoir is not None:
            # only requests that were served: a rejected upload is not traffic the model saw
            await run_in_threadpool(lambda: [slot.reservoir.offer(img, model.version) for img in decoded])
        k = min(top_k or cfg.default_top_k, len(model.classes))
        probs = softmax(out.astype(np.float64))
        preds = []
        for row, p in zip(out, probs):
            idx = np.argsort(-p, kind="stable")[:k]
            pred: dict[str, Any] = {"top_k": [{"label": model.classes[i], "index": int(i), "probability": float(p[i])}
                                              for i in idx]}  # fmt: skip
            if logits:
                pred["logits"] = [float(v) for v in row]
            preds.append(pred)
        metrics.requests.labels(name, "200").inc()
        metrics.images.labels(name).inc(len(x))
        metrics.latency.labels(name).observe(time.perf_counter() - t0)
        body = {"model": name, "version": model.version, "provider": model.provider, "predictions": preds}
        return JSONResponse(body, headers={"X-Model-Version": str(model.version)})

    @app.get("/v1/models")
    async def models(request: Request):
        _auth(request)
        return {"models": [registry.status(n) for n in sorted(registry.slots)]}

    @app.get("/v1/models/{name}")
    async def model_status(name: str, request: Request):
        _auth(request)
        if name not in registry.slots:
            raise RequestError(404, f"no model named {name!r} (serving: {sorted(registry.slots) or 'none'})")
        return registry.status(name)

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        ok, why = registry.ready()
        versions = {n: (s.current.version if s.current else None) for n, s in registry.slots.items()}
        return JSONResponse({"ready": ok, "detail": why, "versions": versions}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE)

    return app


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run one uvicorn process (scale out with replicas, not workers: each holds its own sessions)."""
    import uvicorn

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(cfg), host=host, port=port, log_level=log_level, access_log=False,
                h11_max_incomplete_event_size=64 * 1024)  # fmt: skip


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
