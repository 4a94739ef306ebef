"""The backbones users pick online (ViT, DINOv2 with registers, ConvNeXt, a CLIP tower), end to end offline.

Each family's smallest timm architecture is built with random weights (`pretrained=False`) and saved where
huggingface_hub looks (a local hub cache: models--timm--NAME/snapshots/REV/model.safetensors + refs/main) with
HF_HUB_OFFLINE=1, so the loading code under test is timm's own, as online users run it. Then: select (LEEP n/a
without a source classifier), every strategy trains and the gate judges it, fp32 ONNX parity, int8 kept or
dropped with its reason, one server answering /v1 and V2 for the four; an empty cache fails in one line.

    .venv/bin/pytest -q tests/models/test_backbones.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import serving

from transferkit.core.config import load_params
from transferkit.core.io import read_json, sha256_file

pytestmark = pytest.mark.slow

# family -> (timm hub name, side in px): the smallest of each family, at a side its patch grid divides
FAMILIES = {
    "vit": ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", 32),
    "dinov2": ("vit_small_patch14_reg4_dinov2.lvd142m", 28),
    "convnext": ("convnext_atto.d2_in1k", 32),
    "clip": ("vit_xsmall_patch16_clip_224.tinyclip_yfcc15m", 32),
}
STRATEGIES = ("linear-probe", "partial", "full", "lp-ft", "scratch")
REV = "0123456789abcdef0123456789abcdef01234567"


def seed_hub_cache(cache: Path, name: str, seed: int = 0) -> Path:
    """Random weights of NAME's architecture where huggingface_hub's cache lookup finds timm/NAME."""
    import timm
    import torch
    from safetensors.torch import save_file

    repo = timm.models.get_pretrained_cfg(name).hf_hub_id
    torch.manual_seed(seed)
    state = timm.create_model(name, pretrained=False).state_dict()
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / REV).mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(REV)
    path = folder / "snapshots" / REV / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores (see test_export.py)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A local hub cache with the four families, HF_HUB_OFFLINE=1 (env and huggingface_hub's constants, read
    once at its import) and an empty transferkit registry for the pins; restored after the module."""
    from huggingface_hub import constants

    cache = tmp_path_factory.mktemp("hf-hub")
    files = {fam: seed_hub_cache(cache, name) for fam, (name, _) in FAMILIES.items()}
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFERKIT_ZOO": str(cache.parent / "zoo")}
    saved_env = {k: os.environ.get(k) for k in env}
    saved = (constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE)
    os.environ.update(env)
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = str(cache), True
    yield {"cache": cache, "files": files}
    constants.HF_HUB_CACHE, constants.HF_HUB_OFFLINE = saved
    for k, v in saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    """sklearn digits at 32 px, 3 classes: train 4 / val 3 / test 3 per class."""
    from transferkit.data.builtin import write_builtin

    out = tmp_path_factory.mktemp("data") / "digits3"
    write_builtin("digits", out, per_class=10, size=32, train_per_class=4, val_per_class=3, progress=False)
    for split in ("train", "val", "test"):
        for cls in (out / split).iterdir():
            if cls.name not in ("0", "1", "2"):
                shutil.rmtree(cls)
    return out


def _params(fam: str):
    return load_params(
        None,
        {
            "data.image_size": FAMILIES[fam][1],
            "data.batch_size": 16,
            "train.epochs": 1,
            "train.min_epochs": 0,
            "train.unfreeze_blocks": 1,
            "train.layer_decay": 0.75,
            "validate.no_transfer": ["pixels-logreg"],
            "export.opset": 17,
            "export.int8": True,
            "export.name": fam,
        },
    )


@pytest.fixture(scope="module")
def runs(hub, target, tmp_path_factory) -> dict:
    """(family, strategy) -> run folder, trained and validated on first use (module-wide)."""
    return {"root": tmp_path_factory.mktemp("runs")}


