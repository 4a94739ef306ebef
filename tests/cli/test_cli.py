"""CLI: every verb end to end on tiny real data, readable errors and exit codes, a light --help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from transferkit.cli.main import app

runner = CliRunner()
TINY = ["--set", "data.image_size=64", "--set", "train.epochs=15", "--set", "drift.min_samples=5"]


def tk(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys; from transferkit.cli.main import app; "
        "heavy = [m for m in ('torch', 'timm', 'prefect', 'evidently', 'onnx', 'sklearn') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    "verb", ["data", "zoo", "drift", "select", "train", "validate", "export", "run", "serve", "predict"]
)
def test_every_verb_has_help(verb):
    r = tk(verb, "--help")
    assert r.exit_code == 0
    assert "Usage" in r.output


def test_design_flags_are_present():
    flags = {
        ("drift",): ["--reference", "--current", "--out"],
        ("select",): ["--target", "--candidates", "--out"],
        ("train",): ["--target", "--model", "--strategy", "--out"],
        ("validate",): ["--run"],
        ("export",): ["--run", "--repo"],
        ("run",): ["--target", "--reference", "--candidates", "--out"],
        ("serve",): ["--repo", "--host", "--port"],
        ("data", "builtin"): ["--out", "--per-class", "--size"],
    }
    for verb, names in flags.items():
        out = tk(*verb, "--help").output
        for n in names:
            assert n in out, f"{' '.join(verb)} lacks {n}"


def test_zoo_list_json_reports_packaged_weights():
    r = tk("zoo", "list", "--json")
    rows = {x["model"]: x for x in json.loads(r.output)}
    for m in ("mobilenetv2_100", "tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"):
        assert rows[m]["available"] is True and "sha256" in rows[m]["detail"]


def test_data_builtin_and_check(tmp_path):
    out = tmp_path / "d"
    r = tk("data", "builtin", "digits", "--out", str(out), "--per-class", "5", "--size", "16", "-q")
    assert r.exit_code == 0 and "wrote 50 images" in r.output
    (out / "3" / "broken.png").write_bytes(b"\x89PNG not really")
    r = tk("data", "check", str(out))
    info = json.loads(r.output)
    assert info["sizes"] == {"train": 30, "val": 10, "test": 10}
    assert info["skipped"] == 1 and info["skipped_files"][0]["path"].endswith("broken.png")


def test_errors_are_one_readable_line_and_nonzero(tmp_path):
    r = runner.invoke(
        app, ["train", "--target", str(tmp_path / "nope"), "--model", "mobilenetv2_100", "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 1
    assert "does not exist" in r.output and "nope" in r.output and "Traceback" not in r.output
    r = runner.invoke(
        app, ["select", "--target", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "train.epochs=abc"]
    )
    assert r.exit_code == 1 and "train.epochs" in r.output
    r = runner.invoke(app, ["data", "builtin", "cifar", "--out", str(tmp_path / "c")])
    assert r.exit_code == 1 and "unknown built-in dataset" in r.output
    r = runner.invoke(app, ["train", "--target", str(tmp_path), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "--model or --ranking" in r.output


def test_only_transferkit_errors_and_os_errors_become_one_line(tmp_path, monkeypatch):
    """A stage's TransferkitError (and an OSError) is one line and exit 1; any other exception is a bug and
    keeps its traceback: a ValueError from inside a stage is not taken for bad input."""
    from transferkit.data.folder import DataError
    from transferkit.drift import detect

    args = ["drift", "--reference", str(tmp_path), "--current", str(tmp_path), "--out", str(tmp_path / "o")]
    for exc, code in ((DataError("a.png: broken"), 1), (PermissionError("denied: b.png"), 1)):
        monkeypatch.setattr(detect, "run_drift", lambda *a, _e=exc, **k: (_ for _ in ()).throw(_e))
        r = runner.invoke(app, args)
        assert r.exit_code == code and str(exc) in r.output and r.exception.__class__ is SystemExit
    monkeypatch.setattr(detect, "run_drift", lambda *a, **k: {}["drift_detected"])  # a bug: KeyError
    r = runner.invoke(app, args)
    assert isinstance(r.exception, KeyError) and "error:" not in r.output
    monkeypatch.setattr(detect, "run_drift", lambda *a, **k: int("x"))  # a bug: plain ValueError
    assert isinstance(runner.invoke(app, args).exception, ValueError)
    # a malformed JSON file given to a stage is bad input, not a bug
    (tmp_path / "ranking.json").write_bytes(b"\xff\xfe{")
    r = runner.invoke(
        app,
        ["train", "--target", str(tmp_path), "--ranking", str(tmp_path / "ranking.json"), "--out", str(tmp_path / "t")],
    )
    assert r.exit_code == 1 and "ranking.json" in r.output and "UTF-8" in r.output


def test_serve_refuses_a_missing_repository(tmp_path):  # the server itself: tests/serve/test_serve.py
    r = runner.invoke(app, ["serve", "--repo", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "model repository not found" in r.output


def test_stage_verbs_chain_on_real_data(tiny_target, tiny_reference, tmp_path, monkeypatch):
    """drift -> select -> train -> validate -> export, through the CLI, file contracts between them."""
    monkeypatch.chdir(tmp_path)  # no ./params.yaml: defaults + the overrides below
    run = tmp_path / "run"
    r = tk(
        "drift",
        "--reference",
        str(tiny_reference),
        "--current",
        str(tiny_target),
        "--out",
        str(run / "drift"),
        "-q",
        *TINY,
    )
    assert r.exit_code == 0, r.output
    d = json.loads((run / "drift" / "drift.json").read_text())
    assert d["drift_detected"] is True and (run / "drift" / "drift.html").is_file()

    r = tk(
        "select",
        "--target",
        str(tiny_target),
        "--candidates",
        "mobilenetv2_100,scratch:mobilenetv2_100",
        "--out",
        str(run / "select"),
        "-q",
        *TINY,
    )
    assert r.exit_code == 0, r.output
    assert "selected: mobilenetv2_100" in r.output

    r = tk(
        "train",
        "--target",
        str(tiny_target),
        "--ranking",
        str(run / "select" / "ranking.json"),
        "--drift",
        str(run / "drift" / "drift.json"),
        "--out",
        str(run / "train"),
        "--search",
        "rule",  # the fixed rule, which reads drift.json (the search has its tests in test_train.py)
        "-q",
        *TINY,
    )
    assert r.exit_code == 0, r.output
    m = json.loads((run / "train" / "metrics.json").read_text())
    assert m["model"] == "mobilenetv2_100" and m["strategy"] == "linear-probe"
    assert "measured shift: severe" in m["strategy_reason"]

    # a gate that cannot pass (gain must exceed 100 points): exit 3, reasons printed, export refuses
    r = tk("validate", "--run", str(run / "train"), "-q", *TINY, "--set", "validate.min_gain=1.0")
    assert r.exit_code == 3 and "transfer does not help here" in r.output
    r = tk("export", "--run", str(run / "train"), "--repo", str(tmp_path / "models"), "-q", *TINY)
    assert r.exit_code == 1 and "validation" in r.output
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("model.onnx"))

    # default gate: on 6-label digits raw pixels beat the ImageNet probe, so it is refused with the numbers,
    # the better model and the options; --force ships it anyway and says so
    r = tk("validate", "--run", str(run / "train"), "-q", *TINY)
    v = json.loads((run / "train" / "validation.json").read_text())
    assert v["baseline"]["name"].startswith(("pixels-", "small-cnn")) and v["verdict"] != "transfer helps"
    assert r.exit_code == 3 and "FAILED" in r.output and "transfer does not help here" in r.output
    assert "likely reason: severe domain shift" in r.output and "export --force" in r.output
    r = tk("export", "--run", str(run / "train"), "--repo", str(tmp_path / "models"), "--force", "-q", *TINY)
    assert r.exit_code == 0, r.output
    card = (tmp_path / "models" / "digits" / "1" / "model_card.md").read_text()
    assert "forced past a closed gate" in card and f"Transfer vs no transfer (same splits): **{v['verdict']}" in card
    assert "raw-pixel" in card and "McNemar p" in card
    meta = json.loads((tmp_path / "models" / "digits" / "1" / "metadata.json").read_text())
    assert meta["parity"]["max_abs_diff"] <= 1e-4 and meta["classes"] == [str(i) for i in range(10)]
