"""Export stage: ONNX in a versioned repository, behind the validation gate and the parity gate.

    .venv/bin/pytest -q tests/export/test_export.py

A run folder is built here without the train stage (a scratch mobilenetv2_100 at 32 px, batch-norm
statistics moved off their init, one SGD step). One real dynamo export with int8 (~30-60 s on 2 busy
cores) is shared by the read-only tests; opset-17 exports (TorchScript exporter, ~3 s) cover the tests
that need another, with int8 off unless int8 is what they test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_fake_run

from transferkit.core.config import load_params
from transferkit.core.io import read_json, sha256_file, write_json
from transferkit.export import convert
from transferkit.export.convert import ExportError
from transferkit.export.quantize import onnx_accuracy, quantize_int8
from transferkit.export.stage import run_export
from transferkit.modelrepo.repository import (
    INT8_FILE,
    REQUIRED_KEYS,
    latest_version,
    list_versions,
    next_version,
    read_onnx_metadata,
    sanitize_name,
)
from transferkit.modelrepo.runtime import execution_providers

pytestmark = pytest.mark.slow

# the shared export uses the dynamo exporter and int8 (not the defaults) so that both paths stay covered
PARAMS = {
    "data.image_size": 32,
    "data.batch_size": 32,
    "train.epochs": 1,
    "export.exporter": "dynamo",
    "export.int8": True,
}


def _params(run: Path | None = None, **overrides):
    return load_params(run / "params.yaml" if run else None, {**PARAMS, **overrides})


def _tree(root: Path) -> dict[str, str]:
    """Every file under root with its content hash: 'unchanged' means this dict is equal."""
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def _test_batch(run: Path, target: Path, n: int | None = None):
    """Real test images of the target, preprocessed exactly as the export does, and the torch model."""
    import torch

    from transferkit.data.folder import load_dataset
    from transferkit.data.images import load_rgb
    from transferkit.models import zoo

    loaded = zoo.create_model(f"file:{run / 'model.safetensors'}")
    tf = zoo.eval_transform(loaded.data_config)
    test = load_dataset(target).splits["test"][:n]
    x = torch.stack([tf(load_rgb(p)) for p, _ in test])
    return loaded.model.eval(), x


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """On a shared 2-core machine, torch's 2 OpenMP threads spin against other jobs: a 32 px forward
    went from 19 ms to 1.9 s. One thread costs little here (the dynamo export is single-threaded)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tiny_target, tmp_path_factory) -> Path:
    return write_fake_run(tmp_path_factory.mktemp("train-run"), tiny_target, PARAMS)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> dict:
    """One real export with the dynamo exporter at opset 18 and int8, shared read-only."""
    import time

    repo = tmp_path_factory.mktemp("repo")
    t0 = time.perf_counter()
    meta = run_export(run_dir, repo, progress=False)
    meta["_seconds"] = time.perf_counter() - t0
    meta["_repo"] = repo
    return meta


def _variant(run_dir: Path, tmp_path: Path, validation: dict | None) -> Path:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    if validation is None:
        (run / "validation.json").unlink()
    else:
        write_json(run / "validation.json", validation)
    return run


# --------------------------------------------------------------------------- the shared export


def test_export_writes_a_complete_version_folder(exported):
    repo, path = exported["_repo"], Path(exported["path"])
    assert path == repo / "digits" / "1"
    int8 = [INT8_FILE] if exported["int8"]["kept"] else []
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["metadata.json", "model.onnx", "model_card.md", "reference.npz", *int8]
    )
    assert sorted(p.name for p in (repo / "digits").iterdir()) == [
        ".lock",
        "1",
        "config.pbtxt",
        "latest",
        "promotions.jsonl",
    ]  # promote.py's audit trail
    assert (repo / "digits" / "latest").read_text().strip() == "1"
    assert latest_version(repo / "digits") == 1
    # self-contained: no external-data files, no temp folders left
    assert not [p for p in repo.rglob("*") if p.suffix == ".data" or p.name.startswith(".export-")]
    assert exported["exporter"] == "dynamo" and exported["fallback_reason"] is None
    assert exported["opset"] == 18
    assert exported["forced"] is False
    print(f"dynamo export + parity: {exported['_seconds']:.1f} s")


