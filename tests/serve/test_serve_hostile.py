"""Hostile inputs, round two (issue 34), against real `transferkit serve` processes and the real CLI.

    .venv/bin/pytest -q tests/serve/test_serve_hostile.py

One server follows every model of a copy of conftest.model_repo (digits/1, digits/2) with a 100 MB in-flight
budget; a second one is started with --model digits where `latest` itself is attacked, and a third, slow to
follow `latest`, for the promote race.
"""

from __future__ import annotations

import base64
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
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from conftest import SERVE_TOKEN, bad_reference, renumber_version, serving, start_server, wait_failed
from PIL import Image

from transferkit.export.promote import PromoteError, promote, read_history
from transferkit.modelrepo.repository import latest_version
from transferkit.serve import launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    """Every model of the repository; a 100 MB in-flight budget (1 Mpx images keep it valid), no token."""
    tmp = tmp_path_factory.mktemp("server-hostile2")
    with serving(repo, tmp, "--max-inflight-mb", "100", "--max-image-pixels", "1000000", token=None) as s:
        yield s


class _PeakRSS:
    """The server's peak RSS (MB) while the block runs, sampled every 10 ms."""

    def __init__(self, proc):
        self.p = psutil.Process(proc.pid)
        self.base = self.peak = self.p.memory_info().rss / 2**20
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.p.memory_info().rss / 2**20)
            time.sleep(0.01)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.t.join()

    @property
    def grew(self) -> float:
        return self.peak - self.base


def disguised_tiff(side: int = 11000) -> bytes:
    """110 KB that are a 1x1 TIFF to a TIFF reader and a side x side FLI animation to Pillow's detection: the
    TIFF header's IFD offset (bytes 4-7) spells the FLI magic 0xAF11 and one frame."""
    ifd = 0x0001AF11
    head = bytearray(128)
    struct.pack_into("<HHHHHHI", head, 4, 0xAF11, 1, side, side, 8, 0, 5)  # magic, frames, w, h, depth, flags
    head[0:4] = b"II*\x00"
    buf = bytes(head) + struct.pack("<IHHH", 16, 0xF1FA, 0, 0) + bytes(6)  # an empty first frame
    buf += bytes(ifd - len(buf))
    tags = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1)]
    tags += [(273, 4, 1, ifd + 2 + 12 * 8 + 4), (277, 3, 1, 1), (279, 4, 1, 1)]
    buf += struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", *t) for t in tags)
    return buf + struct.pack("<I", 0) + b"\x7f"


def _raw(port: int, data: bytes, timeout: float = 20) -> tuple[bytes, float]:
    """Send raw bytes, read until the server closes: (everything it sent, seconds until it closed)."""
    t0 = time.time()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out, time.time() - t0