def _trained(runs: dict, target: Path, fam: str, strategy: str) -> Path:
    from transferkit.train.stage import run_train
    from transferkit.validate.stage import run_validate

    key = (fam, strategy)
    if key not in runs:
        out = runs["root"] / f"{fam}-{strategy}"
        run_train(target, out, _params(fam), FAMILIES[fam][0], strategy=strategy, progress=False)
        if strategy != "linear-probe":  # validate reuses the family's probe as its baseline (same source)
            shutil.copytree(_trained(runs, target, fam, "linear-probe"), out / "baseline_linear_probe")
        run_validate(out, _params(fam), progress=False)
        runs[key] = out
    return runs[key]


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fam", FAMILIES)
def test_hub_weights_load_offline_at_the_asked_side_with_the_pretrained_preprocessing(hub, fam):
    import timm
    import torch
    from safetensors.torch import load_file

    from transferkit.models import zoo

    name, side = FAMILIES[fam]
    lm = zoo.create_model(name, image_size=side)
    cfg = timm.models.get_pretrained_cfg(name)
    assert lm.data_config["input_size"] == [3, side, side]
    assert lm.data_config["mean"] == list(cfg.mean) and lm.data_config["interpolation"] == cfg.interpolation
    assert lm.weights_sha256 == sha256_file(hub["files"][fam])
    # the cache's bytes are what loaded (a block weight is not resampled, unlike a position embedding)
    saved = load_file(str(hub["files"][fam]))
    key = next(k for k in saved if k.endswith("mlp.fc1.weight"))
    assert torch.equal(lm.model.state_dict()[key], saved[key])
    with torch.no_grad():
        assert lm.model(torch.zeros(2, 3, side, side)).shape[0] == 2
    # `auto`: a hub model at its pretrained config's own side
    assert zoo.create_model(name, image_size="auto").data_config["input_size"][-1] == cfg.input_size[-1]


def test_zoo_list_shows_recommended_sources_by_family_and_which_are_here(hub):
    from transferkit.models import catalog

    rows = {r["model"]: r for r in catalog.list_entries() if r["kind"] == "hub"}
    assert {r["family"] for r in rows.values()} >= {"vit", "dinov2", "convnext", "clip"}
    for name, _ in FAMILIES.values():
        assert rows[name]["available"] is True and str(hub["cache"]) in rows[name]["detail"]
    big = rows["vit_base_patch16_clip_224.openai"]  # not in this cache: how to get it
    assert big["available"] is False and "zoo fetch vit_base_patch16_clip_224.openai" in big["detail"]
    assert big["input_size"] == 224 and 80 < big["params_m"] < 95 and big["mb"] > 300 and big["license"]
    assert rows["vit_small_patch14_dinov2.lvd142m"]["input_size"] == 518


def test_zoo_fetch_pins_the_cached_file_and_a_changed_file_is_refused(hub, tmp_path):
    from transferkit.models import catalog, registry, zoo
    from transferkit.models.hub import HubError, read_pins

    name = FAMILIES["convnext"][0]
    pin = catalog.fetch(name)  # offline with a pre-seeded cache: pins what the cache holds
    assert pin["sha256"] == sha256_file(hub["files"]["convnext"])
    assert read_pins(registry.hub_pins())[name]["sha256"] == pin["sha256"]
    path = hub["files"]["convnext"]
    original = path.read_bytes()
    try:
        seed_hub_cache(hub["cache"], name, seed=1)  # other bytes under the same name
        with pytest.raises(HubError, match="pinned"):
            zoo.create_model(name, image_size=32)
    finally:
        path.write_bytes(original)
    assert zoo.create_model(name, image_size=32).weights_sha256 == pin["sha256"]