def test_onnx_is_valid_and_matches_torch_on_real_images_with_dynamic_batch(exported, run_dir, tiny_target):
    import onnx
    import onnxruntime as ort
    import torch

    path = Path(exported["path"]) / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch

    model, x = _test_batch(run_dir, tiny_target)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (x[:1], x[:7], x):  # 1 and 7 were never traced (the example batch is 2); the split is 60
        with torch.no_grad():
            ref = model(batch).numpy()
        out = sess.run(["logits"], {"input": batch.numpy()})[0]
        assert out.shape == (len(batch), 10)
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
        assert (out.argmax(1) == ref.argmax(1)).all()


def test_metadata_in_json_and_inside_onnx(exported, run_dir, tiny_target):
    path = Path(exported["path"])
    meta = read_json(path / "metadata.json")
    assert set(REQUIRED_KEYS) <= set(meta)
    assert {k: v for k, v in exported.items() if not k.startswith("_") and k != "path"} == meta
    assert meta["sha256"] == sha256_file(path / "model.onnx")
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["input_size"] == [3, 32, 32] and len(meta["mean"]) == len(meta["std"]) == 3
    assert meta["parity"]["max_abs_diff"] <= 1e-4 and meta["parity"]["top1_agreement"] == 1.0
    assert meta["parity"]["n_images"] == 60 and meta["parity"]["batch_sizes"] == [1, 32]
    assert meta["source_model"] == "scratch:mobilenetv2_100" and meta["strategy"] == "scratch"
    assert meta["data_md5"] == read_json(run_dir / "metrics.json")["data_md5"]
    assert meta["params"]["export"]["opset"] == 18
    assert "git_rev" in meta  # None outside a git checkout with commits
    assert meta["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")
    assert meta["providers"] == [p if isinstance(p, str) else p[0] for p in execution_providers()]
    assert meta["providers"][-1] == "CPUExecutionProvider" and meta["provider"] in meta["providers"]
    assert meta["name"] == "digits" and meta["version"] == 1
    assert meta["onnx_test_accuracy"] == meta["torch_test_accuracy"]
    assert meta["created"].endswith("+00:00") and meta["warnings"] == []

    # the reference a server replays: the first 4 test images as decoded, and torch's logits for them
    ref = meta["reference"]
    assert ref == {"file": "reference.npz", "n": 4, "sha256": sha256_file(path / "reference.npz")}
    with np.load(path / "reference.npz", allow_pickle=False) as z:
        logits, imgs = z["logits"], [z[f"image{i}"] for i in range(4)]
    from transferkit.data.folder import load_dataset
    from transferkit.data.images import load_rgb
    from transferkit.models import zoo

    test = load_dataset(tiny_target).splits["test"][:4]
    assert all(np.array_equal(a, np.asarray(load_rgb(p))) for a, (p, _) in zip(imgs, test))
    import torch

    lm = zoo.create_model(f"file:{run_dir / 'model.safetensors'}")
    with torch.no_grad():
        torch_logits = lm.model.eval()(torch.stack([zoo.eval_transform(lm.data_config)(load_rgb(p)) for p, _ in test]))
    np.testing.assert_allclose(logits, torch_logits.numpy(), atol=1e-5, rtol=0)

    inside = read_onnx_metadata(path / "model.onnx")
    for key in set(REQUIRED_KEYS) - {"sha256"}:  # a file cannot hold its own hash
        assert inside[key] == meta[key], key
    assert inside["version"] == 1 and inside["forced"] is False and inside["provider"] == meta["provider"]


def test_model_card(exported):
    card = (Path(exported["path"]) / "model_card.md").read_text()
    assert card.startswith("# digits v1")
    for text in (
        "scratch:mobilenetv2_100",
        exported["data_md5"],
        "Parity",
        "Limitations",
        "baseline",
        exported["sha256"],
    ):
        assert text in card, text
    assert exported["shift"] is None and "Domain shift: not measured" in card  # trained without a drift.json


# --------------------------------------------------------------------------- int8, providers, Triton


