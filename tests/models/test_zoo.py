"""Unit tests for transferkit.zoo: packaged offline weights, sha256 pins, safe loading, checkpoints.

    .venv/bin/pytest -q tests/models/test_zoo.py

These use the real environment: the four weight packages are installed (the Makefile's WEIGHTS, pinned by sha256 in transferkit.zoo).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from transferkit.models import catalog, zoo
from transferkit.models import registry as models_registry
from transferkit.models.registry import ZooError
from transferkit.models.zoo import create_model, load_state, save_checkpoint

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
PACKAGED_NAMES = ["mobilenetv2_100", "tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


@pytest.fixture(scope="module")
def mobilenet():
    return create_model("mobilenetv2_100")


@pytest.fixture(scope="module")
def x_img():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 128, 128, generator=g)  # any size works; 128 keeps it fast


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


# --------------------------------------------------------------------------- listing


def test_list_entries_packaged_models_available():
    rows = {r["model"]: r for r in catalog.list_entries()}
    for name in PACKAGED_NAMES:
        assert rows[name]["kind"] == "packaged"
        assert rows[name]["available"] is True, rows[name]["detail"]
        assert models_registry.PACKAGED[name].sha256[:12] in rows[name]["detail"]
    assert rows["scratch:<arch>"]["available"] is True


def test_parse_spec_kinds():
    assert zoo.parse_spec("mobilenetv2_100").kind == "packaged"
    assert zoo.parse_spec(" resnet18 ").kind == "timm"
    s = zoo.parse_spec("scratch:resnet18")
    assert (s.kind, s.arch, s.pretrained) == ("scratch", "resnet18", False)
    with pytest.raises(ZooError, match="empty"):
        zoo.parse_spec("  ")


# --------------------------------------------------------------------------- packaged weights


def test_mobilenet_is_torchvision_imagenet_weights(mobilenet, x_img):
    """timm's model with the mapped weights computes what torchvision's does with the same file."""
    import torchvision

    path = models_registry.packaged_path(models_registry.PACKAGED["mobilenetv2_100"])
    assert path is not None and path.is_file()
    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    ours, ref = _logits(mobilenet.model, x_img), _logits(tv, x_img)
    assert ours.shape == ref.shape == (2, 1000)
    assert (ours - ref).abs().max().item() < 1e-4
    assert mobilenet.spec.kind == "packaged" and mobilenet.spec.pretrained
    assert mobilenet.weights_sha256 == models_registry.PACKAGED["mobilenetv2_100"].sha256


def test_mobilenet_data_config_is_imagenet(mobilenet):
    cfg = mobilenet.data_config
    assert cfg["mean"] == pytest.approx(IMAGENET_MEAN)
    assert cfg["std"] == pytest.approx(IMAGENET_STD)
    assert cfg["input_size"] == [3, 224, 224]
    assert cfg["crop_pct"] == 1.0


@pytest.mark.parametrize("name,px", [("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite2", 260)])
def test_efficientnet_lite_data_config(name, px):
    lm = create_model(name)
    cfg = lm.data_config
    assert cfg["mean"] == pytest.approx([0.5, 0.5, 0.5])
    assert cfg["std"] == pytest.approx([0.5, 0.5, 0.5])
    assert cfg["input_size"] == [3, px, px]
    assert lm.weights_sha256 == models_registry.PACKAGED[name].sha256


def test_image_size_override():
    lm = create_model("tf_efficientnet_lite0", image_size=32)
    assert lm.data_config["input_size"] == [3, 32, 32]
    assert lm.data_config["mean"] == pytest.approx([0.5, 0.5, 0.5])  # only the size changes


def test_scratch_differs_from_pretrained(mobilenet, x_img):
    scratch = create_model("scratch:mobilenetv2_100")
    assert scratch.spec.kind == "scratch" and not scratch.spec.pretrained
    assert scratch.weights_sha256 is None
    a, b = mobilenet.model.state_dict(), scratch.model.state_dict()
    assert a.keys() == b.keys()
    assert not torch.equal(a["conv_stem.weight"], b["conv_stem.weight"])
    assert (_logits(mobilenet.model, x_img) - _logits(scratch.model, x_img)).abs().max().item() > 1e-2


def test_num_classes_replaces_head_keeps_backbone(mobilenet):
    lm = create_model("mobilenetv2_100", num_classes=5)
    out = _logits(lm.model, torch.zeros(1, 3, 32, 32))
    assert out.shape == (1, 5)
    assert torch.equal(lm.model.state_dict()["conv_stem.weight"], mobilenet.model.state_dict()["conv_stem.weight"])
    sc = create_model("scratch:mobilenetv2_100", num_classes=7)
    assert _logits(sc.model, torch.zeros(1, 3, 32, 32)).shape == (1, 7)


def test_unknown_architectures():
    with pytest.raises(ZooError, match="not_a_model"):
        create_model("scratch:not_a_model")
    with pytest.raises(ZooError, match="not_a_timm_model_xyz"):
        create_model("not_a_timm_model_xyz")
    ok, detail = catalog.availability("not_a_timm_model_xyz")
    assert ok is False and "not a timm architecture" in detail


# --------------------------------------------------------------------------- sha256 pins


def test_sha256_pin_mismatch_refuses(monkeypatch):
    entry = models_registry.PACKAGED["mobilenetv2_100"]
    monkeypatch.setitem(models_registry.PACKAGED, "mobilenetv2_100", dataclasses.replace(entry, sha256="0" * 64))
    with pytest.raises(ZooError, match="sha256"):
        create_model("mobilenetv2_100")
    ok, detail = catalog.availability("mobilenetv2_100")
    assert ok is False and "sha256" in detail
    row = next(r for r in catalog.list_entries() if r["model"] == "mobilenetv2_100")
    assert row["available"] is False


def test_missing_package_is_unavailable(monkeypatch):
    entry = models_registry.PACKAGED["tf_efficientnet_lite1"]
    monkeypatch.setitem(
        models_registry.PACKAGED, "tf_efficientnet_lite1", dataclasses.replace(entry, package="no_such_pkg_tk")
    )
    ok, detail = catalog.availability("tf_efficientnet_lite1")
    assert ok is False and "no_such_pkg_tk" in detail
    with pytest.raises(ZooError, match="no_such_pkg_tk"):
        create_model("tf_efficientnet_lite1")


def test_load_state_sha_pin(tmp_path):
    p = tmp_path / "w.pth"
    torch.save({"w": torch.arange(3.0)}, p)
    from transferkit.core.io import sha256_file

    assert torch.equal(load_state(p, expected_sha256=sha256_file(p))["w"], torch.arange(3.0))
    with pytest.raises(ZooError, match="sha256"):
        load_state(p, expected_sha256="f" * 64)


# --------------------------------------------------------------------------- safe loading


_MARKER: list[str] = []


def _side_effect(marker_path: str):
    """Would run during unpickling if the loader trusted pickles."""
    Path(marker_path).write_text("executed")
    _MARKER.append(marker_path)
    return {"pwned": True}


class _Payload:
    def __init__(self, marker_path: str):
        self.marker_path = marker_path

    def __reduce__(self):
        return (_side_effect, (self.marker_path,))


def test_pickled_code_is_not_executed(tmp_path):
    marker = tmp_path / "marker.txt"
    p = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(str(marker))}, p)
    with pytest.raises(ZooError, match="weights_only"):
        load_state(p)
    assert not marker.exists() and _MARKER == []


def test_pickled_class_instance_is_refused(tmp_path):
    p = tmp_path / "obj.pth"
    torch.save({"weight": torch.zeros(2), "obj": dataclasses.replace(models_registry.PACKAGED["mobilenetv2_100"])}, p)
    with pytest.raises(ZooError, match="weights_only"):
        load_state(p)


def test_load_state_plain_and_nested_state_dicts(tmp_path):
    p = tmp_path / "plain.pth"
    torch.save({"a": torch.ones(2)}, p)
    assert torch.equal(load_state(p)["a"], torch.ones(2))
    q = tmp_path / "nested.pth"
    torch.save({"state_dict": {"b": torch.zeros(1)}, "epoch": 3}, q)
    assert list(load_state(q)) == ["b"]
    r = tmp_path / "list.pth"
    torch.save([torch.ones(1)], r)
    with pytest.raises(ZooError, match="state dict"):
        load_state(r)


def test_file_spec_rejects_pth(tmp_path):
    p = tmp_path / "model.pth"
    torch.save({"a": torch.ones(1)}, p)
    with pytest.raises(ZooError, match="only .safetensors"):
        create_model(f"file:{p}")


def test_file_spec_missing_file(tmp_path):
    p = tmp_path / "absent.safetensors"
    with pytest.raises(ZooError, match="not found") as e:
        create_model(f"file:{p}")
    assert str(p) in str(e.value)
    ok, detail = catalog.availability(f"file:{p}")
    assert ok is False and str(p) in detail


def test_safetensors_without_arch(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "noarch.safetensors"
    save_file({"w": torch.zeros(2)}, str(p), metadata={"num_classes": "3"})
    with pytest.raises(ZooError, match="'arch'"):
        create_model(f"file:{p}")


def test_not_a_safetensors_file(tmp_path):
    p = tmp_path / "garbage.safetensors"
    p.write_bytes(b"\x00" * 64)
    with pytest.raises(ZooError, match="not a readable safetensors"):
        create_model(f"file:{p}")


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    lm = create_model("scratch:mobilenetv2_100", num_classes=3, image_size=32)
    model = lm.model.eval()
    cfg = dict(lm.data_config)
    assert cfg["input_size"] == [3, 32, 32]
    path = tmp_path / "ckpt" / "model.safetensors"
    sha = save_checkpoint(model, path, {"arch": "mobilenetv2_100", "num_classes": 3, "data_config": cfg})
    assert path.is_file() and len(sha) == 64

    back = create_model(f"file:{path}")
    assert back.spec.kind == "file" and back.arch == "mobilenetv2_100"
    assert back.weights_sha256 == sha
    assert back.data_config == cfg  # the checkpoint's own preprocessing, not timm's 224 default
    assert back.file_meta["arch"] == "mobilenetv2_100"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a, b = _logits(model, x), _logits(back.model, x)
    assert a.shape == (2, 3)
    assert torch.equal(a, b)


def test_auto_image_size_is_a_trained_checkpoints_own_side_else_one_side_for_all(tmp_path):
    from transferkit.models.zoo import AUTO_SIZE

    # every ImageNet source at one side (their own are 224, 240, 260): any feature ensemble of them is valid
    for spec in ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "mobilenetv2_100"):
        assert create_model(spec, image_size="auto").data_config["input_size"] == [3, AUTO_SIZE, AUTO_SIZE]
    assert create_model("tf_efficientnet_lite1", image_size=None).data_config["input_size"] == [3, 240, 240]
    lm = create_model("scratch:mobilenetv2_100", num_classes=3, image_size=48)
    path = tmp_path / "m.safetensors"
    save_checkpoint(lm.model, path, {"arch": "mobilenetv2_100", "num_classes": 3, "data_config": lm.data_config})
    assert create_model(f"file:{path}", image_size="auto").data_config["input_size"] == [3, 48, 48]
    assert create_model(f"file:{path}", image_size=64).data_config["input_size"] == [3, 64, 64]  # a side wins
    bare = tmp_path / "bare.safetensors"  # no preprocessing of its own: like an ImageNet source
    save_checkpoint(lm.model, bare, {"arch": "mobilenetv2_100", "num_classes": 3})
    assert create_model(f"file:{bare}", image_size="auto").data_config["input_size"] == [3, AUTO_SIZE, AUTO_SIZE]


def test_checkpoint_that_does_not_fit_its_arch(tmp_path):
    lm = create_model("scratch:mobilenetv2_100", num_classes=3)
    path = tmp_path / "m.safetensors"
    save_checkpoint(lm.model, path, {"arch": "mobilenetv2_100", "num_classes": 4})  # wrong head size
    with pytest.raises(ZooError, match="does not fit"):
        create_model(f"file:{path}")


# --------------------------------------------------------------------------- local registry (zoo:NAME)


@pytest.fixture
def registry(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFERKIT_ZOO", str(tmp_path / "zoo"))
    return tmp_path / "zoo"


@pytest.fixture
def small_ckpt(tmp_path):
    lm = create_model("scratch:mobilenetv2_100", num_classes=3, image_size=32)
    path = tmp_path / "src.safetensors"
    save_checkpoint(lm.model, path, {"arch": "mobilenetv2_100", "num_classes": 3, "data_config": lm.data_config})
    return path


def test_register_pins_sha_and_round_trips(registry, small_ckpt):
    from transferkit.core.io import sha256_file

    card = models_registry.register(
        "tiny-src", small_ckpt, {"trained_on": {"dataset": "unit"}}, lambda c: f"# {c['name']}\n"
    )
    assert card["sha256"] == sha256_file(small_ckpt) == sha256_file(registry / "tiny-src" / "model.safetensors")
    assert card["arch"] == "mobilenetv2_100" and card["num_classes"] == 3 and card["spec"] == "zoo:tiny-src"
    assert (registry / "tiny-src" / "card.md").read_text() == "# tiny-src\n"
    assert models_registry.registered_names() == ["tiny-src"]
    spec = zoo.parse_spec("zoo:tiny-src")
    assert (spec.kind, spec.arch, spec.pretrained) == ("zoo", "mobilenetv2_100", True)
    lm = create_model("zoo:tiny-src")
    assert lm.weights_sha256 == card["sha256"] and lm.model.num_classes == 3
    rows = {r["model"]: r for r in catalog.list_entries()}
    assert rows["zoo:tiny-src"]["available"] is True and "unit" in rows["zoo:tiny-src"]["note"]
    with pytest.raises(ZooError, match="already registered"):
        models_registry.register("tiny-src", small_ckpt, {})
    models_registry.register("tiny-src", small_ckpt, {}, force=True)


def test_unknown_or_damaged_registry_entries(registry, small_ckpt):
    models_registry.register("known", small_ckpt, {})
    with pytest.raises(ZooError, match=r"zoo:unknown'.*not registered.*registered: known"):
        zoo.parse_spec("zoo:unknown")
    ok, detail = catalog.availability("zoo:unknown")
    assert ok is False and "not registered" in detail
    for bad in ("", "../up", "a/b", "-x"):
        with pytest.raises(ZooError, match="zoo name"):
            zoo.parse_spec(f"zoo:{bad}")
    (registry / "known" / "card.json").write_text("{not json")
    with pytest.raises(ZooError, match="not a readable model card"):
        create_model("zoo:known")


def test_register_refuses_pickles_and_headerless_files(registry, tmp_path):
    p = tmp_path / "w.pth"
    torch.save({"a": torch.ones(1)}, p)
    with pytest.raises(ZooError, match="only .safetensors"):
        models_registry.register("x", p, {})
    assert models_registry.registered_names() == []


def test_seeded_scratch_init_is_thread_safe():
    """select's thread runner builds models concurrently; the seeded control must not see other draws."""
    from concurrent.futures import ThreadPoolExecutor

    ref = create_model("scratch:mobilenetv2_100", image_size=32).model.state_dict()["conv_stem.weight"]
    specs = ["scratch:mobilenetv2_100", "scratch:tf_efficientnet_lite0"] * 3
    with ThreadPoolExecutor(max_workers=6) as pool:
        built = list(pool.map(lambda s: create_model(s, image_size=32), specs))
    for lm in built[::2]:
        assert torch.equal(lm.model.state_dict()["conv_stem.weight"], ref)
