"""The model server, as a real uvicorn process on loopback, driven by a real HTTP client (httpx).

    .venv/bin/pytest -q tests/serve/test_serve.py

Two server processes share a copy of the repository from conftest.model_repo (real exports digits/1 and
digits/2): one with batching, a bearer token, tight limits and a monitor reservoir (most tests), one with
batching off and no token (switch and browser tests). Every prediction is compared with an offline
onnxruntime run of the same file on zoo.eval_transform's (torch) preprocessing.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import (
    SERVE_TOKEN,
    bad_reference,
    read_metric,
    serving,
    start_server,
    wait_failed,
    wait_version,
)
from PIL import Image

from transferkit.core.io import read_json, write_json
from transferkit.core.procs import free_port
from transferkit.export.promote import PromoteError, promote, read_history, rollback
from transferkit.modelrepo.repository import latest_version
from transferkit.serve import launch

pytestmark = pytest.mark.slow

MONITOR_SIZE = 8


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    """Batching on (20 ms for batch-mates, so that concurrent test requests do meet), token, 1 MB body, 1 Mpx
    images, 4 images per request, an 8-image reservoir."""
    tmp = tmp_path_factory.mktemp("server")
    limits = ("--max-body-mb", "1", "--max-queue-delay-ms", "20", "--max-image-pixels", "1000000", "--max-images", "4")
    monitor = ("--monitor-dir", str(tmp / "monitor"), "--monitor-size", str(MONITOR_SIZE))
    with serving(repo, tmp, *limits, *monitor) as s:
        yield {**s, "monitor": tmp / "monitor"}


@pytest.fixture(scope="module")
def plain_server(repo, tmp_path_factory):
    """Batching off, no token."""
    with serving(repo, tmp_path_factory.mktemp("server-plain"), "--no-batching", token=None) as s:
        yield s


@pytest.fixture(scope="module")
def offline(repo):
    """Offline reference: version -> f(list of PIL images) -> logits, via torch preprocessing + onnxruntime."""
    import onnxruntime as ort
    import torch

    from transferkit.models import zoo

    out = {}
    for v in (1, 2):
        meta = read_json(repo / "digits" / str(v) / "metadata.json")
        tf = zoo.eval_transform({k: meta[k] for k in ("input_size", "mean", "std", "interpolation")})
        sess = ort.InferenceSession(str(repo / "digits" / str(v) / "model.onnx"), providers=["CPUExecutionProvider"])

        def run(images, tf=tf, sess=sess):
            x = torch.stack([tf(im.convert("RGB")) for im in images]).numpy()
            return sess.run(["logits"], {"input": x})[0]

        out[v] = run
    return out


def _png(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(tiny_target) -> list[Image.Image]:
    """Real digits test images (32 px), plus one non-square and one larger RGB image made from them."""
    files = sorted((tiny_target / "test").rglob("*.png"))[:3]
    ims = [Image.open(p).convert("RGB") for p in files]
    ims.append(ims[0].resize((48, 29), Image.BILINEAR))  # shorter side resized, then centre-cropped
    ims.append(ims[1].resize((70, 90), Image.NEAREST).rotate(7))
    return ims


def _check(body: dict, version: int, offline, images, k: int) -> None:
    assert body["model"] == "digits" and body["version"] == version
    ref = offline[version](images)
    assert len(body["predictions"]) == len(images)
    for pred, row in zip(body["predictions"], ref):
        np.testing.assert_allclose(pred["logits"], row, atol=1e-4, rtol=0)
        p = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        top = [t["index"] for t in pred["top_k"]]
        assert len(top) == k and top[0] == int(row.argmax())
        np.testing.assert_allclose([t["probability"] for t in pred["top_k"]], p[top], atol=1e-5)
        assert [t["label"] for t in pred["top_k"]] == [str(i) for i in top]  # digits classes are "0".."9"


# --------------------------------------------------------------------------- preprocessing, in process


def test_numpy_preprocessing_equals_the_torch_eval_transform(images):
    from transferkit.models import zoo
    from transferkit.serve import preprocess

    for interp in ("bicubic", "bilinear"):
        cfg = {
            "input_size": (3, 32, 32),
            "interpolation": interp,
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
        }
        tf = zoo.eval_transform(cfg)
        for im in images:
            ref = tf(im).numpy()
            got = preprocess(im, [3, 32, 32], cfg["mean"], cfg["std"], interp)
            assert got.shape == ref.shape and got.dtype == np.float32
            np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- predictions


def test_multipart_json_and_raw_predictions_match_offline_onnxruntime(server, offline, images):
    c = server["client"]
    files = [("file", (f"{i}.png", _png(im), "image/png")) for i, im in enumerate(images[:4])]
    r = c.post("/v1/models/digits/predict", params={"top_k": 3, "logits": True}, files=files)
    assert r.status_code == 200, r.text
    assert r.headers["x-model-version"] == "2"
    _check(r.json(), 2, offline, images[:4], 3)

    b64 = [base64.b64encode(_png(im, fmt)).decode() for im, fmt in ((images[4], "PNG"), (images[0], "BMP"))]
    r = c.post("/v1/models/digits/predict", params={"logits": True}, json={"images": b64})
    assert r.status_code == 200, r.text
    _check(r.json(), 2, offline, [images[4], images[0]], 5)

    jpeg = _png(images[2], "JPEG")
    r = c.post(
        "/v1/models/digits/predict",
        params={"top_k": 10, "logits": True},
        content=jpeg,
        headers={"Content-Type": "image/jpeg"},
    )
    assert r.status_code == 200, r.text
    _check(r.json(), 2, offline, [Image.open(io.BytesIO(jpeg))], 10)


def test_batching_off_gives_the_same_answers(plain_server, offline, images):
    files = [("file", (f"{i}.png", _png(im), "image/png")) for i, im in enumerate(images[:3])]
    r = plain_server["client"].post("/v1/models/digits/predict", params={"logits": True}, files=files)
    assert r.status_code == 200, r.text
    _check(r.json(), 2, offline, images[:3], 5)
    assert plain_server["client"].get("/v1/models/digits").json()["batching"] is False


def test_concurrent_requests_are_batched(server, offline, images):
    from concurrent.futures import ThreadPoolExecutor

    c = server["client"]
    data = _png(images[0])

    def one(_):
        return c.post(
            "/v1/models/digits/predict", params={"logits": True}, files={"file": ("a.png", data, "image/png")}
        )

    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(one, range(24)))
    assert all(r.status_code == 200 for r in rs)
    for r in rs:
        _check(r.json(), 2, offline, [images[0]], 5)
    metrics = c.get("/metrics").text
    # some onnxruntime call carried more than one request's image
    count = read_metric(metrics, 'transferkit_batch_size_count{model="digits"}')
    total = read_metric(metrics, 'transferkit_batch_size_sum{model="digits"}')
    assert total / count > 1.0, (count, total)


# --------------------------------------------------------------------------- limits and errors


@functools.lru_cache(1)
def _bomb() -> bytes:
    data = _png(Image.new("1", (16000, 16000)))
    assert len(data) < 200_000  # small on the wire, under the 1 MB body limit
    return data


def _bad_cases(images):
    png = _png(images[0])
    big = _png(Image.new("L", (1200, 1000), 3))  # 1.2 Mpx, a few kB compressed: refused from its header
    return {
        "no token": (dict(files={"file": ("a.png", png, "image/png")}), 401, "bearer token", {"Authorization": ""}),
        "wrong token": (
            dict(files={"file": ("a.png", png, "image/png")}),
            401,
            "bearer token",
            {"Authorization": "Bearer nope"},
        ),
        "text body": (dict(content=b"hello", headers={"Content-Type": "text/plain"}), 415, "text/plain", None),
        "svg part": (dict(files={"file": ("a.svg", b"<svg/>", "image/svg+xml")}), 415, "image/svg+xml", None),
        "not an image": (
            dict(files={"file": ("a.png", b"GIF87a-nope" * 3, "application/octet-stream")}),
            415,
            "not an image",
            None,
        ),
        "truncated png": (dict(files={"file": ("cut.png", png[: len(png) // 2], "image/png")}), 400, "'cut.png'", None),
        # a good image before the bad one: the request fails whole, and the monitor never samples it
        "good then truncated": (
            dict(
                files=[("file", ("ok.png", png, "image/png")), ("file", ("cut.png", png[: len(png) // 2], "image/png"))]
            ),
            400,
            "'cut.png'",
            None,
        ),
        "bad json": (dict(content=b"{", headers={"Content-Type": "application/json"}), 400, "not valid JSON", None),
        "json shape": (dict(json=["x"]), 400, '{"images"', None),
        "bad base64": (dict(json={"images": ["***"]}), 400, "images[0]: not valid base64", None),
        "no image": (dict(files={"note": (None, "hi")}), 400, "no image", None),
        "body size": (
            dict(content=os.urandom(1_200_000), headers={"Content-Type": "image/png"}),
            413,
            "limit is 1048576",
            None,
        ),
        "pixels": (dict(files={"file": ("big.png", big, "image/png")}), 413, "1200x1000", None),
        "side": (dict(files={"file": ("wide.png", _png(Image.new("L", (9000, 1))), "image/png")}), 413, "9000x1", None),
        # a decompression bomb: 256 Mpx that compress to a few kB; refused from the header, never decoded
        "bomb": (dict(files={"file": ("bomb.png", _bomb(), "image/png")}), 413, "256000000 pixels", None),
        # no Content-Length (chunked upload): the limit is enforced while streaming
        "chunked body": (
            dict(content=(b"x" * 65536 for _ in range(20)), headers={"Content-Type": "image/png"}),
            413,
            "exceeds the limit of 1048576",
            None,
        ),
        "batch size": (dict(files=[("file", (f"{i}.png", png, "image/png")) for i in range(5)]), 413, "5 images", None),
        "top_k": (dict(files={"file": ("a.png", png, "image/png")}, params={"top_k": 0}), 422, "top_k", None),
    }


@pytest.mark.parametrize("case", list(_bad_cases([Image.new("RGB", (8, 8))])))
def test_bad_input_gets_the_right_4xx_with_a_readable_message(server, images, case):
    kwargs, status, text, headers = _bad_cases(images)[case]
    c = server["client"]
    if headers is not None:
        kwargs = {**kwargs, "headers": {**kwargs.get("headers", {}), **headers}}
    r = c.post("/v1/models/digits/predict", **kwargs)
    assert r.status_code == status, (case, r.status_code, r.text)
    detail = r.json()["detail"]
    assert text in (detail if isinstance(detail, str) else json.dumps(detail)), r.text
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


def test_unknown_model_and_good_requests_still_work(server, images):
    c = server["client"]
    r = c.post("/v1/models/cats/predict", files={"file": ("a.png", _png(images[0]), "image/png")})
    assert r.status_code == 404 and "cats" in r.json()["detail"]
    assert (
        c.post("/v1/models/digits/predict", files={"file": ("a.png", _png(images[0]), "image/png")}).status_code == 200
    )
    assert httpx.get(f"{server['url']}/v1/models").status_code == 401  # listing needs the token too


def test_health_ready_and_metrics(server, images):
    c = server["client"]
    assert httpx.get(f"{server['url']}/healthz").json() == {"status": "alive"}
    ready = httpx.get(f"{server['url']}/readyz")
    assert ready.status_code == 200 and ready.json()["versions"] == {"digits": 2}

    def errors_415() -> float:
        text = httpx.get(f"{server['url']}/metrics").text
        key = 'transferkit_errors_total{code="415",model="digits"}'
        return read_metric(text, key) if key + " " in text else 0.0

    assert (
        c.post("/v1/models/digits/predict", files={"file": ("a.png", _png(images[0]), "image/png")}).status_code == 200
    )
    before = errors_415()
    assert c.post("/v1/models/digits/predict", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
    assert errors_415() == before + 1  # errors are counted by code
    m = httpx.get(f"{server['url']}/metrics").text  # scrapeable without the token
    assert read_metric(m, 'transferkit_model_version{model="digits"}') == 2
    assert read_metric(m, 'transferkit_requests_total{code="200",model="digits"}') >= 1
    assert read_metric(m, 'transferkit_request_seconds_count{model="digits"}') >= 1
    st = c.get("/v1/models/digits").json()
    assert st["version"] == 2 and st["provider"] == "CPUExecutionProvider" and st["swaps"][0]["ok"]


# --------------------------------------------------------------------------- hot swap, rollback, broken versions


class _Load:
    """Requests in a background thread during a swap; every answer is checked against its own version."""

    def __init__(self, server, image: Image.Image):
        self.c = httpx.Client(base_url=server["url"], headers={"Authorization": f"Bearer {SERVE_TOKEN}"}, timeout=30)
        self.data, self.stop, self.results = _png(image), threading.Event(), []
        self.t = threading.Thread(target=self._run)
        self.t.start()

    def _run(self):
        while not self.stop.is_set():
            r = self.c.post(
                "/v1/models/digits/predict", params={"logits": True}, files={"file": ("a.png", self.data, "image/png")}
            )
            self.results.append((r.status_code, r.json()))

    def finish(self):
        self.stop.set()
        self.t.join(30)
        self.c.close()
        return self.results


def test_hot_swap_and_rollback_under_load_never_fail_and_never_mix_versions(server, repo, offline, images):
    c = server["client"]
    load = _Load(server, images[0])
    time.sleep(0.5)
    promote(repo, "digits", 1, reason="test: swap to 1")
    st = wait_version(c, 1)
    time.sleep(0.5)
    rollback(repo, "digits")
    wait_version(c, 2)
    time.sleep(0.5)
    results = load.finish()
    assert [s for s, _ in results if s != 200] == []
    versions = [b["version"] for _, b in results]
    assert 1 in versions and 2 in versions, versions
    ref = {v: offline[v]([images[0]])[0] for v in (1, 2)}
    assert not np.allclose(ref[1], ref[2], atol=1e-3)  # the versions really differ
    for _, b in results:  # each answer is wholly from the version it names
        np.testing.assert_allclose(b["predictions"][0]["logits"], ref[b["version"]], atol=1e-4, rtol=0)
    swap = [s for s in st["swaps"] if s["to"] == 1][-1]
    assert swap["ok"] and swap["seconds"] > 0


def test_broken_versions_are_never_served(server, repo, images):
    c = server["client"]
    d = repo / "digits"
    load = _Load(server, images[1])
    # 3: model.onnx is not ONNX, but metadata.json's sha256 matches it, so promote's file checks pass
    shutil.copytree(d / "1", d / "3")
    (d / "3" / "model.onnx").write_bytes(b"this is not an onnx model" * 100)
    meta = read_json(d / "3" / "metadata.json")
    from transferkit.core.io import sha256_file

    meta.update(version=3, sha256=sha256_file(d / "3" / "model.onnx"))
    write_json(d / "3" / "metadata.json", meta)
    with pytest.raises(PromoteError, match="not a readable ONNX file"):
        promote(repo, "digits", 3, reason="test: broken file")
    (d / "latest").write_text("3\n")  # by hand, past promote's checks: the server checks again
    why = wait_failed(c, 3)
    assert "not a readable ONNX file" in why
    # 4: a real model, but its embedded metadata (version 1) contradicts metadata.json
    shutil.copytree(d / "1", d / "4")
    meta = read_json(d / "4" / "metadata.json")
    meta["version"] = 4
    write_json(d / "4" / "metadata.json", meta)
    with pytest.raises(PromoteError, match="embedded version 1 differs"):
        promote(repo, "digits", 4, reason="test: mismatched metadata")
    (d / "latest").write_text("4\n")
    why = wait_failed(c, 4)
    assert "embedded version 1 differs" in why
    # 5: intact files, but export's reference logits (re-pinned in metadata.json) are not what it computes
    shutil.copytree(d / "1", d / "5")
    with np.load(d / "1" / "reference.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["logits"] = arrays["logits"] + 0.01  # above the 1e-4 parity tolerance, top-1 unchanged
    np.savez_compressed(d / "5" / "reference.npz", **arrays)
    import onnx

    proto = onnx.load(str(d / "5" / "model.onnx"))
    next(p for p in proto.metadata_props if p.key == "version").value = "5"  # a consistent version 5
    onnx.save_model(proto, str(d / "5" / "model.onnx"))
    meta = read_json(d / "5" / "metadata.json")
    meta.update(version=5, sha256=sha256_file(d / "5" / "model.onnx"))
    meta["reference"]["sha256"] = sha256_file(d / "5" / "reference.npz")
    write_json(d / "5" / "metadata.json", meta)
    with pytest.raises(PromoteError, match="a server would not serve it: .*differ from export's torch logits"):
        promote(repo, "digits", 5, reason="test: reference disagrees")  # promote runs the servers' load checks
    promote(repo, "digits", 5, reason="test: reference disagrees", load_check=False)  # as promote before #34 did
    why = wait_failed(c, 5)
    assert "differ from export's torch logits" in why and "reference.npz" in why
    time.sleep(0.3)
    results = load.finish()
    assert results and all(s == 200 and b["version"] == 2 for s, b in results)
    m = c.get("/metrics").text
    assert read_metric(m, 'transferkit_model_load_failures_total{model="digits"}') == 3
    assert read_metric(m, 'transferkit_model_version{model="digits"}') == 2
    rollback(repo, "digits")  # 5 -> 2 (3 and 4 never entered the history)
    status = wait_version(c, 2)
    assert status["version"] == 2 and 0 <= status["reference_diff"] <= 1e-4  # the good one replayed its reference


# --------------------------------------------------------------------------- monitoring reservoir


def test_monitor_reservoir_is_bounded_and_counts_every_served_image(server):
    """Only served images are sampled: the rejected requests of the bad-input tests (one of them with a good
    image before a bad one) left no trace, so what the reservoir saw equals what the server answered."""
    m = server["client"].get("/metrics").text
    served = read_metric(m, 'transferkit_images_total{model="digits"}')
    folder = server["monitor"] / "digits"
    stored = sorted((folder / "images").glob("*.png"))
    assert served > MONITOR_SIZE and len(stored) == MONITOR_SIZE
    live = server["client"].get("/v1/models/digits").json()["monitor"]
    assert live["seen"] == served and live["stored"] == MONITOR_SIZE
    state = read_json(folder / "reservoir.json")  # persisted on every store (and every 100 images seen)
    assert state["stored"] == MONITOR_SIZE and MONITOR_SIZE <= state["seen"] <= served
    assert sorted(int(k) for k in state["slots"]) == list(range(MONITOR_SIZE))
    assert all(max(Image.open(p).size) <= 64 for p in stored)


# --------------------------------------------------------------------------- the web page in a real browser


def test_upload_page_in_headless_chromium(plain_server, images, offline, tmp_path, browser):
    img = tmp_path / "digit.png"
    images[3].save(img)
    expected = str(int(offline[2]([Image.open(img)])[0].argmax()))
    page = browser.new_page()
    page.goto(plain_server["url"] + "/")
    page.wait_for_selector("#model option[value=digits]", state="attached", timeout=30_000)
    page.set_input_files("#file", str(img))
    page.fill("#topk", "3")
    page.click("#submit")
    page.wait_for_selector("#result:not([hidden])", timeout=30_000)
    labels = page.locator("#result tbody .label").all_inner_texts()
    status = page.inner_text("#status")
    # a wrong type is shown as the server's message
    (tmp_path / "note.txt").write_text("not an image")
    page.set_input_files("#file", str(tmp_path / "note.txt"))
    page.click("#submit")
    page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
    error = page.inner_text("#error")
    assert len(labels) == 3 and labels[0] == expected
    assert "version 2" in status
    assert error.startswith("415") and "text/plain" in error


# --------------------------------------------------------------------------- hostile traffic (issue 17)


def _rss_mb(proc: subprocess.Popen) -> float:
    import psutil

    return psutil.Process(proc.pid).memory_info().rss / 2**20


class _PeakRSS:
    """Samples the server's RSS every 20 ms in a thread: the peak during a block of requests."""

    def __init__(self, proc):
        self.proc, self.peak, self.stop = proc, _rss_mb(proc), threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _rss_mb(self.proc))
            time.sleep(0.02)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()