def test_int8_decision_is_recorded_and_a_kept_file_keeps_accuracy(exported, run_dir, tiny_target):
    import onnxruntime as ort

    from transferkit.data.folder import load_dataset
    from transferkit.models import zoo

    path = Path(exported["path"])
    q = read_json(path / "metadata.json")["int8"]
    assert {"kept", "test_accuracy", "fp32_test_accuracy", "drop", "reason", "sha256"} <= set(q)
    assert q["fp32_test_accuracy"] == exported["onnx_test_accuracy"]
    assert q["format"] == "QDQ" and q["per_channel"] is True and q["calibration_images"] == 60  # all train images
    assert q["test_accuracy"] is not None, q["reason"]  # quantization itself must work on this model
    assert q["drop"] == pytest.approx(q["fp32_test_accuracy"] - q["test_accuracy"])
    print(f"int8: {q['reason']} ({q['seconds']} s)")
    if not q["kept"]:
        assert q["reason"].startswith("dropped") and q["drop"] > q["max_drop"] and q["sha256"] is None
        assert not (path / INT8_FILE).exists()
        return
    assert q["reason"].startswith("kept") and q["drop"] <= q["max_drop"] + 1e-9
    assert q["sha256"] == sha256_file(path / INT8_FILE)
    assert read_onnx_metadata(path / INT8_FILE)["precision"] == "int8"
    # mixed precision as recorded: the high-resolution convs are float32, every other Conv is int8
    fp32_convs, int8_convs = _conv_precision(path / INT8_FILE)
    assert q["fp32_nodes"] and set(q["fp32_nodes"]) == fp32_convs and int8_convs
    model, x = _test_batch(run_dir, tiny_target)
    sess = ort.InferenceSession(str(path / INT8_FILE), providers=["CPUExecutionProvider"])
    assert sess.run(["logits"], {"input": x[:7].numpy()})[0].shape == (7, 10)  # dynamic batch survives
    test = load_dataset(tiny_target).splits["test"]
    tf = zoo.eval_transform(zoo.create_model(f"file:{run_dir / 'model.safetensors'}").data_config)
    acc, provider = onnx_accuracy(path / INT8_FILE, test, tf, providers=["CPUExecutionProvider"])
    assert acc == q["test_accuracy"] and exported["onnx_test_accuracy"] - acc <= 0.01 + 1e-9