def test_an_empty_cache_offline_fails_in_one_line_that_says_how_to_get_the_weights(target, tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    name = "vit_base_patch16_clip_224.openai"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "transferkit.cli",
            "train",
            "--target",
            str(target),
            "--model",
            name,
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert f"zoo fetch {name}" in lines[0] and "file:" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


# --------------------------------------------------------------------------- select, strategies, gate


def test_select_leep_is_na_without_a_source_classifier(hub, target, tmp_path):
    from transferkit.select.rank import run_select

    names = [FAMILIES[f][0] for f in FAMILIES]
    r = run_select(target, tmp_path, _params("vit"), candidates=names[:1] + names[2:], progress=False)
    r_dino = run_select(target, tmp_path / "d", _params("dinov2"), candidates=[names[1]], progress=False)
    leep = {row["model"]: row["leep"] for row in r["candidates"] + r_dino["candidates"]}
    assert leep[FAMILIES["dinov2"][0]] is None  # no head at all
    assert leep[FAMILIES["clip"][0]] is None  # a CLIP tower's head is its image-text projection
    assert np.isfinite(leep[FAMILIES["vit"][0]]) and np.isfinite(leep[FAMILIES["convnext"][0]])  # ImageNet heads
    assert all(np.isfinite(row["logme"]) for row in r["candidates"])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("fam", FAMILIES)
def test_every_strategy_trains_and_the_gate_judges_it(hub, target, runs, fam, strategy):
    run = _trained(runs, target, fam, strategy)
    m, v = read_json(run / "metrics.json"), read_json(run / "validation.json")
    arch = m["architecture"]
    assert m["strategy"] == strategy and 0.0 <= m["val_accuracy"] <= 1.0
    assert arch["family"] == fam and arch["batchnorm"] is False  # LayerNorm families: no BatchNorm tricks
    assert m["adabn"]["applied"] is False
    n_all = m["trainable_params"] + m["frozen_params"]
    if strategy == "linear-probe":
        assert m["trainable_params"] < 0.01 * n_all
    elif strategy == "partial":  # the top block (+ final norm) and the head
        assert 0 < m["frozen_params"] < n_all and m["trainable_params"] < 0.6 * n_all
    else:
        assert m["frozen_params"] == 0
    assert isinstance(v["passed"], bool) and (v["passed"] or v["reasons"])  # a verdict, with reasons if refused
    if strategy != "linear-probe":  # judged against the linear probe of the same source
        probe = read_json(runs[(fam, "linear-probe")] / "metrics.json")
        lp = next(b for b in v["baselines"] if b["strategy"] == "linear-probe")
        assert lp["model"] == FAMILIES[fam][0] and lp["test_accuracy"] == probe["test_accuracy"]


def test_partial_trains_the_top_block_and_its_final_norm(hub):
    from transferkit.models import zoo
    from transferkit.train.finetune import param_groups
    from transferkit.train.freezing import set_trainable

    for fam in ("vit", "convnext"):
        lm = zoo.create_model(FAMILIES[fam][0], num_classes=3, image_size=32)
        set_trainable(lm.model, "partial", 1)
        trains = {n for n, p in lm.model.named_parameters() if p.requires_grad}
        top = "blocks.11." if fam == "vit" else "stages.3."
        norm = "norm.weight" if fam == "vit" else "head.norm.weight"
        assert norm in trains and any(n.startswith(top) for n in trains)
        assert not any(n.startswith("blocks.10." if fam == "vit" else "stages.2.") for n in trains)
    # layer-wise LR decay by transformer block (timm's param groups): the input side learns slowest
    lm = zoo.create_model(FAMILIES["vit"][0], num_classes=3, image_size=32)
    set_trainable(lm.model, "full", 1)
    lrs = [g["lr"] for g in param_groups(lm.model, 1e-3, 1e-2, 0.05, 0.75)]
    assert lrs[-1] == 1e-2 and min(lrs) == pytest.approx(1e-3 * 0.75**13)  # head; patch embedding, 13 below
    assert len(set(lrs[:-1])) == 13 and max(lrs[:-1]) <= 1e-3  # one LR per block, the top ones fastest


# --------------------------------------------------------------------------- export, serve


@pytest.fixture(scope="module")
def exported(hub, target, runs, tmp_path_factory) -> dict:
    """Each family's full fine-tune exported (forced past the gate: random weights) into one repository."""
    from transferkit.export.stage import run_export

    repo = tmp_path_factory.mktemp("repo")
    metas = {
        fam: run_export(_trained(runs, target, fam, "full"), repo, _params(fam), force=True, progress=False)
        for fam in FAMILIES
    }
    return {"repo": repo, "metas": metas}


@pytest.mark.parametrize("fam", FAMILIES)
def test_fp32_onnx_parity_and_int8_kept_or_dropped_with_its_reason(exported, fam):
    meta = exported["metas"][fam]
    assert meta["parity"]["max_abs_diff"] <= 1e-4 and meta["parity"]["top1_agreement"] >= 0.999
    assert meta["input_size"] == [3, FAMILIES[fam][1], FAMILIES[fam][1]]
    int8 = meta["int8"]
    assert isinstance(int8["kept"], bool) and int8["reason"]
    folder = exported["repo"] / fam / str(meta["version"])
    assert (folder / "model.int8.onnx").is_file() == int8["kept"]


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    with serving(exported["repo"], tmp_path_factory.mktemp("server")) as s:
        yield s


def _offline_logits(repo: Path, fam: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(repo / fam / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return s.run(["logits"], {"input": x})[0]


@pytest.mark.parametrize("fam", FAMILIES)
def test_served_over_v1_and_v2(exported, server, target, fam):
    import tritonclient.http as th

    from transferkit.data.folder import load_dataset
    from transferkit.data.images import load_rgb
    from transferkit.models import zoo

    c = server["client"]
    images = [p for p, _ in load_dataset(target).splits["test"][:2]]
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in images]
    r = c.post(f"/v1/models/{fam}/predict", params={"logits": True}, files=files)
    assert r.status_code == 200, r.text
    meta = exported["metas"][fam]
    tf = zoo.eval_transform(meta)
    x = np.stack([tf(load_rgb(p)).numpy() for p in images]).astype(np.float32)
    ref = _offline_logits(exported["repo"], fam, x)
    got = np.array([p["logits"] for p in r.json()["predictions"]], dtype=np.float32)
    np.testing.assert_allclose(got, ref, atol=1e-4)

    t = th.InferenceServerClient(server["url"].removeprefix("http://"), network_timeout=30)
    inp = th.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    headers = dict(server["client"].headers)
    out = t.infer(fam, [inp], headers={"Authorization": headers["authorization"]}).as_numpy("logits")
    np.testing.assert_allclose(out, ref, atol=1e-5)
