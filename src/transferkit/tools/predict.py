"""Batch prediction: a model from the repository over a folder or a list of images -> CSV or JSON.

    transferkit predict data/new_images --model clipart --out predictions.csv
    transferkit predict a.png b.jpg --model clipart@3 --top-k 3 --out predictions.json
    transferkit predict data/new_images --model clipart --server http://127.0.0.1:8000

The model is REPO/<name>/latest, REPO/<name>/<version> (NAME@VERSION) or an exported ONNX file; a repository
version is checked as every server checks it (complete, each file's sha256 as metadata.json pins it). Images
are read by data.load_rgb and preprocessed by serve.decode.preprocess with the input size, mean, std and
interpolation recorded in the model's metadata: the loader and preprocessing the server runs, so the same
image gets the same answer here and from `transferkit serve`. With `--server URL` the image bytes go to a
running server's /v1 predict route instead (batches of --batch-size images per request).

A file that cannot be read or decoded (corrupt, truncated, a bomb, not an image) is skipped and listed, in the
output (a row with `error`) and on stderr; it never stops the run.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.core.errors import TransferkitError

FORMATS = ("csv", "json")
SERVER_RETRIES = 3  # a 503 (busy) is retried this many times before the run stops
# image bytes per server request: base64 makes 5 MB about 6.7 MB of JSON, under serve's default 8 MB body limit
MAX_REQUEST_BYTES = 5 << 20


class PredictError(TransferkitError, ValueError):
    """A model, input or server that predict cannot use; the message names it."""


@dataclass
class PredictModel:
    """The model predict runs: its ONNX file and the metadata that fixes its preprocessing."""

    name: str
    version: int | None
    path: Path
    meta: dict[str, Any]
    pinned: bool = False  # a version the user named (NAME@VERSION or a file): a server must answer with it

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])


@dataclass
class Predictions:
    """What one predict run found: a row per readable image, the skipped files with their reason."""

    model: PredictModel
    top_k: int
    source: str  # "onnxruntime" or the server's URL
    provider: str | None = None
    served_version: int | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model.name,
            "version": self.served_version if self.served_version is not None else self.model.version,
            "onnx": str(self.model.path),
            "source": self.source,
            "provider": self.provider,
            "top_k": self.top_k,
            "n_images": len(self.rows),
            "n_skipped": len(self.skipped),
            "predictions": self.rows,
            "skipped": self.skipped,
        }


# --------------------------------------------------------------------------- the model


def resolve_model(ref: str, repo: Path) -> PredictModel:
    """NAME (its `latest`), NAME@VERSION, or a path to an exported .onnx file; PredictError naming what is wrong."""
    from transferkit.modelrepo.repository import (
        RepositoryError,
        check_version,
        find_model,
        read_latest,
        read_onnx_metadata,
    )

    path = Path(ref)
    if ref.endswith(".onnx") or path.is_file():
        if not path.is_file():
            raise PredictError(f"{path}: no such ONNX file")
        try:
            meta = read_onnx_metadata(path)
        except Exception as e:
            raise PredictError(f"{path}: not a readable ONNX file ({type(e).__name__}: {str(e)[:200]})") from None
        version = meta.get("version")
        version = version if isinstance(version, int) else None
        model = PredictModel(str(meta.get("name") or path.stem), version, path, meta, pinned=version is not None)
    else:
        name, _, ver = ref.partition("@")
        try:
            model_dir = find_model(Path(repo), name)
            version = _version(ver, ref) if ver else read_latest(model_dir)
            if version is None:
                raise PredictError(f"{model_dir}: no `latest` version yet; name one as {name}@VERSION")
            meta = check_version(model_dir, version)
        except RepositoryError as e:
            raise PredictError(str(e)) from None
        model = PredictModel(name, version, model_dir / str(version) / "model.onnx", meta, pinned=bool(ver))
    _check_meta(model)
    return model


def _version(text: str, ref: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise PredictError(f"--model {ref!r}: the version after @ must be a number >= 1")
    return int(text)


def _check_meta(model: PredictModel) -> None:
    """The keys the preprocessing needs, as export writes them (an ONNX file from elsewhere has none)."""
    m = model.meta
    size, classes = m.get("input_size"), m.get("classes")
    ok = (
        isinstance(classes, list)
        and classes
        and isinstance(size, list)
        and len(size) == 3
        and all(isinstance(v, int) and v > 0 for v in size)
        and all(isinstance(m.get(k), list) and len(m[k]) == 3 for k in ("mean", "std"))
    )
    if not ok:
        raise PredictError(
            f"{model.path}: no transferkit metadata (classes, input_size [3, H, W], mean, std): "
            "predict runs models that `transferkit export` wrote"
        )


def server_model(ref: str, repo: Path) -> PredictModel:
    """The model to ask a server for: resolved as resolve_model does when REPO has it (its version is then
    checked against the server's answer), else only the name (and the NAME@VERSION asked for)."""
    name, _, ver = ref.partition("@")
    if ref.endswith(".onnx") or (Path(repo) / name).is_dir():
        return resolve_model(ref, repo)
    from transferkit.modelrepo.repository import RepositoryError, check_model_name

    try:
        check_model_name(name)
    except RepositoryError as e:
        raise PredictError(str(e)) from None
    return PredictModel(name, _version(ver, ref) if ver else None, Path(ref), {"classes": []}, pinned=bool(ver))


# --------------------------------------------------------------------------- the images


def _shown(p: Path) -> str:
    """A path as printable text (undecodable name bytes as \\xNN)."""
    return os.fsencode(p).decode("utf-8", "backslashreplace")


def collect_images(inputs: list[Path], list_file: Path | None = None) -> tuple[list[Path], list[dict[str, str]]]:
    """The image files to predict, in a stable order, and the files passed over with their reason.

    A folder is walked recursively (sorted; linked folders not followed; hidden files, other extensions and
    non-regular files listed as skipped). A named file is tried whatever its extension. `list_file`: one
    path a line, relative ones from the list's folder; a missing entry is skipped, a missing argument an error.
    """
    from transferkit.data.images import IMAGE_EXTENSIONS

    files: list[Path] = []
    skipped: list[dict[str, str]] = []
    named = list(inputs)
    if list_file is not None:
        named += _read_list(Path(list_file))
    for p in inputs:
        if not p.exists():
            raise PredictError(f"{p}: no such file or folder")
    for p in named:
        if p.is_dir():
            files += _walk(p, IMAGE_EXTENSIONS, skipped)
        elif not p.exists():
            skipped.append({"path": _shown(p), "reason": "no such file"})
        elif not p.is_file():  # opening a named pipe would wait for a writer
            skipped.append({"path": _shown(p), "reason": "not a regular file (named pipe, socket or device)"})
        else:
            files.append(p)
    seen: set[Path] = set()
    unique = [f for f in files if not (f in seen or seen.add(f))]
    if not unique and not skipped:
        raise PredictError(f"no image files in {', '.join(str(p) for p in named) or 'the inputs'}")
    return unique, skipped


def _read_list(list_file: Path) -> list[Path]:
    try:
        text = list_file.read_text()
    except UnicodeDecodeError:
        raise PredictError(f"{list_file}: the image list is not UTF-8 text") from None
    base = list_file.parent
    return [
        Path(line) if Path(line).is_absolute() else base / line for line in map(str.strip, text.splitlines()) if line
    ]


def _walk(folder: Path, extensions: set[str], skipped: list[dict[str, str]]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                skipped.append({"path": _shown(Path(dirpath, d)), "reason": "linked folder (not followed)"})
        for f in sorted(filenames):
            p = Path(dirpath, f)
            if f.startswith(".") or p.suffix.lower() not in extensions:
                skipped.append({"path": _shown(p), "reason": "not an image file (extension)"})
            elif not p.is_file():
                skipped.append({"path": _shown(p), "reason": "not a regular file (named pipe, socket or device)"})
            else:
                out.append(p)
    return out


def load_input(path: Path, meta: dict[str, Any]) -> tuple[np.ndarray | None, str | None]:
    """(the model's [3, H, W] input, None) or (None, why the file cannot be used): the server's loader and
    preprocessing with the metadata's input size, mean, std and interpolation."""
    from transferkit.data.images import load_rgb
    from transferkit.serve.decode import preprocess

    try:
        img = load_rgb(path)
        return preprocess(img, meta["input_size"], meta["mean"], meta["std"], meta.get("interpolation")), None
    except Exception as e:  # PIL raises many types for corrupt data; none may stop the run
        return None, f"unreadable image ({type(e).__name__}: {str(e)[:200]})"


# --------------------------------------------------------------------------- local (onnxruntime)


def predict_local(
    model: PredictModel,
    files: list[Path],
    *,
    batch_size: int = 32,
    top_k: int = 5,
    threads: int = 0,
    workers: int = 2,
    progress: bool = True,
) -> Predictions:
    """Every file through the model's ONNX file on onnxruntime, `batch_size` images a call; the next batch is
    decoded on `workers` threads while this one runs (at most two batches in memory)."""
    from transferkit.modelrepo.runtime import ort_session

    _check_sizes(batch_size, top_k)
    sess, provider = ort_session(model.path, threads=threads)
    in_name = model.meta.get("input_name", sess.get_inputs()[0].name)
    out_name = model.meta.get("output_name", sess.get_outputs()[0].name)
    result = Predictions(model, min(top_k, len(model.classes)), "onnxruntime", provider)
    chunks = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    with ThreadPoolExecutor(max(1, workers)) as pool, _bar(len(files), progress) as bar:

        def submit(chunk):
            return [(p, pool.submit(load_input, p, model.meta)) for p in chunk]

        ahead = submit(chunks[0]) if chunks else []
        for i in range(len(chunks)):
            current, ahead = ahead, submit(chunks[i + 1]) if i + 1 < len(chunks) else []
            good, xs = [], []
            for p, fut in current:
                x, why = fut.result()
                if why is None:
                    good.append(p)
                    xs.append(x)
                else:
                    result.skipped.append({"path": _shown(p), "reason": why})
            if xs:
                logits = sess.run([out_name], {in_name: np.stack(xs)})[0]
                result.rows += _rows(good, logits, model.classes, result.top_k)
            bar.update(len(current))
    return result


def _check_sizes(batch_size: int, top_k: int) -> None:
    if batch_size < 1:
        raise PredictError(f"--batch-size {batch_size}: must be at least 1")
    if top_k < 1:
        raise PredictError(f"--top-k {top_k}: must be at least 1")


def _rows(paths: list[Path], logits: np.ndarray, classes: list[str], k: int) -> list[dict[str, Any]]:
    from transferkit.core.numeric import softmax

    out = []
    for p, prob in zip(paths, softmax(logits)):
        idx = np.argsort(-prob, kind="stable")[:k]  # the server's order (v1._predictions)
        out.append(_row(p, [{"label": classes[i], "probability": float(prob[i])} for i in idx]))
    return out


def _row(path: Path, top: list[dict[str, Any]]) -> dict[str, Any]:
    return {"path": _shown(path), "label": top[0]["label"], "confidence": top[0]["probability"], "top_k": top}


def _bar(total: int, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="predict", unit="img", disable=not progress, leave=False)


# --------------------------------------------------------------------------- through a running server


def predict_server(
    model: PredictModel,
    files: list[Path],
    url: str,
    *,
    batch_size: int = 32,
    top_k: int = 5,
    token: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> Predictions:
    """The same images as raw bytes to URL's POST /v1/models/<name>/predict, `batch_size` a request (JSON
    base64 batch; fewer where their bytes pass MAX_REQUEST_BYTES). A request refused for its images (400/413/415) is resent one image at a time, so only the
    images the server refuses are skipped, with its reason. Other refusals (401, 404, 5xx, no server) stop the
    run with a PredictError; a version named with NAME@VERSION must be the one the server answers with."""
    import httpx

    _check_sizes(batch_size, top_k)
    result = Predictions(model, min(top_k, len(model.classes) or top_k), url.rstrip("/"))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    route = f"{url.rstrip('/')}/v1/models/{model.name}/predict"
    with httpx.Client(headers=headers, timeout=timeout) as client, _bar(len(files), progress) as bar:
        post = _poster(client, route, result.top_k)
        for i in range(0, len(files), batch_size):
            chunk = files[i : i + batch_size]
            sent = _read_bytes(chunk, result.skipped)
            for p, body in (a for group in _by_size(sent) for a in _answers(post, group, result.skipped)):
                if model.pinned and body["version"] != model.version:
                    raise PredictError(
                        f"{url}: serves {model.name} version {body['version']}, not the version {model.version} "
                        "asked for (a server answers with its live version; promote it, or predict without --server)"
                    )
                result.provider, result.served_version = body["provider"], body["version"]
                result.rows.append(_row(p, body["top_k"]))
            bar.update(len(chunk))
    return result


def _by_size(sent: list[tuple[Path, bytes]]) -> Iterator[list[tuple[Path, bytes]]]:
    """Consecutive groups of at most MAX_REQUEST_BYTES of image bytes (one image alone may exceed it)."""
    group, size = [], 0
    for item in sent:
        if group and size + len(item[1]) > MAX_REQUEST_BYTES:
            yield group
            group, size = [], 0
        group.append(item)
        size += len(item[1])
    if group:
        yield group


def _read_bytes(chunk: list[Path], skipped: list[dict[str, str]]) -> list[tuple[Path, bytes]]:
    out = []
    for p in chunk:
        try:
            out.append((p, p.read_bytes()))
        except OSError as e:
            skipped.append({"path": _shown(p), "reason": f"unreadable file ({e.strerror or type(e).__name__})"})
    return out


def _poster(client, route: str, k: int) -> Callable[[list[bytes]], Any]:
    """POST a batch of image bytes; the httpx response (503 retried; no connection is a PredictError)."""
    import base64
    import time

    import httpx

    def post(images: list[bytes]):
        body = {"images": [base64.b64encode(b).decode("ascii") for b in images]}
        for attempt in range(SERVER_RETRIES + 1):
            try:
                r = client.post(route, params={"top_k": k}, json=body)
            except httpx.HTTPError as e:
                raise PredictError(f"{route}: no answer from the server ({type(e).__name__}: {e})") from None
            if r.status_code != 503 or attempt == SERVER_RETRIES:
                return r
            time.sleep(0.5 * 2**attempt)  # busy: back off, then try again
        return r

    return post


def _answers(post, sent: list[tuple[Path, bytes]], skipped: list[dict[str, str]]) -> Iterator[tuple[Path, dict]]:
    """(path, {"top_k", "version", "provider"}) per image the server answered; the refused ones go to `skipped`."""
    if not sent:
        return
    r = post([b for _, b in sent])
    if r.status_code in (400, 413, 415) and len(sent) > 1:
        for one in sent:  # find the image(s) it refused
            yield from _answers(post, [one], skipped)
        return
    if r.status_code in (400, 413, 415):
        skipped.append({"path": _shown(sent[0][0]), "reason": f"server refused it: {r.status_code} {_detail(r)}"})
        return
    if r.status_code != 200:
        raise PredictError(f"{r.request.url}: {r.status_code} {_detail(r)}")
    body = r.json()
    for (p, _), pred in zip(sent, body["predictions"]):
        top = [{"label": t["label"], "probability": t["probability"]} for t in pred["top_k"]]
        yield p, {"top_k": top, "version": body["version"], "provider": body.get("provider")}


def _detail(r) -> str:
    try:
        return str(r.json().get("detail"))[:300]
    except ValueError:
        return r.text[:300]


# --------------------------------------------------------------------------- output


def output_format(out: Path | None, fmt: str | None) -> str:
    """`fmt` if given, else from OUT's suffix (.json: json), else csv."""
    if fmt is None:
        fmt = "json" if out is not None and out.suffix.lower() == ".json" else "csv"
    if fmt not in FORMATS:
        raise PredictError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return fmt


def render(result: Predictions, fmt: str) -> str:
    """CSV: path, label, confidence, label_2, confidence_2, ... label_k, confidence_k, error (a skipped file
    is a row with only path and error). JSON: Predictions.as_json()."""
    if fmt == "json":
        return json.dumps(result.as_json(), indent=2) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    k = result.top_k
    w.writerow(
        [
            "path",
            "label",
            "confidence",
            *[f"{c}_{i}" for i in range(2, k + 1) for c in ("label", "confidence")],
            "error",
        ]
    )
    for r in result.rows:
        rest = [v for t in r["top_k"][1:] for v in (t["label"], f"{t['probability']:.6g}")]
        w.writerow([r["path"], r["label"], f"{r['confidence']:.6g}", *rest, *[""] * (2 * (k - 1) - len(rest)), ""])
    for s in result.skipped:
        w.writerow([s["path"], "", "", *[""] * (2 * (k - 1)), s["reason"]])
    return buf.getvalue()


def write_predictions(result: Predictions, out: Path, fmt: str) -> None:
    """OUT written atomically: an earlier file stays whole until the new one is complete."""
    from transferkit.core.io import atomic_write_text

    atomic_write_text(out, render(result, fmt))
