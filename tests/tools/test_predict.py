"""transferkit predict: a real exported model (conftest.model_repo) over a real folder with a corrupt file and a
CMYK JPEG, its answers compared with a real `transferkit serve` process's /v1 answers for the same images.

    .venv/bin/python -m pytest tests/tools/test_predict.py -q
"""

from __future__ import annotations

import csv
import io
import json
import shutil

import httpx
import numpy as np
import pytest
from conftest import serving
from PIL import Image
from typer.testing import CliRunner

from transferkit.cli.main import app

runner = CliRunner()


def tk(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def folder(tiny_target, tmp_path_factory):
    """Six real digits test images in two subfolders, a CMYK JPEG and a 48x29 RGB image made from them, a
    truncated PNG, an empty .jpg and a text file: 8 readable images, 3 files that are not."""
    d = tmp_path_factory.mktemp("to-predict") / "images"
    src = sorted((tiny_target / "test").rglob("*.png"))[::10][:6]
    for i, p in enumerate(src):
        (d / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / f"sub{i % 2}" / f"{i}.png")
    rgb = Image.open(src[0]).convert("RGB")
    rgb.convert("CMYK").save(d / "cmyk.jpg", format="JPEG", quality=95)
    assert Image.open(d / "cmyk.jpg").mode == "CMYK"
    rgb.resize((48, 29), Image.BILINEAR).save(d / "sub1" / "wide.png")
    data = (d / "sub0" / "0.png").read_bytes()
    (d / "sub0" / "corrupt.png").write_bytes(data[: len(data) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    """A real `transferkit serve` on the module's copy of the repository (batching off, no token)."""
    with serving(repo, tmp_path_factory.mktemp("predict-server"), "--no-batching", token=None) as s:
        yield s


def _csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_folder_with_bad_files_gives_one_row_per_readable_image_and_agrees_with_the_server(
    folder, repo, server, tmp_path
):
    out = tmp_path / "pred.csv"
    r = tk("predict", folder, "--model", "digits", "--repo", repo, "--out", out, "--batch-size", 3, "--top-k", 3, "-q")
    assert r.exit_code == 0, r.output
    rows = _csv(out.read_text())
    good = [x for x in rows if not x["error"]]
    bad = {x["path"]: x["error"] for x in rows if x["error"]}
    readable = sorted(str(p) for p in folder.rglob("*") if p.suffix in (".png", ".jpg") and p.stat().st_size)
    readable.remove(str(folder / "sub0" / "corrupt.png"))
    assert sorted(x["path"] for x in good) == readable and len(good) == 8
    assert set(bad) == {str(folder / "sub0" / "corrupt.png"), str(folder / "empty.jpg"), str(folder / "notes.txt")}
    assert bad[str(folder / "sub0" / "corrupt.png")].startswith("unreadable image")
    assert "extension" in bad[str(folder / "notes.txt")]
    assert "corrupt.png" in r.stderr and "empty.jpg" in r.stderr  # listed on stderr too
    assert all(x["label"] in [str(i) for i in range(10)] and 0 < float(x["confidence"]) <= 1 for x in good)
    assert all(float(x["confidence"]) >= float(x["confidence_2"]) >= float(x["confidence_3"]) for x in good)

    s = server
    answers = {}
    for x in good:  # the server's own route, one image a request, as any client sends it
        with open(x["path"], "rb") as f:
            resp = s["client"].post("/v1/models/digits/predict", files={"file": f}, params={"top_k": 3})
        assert resp.status_code == 200, resp.text
        answers[x["path"]] = resp.json()["predictions"][0]["top_k"]
    # and predict through the server: same rows, the refused files listed with the server's reason
    js = tmp_path / "pred.json"
    r2 = tk("predict", folder, "-m", "digits", "--repo", repo, "--server", s["url"], "--out", js, "--top-k", 3, "-q")
    assert r2.exit_code == 0, r2.output
    for x in good:
        top = answers[x["path"]]
        assert x["label"] == top[0]["label"]
        np.testing.assert_allclose(float(x["confidence"]), top[0]["probability"], atol=1e-4)
        assert [x["label"], x["label_2"], x["label_3"]] == [t["label"] for t in top]
    via = json.loads(js.read_text())
    assert via["version"] == 2 and via["source"] == s["url"] and via["n_images"] == 8
    assert {p["path"]: p["label"] for p in via["predictions"]} == {x["path"]: x["label"] for x in good}
    refused = {x["path"]: x["reason"] for x in via["skipped"]}
    assert set(refused) == set(bad)
    assert refused[str(folder / "sub0" / "corrupt.png")].startswith("server refused it: 400")


def test_version_onnx_file_and_list_give_that_version(folder, repo, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder / 'cmyk.jpg'}\n\n{folder / 'sub1' / 'wide.png'}\n{folder / 'gone.png'}\n")
    v1 = tk("predict", "--list", listing, "-m", "digits@1", "--repo", repo, "--format", "json", "-q")
    assert v1.exit_code == 0, v1.output
    body = json.loads(v1.stdout)
    assert body["version"] == 1 and body["n_images"] == 2
    assert body["skipped"] == [{"path": str(folder / "gone.png"), "reason": "no such file"}]
    onnx = repo / "digits" / "1" / "model.onnx"
    f = tk("predict", folder / "cmyk.jpg", folder / "sub1" / "wide.png", "-m", onnx, "--format", "json", "-q")
    assert [p["top_k"] for p in json.loads(f.stdout)["predictions"]] == [p["top_k"] for p in body["predictions"]]
    v2 = json.loads(tk("predict", folder / "cmyk.jpg", "-m", "digits", "--repo", repo, "--format", "json", "-q").stdout)
    assert v2["version"] == 2


def test_bad_arguments_exit_non_zero_with_one_line_and_leave_the_output_alone(folder, repo, tmp_path):
    out = tmp_path / "keep.csv"
    out.write_text("earlier,good,output\n")
    cases = [
        (("-m", "nosuch"), "no such model"),
        (("-m", "digits@9"), "no such version"),
        (("-m", "digits@x"), "must be a number"),
        (("-m", "../digits"), "not a name"),
        (("-m", str(tmp_path / "none.onnx")), "no such ONNX file"),
        (("-m", "digits", "--batch-size", "0"), "--batch-size 0"),
        (("-m", "digits", "--format", "xml"), "--format 'xml'"),
    ]
    for args, msg in cases:
        r = tk("predict", folder, "--repo", repo, "--out", out, *args)
        assert r.exit_code == 1 and msg in r.stderr, (args, r.output)
    r = tk("predict", tmp_path / "missing", "-m", "digits", "--repo", repo, "--out", out)
    assert r.exit_code == 1 and "no such file or folder" in r.stderr
    r = tk("predict", folder, "-m", "digits", "--repo", repo, "--server", "http://127.0.0.1:9", "--out", out, "-q")
    assert r.exit_code == 1 and "no answer from the server" in r.stderr
    assert out.read_text() == "earlier,good,output\n"


def test_a_server_that_serves_another_version_is_an_error(folder, repo, server):
    assert httpx.get(f"{server['url']}/v1/models/digits").json()["version"] == 2
    r = tk("predict", folder / "cmyk.jpg", "-m", "digits@1", "--repo", repo, "--server", server["url"], "-q")
    assert r.exit_code == 1 and "serves digits version 2, not the version 1" in r.stderr