@pytest.fixture(scope="module")
def hostile(repo, tmp_path_factory):
    """Short timeouts and a small in-flight budget, so that each limit can be reached in a test: 1 MB body,
    1 Mpx images, 4 Mpx per request, 20 MB in flight (waits 1 s, then 503), 8 requests in flight, headers
    within 2 s and 16 KB, bodies within 3 s."""
    tmp = tmp_path_factory.mktemp("server-hostile")
    with serving(
        repo,
        tmp,
        "--max-body-mb",
        "1",
        "--max-image-pixels",
        "1000000",
        "--max-images",
        "64",
        "--max-request-pixels",
        "4000000",
        "--max-inflight-mb",
        "20",
        "--queue-timeout",
        "1",
        "--max-concurrency",
        "8",
        "--header-timeout",
        "2",
        "--body-timeout",
        "3",
        "--max-header-kb",
        "16",
        token=None,
    ) as s:
        yield s


def _raw(port: int, data: bytes, timeout: float = 20) -> tuple[bytes, float]:
    """Send raw bytes, read until the server closes; (what it answered, seconds until it closed)."""
    t0 = time.time()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out, time.time() - t0


def _status_and_detail(raw: bytes) -> tuple[int, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["detail"]


def test_metrics_labels_stay_bounded_under_random_paths_and_unauthenticated_requests(server):
    """1: 404s for 2,000-character model names and 401s without the token grew /metrics to 65 MB; labels now
    come from the served models and the status codes only."""
    url, c = server["url"], server["client"]
    before = len(httpx.get(f"{url}/metrics").text)
    rss0 = _rss_mb(server["proc"])
    rng = np.random.default_rng(0)
    names = ["".join(rng.choice(list("abcdefghij"), 2000)) + str(i) for i in range(300)]
    with httpx.Client(base_url=url, timeout=30) as anon:
        for n in names:
            assert c.get(f"/v1/models/{n}").status_code == 404
            r = anon.post(f"/v1/models/{n}/predict", content=b"x", headers={"Content-Type": "image/png"})
            assert r.status_code == 401 and r.json()["detail"].startswith("missing or wrong bearer token")
    r = c.get(f"/v1/models/{names[0]}")
    assert len(r.json()["detail"]) < 300  # the name is not echoed whole
    text = httpx.get(f"{url}/metrics").text
    assert names[0][:100] not in text
    assert len(text) - before < 2000, len(text) - before  # a few new (model="", code) series at most
    assert read_metric(text, 'transferkit_errors_total{code="404",model=""}') >= 300
    assert read_metric(text, 'transferkit_errors_total{code="401",model=""}') >= 300
    assert _rss_mb(server["proc"]) - rss0 < 30


def _png_of(size: tuple[int, int], mode: str = "L") -> bytes:
    return _png(Image.new(mode, size, 7))


def test_request_pixel_budget_refuses_many_large_images_before_decoding(hostile):
    """2: 64 small PNGs that decode to 1000x1000 each (64 Mpx, 0.3 MB of JSON): 413 from the headers, fast,
    memory flat."""
    c, proc = hostile["client"], hostile["proc"]
    one = base64.b64encode(_png_of((1000, 1000))).decode()
    body = {"images": [one] * 64}
    assert len(json.dumps(body)) < 1 << 20
    with _PeakRSS(proc) as rss:
        base = rss.peak
        t0 = time.time()
        r = c.post("/v1/models/digits/predict", json=body)
        seconds = time.time() - t0
    assert r.status_code == 413, r.text
    assert "64000000 pixels in all; the limit is 4000000 pixels per request" in r.json()["detail"]
    assert seconds < 5 and rss.peak - base < 60, (seconds, rss.peak - base)
    r = c.post("/v1/models/digits/predict", json={"images": [one] * 3})  # 3 Mpx: within every limit
    assert r.status_code == 200, r.text


def test_thin_strips_cost_little_memory_and_time_under_concurrency(hostile, offline):
    """2: a 96-byte 1x8192 PNG cost 0.55 s and ~330 MB (the resize before the crop made it 32x262144);
    8 clients at once gave 3.4 GB. Now only the kept region is resized."""
    from concurrent.futures import ThreadPoolExecutor

    strip = _png(Image.new("L", (8192, 1), 200))
    assert len(strip) < 200
    c, proc = hostile["client"], hostile["proc"]

    def one(_):
        t0 = time.time()
        r = c.post(
            "/v1/models/digits/predict", content=strip, params={"logits": True}, headers={"Content-Type": "image/png"}
        )
        return r, time.time() - t0

    with _PeakRSS(proc) as rss:
        base = rss.peak
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(32)))
    assert all(r.status_code == 200 for r, _ in results), [r.text for r, _ in results if r.status_code != 200]
    median = sorted(s for _, s in results)[len(results) // 2]
    assert median < 1.5 and rss.peak - base < 80, (median, rss.peak - base)
    ref = offline[2]([Image.open(io.BytesIO(strip))])[0]
    # the region resize is within one level of 255 of torch's resize-then-crop: logits agree closely
    np.testing.assert_allclose(results[0][0].json()["predictions"][0]["logits"], ref, atol=0.05)


def test_process_budget_makes_requests_wait_then_503(hostile):
    """2: 14 of the 20 MB in-flight budget held by 7 slow uploads of 1 MB (2 MB each, under the concurrency
    limit of 8): a 1 Mpx RGBA image needing 15 MB to decode waits --queue-timeout, then gets 503 with Retry-After;
    once the uploads time out it is served."""
    port, c = hostile["port"], hostile["client"]
    head = (
        b"POST /v1/models/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 1000000\r\n\r\n" + b"\x89PNG"
    )
    socks = []
    for _ in range(7):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head)
        socks.append(s)
    try:
        time.sleep(0.5)
        big = _png_of((1000, 1000), "RGBA")  # 15 bytes a pixel to decode (RGBA, composited, RGB)
        r = c.post("/v1/models/digits/predict", content=big, headers={"Content-Type": "image/png"})
        assert r.status_code == 503, r.text
        assert "in-flight bytes" in r.json()["detail"] and r.headers["retry-after"] == "1"
        answers = []
        for s in socks:  # each slow upload is cut at --body-timeout with a 408
            s.settimeout(10)
            out = b""
            while chunk := s.recv(65536):  # until the server closes
                out += chunk
            answers.append(out)
        assert all(a.startswith(b"HTTP/1.1 408") and b"not complete within 3 s" in a for a in answers), answers[0]
    finally:
        for s in socks:
            s.close()
    assert c.post("/v1/models/digits/predict", content=big, headers={"Content-Type": "image/png"}).status_code == 200


