"""One image file as the package sees it: which file names count as images, the decompression-bomb bound (MAX_IMAGE_PIXELS), the full-decode check the folder reader applies to every file, and `load_rgb`, the decoding to upright 8-bit RGB that training, prediction and serving all share. Both readers of MAX_IMAGE_PIXELS live here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs early (PIL raises above 2x this)


def check_image(path: Path) -> str | None:
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
