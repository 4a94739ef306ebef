"""Debian's openclipart-png as a built-in dataset: class folders walked recursively, pictures shared by two classes or duplicated reported and left out, and each drawing decoded under an explicit pixel bound, composited on white, trimmed and fitted into a square."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from transferkit.data.arrays import BuiltinSource, UnusableSource, png_bytes
from transferkit.data.folder import DataError

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


def clipart_source(size: int) -> BuiltinSource:
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
    return BuiltinSource(
        classes,
        candidates,
        encode=lambda p: png_bytes(_clipart_image(p, size)),
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
                raise UnusableSource(f"{w}x{h} px is over the decoding bound of {CLIPART_MAX_PIXELS:,} px")
            im.load()
            k = max(1, max(w, h) // (2 * size))
            rows = k * max(1, (1 << 20) // (w * k))  # a multiple of k: bands reduce exactly like the whole
            small = Image.new("RGB", (-(-w // k), -(-h // k)))
            for y in range(0, h, rows):
                band = _on_white(im.crop((0, y, w, min(h, y + rows))))
                small.paste(band.reduce(k) if k > 1 else band, (0, y // k))
    except UnusableSource:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise UnusableSource(f"unreadable image ({type(e).__name__}: {e})") from e
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