def _wait(pred, timeout: float = 30, what: str = ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


# --------------------------------------------------------------------------- 1: a disguised image


def test_a_disguised_image_is_refused_before_any_decoding(server):
    """1: a 110 KB file the size check read as a 1x1 TIFF decoded as an 11,000 x 11,000 FLI (121 Mpx): 200
    after ~4 s and +1 GB. Now 415 from the headers, in milliseconds, memory flat, in every request form."""
    c, data = server["client"], disguised_tiff()
    assert 100_000 < len(data) < 120_000
    Image.init()  # the disguise is real: Pillow's own detection reads it as the big FLI
    with Image.open(io.BytesIO(data)) as im:
        assert (im.format, im.size) == ("FLI", (11000, 11000))
    b64 = base64.b64encode(data).decode()
    forms = [
        dict(content=data, headers={"Content-Type": "image/tiff"}),
        dict(content=data, headers={"Content-Type": "application/octet-stream"}),
        dict(json={"images": [b64] * 3}),
        dict(files=[("file", (f"{i}.tif", data, "image/tiff")) for i in range(3)]),
    ]
    with _PeakRSS(server["proc"]) as rss:
        for form in forms:
            t0 = time.time()
            r = c.post("/v1/models/digits/predict", **form)
            seconds = time.time() - t0
            assert r.status_code == 415, r.text
            assert "reads as TIFF 1x1 to the format check but as FLI 11000x11000" in r.json()["detail"]
            assert seconds < 1, seconds
    assert rss.grew < 30, rss.grew
    buf = io.BytesIO()
    Image.new("L", (40, 30), 99).save(buf, "TIFF")  # a genuine TIFF still serves
    r = c.post("/v1/models/digits/predict", content=buf.getvalue(), headers={"Content-Type": "image/tiff"})
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- 2: request smuggling


def test_content_length_with_transfer_encoding_is_answered_once_and_closed(server):
    """2: both headers got two answers on one connection (400, then 404 for the request in the body)."""
    smuggled = b"GET /v1/models/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled
    req = (
        b"POST /v1/models/digits/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body)
    ) + body
    out, seconds = _raw(server["port"], req)
    assert out.count(b"HTTP/1.1 ") == 1, out  # one answer, none for the smuggled request
    head, _, payload = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"connection: close" in head.lower(), head
    assert "RFC 9112" in json.loads(payload)["detail"]
    assert seconds < 5  # closed by the server, not by our read timeout
    r = httpx.get(f"{server['url']}/readyz")
    assert r.status_code == 200


# --------------------------------------------------------------------------- 4: a broken model folder


def test_a_broken_model_folder_leaves_the_server_ready_and_is_forgotten_once_removed(server, repo):
    """4: a copied version under another name (`other/2` + latest) made /readyz 503 and /v2/health/ready 400
    while digits served, and stayed so after `other/` was removed (until restart)."""
    c, url = server["client"], server["url"]
    other = repo / "other"
    other.mkdir()
    shutil.copytree(repo / "digits" / "2", other / "2")
    (other / "latest").write_text("2\n")
    try:
        why = _wait(lambda: c.get("/v1/models/other").json().get("failed_versions", {}).get("2"), what="refusal")
        assert "says name 'digits' but sits at other/2" in why, why
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["detail"].startswith("degraded: other not loaded: ") and "other/2" in ready.json()["detail"]
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        r = c.post("/v1/models/digits/predict", content=_png(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200 and r.json()["version"] == 2
        assert c.post("/v1/models/other/predict", content=_png()).status_code == 503
    finally:
        shutil.rmtree(other)
    _wait(lambda: httpx.get(f"{url}/readyz").json()["detail"] == "ready", what="ready again")
    assert [m["name"] for m in c.get("/v1/models").json()["models"]] == ["digits"]
    assert c.get("/v1/models/other").status_code == 404


def _png(size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- smaller: refused latest, redirects


def test_a_refused_latest_makes_readiness_degraded_not_plain_ready(server, repo):
    """Smaller: a server that refused `latest` and stayed on an older version said plain "ready"."""
    c, url, d = server["client"], server["url"], repo / "digits"
    bad_reference(d, 1, 9)
    try:
        promote(repo, "digits", 9, reason="test: a refusal only servers see", load_check=False)
        assert "differ from export's torch logits" in wait_failed(c, 9)
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["ready"] and ready["versions"] == {"digits": 2}
        assert ready["detail"].startswith("degraded: digits serves version 2: latest (9) refused: "), ready
    finally:
        promote(repo, "digits", 2, reason="test: back to 2")
        shutil.rmtree(d / "9")
    _wait(lambda: httpx.get(f"{url}/readyz").json()["detail"] == "ready", what="ready after repair")


def test_slash_redirects_never_name_the_clients_host(server):
    """Smaller: the 307 slash redirect copied the request's Host header into Location."""
    for path, want in (("/v1/models/", "/v1/models"), ("/v1/models/?a=1", "/v1/models?a=1")):
        r = httpx.get(f"{server['url']}{path}", headers={"Host": "evil.example"}, follow_redirects=False)
        assert r.status_code == 307, r.text
        assert r.headers["location"] == want, r.headers["location"]


# --------------------------------------------------------------------------- 9: JSON parsing within its budget


def _v2_json(n_bytes: int, unit: bytes) -> bytes:
    items = (unit * (n_bytes // len(unit)))[:-1]
    return b'{"inputs":[{"name":"input","shape":[1,3,32,32],"datatype":"FP32","data":[' + items + b"]}]}"


def test_json_parsing_stays_within_the_in_flight_budget(server):
    """9: the budget assumed 16x the JSON's bytes; `[{},{},...]` costs ~46x (+294 MB for 8 MB), and /v1's
    `{"images": [0, 0, ...]}` made one error object per item (553x: 4.4 GB for 8 MB). Now the cost is counted
    per element and per object/array: 4 clients sending 1.25 MB of `{},` to a 100 MB budget take turns."""
    c, url = server["client"], server["url"]
    body = _v2_json(5 << 18, b"{},")

    def one(_):
        r = httpx.post(
            f"{url}/v2/models/digits/infer", content=body, headers={"Content-Type": "application/json"}, timeout=60
        )
        return r.status_code, r.text

    with _PeakRSS(server["proc"]) as rss:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(one, range(4)))
    assert all(s in (400, 503) for s, _ in answers), answers
    assert any(s == 400 and "not numbers" in t for s, t in answers), answers
    assert rss.grew < 90, rss.grew  # one parse at a time (~55 MB) within the 100 MB budget; before: 136 MB
    r = httpx.post(f"{url}/v2/models/digits/infer", content=_v2_json((8 << 20) - 200, b"{},"), timeout=60)
    assert r.status_code == 413 and "of the in-flight budget, more than its" in r.json()["error"], r.text
    zeros = b'{"images":[' + b"0," * (1 << 19) + b"0]}"
    with _PeakRSS(server["proc"]) as rss:
        r = c.post("/v1/models/digits/predict", content=zeros, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "images.0" in r.json()["detail"], r.text
    assert rss.grew < 60, rss.grew


# --------------------------------------------------------------------------- 6: `latest` as a pipe or a huge file


@pytest.fixture
def named_server(repo, tmp_path):
    """A server started with --model digits on its own copy of the repository."""
    own = tmp_path / "repo"
    shutil.copytree(repo, own, ignore=shutil.ignore_patterns(".lock"))
    with serving(own, tmp_path, "--model", "digits", token=None) as s:
        yield {**s, "repo": own}


def test_latest_as_a_named_pipe_or_a_huge_file_never_blocks_the_server(named_server):
    """6: a named pipe as `latest` hung /healthz, /readyz and /metrics for good; a 1 GB sparse `latest` cost a
    1 GB read per poll (1.85 GB peak, /healthz 1-2.8 s)."""
    url, d = named_server["url"], named_server["repo"] / "digits"
    os.mkfifo(d / ".pipe")
    os.replace(d / ".pipe", d / "latest")
    why = _wait(lambda: httpx.get(f"{url}/v1/models/digits", timeout=5).json()["latest_error"], what="pipe seen")
    assert "latest: not a regular file" in why
    for probe in ("/healthz", "/readyz", "/metrics"):
        t0 = time.time()
        r = httpx.get(f"{url}{probe}", timeout=5)
        assert r.status_code == 200 and time.time() - t0 < 1, probe
    assert httpx.get(f"{url}/readyz").json()["detail"].startswith("degraded: digits: ")
    (d / "latest").unlink()
    with open(d / ".big", "wb") as f:
        f.truncate(1 << 30)
    os.replace(d / ".big", d / "latest")
    with _PeakRSS(named_server["proc"]) as rss:
        why = _wait(
            lambda: "bytes, not a version number" in (httpx.get(f"{url}/v1/models/digits").json()["latest_error"] or "")
        )
        t0 = time.time()
        for _ in range(10):
            assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        seconds = (time.time() - t0) / 10
    assert seconds < 0.1 and rss.grew < 30, (seconds, rss.grew)
    r = httpx.post(f"{url}/v1/models/digits/predict", content=_png(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["version"] == 2
    promote(named_server["repo"], "digits", 2, reason="test: repair latest")
    _wait(lambda: httpx.get(f"{url}/readyz").json()["detail"] == "ready", what="repaired")


# --------------------------------------------------------------------------- 3: a revert never undoes another's move


def test_a_failed_promotes_revert_never_undoes_another_promote(server, repo, tmp_path):
    """3: A promoted 6 to S1 and S2; S1 refused it, S2 was slow; meanwhile B promoted 5 (exit 0). A then moved
    `latest` from 5 back to 2. Now A's revert sees B's move and leaves it."""
    d = repo / "digits"
    bad_reference(d, 1, 6)  # S1's reference replay refuses it
    renumber_version(d, 1, 5)  # a good one
    slow, slow_url = start_server(repo, tmp_path, "--poll-interval", "1000")  # follows `latest` only at start
    outcome: dict = {}

    def a():
        try:
            promote(repo, "digits", 6, servers=[server["url"], slow_url], wait=8, load_check=False)
        except PromoteError as e:
            outcome["a"] = str(e)

    try:
        t = threading.Thread(target=a)
        t.start()
        _wait(lambda: "6" in server["client"].get("/v1/models/digits").json()["failed_versions"], what="S1 refuses")
        b = subprocess.run(
            [sys.executable, "-m", "transferkit.cli", "promote", "--repo", str(repo), "--name", "digits"]
            + ["--version", "5", "--server", server["url"], "--wait", "30"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1", "TRANSFERKIT_SERVE_TOKEN": SERVE_TOKEN},
        )
        assert b.returncode == 0 and "6 -> 5" in b.stdout, b.stderr
        t.join(60)
        assert (
            "refused version 6" in outcome["a"] and "latest not moved back: it was moved since (now 5" in outcome["a"]
        )
        assert latest_version(d) == 5 and read_history(d)[-1]["version"] == 5
        assert server["client"].get("/v1/models/digits").json()["version"] == 5
    finally:
        launch.stop(slow)
        promote(repo, "digits", 2, reason="test: back to 2")
        _wait(lambda: server["client"].get("/v1/models/digits").json()["version"] == 2, what="back to 2")
        shutil.rmtree(d / "5")
        shutil.rmtree(d / "6")


def test_one_table_maps_every_server_error_to_its_status():
    """The KServe way: code raises typed errors, and only `STATUS` (and `HEADERS`) choose the numbers. No call
    site in the server passes a status code, and every error type has exactly one."""
    import ast
    import inspect

    from transferkit.serve import errors

    types = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.RequestError)]
    assert set(errors.STATUS) == set(types) - {errors.RequestError}
    assert set(errors.HEADERS) <= set(errors.STATUS)
    assert errors.ServerBusy("x").headers == {"Retry-After": "1"} and errors.NotFound("x").headers == {}
    assert errors.Unauthorized("x").status == 401 and errors.reason(errors.HeadersTooLarge("x")) == (
        "Request Header Fields Too Large"
    )
    names = {c.__name__ for c in types}
    offenders = []
    for f in sorted(__import__("pathlib").Path(errors.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in names:
                if node.func.id == "RequestError" or (
                    node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, int)
                ):
                    offenders.append(f"{f.name}:{node.lineno}")
    assert offenders == [], f"raise a typed error instead of choosing a status: {offenders}"
