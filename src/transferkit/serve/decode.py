"""Images from request bytes: the accepted formats, header-only size checks, decoding, and the model's
preprocessing in numpy/PIL (zoo.eval_transform's, without torch)."""

from __future__ import annotations

import io

import numpy as np

from transferkit.serve.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

ALLOWED_TYPES = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/gif": "GIF",
    "image/tiff": "TIFF",
}
OCTET = "application/octet-stream"  # a client that does not know: the decoded format must still be allowed


def decode_cost(pixels: int, mode: str) -> int:
    """Bytes load_rgb holds at once for an image of this size and PIL mode: the decoded planes, the
    intermediate conversions (16-bit via float64, alpha via RGBA) and the RGB result."""
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        per = 4 + 8 + 1 + 3
    elif mode in ("RGBA", "LA", "PA", "La", "RGBa", "P"):
        per = 4 * 3 + 3
    else:
        per = len(mode) + 3 if mode.isalpha() and mode.isupper() else 8
    return int(pixels) * per


_INTERP = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}  # PIL codes


def probe_image(data: bytes, cfg, where: str, content_type: str | None = None) -> tuple[int, int, str, str]:
    """(width, height, format, mode) from the header alone, refusing bombs and formats outside ALLOWED_TYPES.
    `cfg` (a ServeConfig) gives the limits: max_image_side, max_image_pixels."""
    from PIL import Image, UnidentifiedImageError

    if content_type is not None:
        ct = content_type.split(";")[0].strip().lower()
        if ct not in ALLOWED_TYPES and ct != OCTET:
            raise UnsupportedMediaType(
                f"{where}: content type {ct[:80] or 'none'} not accepted "
                f"(accepted: {', '.join(sorted(ALLOWED_TYPES))})",
            )
    if not data:
        raise InvalidInput(f"{where}: empty image")
    formats = sorted(set(ALLOWED_TYPES.values()))
    try:
        with Image.open(io.BytesIO(data), formats=formats) as im:  # reads the header only
            w, h, fmt, mode = im.size[0], im.size[1], im.format, im.mode
    except UnidentifiedImageError:
        raise UnsupportedMediaType(f"{where}: not an image in an accepted format ({', '.join(formats)})") from None
    except Image.DecompressionBombError as e:  # PIL's own guard, from the header: far above our limits too
        raise PayloadTooLarge(
            f"{where}: {e}; limits are {cfg.max_image_side} px a side and {cfg.max_image_pixels} pixels"
        ) from e
    except Exception as e:  # any plugin's parse error on hostile bytes is the client's
        raise InvalidInput(f"{where}: cannot read image header ({type(e).__name__}: {str(e)[:200]})") from None
    _same_for_every_reader(data, where, fmt, (w, h))
    if max(w, h) > cfg.max_image_side or w * h > cfg.max_image_pixels:
        raise PayloadTooLarge(
            f"{where}: image is {w}x{h} px; limits are {cfg.max_image_side} px a side and "
            f"{cfg.max_image_pixels} pixels",
        )
    if w < 1 or h < 1:
        raise InvalidInput(f"{where}: image has no pixels ({w}x{h})")
    return w, h, fmt, mode


def _same_for_every_reader(data: bytes, where: str, fmt: str, size: tuple[int, int]) -> None:
    """415 for a polyglot: bytes that Pillow's own detection (every format it knows: what data.load_rgb does
    in training) reads as another format or size than the allowed-format check did. A TIFF header whose
    IFD offset spells the FLI magic is a 1x1 TIFF to the check and an 11000x11000 FLI to the detection."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only, as above
            other, other_size = im.format, im.size
    except Exception as e:  # an earlier plugin claimed the bytes and failed on them (a bomb, a parse error)
        other, other_size = f"an unreadable image ({type(e).__name__})", None
    if other != fmt or other_size != size:
        what = f"{other} {other_size[0]}x{other_size[1]}" if other_size else other
        raise UnsupportedMediaType(
            f"{where}: reads as {fmt} {size[0]}x{size[1]} to the format check but as {what} to Pillow's "
            "detection: an image disguised as another format is refused",
        )


# the PIL format an image of each reported format is opened with (JPEG's opener also makes MPO images)
_OPENER = {"MPO": "JPEG"}


def decode_image(data: bytes, cfg, where: str, content_type: str | None = None):
    """Bytes -> (RGB PIL image, format), after probe_image's checks, decoded by the format the check read
    (never another plugin) and refused unless it has the size the check read (what the budget reserved)."""
    from PIL import Image

    from transferkit.data.images import load_rgb

    w, h, fmt, _ = probe_image(data, cfg, where, content_type)
    try:
        img = load_rgb(io.BytesIO(data), formats=[_OPENER.get(fmt, fmt)])
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InvalidInput(f"{where}: cannot decode {fmt} image ({type(e).__name__}: {str(e)[:200]})") from None
    except Exception as e:  # a decoder bug on hostile bytes: still the input's fault, never a 500
        raise InvalidInput(f"{where}: cannot decode {fmt} image ({type(e).__name__})") from None
    if img.size not in ((w, h), (h, w)):  # (h, w): EXIF orientation applied
        raise InvalidInput(f"{where}: {fmt} header says {w}x{h} px but decodes to {img.size[0]}x{img.size[1]}")
    return img, fmt


def preprocess(
    img, input_size: list[int], mean: list[float], std: list[float], interpolation: str | None
) -> np.ndarray:
    """zoo.eval_transform (timm eval, crop_pct=1.0) without torch: [3, H, W] float32.

    Where the crop would discard most of the resized image (aspect ratio beyond 4:1), only the source region
    it keeps is resized (PIL's resize `box`: the same filter taps, coefficients within float rounding, so at
    most one level of 255 apart), so a 1x8192 strip costs a 32x32 resize, not a 32x262144 one.
    """
    _, th, tw = (int(v) for v in input_size)
    resample = _INTERP.get(str(interpolation or "bilinear").lower(), 2)
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = th, int(th * long / short)  # torchvision's shorter-side rule
    nw, nh = (new_short, new_long) if w <= h else (new_long, new_short)
    top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
    if nw * nh > 4 * th * tw:
        sx, sy = w / nw, h / nh
        img = img.resize((tw, th), resample, box=(left * sx, top * sy, (left + tw) * sx, (top + th) * sy))
    else:
        if (nh, nw) != (h, w):
            img = img.resize((nw, nh), resample)
        if (nh, nw) != (th, tw):
            img = img.crop((left, top, left + tw, top + th))
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
