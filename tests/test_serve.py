"""The model server, as a real uvicorn process on loopback, driven by a real HTTP client (httpx).

    .venv/bin/pytest -q tests/test_serve.py

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
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from transferkit.io import read_json, write_json
from transferkit.promote import PromoteError, promote, rollback

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"
MONITOR_SIZE = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(repo: Path, tmp: Path, *args: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("TRANSFERKIT_SERVE_TOKEN", None)
    log = open(tmp / f"server-{port}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferkit.cli", "serve", "--repo", str(repo), "--port", str(port),
         "--poll-interval", "0.2", "--threads", "1", *args],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {(tmp / f'server-{port}.log').read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server not ready in 120 s: {(tmp / f'server-{port}.log').read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def repo(model_repo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "repo"
    shutil.copytree(model_repo, out)
    return out


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    """Batching on (20 ms for batch-mates, so that concurrent test requests do meet), token, 1 MB body, 1 Mpx
    images, 4 images per request, an 8-image reservoir."""
    tmp = tmp_path_factory.mktemp("server")
    (tmp / "token").write_text(TOKEN + "\n")
    proc, url = _start(repo, tmp, "--token-file", str(tmp / "token"), "--max-body-mb", "1", "--max-queue-delay-ms", "20",
                       "--max-image-pixels", "1000000", "--max-images", "4",
                       "--monitor-dir", str(tmp / "monitor"), "--monitor-size", str(MONITOR_SIZE))  # fmt: skip
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    yield {"url": url, "client": client, "monitor": tmp / "monitor", "proc": proc}
    client.close()
    _stop(proc)


@pytest.fixture(scope="module")
def plain_server(repo, tmp_path_factory):
    """Batching off, no token."""
    tmp = tmp_path_factory.mktemp("server-plain")
    proc, url = _start(repo, tmp, "--no-batching")
    client = httpx.Client(base_url=url, timeout=30)
    yield {"url": url, "client": client}
    client.close()
    _stop(proc)


@pytest.fixture(scope="module")
def offline(repo):
    """Offline reference: version -> f(list of PIL images) -> logits, via torch preprocessing + onnxruntime."""
    import onnxruntime as ort
    import torch

    from transferkit import zoo

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
    from transferkit import zoo
    from transferkit.serve import preprocess

    for interp in ("bicubic", "bilinear"):
        cfg = {"input_size": (3, 32, 32), "interpolation": interp, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
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
    r = c.post("/v1/models/digits/predict", params={"top_k": 10, "logits": True}, content=jpeg,
               headers={"Content-Type": "image/jpeg"})  # fmt: skip
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
        return c.post("/v1/models/digits/predict", params={"logits": True}, files={"file": ("a.png", data, "image/png")})

    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(one, range(24)))
    assert all(r.status_code == 200 for r in rs)
    for r in rs:
        _check(r.json(), 2, offline, [images[0]], 5)
    metrics = c.get("/metrics").text
    # some onnxruntime call carried more than one request's image
    count = _metric(metrics, 'transferkit_batch_size_count{model="digits"}')
    total = _metric(metrics, 'transferkit_batch_size_sum{model="digits"}')
    assert total / count > 1.0, (count, total)


def _metric(text: str, key: str) -> float:
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{key} not in /metrics")


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
        "wrong token": (dict(files={"file": ("a.png", png, "image/png")}), 401, "bearer token",
                        {"Authorization": "Bearer nope"}),
        "text body": (dict(content=b"hello", headers={"Content-Type": "text/plain"}), 415, "text/plain", None),
        "svg part": (dict(files={"file": ("a.svg", b"<svg/>", "image/svg+xml")}), 415, "image/svg+xml", None),
        "not an image": (dict(files={"file": ("a.png", b"GIF87a-nope" * 3, "application/octet-stream")}), 415,
                         "not an image", None),
        "truncated png": (dict(files={"file": ("cut.png", png[: len(png) // 2], "image/png")}), 400, "'cut.png'", None),
        # a good image before the bad one: the request fails whole, and the monitor never samples it
        "good then truncated": (dict(files=[("file", ("ok.png", png, "image/png")),
                                            ("file", ("cut.png", png[: len(png) // 2], "image/png"))]),
                                400, "'cut.png'", None),
        "bad json": (dict(content=b"{", headers={"Content-Type": "application/json"}), 400, "not valid JSON", None),
        "json shape": (dict(json=["x"]), 400, '{"images"', None),
        "bad base64": (dict(json={"images": ["***"]}), 400, "images[0]: not valid base64", None),
        "no image": (dict(files={"note": (None, "hi")}), 400, "no image", None),
        "body size": (dict(content=os.urandom(1_200_000), headers={"Content-Type": "image/png"}), 413,
                      "limit is 1048576", None),
        "pixels": (dict(files={"file": ("big.png", big, "image/png")}), 413, "1200x1000", None),
        "side": (dict(files={"file": ("wide.png", _png(Image.new("L", (9000, 1))), "image/png")}), 413, "9000x1", None),
        # a decompression bomb: 256 Mpx that compress to a few kB; refused from the header, never decoded
        "bomb": (dict(files={"file": ("bomb.png", _bomb(), "image/png")}), 413, "256000000 pixels", None),
        # no Content-Length (chunked upload): the limit is enforced while streaming
        "chunked body": (dict(content=(b"x" * 65536 for _ in range(20)), headers={"Content-Type": "image/png"}), 413,
                         "exceeds the limit of 1048576", None),
        "batch size": (dict(files=[("file", (f"{i}.png", png, "image/png")) for i in range(5)]), 413,
                       "5 images", None),
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
    assert c.post("/v1/models/digits/predict", files={"file": ("a.png", _png(images[0]), "image/png")}).status_code == 200
    assert httpx.get(f"{server['url']}/v1/models").status_code == 401  # listing needs the token too


def test_health_ready_and_metrics(server, images):
    c = server["client"]
    assert httpx.get(f"{server['url']}/healthz").json() == {"status": "alive"}
    ready = httpx.get(f"{server['url']}/readyz")
    assert ready.status_code == 200 and ready.json()["versions"] == {"digits": 2}
    def errors_415() -> float:
        text = httpx.get(f"{server['url']}/metrics").text
        key = 'transferkit_errors_total{code="415",model="digits"}'
        return _metric(text, key) if key + " " in text else 0.0

    assert c.post("/v1/models/digits/predict", files={"file": ("a.png", _png(images[0]), "image/png")}).status_code == 200
    before = errors_415()
    assert c.post("/v1/models/digits/predict", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
    assert errors_415() == before + 1  # errors are counted by code
    m = httpx.get(f"{server['url']}/metrics").text  # scrapeable without the token
    assert _metric(m, 'transferkit_model_version{model="digits"}') == 2
    assert _metric(m, 'transferkit_requests_total{code="200",model="digits"}') >= 1
    assert _metric(m, 'transferkit_request_seconds_count{model="digits"}') >= 1
    st = c.get("/v1/models/digits").json()
    assert st["version"] == 2 and st["provider"] == "CPUExecutionProvider" and st["swaps"][0]["ok"]


# --------------------------------------------------------------------------- hot swap, rollback, broken versions


def _wait_version(c: httpx.Client, want: int, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = c.get("/v1/models/digits").json()
        if st["version"] == want:
            return st
        time.sleep(0.1)
    raise AssertionError(f"server did not switch to version {want}: {st}")


def _wait_failed(c: httpx.Client, version: int, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = c.get("/v1/models/digits").json()
        if str(version) in st["failed_versions"]:
            return st["failed_versions"][str(version)]
        time.sleep(0.1)
    raise AssertionError(f"version {version} was neither served nor refused: {st}")


class _Load:
    """Requests in a background thread during a swap; every answer is checked against its own version."""

    def __init__(self, server, image: Image.Image):
        self.c = httpx.Client(base_url=server["url"], headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        self.data, self.stop, self.results = _png(image), threading.Event(), []
        self.t = threading.Thread(target=self._run)
        self.t.start()

    def _run(self):
        while not self.stop.is_set():
            r = self.c.post("/v1/models/digits/predict", params={"logits": True},
                            files={"file": ("a.png", self.data, "image/png")})  # fmt: skip
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
    st = _wait_version(c, 1)
    time.sleep(0.5)
    rollback(repo, "digits")
    _wait_version(c, 2)
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
    from transferkit.io import sha256_file

    meta.update(version=3, sha256=sha256_file(d / "3" / "model.onnx"))
    write_json(d / "3" / "metadata.json", meta)
    with pytest.raises(PromoteError, match="not a readable ONNX file"):
        promote(repo, "digits", 3, reason="test: broken file")
    (d / "latest").write_text("3\n")  # by hand, past promote's checks: the server checks again
    why = _wait_failed(c, 3)
    assert "not a readable ONNX file" in why
    # 4: a real model, but its embedded metadata (version 1) contradicts metadata.json
    shutil.copytree(d / "1", d / "4")
    meta = read_json(d / "4" / "metadata.json")
    meta["version"] = 4
    write_json(d / "4" / "metadata.json", meta)
    with pytest.raises(PromoteError, match="embedded version 1 differs"):
        promote(repo, "digits", 4, reason="test: mismatched metadata")
    (d / "latest").write_text("4\n")
    why = _wait_failed(c, 4)
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
    promote(repo, "digits", 5, reason="test: reference disagrees")
    why = _wait_failed(c, 5)
    assert "differ from export's torch logits" in why and "reference.npz" in why
    time.sleep(0.3)
    results = load.finish()
    assert results and all(s == 200 and b["version"] == 2 for s, b in results)
    m = c.get("/metrics").text
    assert _metric(m, 'transferkit_model_load_failures_total{model="digits"}') == 3
    assert _metric(m, 'transferkit_model_version{model="digits"}') == 2
    rollback(repo, "digits")  # 5 -> 2 (3 and 4 never entered the history)
    status = _wait_version(c, 2)
    assert status["version"] == 2 and 0 <= status["reference_diff"] <= 1e-4  # the good one replayed its reference


# --------------------------------------------------------------------------- monitoring reservoir


def test_monitor_reservoir_is_bounded_and_counts_every_served_image(server):
    """Only served images are sampled: the rejected requests of the bad-input tests (one of them with a good
    image before a bad one) left no trace, so what the reservoir saw equals what the server answered."""
    m = server["client"].get("/metrics").text
    served = _metric(m, 'transferkit_images_total{model="digits"}')
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
