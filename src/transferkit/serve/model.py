"""One served version: its session and metadata, and the checks it passes before it may serve."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from transferkit.modelrepo.repository import INPUT_NAME, OUTPUT_NAME
from transferkit.serve.decode import preprocess
from transferkit.serve.errors import LoadError

if TYPE_CHECKING:
    from transferkit.serve.config import ServeConfig

EMBEDDED_KEYS = ("name", "classes", "input_size", "mean", "std", "version")  # ONNX metadata == metadata.json


class Tensor(NamedTuple):
    """A graph input or output as onnxruntime reports it (symbolic dimensions are strings or None)."""

    name: str
    type: str
    shape: list


@dataclass
class ServedModel:
    name: str
    version: int
    path: Path
    meta: dict
    sess: Any
    provider: str
    inputs: list[Tensor] = field(default_factory=list)  # read once: a version's graph never changes
    outputs: list[Tensor] = field(default_factory=list)
    load_seconds: float = 0.0
    reference_diff: float | None = None  # max abs diff vs export's torch logits on its reference images
    inflight: int = 0
    batcher: Any = None  # its Batcher while batching is on

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def input_name(self) -> str:
        return self.meta.get("input_name", INPUT_NAME)

    @property
    def output_name(self) -> str:
        return self.meta.get("output_name", OUTPUT_NAME)

    def preprocess(self, img) -> np.ndarray:
        m = self.meta
        return preprocess(img, m["input_size"], m["mean"], m["std"], m.get("interpolation"))

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run([self.output_name], {self.input_name: x})[0]

    @contextmanager
    def in_use(self) -> Iterator[ServedModel]:
        """Held by a request: a swapped-out version is dropped only once none holds it (Registry._retire)."""
        self.inflight += 1
        try:
            yield self
        finally:
            self.inflight -= 1


def load_version(model_dir: Path, version: int, cfg: ServeConfig) -> ServedModel:
    """Load, check against metadata.json, warm up and parity-check one version; LoadError if it must not serve."""
    from transferkit.modelrepo.repository import REFERENCE_FILE

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    meta, path = _checked_files(model_dir, version, cfg.int8)
    model = _open(model_dir.name, version, path, meta, cfg.threads)
    _check_graph(model)
    atol = float((meta.get("parity") or {}).get("atol") or 1e-4)
    _warm_up(model, cfg.max_batch_size, atol)
    if meta.get("reference") and path.name == "model.onnx":  # int8 answers differently by design
        model.reference_diff = _replay_reference(model, path.parent / REFERENCE_FILE, atol)  # sha256 checked
    model.load_seconds = time.perf_counter() - t0
    return model


def _checked_files(model_dir: Path, version: int, int8: bool) -> tuple[dict, Path]:
    """metadata.json and the file to serve, once every file's sha256 and the embedded metadata agree."""
    from transferkit.modelrepo.repository import INT8_FILE, check_version, read_onnx_metadata

    try:
        meta = check_version(model_dir, version, embedded=False)  # every file's sha256, int8 included
    except ValueError as e:
        raise LoadError(str(e)) from None
    vdir = model_dir / str(version)
    path = vdir / "model.onnx"
    if int8 and (meta.get("int8") or {}).get("kept"):
        path = vdir / INT8_FILE  # check_version pinned it
    try:
        embedded = read_onnx_metadata(path)
    except Exception as e:
        raise LoadError(f"{path}: not a readable ONNX file ({type(e).__name__}: {str(e)[:200]})") from None
    for key in EMBEDDED_KEYS:
        if embedded.get(key) != meta.get(key):
            raise LoadError(
                f"{path}: embedded {key} {embedded.get(key)!r} differs from metadata.json's {meta.get(key)!r}"
            )
    if len(meta["input_size"]) != 3 or meta["input_size"][1] != meta["input_size"][2]:
        raise LoadError(
            f"{vdir / 'metadata.json'}: input_size {meta['input_size']}: only square [3, S, S] inputs are served"
        )
    return meta, path


def _open(name: str, version: int, path: Path, meta: dict, threads: int) -> ServedModel:
    from transferkit.modelrepo.runtime import ort_session

    try:
        sess, provider = ort_session(path, threads=threads)
    except Exception as e:
        raise LoadError(f"{path}: onnxruntime cannot load it ({type(e).__name__}: {str(e)[:300]})") from None
    return ServedModel(
        name,
        version,
        path,
        meta,
        sess,
        provider,
        inputs=[Tensor(t.name, t.type, list(t.shape)) for t in sess.get_inputs()],
        outputs=[Tensor(t.name, t.type, list(t.shape)) for t in sess.get_outputs()],
    )


def _check_graph(model: ServedModel) -> None:
    """The graph's one input and its output named, and the input shaped, as metadata.json says."""
    ins, outs = [t.name for t in model.inputs], [t.name for t in model.outputs]
    if ins != [model.input_name] or model.output_name not in outs:
        raise LoadError(
            f"{model.path}: graph inputs {ins} / outputs {outs}, metadata says {model.input_name} -> {model.output_name}"
        )
    shape, size = model.inputs[0].shape, model.meta["input_size"]
    if len(shape) != 4 or list(shape[1:]) != list(size):
        raise LoadError(f"{model.path}: graph input shape {shape}, metadata input_size {size}")


def _warm_up(model: ServedModel, max_batch: int, atol: float) -> None:
    """Warm-up doubles as a check: finite logits of the right shape, and a batch that agrees with the same
    images one at a time (dynamic batch dim sound) within the version's own parity tolerance."""
    size, n_classes = model.meta["input_size"], len(model.classes)
    n = max(2, min(8, max_batch))
    x = np.random.default_rng(0).standard_normal((n, *size)).astype(np.float32)
    try:
        batched = model.run(x)
        singles = np.concatenate([model.run(x[i : i + 1]) for i in range(n)])
        model.run(np.zeros((max_batch, *size), np.float32))
    except Exception as e:
        raise LoadError(f"{model.path}: warm-up inference failed ({type(e).__name__}: {str(e)[:300]})") from None
    if batched.shape != (n, n_classes) or not np.isfinite(batched).all():
        raise LoadError(
            f"{model.path}: warm-up gave logits of shape {batched.shape} (finite: {np.isfinite(batched).all()}), "
            f"expected ({n}, {n_classes})"
        )
    diff = float(np.max(np.abs(batched - singles)))
    if not diff <= atol:
        raise LoadError(f"{model.path}: batch vs single logits differ by {diff:.3g} (> parity atol {atol:g})")


def _replay_reference(model: ServedModel, ref_path: Path, atol: float) -> float:
    """Export's reference test images through this server's preprocessing and session, against the torch
    logits export recorded; LoadError beyond the parity tolerance or on another top-1. Returns the max diff."""
    from PIL import Image

    try:
        with np.load(ref_path, allow_pickle=False) as z:
            want = z["logits"]
            imgs = [z[f"image{i}"] for i in range(len(want))]
        x = np.stack([model.preprocess(Image.fromarray(a)) for a in imgs])
        got = model.run(x)
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