def test_quantize_int8_keeps_or_drops_by_the_accuracy_bound(exported, run_dir, tiny_target, tmp_path):
    """Both branches, whatever the shared export decided: a generous bound keeps, an fp32 claim of 100% drops."""
    import onnxruntime as ort

    from transferkit.data.folder import load_dataset
    from transferkit.models import zoo

    ds = load_dataset(tiny_target)
    tf = zoo.eval_transform(zoo.create_model(f"file:{run_dir / 'model.safetensors'}").data_config)
    fp32 = Path(exported["path"]) / "model.onnx"
    kw = dict(calibration=ds.splits["train"][:20], test=ds.splits["test"], transform=tf)
    generous = _params(**{"export.int8_max_drop": 1.0}).export
    kept = quantize_int8(fp32, tmp_path / "a.onnx", fp32_accuracy=exported["onnx_test_accuracy"], ep=generous, **kw)
    assert kept["kept"] and kept["calibration_images"] == 20 and (tmp_path / "a.onnx").is_file()
    proto_ops = {n.op_type for n in __import__("onnx").load(str(tmp_path / "a.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= proto_ops
    sess = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"]
    strict = _params(**{"export.int8_max_drop": 0.0}).export
    dropped = quantize_int8(fp32, tmp_path / "b.onnx", fp32_accuracy=1.0, ep=strict, **kw)
    assert not dropped["kept"] and dropped["reason"].startswith("dropped") and not (tmp_path / "b.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx"]  # no work files left behind


def _conv_precision(path: Path) -> tuple[set[str], set[str]]:
    """(names of Convs with float weights, names of Convs whose weights come out of a DequantizeLinear)."""
    import onnx

    graph = onnx.load(str(path)).graph
    dq_outputs = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    return {n.name for n in convs if n.input[1] not in dq_outputs}, {n.name for n in convs if n.input[1] in dq_outputs}


def test_int8_keeps_high_resolution_convs_float(exported, run_dir, tiny_target, tmp_path):
    """export.int8_fp32_resolution picks Convs by the size of their input map; 0 quantizes every Conv."""
    import onnx

    from transferkit.data.folder import load_dataset
    from transferkit.export.quantize import high_resolution_convs
    from transferkit.models import zoo

    fp32 = Path(exported["path"]) / "model.onnx"
    convs = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type == "Conv"]
    whole, half, quarter = (high_resolution_convs(fp32, f) for f in (1.0, 0.5, 0.25))
    assert whole == convs[:1]  # only the stem sees the full 32 px image
    assert set(whole) < set(half) < set(quarter) < set(convs)  # lower fractions reach deeper, never all
    assert high_resolution_convs(fp32, 0.0) == []

    ds = load_dataset(tiny_target)
    tf = zoo.eval_transform(zoo.create_model(f"file:{run_dir / 'model.safetensors'}").data_config)
    ep = _params(**{"export.int8_max_drop": 1.0, "export.int8_fp32_resolution": 0.0}).export
    info = quantize_int8(
        fp32,
        tmp_path / "all.onnx",
        ds.splits["train"][:20],
        ds.splits["test"],
        tf,
        fp32_accuracy=exported["onnx_test_accuracy"],
        ep=ep,
    )
    assert info["kept"] and info["fp32_nodes"] == [] and info["fp32_resolution"] == 0.0
    float_convs, int8_convs = _conv_precision(tmp_path / "all.onnx")
    assert float_convs == set() and len(int8_convs) == len(convs)


def test_quantization_failure_keeps_fp32_and_says_why(run_dir, tmp_path, monkeypatch):
    import onnxruntime.quantization as q

    def broken(*a, **k):
        raise RuntimeError("simulated quantizer crash")

    monkeypatch.setattr(q, "quantize_static", broken)
    meta = run_export(run_dir, tmp_path / "repo", params=_params(run_dir, **{"export.opset": 17}), progress=False)
    assert meta["int8"]["kept"] is False and "simulated quantizer crash" in meta["int8"]["reason"]
    assert meta["int8"]["reason"].startswith("quantization failed")
    assert sorted(p.name for p in Path(meta["path"]).iterdir()) == [
        "metadata.json",
        "model.onnx",
        "model_card.md",
        "reference.npz",
    ]
    assert latest_version(tmp_path / "repo" / "digits") == 1


def test_triton_config(exported):
    text = (exported["_repo"] / "digits" / "config.pbtxt").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    for expected in (
        'name: "digits"',
        'backend: "onnxruntime"',
        "max_batch_size: 32",
        'name: "input"',
        "data_type: TYPE_FP32",
        "dims: [ 3, 32, 32 ]",
        'name: "logits"',
        "dims: [ 10 ]",
        "max_queue_delay_microseconds: 100",
        "version_policy: { specific: { versions: [ 1 ] } }",
    ):
        assert expected in lines, expected
    assert lines.count("dynamic_batching {") == 1 and text.count("{") == text.count("}")
    assert text.count("[") == text.count("]")
    assert exported["triton"]["max_batch_size"] == 32


def test_provider_list_is_explicit():
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert execution_providers(gpu_build, cuda=False) == ["CPUExecutionProvider"]  # onnxruntime-gpu, no GPU
    names = [p if isinstance(p, str) else p[0] for p in execution_providers(gpu_build, cuda=True)]
    assert names == gpu_build
    assert dict(execution_providers(gpu_build, cuda=True)[1:2])["CUDAExecutionProvider"]["use_tf32"] == "0"
    assert execution_providers(["CPUExecutionProvider"], cuda=True) == ["CPUExecutionProvider"]


# --------------------------------------------------------------------------- gates and versions


@pytest.mark.parametrize("validation", [None, {"passed": False, "reasons": ["overfit: train-val gap 0.6"]}])
def test_failed_or_missing_validation_blocks_export(exported, run_dir, tmp_path, validation):
    repo = exported["_repo"]
    before = _tree(repo)
    run = _variant(run_dir, tmp_path, validation)
    with pytest.raises(ExportError, match="refusing to export.*(overfit|validate)") as err:
        run_export(run, repo, progress=False)
    assert "force" in str(err.value)
    assert _tree(repo) == before


def test_force_exports_next_version_and_moves_latest(exported, run_dir, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(exported["_repo"], repo)
    v1 = _tree(repo / "digits" / "1")
    run = _variant(run_dir, tmp_path, {"passed": False, "reasons": ["did not beat scratch"]})
    meta = run_export(
        run, repo, params=_params(run, **{"export.opset": 17, "export.int8": False}), force=True, progress=False
    )
    assert Path(meta["path"]) == repo / "digits" / "2"
    assert meta["int8"]["kept"] is False and meta["int8"]["reason"].startswith("disabled")
    assert not (repo / "digits" / "2" / INT8_FILE).exists()
    assert "versions: [ 2 ]" in (repo / "digits" / "config.pbtxt").read_text()  # Triton follows the promotion
    assert meta["version"] == 2 and meta["forced"] is True
    assert meta["validation"]["reasons"] == ["did not beat scratch"]
    assert read_onnx_metadata(repo / "digits" / "2" / "model.onnx")["forced"] is True
    assert latest_version(repo / "digits") == 2 and list_versions(repo / "digits") == [1, 2]
    assert _tree(repo / "digits" / "1") == v1  # the old version is never touched
    assert "forced past a closed gate" in (repo / "digits" / "2" / "model_card.md").read_text()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_checkpoint_names_the_file_and_leaves_nothing(exported, run_dir, tmp_path, damage):
    run = _variant(run_dir, tmp_path, {"passed": True, "reasons": []})
    ckpt = run / "model.safetensors"
    data = ckpt.read_bytes()
    ckpt.write_bytes(b"not a safetensors file at all" if damage == "garbage" else data[: len(data) // 2])
    fresh = tmp_path / "fresh-repo"
    with pytest.raises(ExportError, match="model.safetensors") as err:
        run_export(run, fresh, progress=False)
    assert str(ckpt) in str(err.value)
    assert not fresh.exists()
    before = _tree(exported["_repo"])
    with pytest.raises(ExportError):
        run_export(run, exported["_repo"], progress=False)
    assert _tree(exported["_repo"]) == before


def test_parity_failure_publishes_nothing(exported, run_dir, tmp_path):
    """A tolerance no float32 graph meets: the export runs fully, then nothing may remain."""
    run = _variant(run_dir, tmp_path, {"passed": True, "reasons": []})
    params = _params(run, **{"export.opset": 17, "export.parity_atol": 1e-12, "export.int8": False})
    fresh = tmp_path / "a" / "fresh-repo"
    with pytest.raises(ExportError, match="parity failed.*nothing was published"):
        run_export(run, fresh, params=params, progress=False)
    assert not (tmp_path / "a").exists()  # even the parent folders it created are gone
    repo = tmp_path / "repo"
    shutil.copytree(exported["_repo"], repo)
    before = _tree(repo)
    with pytest.raises(ExportError, match="parity failed"):
        run_export(run, repo, params=params, progress=False)
    assert _tree(repo) == before and latest_version(repo / "digits") == 1


def test_tampered_onnx_weights_are_refused_and_the_previous_version_stays_latest(
    exported, run_dir, tmp_path, monkeypatch
):
    """The exporter's file differs from the torch model (one classifier weight nudged): the gate refuses it."""
    import onnx

    from transferkit.export import convert

    real = convert._export_torchscript

    def tampered(model, example, path, opset):
        real(model, example, path, opset)
        proto = onnx.load(str(path))
        w = max(proto.graph.initializer, key=lambda t: "classifier" in t.name and len(t.dims) == 2)
        arr = onnx.numpy_helper.to_array(w).copy()
        arr[0, 0] += 0.5
        w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
        onnx.save(proto, str(path))

    monkeypatch.setattr(convert, "_export_torchscript", tampered)
    repo = tmp_path / "repo"
    shutil.copytree(exported["_repo"], repo)
    before = _tree(repo)
    run = _variant(run_dir, tmp_path, {"passed": True, "reasons": []})
    with pytest.raises(ExportError, match="parity failed.*nothing was published"):
        run_export(run, repo, params=_params(run, **{"export.opset": 17, "export.int8": False}), progress=False)
    assert _tree(repo) == before and latest_version(repo / "digits") == 1 and list_versions(repo / "digits") == [1]


def test_opset_below_18_uses_the_torchscript_exporter(run_dir, tmp_path, tiny_target):
    import onnxruntime as ort
    import torch

    meta = run_export(
        run_dir,
        tmp_path / "repo",
        params=_params(run_dir, **{"export.opset": 17, "export.int8": False, "export.name": "Digits v2!"}),
        force=True,
        progress=False,
    )
    assert meta["forced"] is False  # force only counts when it overrides a closed gate
    assert meta["name"] == "digits_v2" and Path(meta["path"]) == tmp_path / "repo" / "digits_v2" / "1"
    assert meta["exporter"] == "torchscript" and "18" in meta["fallback_reason"]
    assert meta["opset"] == 17
    model, x = _test_batch(run_dir, tiny_target, 5)
    sess = ort.InferenceSession(str(Path(meta["path"]) / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], model(x).numpy(), atol=1e-4, rtol=0)


def test_dynamo_failure_falls_back_and_says_why(run_dir, tmp_path, monkeypatch, caplog):

    def broken(model, example, path, opset):
        path.write_bytes(b"half a file")  # whatever it leaves must not survive
        raise RuntimeError("simulated torch.export failure")

    monkeypatch.setattr(convert, "_export_dynamo", broken)
    meta = run_export(run_dir, tmp_path / "repo", params=_params(run_dir, **{"export.int8": False}), progress=False)
    assert meta["exporter"] == "torchscript" and meta["opset"] == 18
    assert "simulated torch.export failure" in meta["fallback_reason"]
    assert any(
        "TorchScript exporter" in r.getMessage() and "simulated torch.export failure" in r.getMessage()
        for r in caplog.records
        if r.name == "transferkit.export"
    )  # logged, not only recorded
    assert sorted(p.name for p in Path(meta["path"]).iterdir()) == [
        "metadata.json",
        "model.onnx",
        "model_card.md",
        "reference.npz",
    ]


# --------------------------------------------------------------------------- helpers


def test_names_and_versions(tmp_path):
    assert sanitize_name("My Digits/v2") == "my_digits_v2"
    assert sanitize_name("../..") == "model" and sanitize_name("a-b_c") == "a-b_c"
    d = tmp_path / "m"
    assert next_version(d) == 1 and latest_version(d) is None
    for name in ("1", "3", "10", ".export-x", "latest", "v4"):
        (d / name).mkdir(parents=True)
    assert list_versions(d) == [1, 3, 10] and next_version(d) == 11
    (d / "latest").rmdir()
    (d / "latest").write_text(json.dumps(3))
    assert latest_version(d) == 3


def test_leftovers_of_killed_exports_are_cleaned_by_the_next_one(exported, run_dir, tmp_path):
    """9: killed exports left .export-* folders and *.tmp files that nothing cleaned. The next export removes
    those whose process is gone (its flock died with it) and leaves a live export's folder alone."""
    import os
    import signal
    import subprocess
    import sys

    from transferkit.modelrepo.repository import hold

    repo = tmp_path / "repo"
    shutil.copytree(exported["_repo"], repo)
    d = repo / "digits"
    killed = d / ".export-killed"
    (killed / "raw").mkdir(parents=True)
    (killed / "raw" / "model.onnx").write_bytes(b"\0" * (1 << 20))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); time.sleep(600)",
            str(killed),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)  # kill -9 mid-export: the OS drops its lock
    holder.wait()
    (d / ".latest.abc123.tmp").write_text("3")
    live = d / ".export-live"
    live.mkdir()
    fd = hold(live)  # an export still running elsewhere
    try:
        run = _variant(run_dir, tmp_path, {"passed": True, "reasons": []})
        run_export(run, repo, params=_params(run, **{"export.opset": 17, "export.int8": False}), progress=False)
        assert not killed.exists() and not (d / ".latest.abc123.tmp").exists()
        assert live.is_dir()
        assert list_versions(d) == [1, 2] and latest_version(d) == 2
        assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == [".export-live", ".lock"]
    finally:
        os.close(fd)
