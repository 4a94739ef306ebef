"""The Open Inference Protocol (KServe V2) on a real `transferkit serve` process, driven by the real
tritonclient[http]; every answer is compared with an offline onnxruntime run of the same model.onnx.

    .venv/bin/pytest -q tests/serve/test_serve_v2.py
"""

from __future__ import annotations

import shutil
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
    wait_failed,
    wait_version,
)

from transferkit.core.io import read_json
from transferkit.export.promote import promote, rollback

pytestmark = pytest.mark.slow

MAX_BATCH = 8


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    """Batching on (20 ms for batch-mates), a token, batches of at most 8, 1 MB bodies."""
    args = ("--max-queue-delay-ms", "20", "--max-batch-size", str(MAX_BATCH), "--max-body-mb", "1")
    with serving(repo, tmp_path_factory.mktemp("server-v2"), *args) as s:
        yield s


def _triton(server, token: str | None = SERVE_TOKEN, concurrency: int = 1):
    import tritonclient.http as th

    c = th.InferenceServerClient(server["url"].removeprefix("http://"), concurrency=concurrency, network_timeout=30)
    return c, ({"Authorization": f"Bearer {token}"} if token else {})


@pytest.fixture(scope="module")
def offline(repo):
    """version -> f(x) -> logits: a fresh onnxruntime session on the same model.onnx, no server code."""
    import onnxruntime as ort

    sessions = {
        v: ort.InferenceSession(str(repo / "digits" / str(v) / "model.onnx"), providers=["CPUExecutionProvider"])
        for v in (1, 2)
    }
    return {v: (lambda x, s=s: s.run(["logits"], {"input": x})[0]) for v, s in sessions.items()}


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32)).astype(np.float32)


def _infer(c, headers, x, *, binary_in: bool, binary_out: bool | None = None, model="digits", version="", **kw):
    import tritonclient.http as th

    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    outs = None if binary_out is None else [th.InferRequestedOutput("logits", binary_data=binary_out)]
    # a copy: tritonclient writes Inference-Header-Content-Length into the dict it is given
    return c.infer(model, [inp], model_version=version, outputs=outs, headers=dict(headers), **kw)


# --------------------------------------------------------------------------- health, metadata


