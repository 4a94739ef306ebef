"""Serve: the models of a repository over HTTP on onnxruntime, following REPO/<name>/latest with hot swap.

    transferkit serve --repo models --port 8000                  # every model with a `latest` pointer
    curl -F file=@digit.png localhost:8000/v1/models/digits/predict?top_k=3

Endpoints (FastAPI; OpenAPI at /docs):
  POST /v1/models/{name}/predict  multipart image files (any field name), a JSON batch
                                  {"images": [<base64>, ...]}, or one raw image/* body. Answers
                                  {"model", "version", "provider", "predictions": [{"top_k": [...]}]};
                                  the version is also in the X-Model-Version header.
  GET  /v1/models[/{name}]        what is loaded, swap history, last load failure
  GET  /healthz /readyz /metrics  liveness; readiness (every --model serves, else one found does; the rest
                                  is "degraded: ..."); Prometheus
  GET  /                          a small upload page
  /v2/...                         the Open Inference Protocol (KServe V2 / Triton HTTP): v2.py

How a version goes live (the watcher polls `latest` every `poll_interval_s`): promote.check_version
(complete, sha256 as recorded), the ONNX file's embedded metadata equal to metadata.json, graph input/output
shapes as the metadata says, a warm-up at batch 1 and max batch, and batch-vs-single parity within the
version's own `parity.atol`. Only then does one reference assignment switch the model; requests already
holding the old model finish on it (every response is from exactly one version) and the old session is
dropped when its last request ends. A version that fails any step is never served; the old one stays and
the failure is reported in /v1/models/{name} and transferkit_model_load_failures_total.

Preprocessing is zoo.eval_transform's (timm eval, crop_pct 1.0) in numpy/PIL, so the image needs no torch:
RGB as data.load_rgb makes it, resize the shorter side to H with the metadata's interpolation (torchvision's
size rule), centre crop HxW, /255, (x - mean) / std, NCHW float32. tests/serve/test_serve.py checks it against
the torch transform and the predictions against an offline onnxruntime run of the same file.

Limits answer 4xx with {"detail": "..."}: 413 body / image pixels / image side / batch size, 415 content
type or image format, 400 malformed input, 401 missing or wrong bearer token (when a token is set), 404
unknown model, 503 not ready. Images are size-checked from their header before any pixel is decoded, must
read as the same format and size to Pillow's own detection (a disguised image is 415), and are decoded by
the format the check read. Content-Length with Transfer-Encoding is 400 and the connection closes.

Monitoring: each model keeps a reservoir sample (Algorithm R, bounded count) of served images, downscaled,
in MONITOR/<name>/images/ (PNG) with MONITOR/<name>/reservoir.json; flows/monitor.py runs `drift` on it.

Laid out as KServe's server is: errors.py (error types -> status codes and the error object), decode.py
and parsing.py (image bytes, request bodies), model.py (one version and the checks before it serves),
registry.py with batcher.py and reservoir.py (the models, following `latest`), limits.py (budget and the
outermost guard), v1.py and v2.py (routes), app.py (create_app), server.py (uvicorn).
"""

from transferkit.serve.app import create_app
from transferkit.serve.config import TOKEN_ENV, ServeConfig
from transferkit.serve.decode import ALLOWED_TYPES, decode_cost, decode_image, preprocess, probe_image
from transferkit.serve.errors import LoadError, RequestError
from transferkit.serve.model import ServedModel, load_version
from transferkit.serve.server import serve

__all__ = [
    "ALLOWED_TYPES",
    "TOKEN_ENV",
    "LoadError",
    "RequestError",
    "ServeConfig",
    "ServedModel",
    "create_app",
    "decode_cost",
    "decode_image",
    "load_version",
    "preprocess",
    "probe_image",
    "serve",
]