def test_slow_headers_bodies_and_huge_headers_are_cut(hostile):
    """3: unfinished headers stayed open past 90 s, a short body past 45 s, a 64 MB header got a 200."""
    port = hostile["port"]
    out, seconds = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert _status_and_detail(out) == (408, "request headers not complete within 2 s") and seconds < 6
    out, seconds = _raw(
        port,
        b"POST /v1/models/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 5000\r\n\r\n" + b"x" * 100,
    )
    status, detail = _status_and_detail(out)
    assert status == 408 and "not complete within 3 s (100 bytes received)" in detail and seconds < 7
    for size in (20_000, 64 << 20):  # over the 16 KB limit; the 64 MB one is refused long before it is read
        t0 = time.time()
        try:
            r = httpx.get(f"{hostile['url']}/healthz", headers={"X-Big": "a" * size}, timeout=30)
            status, detail = r.status_code, r.json()["detail"]
        except httpx.HTTPError:  # the server answered and closed while the client was still sending
            out, _ = _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000)
            status, detail = _status_and_detail(out)
        assert status == 431 and "exceed 16384 bytes" in detail and time.time() - t0 < 10
    # the server is fine afterwards
    assert httpx.get(f"{hostile['url']}/readyz").status_code == 200


def test_concurrency_limit_answers_503_at_once(hostile):
    """3: 8 requests in flight (chunked uploads that send nothing): the 9th is answered 503 at once."""
    port, c = hostile["port"], hostile["client"]
    head = (
        b"POST /v1/models/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    try:
        for s in socks:
            s.sendall(head)
        time.sleep(0.5)
        t0 = time.time()
        r = c.post("/v1/models/digits/predict", content=_png_of((8, 8)), headers={"Content-Type": "image/png"})
        assert r.status_code == 503 and "8 requests in flight (limit 8)" in r.json()["detail"], r.text
        assert time.time() - t0 < 1 and httpx.get(f"{hostile['url']}/healthz").status_code == 200  # probes pass
    finally:
        for s in socks:
            s.close()
    deadline = time.time() + 10
    while (
        c.post("/v1/models/digits/predict", content=_png_of((8, 8)), headers={"Content-Type": "image/png"}).status_code
        != 200
    ):
        assert time.time() < deadline
        time.sleep(0.2)


def test_errors_are_counted_4xx_with_a_string_detail(hostile):
    """7: 100,000 levels of JSON gave a 500 (RecursionError); 422s carried a list and were not counted."""
    c = hostile["client"]
    m0 = c.get("/metrics").text

    def count(code: str) -> float:
        text = c.get("/metrics").text
        key = f'transferkit_errors_total{{code="{code}",model="digits"}}'
        return read_metric(text, key) if key + " " in text else 0.0

    before = {k: count(k) for k in ("400", "422")}
    deep = b"[" * 100_000 + b"]" * 100_000
    r = c.post("/v1/models/digits/predict", content=deep, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"] and "recursion" in r.json()["detail"]
    r = c.post(
        "/v1/models/digits/predict",
        content=b'{"images": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text
    r = c.post(
        "/v1/models/digits/predict",
        params={"top_k": "many"},
        content=_png_of((8, 8)),
        headers={"Content-Type": "image/png"},
    )
    assert r.status_code == 422 and isinstance(r.json()["detail"], str) and "top_k" in r.json()["detail"]
    assert count("400") == before["400"] + 2 and count("422") == before["422"] + 1
    r = c.get("/no/such/route")
    assert r.status_code == 404 and isinstance(r.json()["detail"], str)
    r = c.delete("/v1/models/digits/predict")
    assert r.status_code == 405 and isinstance(r.json()["detail"], str)
    assert 'code="405"' in c.get("/metrics").text and "Traceback" not in m0


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFERKIT_SERVE_TOKEN": SERVE_TOKEN}
    return subprocess.run(
        [sys.executable, "-m", "transferkit.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_promote_waits_for_the_server_reports_a_refusal_and_retries_a_fixed_version(server, repo):
    """5: promoting a version the server refused printed success; a re-promote of the fixed version was never
    tried again. Now `promote --server` fails with the server's reason and moves latest back; the fixed
    version (same number, new files) is tried and served."""
    from conftest import renumber_version

    c, d = server["client"], repo / "digits"
    assert wait_version(c, 2)["version"] == 2
    bad_reference(d, 1, 7)
    r = _cli(
        "promote", "--repo", str(repo), "--name", "digits", "--version", "7", "--server", server["url"], "--wait", "60"
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    # #34: promote runs the servers' own load checks first: 7 never becomes latest
    assert "a server would not serve it" in r.stderr and "differ from export's torch logits" in r.stderr, r.stderr
    assert "latest stays at 2" in r.stderr and latest_version(d) == 2 and read_history(d)[-1]["version"] == 2
    # a refusal only the server sees (as with another provider or --int8): latest moves back
    with pytest.raises(PromoteError, match="refused version 7: .*differ from export's torch logits.*moved back to 2"):
        promote(repo, "digits", 7, servers=[server["url"]], wait=60, token=SERVE_TOKEN, load_check=False)
    assert latest_version(d) == 2
    assert read_history(d)[-1]["action"] == "rollback" and "refused" in read_history(d)[-1]["reason"]
    shutil.rmtree(d / "7")
    renumber_version(d, 1, 7)  # fixed: the real files of version 1, numbered 7
    r = _cli(
        "promote", "--repo", str(repo), "--name", "digits", "--version", "7", "--server", server["url"], "--wait", "60"
    )
    assert r.returncode == 0, r.stderr
    assert "2 -> 7" in r.stdout and f"serving on {server['url']}" in r.stdout
    assert c.get("/v1/models/digits").json()["version"] == 7
    promote(repo, "digits", 2, reason="test: back to 2")
    wait_version(c, 2)


def test_strict_latest_keeps_the_live_version_and_says_why(server, repo):
    """6: `latest` holding 1.5 or true swapped the server to version 1."""
    c, d = server["client"], repo / "digits"
    try:
        for junk in ("1.5\n", "true\n"):
            (d / "latest").write_text(junk)
            deadline = time.time() + 30
            while not c.get("/v1/models/digits").json()["latest_error"]:
                assert time.time() < deadline
                time.sleep(0.1)
            st = c.get("/v1/models/digits").json()
            assert st["version"] == 2 and "not a version number" in st["latest_error"]
            ready = httpx.get(f"{server['url']}/readyz").json()
            assert ready["ready"] and ready["detail"].startswith("degraded") and str(repo) not in json.dumps(ready)
    finally:
        promote(repo, "digits", 2, reason="test: repair latest")
    deadline = time.time() + 30
    while c.get("/v1/models/digits").json()["latest_error"]:
        assert time.time() < deadline
        time.sleep(0.1)


def test_server_started_on_a_broken_latest_serves_the_last_good_version(repo, tmp_path, images):
    """5: a server (re)started while `latest` is broken answered 503 to everything; now it serves the newest
    earlier version of the promotion history that loads, and says so in /readyz and /metrics. 7: no
    absolute path in its public answers."""
    own = tmp_path / "repo"
    shutil.copytree(repo, own, ignore=shutil.ignore_patterns(".lock"))
    d = own / "digits"
    bad_reference(d, 2, 8)
    promote(own, "digits", 8, reason="test: broken at restart", load_check=False)  # one only servers refuse
    proc, url = start_server(own, tmp_path)
    try:
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["ready"] and ready["versions"] == {"digits": 2}, ready
        assert ready["fallback"]["digits"]["version"] == 2 and ready["fallback"]["digits"]["latest"] == 8
        assert "serves version 2 from the promotion history" in ready["detail"]
        status = httpx.get(f"{url}/v1/models/digits").json()
        public = json.dumps(ready) + json.dumps(status)
        assert "differ from export's torch logits" in public and "digits/8/reference.npz" in public
        for p in (str(own), str(tmp_path), "/tmp/"):
            assert p not in public, p
        assert read_metric(httpx.get(f"{url}/metrics").text, 'transferkit_model_fallback{model="digits"}') == 1
        r = httpx.post(f"{url}/v1/models/digits/predict", files={"file": ("a.png", _png(images[0]), "image/png")})
        assert r.status_code == 200 and r.headers["x-model-version"] == "2"
        promote(own, "digits", 1, reason="test: a good one")  # a good latest ends the fallback
        deadline = time.time() + 30
        while httpx.get(f"{url}/readyz").json()["versions"] != {"digits": 1}:
            assert time.time() < deadline
            time.sleep(0.1)
        assert httpx.get(f"{url}/readyz").json()["detail"] == "ready"
        assert read_metric(httpx.get(f"{url}/metrics").text, 'transferkit_model_fallback{model="digits"}') == 0
    finally:
        launch.stop(proc)


def test_a_version_linked_or_copied_under_another_number_is_never_served(server, repo):
    """6: a version folder that is a symlink to another one (or a copy saved under a new number) was served
    as x-model-version 5 while its metadata said 2."""
    c, d = server["client"], repo / "digits"
    (d / "9").symlink_to(d / "2", target_is_directory=True)
    shutil.copytree(d / "2", d / "10")
    try:
        for v, why in ((9, "not a link to another one"), (10, "says version 2 but sits at digits/10")):
            with pytest.raises(PromoteError, match=why):
                promote(repo, "digits", v)
            (d / "latest").write_text(f"{v}\n")  # past promote: the server checks too
            assert why in wait_failed(c, v)
            assert c.get("/v1/models/digits").json()["version"] == 2
    finally:
        promote(repo, "digits", 2, reason="test: back to 2")
        (d / "9").unlink()
        shutil.rmtree(d / "10")


def test_a_token_standard_clients_cannot_send_is_refused_at_start(repo, tmp_path):
    """9: a non-ASCII token could not be sent by standard clients; `serve` now refuses it, naming the file."""
    (tmp_path / "token").write_text("pässwörd\n")
    r = subprocess.run(
        launch.serve_argv(repo, free_port(), "--token-file", str(tmp_path / "token")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert str(tmp_path / "token") in r.stderr and "RFC 6750" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _image_bodies(fmt: str | None = None):
    """A hypothesis strategy of image files as a hostile client sends them: real images of any size and mode
    in the six accepted formats (or `fmt`), and the same cut short, with a byte flipped, a PNG header that
    claims 100,000 px a side, or issue 34's TIFF that Pillow's detection reads as an 11,000 px FLI."""
    from hypothesis import strategies as st
    from test_serve_hostile import disguised_tiff

    modes = ("1", "L", "P", "RGB", "RGBA", "LA", "I;16", "CMYK")

    @st.composite
    def image(draw) -> bytes:
        f = fmt or draw(st.sampled_from(["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"]))
        size = draw(st.sampled_from([(1, 1), (8, 8), (33, 17), (1, 3000), (300, 200)]))
        im = Image.new(draw(st.sampled_from(modes)), size, draw(st.integers(0, 255)))
        buf = io.BytesIO()
        try:
            im.save(buf, f)
        except (OSError, ValueError, KeyError):  # a mode the format cannot hold
            buf = io.BytesIO()
            im.convert("RGB").save(buf, f)
        data = buf.getvalue()
        how = draw(st.sampled_from(["whole", "whole", "cut", "flip", "claims-huge", "disguised"]))
        if how == "cut":
            return data[: draw(st.integers(1, max(1, len(data) - 1)))]
        if how == "flip":
            i = draw(st.integers(0, len(data) - 1))
            return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        if how == "claims-huge":
            return _png_of((8, 8))[:16] + struct.pack(">II", 100_000, 100_000) + _png_of((8, 8))[24:]
        return disguised_tiff() if how == "disguised" else data

    return image()


def test_schema_driven_fuzzing_finds_no_5xx_and_no_schema_violation(server):
    """17: a bounded schemathesis run over every operation of /openapi.json (v1, v2, probes), positive and
    negative data, with the token: no 5xx, and every answer's status, content type, headers and body as the
    schema documents them. #34: the image bodies (raw image/* and the JSON's base64 items) are real images,
    damaged ones and disguised ones (_image_bodies), so decoding is fuzzed too, not only the parsers. Not
    checked: positive_data_acceptance (that schema-valid data gets a 2xx): a damaged image or a tensor that
    does not hold prod(shape) numbers is schema-valid and gets a 4xx."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import positive_data_acceptance

    from transferkit.serve import ALLOWED_TYPES

    for ctype, fmt in ALLOWED_TYPES.items():
        schemathesis.openapi.media_type(ctype, _image_bodies(fmt))
    # `format: byte` is only the base64 images of /v1's JSON body in this schema
    schemathesis.openapi.format("byte", _image_bodies().map(lambda b: base64.b64encode(b).decode()) | st.text())
    schema = schemathesis.openapi.from_url(f"{server['url']}/openapi.json")
    auth = {"Authorization": f"Bearer {SERVE_TOKEN}"}
    seen: dict[str, dict[int, int]] = {}
    failures: list[str] = []
    t0 = time.time()
    ops = [res.ok() for res in schema.get_all_operations()]
    for op in ops:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            # half the model routes name the served model, so that bodies reach the tensor/image checks
            names = {"name": "digits"} if "{name}" in op.path and mode is GenerationMode.POSITIVE else None
            codes = seen.setdefault(f"{op.method.upper()} {op.path}", {})

            @settings(
                max_examples=40,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=op.as_strategy(generation_mode=mode, path_parameters=names))
            def run(case):
                try:
                    r = case.call_and_validate(headers=auth, excluded_checks=[positive_data_acceptance], timeout=30)
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                except Exception as e:  # schemathesis' FailureGroup: keep going, report every operation's
                    failures.append(f"{op.method.upper()} {op.path} ({mode.value}): {str(e)[:800]}")

            try:
                run()
            except Unsatisfiable:  # nothing to negate (no parameters, no body)
                pass
    seconds = time.time() - t0
    assert not failures, "\n\n".join(failures[:10])
    total = sum(sum(c.values()) for c in seen.values())
    assert total >= 300 and seconds < 60, (total, seconds)
    assert not [k for k, c in seen.items() for code in c if code >= 500], seen
    v2 = {k for k in seen if k.split()[1].startswith("/v2")}
    assert {"POST /v2/models/{name}/infer", "GET /v2/models/{name}", "GET /v2/health/ready"} <= v2, sorted(seen)
    assert any(400 <= code < 500 for code in seen["POST /v2/models/{name}/infer"]), seen  # bodies were checked
    assert seen["GET /v2/models/{name}"].get(200), seen  # and the served model was reached
    predict = seen["POST /v1/models/{name}/predict"]
    assert predict.get(200) and predict.get(415) and predict.get(400), predict  # real, disguised, damaged