def test_health_and_metadata_through_tritonclient(server, repo):
    import onnx
    from tritonclient.utils import InferenceServerException

    c, h = _triton(server)
    assert c.is_server_live(headers=h) and c.is_server_ready(headers=h)
    assert c.is_model_ready("digits", headers=h) and c.is_model_ready("digits", "2", headers=h)
    assert not c.is_model_ready("digits", "1", headers=h)  # exists in the repository, not the served version
    assert not c.is_model_ready("nope", headers=h)
    sm = c.get_server_metadata(headers=h)
    assert sm["name"] == "transferkit" and "binary_tensor_data" in sm["extensions"]
    md = c.get_model_metadata("digits", headers=h)
    # what the ONNX file's graph says, independently of the server: names, element type, dims (batch symbolic)
    g = onnx.load(str(repo / "digits" / "2" / "model.onnx")).graph
    dims = lambda vi: [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]  # noqa: E731
    assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert md == {
        "name": "digits",
        "versions": ["2"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": g.input[0].name, "datatype": "FP32", "shape": dims(g.input[0])}],
        "outputs": [{"name": g.output[0].name, "datatype": "FP32", "shape": dims(g.output[0])}],
    }
    assert md["inputs"][0]["shape"] == [-1, 3, 32, 32] and md["outputs"][0]["shape"] == [-1, 10]
    assert c.get_model_metadata("digits", "2", headers=h) == md
    for name, version, want in (("digits", "1", "version '1' is not loaded"), ("nope", "", "no model named 'nope'")):
        with pytest.raises(InferenceServerException) as e:
            c.get_model_metadata(name, version, headers=h)
        assert e.value.status() == "404" and want in e.value.message()


def test_every_exported_triton_config_parses_with_tritons_model_config_proto(repo, server):
    """config.pbtxt as Triton reads it (its own ModelConfig protobuf), and consistent with what V2 reports."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from transferkit.modelrepo.repository import latest_version

    configs = sorted(repo.glob("*/config.pbtxt"))
    assert configs
    for path in configs:
        cfg = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        d = path.parent
        meta = read_json(d / str(latest_version(d)) / "metadata.json")
        assert cfg.name == d.name and cfg.backend == "onnxruntime" and cfg.max_batch_size > 0
        assert list(cfg.version_policy.specific.versions) == [latest_version(d)]
        (inp,), (out,) = cfg.input, cfg.output
        assert inp.data_type == model_config_pb2.TYPE_FP32 and out.data_type == model_config_pb2.TYPE_FP32
        assert list(inp.dims) == meta["input_size"] and list(out.dims) == [len(meta["classes"])]
        assert cfg.dynamic_batching.max_queue_delay_microseconds >= 0
        md = server["client"].get(f"/v2/models/{d.name}").json()  # same names and dims as our V2 metadata
        assert (md["inputs"][0]["name"], md["inputs"][0]["shape"]) == (inp.name, [-1, *inp.dims])
        assert (md["outputs"][0]["name"], md["outputs"][0]["shape"]) == (out.name, [-1, *out.dims])


# --------------------------------------------------------------------------- inference


@pytest.mark.parametrize("batch", [1, MAX_BATCH])
@pytest.mark.parametrize("binary_in,binary_out", [(False, False), (False, None), (True, True), (True, False)])
def test_infer_json_and_binary_tensors_match_offline_onnxruntime(server, offline, batch, binary_in, binary_out):
    c, h = _triton(server)
    x = _x(batch, seed=batch)
    r = _infer(c, h, x, binary_in=binary_in, binary_out=binary_out, request_id=f"req-{batch}")
    got = r.as_numpy("logits")
    assert got.dtype == np.float32 and got.shape == (batch, 10)
    want = offline[2](x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert (got.argmax(1) == want.argmax(1)).all()
    resp = r.get_response()
    assert resp["model_name"] == "digits" and resp["model_version"] == "2" and resp["id"] == f"req-{batch}"
    binary = binary_out is not False  # no outputs named: tritonclient asks for binary_data_output
    assert ("binary_data_size" in (resp["outputs"][0].get("parameters") or {})) == binary
    assert ("data" in resp["outputs"][0]) != binary
    r = _infer(c, h, x, binary_in=binary_in, version="2")  # the explicit version that serves
    np.testing.assert_allclose(r.as_numpy("logits"), want, atol=1e-5, rtol=0)


def test_v2_on_a_preprocessed_image_equals_v1_on_the_image(server, repo, tiny_target):
    """The same model behind both protocols: torch's eval transform of a PNG through /v2 gives the logits
    /v1 computes from the PNG itself."""
    from PIL import Image

    from transferkit.models import zoo

    png = sorted((tiny_target / "test").rglob("*.png"))[0]
    m = read_json(repo / "digits" / "2" / "metadata.json")
    tf = zoo.eval_transform({k: m[k] for k in ("input_size", "mean", "std", "interpolation")})
    x = tf(Image.open(png).convert("RGB")).numpy()[None]
    c, h = _triton(server)
    v2 = _infer(c, h, x, binary_in=True).as_numpy("logits")[0]
    v1 = (
        server["client"]
        .post(
            "/v1/models/digits/predict",
            params={"logits": True},
            files={"file": ("d.png", png.read_bytes(), "image/png")},
        )
        .json()
    )
    np.testing.assert_allclose(v2, v1["predictions"][0]["logits"], atol=1e-4, rtol=0)


def test_concurrent_requests_are_batched_and_counted(server, offline):
    c, h = _triton(server, concurrency=8)
    text0 = server["client"].get("/metrics").text
    xs = [_x(1, seed=100 + i) for i in range(24)]
    reqs = [None] * len(xs)
    import tritonclient.http as th

    for i, x in enumerate(xs):
        inp = th.InferInput("input", [1, 3, 32, 32], "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        reqs[i] = c.async_infer("digits", [inp], headers=dict(h))
    got = np.concatenate([r.get_result().as_numpy("logits") for r in reqs])
    np.testing.assert_allclose(got, offline[2](np.concatenate(xs)), atol=1e-5, rtol=0)
    text = server["client"].get("/metrics").text
    key_s, key_c = 'transferkit_batch_size_sum{model="digits"}', 'transferkit_batch_size_count{model="digits"}'
    images = read_metric(text, key_s) - read_metric(text0, key_s)
    calls = read_metric(text, key_c) - read_metric(text0, key_c)
    assert images == 24 and calls < 24, (images, calls)  # 8 in flight, 20 ms for batch-mates: batches formed
    key = 'transferkit_requests_total{code="200",model="digits"}'
    assert read_metric(text, key) - read_metric(text0, key) >= 24
    assert (
        read_metric(text, 'transferkit_images_total{model="digits"}')
        - read_metric(text0, 'transferkit_images_total{model="digits"}')
        == 24
    )


# --------------------------------------------------------------------------- errors, limits, auth


def _raw_infer(server, doc, *, binary: bytes = b"", path="/v2/models/digits/infer", headers=None):
    import json

    head = json.dumps(doc).encode() if not isinstance(doc, bytes) else doc
    hdrs = dict(headers or {})
    if binary:
        hdrs["Inference-Header-Content-Length"] = str(len(head))
    return server["client"].post(path, content=head + binary, headers=hdrs)


def _tensor(shape, datatype="FP32", name="input", **kw):
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, **kw}]}


def test_wrong_shape_datatype_model_and_version_are_protocol_errors(server):
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    c, h = _triton(server)
    cases = [  # (what the client sends, status, message part)
        (dict(x=_x(1)[:, :, :31], binary_in=True), "400", "shape [1, 3, 31, 32], the model takes [-1, 3, 32, 32]"),
        (dict(x=_x(1).reshape(1, 3, 1024), binary_in=False), "400", "shape [1, 3, 1024]"),
        (dict(x=_x(1).astype(np.float64), binary_in=True), "400", "datatype 'FP64', the model takes FP32"),
        (dict(x=_x(1).astype(np.int32), binary_in=False), "400", "datatype 'INT32', the model takes FP32"),
        (dict(x=_x(1), binary_in=True, model="nope"), "404", "no model named 'nope'"),
        (dict(x=_x(1), binary_in=True, version="1"), "404", "version '1' is not loaded (serving version 2"),
        (dict(x=_x(MAX_BATCH + 1), binary_in=True), "413", f"batch size {MAX_BATCH + 1}; the limit is {MAX_BATCH}"),
    ]
    for kw, status, part in cases:
        x = kw.pop("x")
        inp = th.InferInput("input", list(x.shape), {np.float64: "FP64", np.int32: "INT32"}.get(x.dtype.type, "FP32"))
        inp.set_data_from_numpy(x, binary_data=kw.pop("binary_in"))
        with pytest.raises(InferenceServerException) as e:
            c.infer(kw.pop("model", "digits"), [inp], model_version=kw.pop("version", ""), headers=dict(h))
        assert e.value.status() == status and part in e.value.message(), (status, part, e.value)
    n = 3 * 32 * 32
    raw_cases = [  # the same and more on the wire: every answer {"error": "<one message>"} and nothing else
        (_tensor([1, 3, 32, 32], data=[0.5] * (n - 1)), b"", 400, f"{n - 1} values for shape [1, 3, 32, 32] ({n})"),
        (_tensor([1, 3, 32, 32], data=["0.5"] * n), b"", 400, "data holds strings, not numbers"),
        (_tensor([1, 3, 32, 32], data=[[0.5] * 3, [0.5]]), b"", 400, "not a regular array of numbers"),
        (_tensor([1, 3, 32, 32], data=[1e39] * n), b"", 400, f"{n} values are not finite FP32 numbers"),
        (_tensor([1, 3, 32, 32], name="pixels", data=[0.0] * n), b"", 400, "takes one input 'input'"),
        (_tensor([0, 3, 32, 32], data=[]), b"", 400, "batch size 0"),
        (
            _tensor([1, 3, 32, 32], parameters={"binary_data_size": 4 * n}),
            b"\0" * (4 * n - 4),
            400,
            f"binary_data_size {4 * n}, but {4 * n - 4} bytes follow",
        ),
        (
            _tensor([1, 3, 32, 32], parameters={"binary_data_size": 12}),
            b"\0" * 12,
            400,
            "binary_data_size 12 for shape",
        ),
        (
            {**_tensor([1, 3, 32, 32], data=[0.0] * n), "outputs": [{"name": "probs"}]},
            b"",
            400,
            "requested output 'probs': the model's output is 'logits'",
        ),
        (b'{"inputs": [' * 3, b"", 400, "inference request is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, b"", 400, "not valid JSON (Invalid JSON: recursion limit exceeded"),
        ({"inputs": []}, b"", 400, "inference request inputs: List should have at least 1 item"),
        (
            _tensor([MAX_BATCH, 3, 32, 32], parameters={"binary_data_size": 4 * n * MAX_BATCH}),
            b"\0" * (1 << 20),
            413,
            "request body is",
        ),
    ]
    text0 = server["client"].get("/metrics").text
    for doc, binary, status, part in raw_cases:
        r = _raw_infer(server, doc, binary=binary)
        assert r.status_code == status, (part, r.status_code, r.text[:300])
        body = r.json()
        assert list(body) == ["error"] and isinstance(body["error"], str) and part in body["error"], (part, body)
    r = server["client"].post(
        "/v2/models/digits/infer", content=b"{}", headers={"Inference-Header-Content-Length": "5"}
    )
    assert r.status_code == 400 and "exceeds the body's 2 bytes" in r.json()["error"]
    r = server["client"].post(
        "/v2/models/digits/infer", content=b"{}", headers={"Inference-Header-Content-Length": "x"}
    )
    assert r.status_code == 422 and "Inference-Header-Content-Length" in r.json()["error"]
    r = server["client"].get("/v2/models/digits/stats")
    assert r.status_code == 404 and list(r.json()) == ["error"]
    text = server["client"].get("/metrics").text
    key = 'transferkit_errors_total{code="400",model="digits"}'
    assert (
        read_metric(text, key) - (read_metric(text0, key) if key in text0 else 0) >= len(raw_cases) - 1
    )  # every error counted


def test_bearer_token_applies_to_v2_and_probes_stay_open(server):
    from tritonclient.utils import InferenceServerException

    for token in (None, "wrong-token"):
        c, h = _triton(server, token=token)
        assert c.is_server_live(headers=h) and c.is_server_ready(headers=h)  # probes, as /healthz /readyz
        for call in (
            lambda: c.get_model_metadata("digits", headers=h),
            lambda: c.get_server_metadata(headers=h),
            lambda: _infer(c, h, _x(1), binary_in=True),
        ):
            with pytest.raises(InferenceServerException) as e:
                call()
            assert e.value.status() == "401" and "bearer token" in e.value.message()
        assert not c.is_model_ready("digits", headers=h)
    r = httpx.post(f"{server['url']}/v2/models/digits/infer", json=_tensor([1, 3, 32, 32], data=[0.0] * 3072))
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and list(r.json()) == ["error"]


# --------------------------------------------------------------------------- versions


def test_hot_swap_under_v2_load_gives_one_version_per_response(server, repo, offline):
    c = server["client"]
    x = _x(2, seed=7)
    want = {v: offline[v](x) for v in (1, 2)}
    assert not np.allclose(want[1], want[2], atol=1e-3)  # the versions really differ
    stop, results = threading.Event(), []

    def load():
        cl, h = _triton(server)
        while not stop.is_set():
            r = _infer(cl, h, x, binary_in=True)
            results.append((r.get_response()["model_version"], r.as_numpy("logits")))

    t = threading.Thread(target=load)
    t.start()
    try:
        time.sleep(0.5)
        promote(repo, "digits", 1, reason="test: v2 swap to 1")
        wait_version(c, 1)
        md = c.get("/v2/models/digits").json()
        assert md["versions"] == ["1"]
        assert c.get("/v2/models/digits/versions/1/ready").status_code == 200
        assert c.get("/v2/models/digits/versions/2/ready").status_code == 404  # not the served version
        time.sleep(0.5)
        rollback(repo, "digits")
        wait_version(c, 2)
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(30)
    versions = [v for v, _ in results]
    assert "1" in versions and "2" in versions, versions
    for v, logits in results:  # each answer wholly from the version it names
        np.testing.assert_allclose(logits, want[int(v)], atol=1e-5, rtol=0)


def test_a_version_failing_the_reference_replay_never_serves_on_v2(server, repo):
    c, d = server["client"], repo / "digits"
    wait_version(c, 2)
    bad_reference(d, 1, 8)
    try:
        promote(repo, "digits", 8, reason="test: bad reference", load_check=False)  # past promote's own check
        assert "differ from export's torch logits" in wait_failed(c, 8)
        assert c.get("/v2/models/digits").json()["versions"] == ["2"]
        r = c.post("/v2/models/digits/versions/8/infer", json=_tensor([1, 3, 32, 32], data=[0.0] * 3072))
        assert r.status_code == 404 and "version '8' is not loaded (serving version 2" in r.json()["error"]
        r = c.post("/v2/models/digits/infer", json=_tensor([1, 3, 32, 32], data=[0.0] * 3072))
        assert r.status_code == 200 and r.json()["model_version"] == "2"
    finally:
        promote(repo, "digits", 2, reason="test: back to 2")
        shutil.rmtree(d / "8")
