"""Input images for edits: read untrusted bytes into an RGB picture (or a repaint mask), safely.

Why a module of its own: an image is the one request field whose cost is decided by its *contents* — a
100 KB PNG can declare 30000×30000 pixels and take gigabytes to decode. So the declared size is read from
the header and refused before any pixel is decoded (PIL's own bomb limit is set to the same number as a
second guard), and every oddity of real files is converted here, once, for the CLI and the service alike:
EXIF rotation, CMYK, 16-bit, palette, grayscale, alpha. A mask is OpenAI's: a PNG whose *transparent*
pixels mark what to repaint; a mask without alpha is refused with the way to make one.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from sd35.errors import InputError

# The largest picture read at all (4096² — a 2048² input has 4x room): header-checked before decoding.
MAX_INPUT_PIXELS = 4096 * 4096
FORMATS = {"PNG": "png", "WEBP": "webp", "JPEG": "jpeg", "MPO": "jpeg"}  # MPO: phone JPEGs with a depth map
MASK_FIX = ("make the mask a PNG with an alpha channel, transparent where to repaint: erase that area in an image "
            "editor and save as PNG, or with Pillow: m = Image.open('mask.png').convert('L'); "
            "rgba = Image.new('RGBA', m.size); rgba.putalpha(ImageOps.invert(m)); rgba.save('mask-alpha.png') "
            "(white in mask.png = repaint)")


@dataclass(frozen=True)
class Picture:
    """A decoded input: `image` is RGB (a picture) or L with 255 = repaint (a mask)."""

    image: object  # PIL.Image.Image
    sha256: str
    format: str  # png | webp | jpeg
    size: tuple[int, int]  # (width, height) after EXIF rotation


def _open(data: bytes, param: str):
    """PIL image with only its header read; refuses what is not png/webp/jpeg and declared bombs."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_INPUT_PIXELS  # PIL's own guard: >2x raises even before our check
    if not data:
        raise InputError(f"{param} is empty.", f"send a png, webp or jpeg file as `{param}`.", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{param} declares too many pixels ({exc}).",
                         f"send at most {MAX_INPUT_PIXELS} pixels (e.g. 4096x4096).", param=param) from None
    except Exception:  # noqa: BLE001 - PIL raises many kinds for bytes that are not an image
        raise InputError(f"{param} is not a png, webp or jpeg image ({len(data)} bytes that no decoder reads).",
                         f"send a png, webp or jpeg file as `{param}`.", param=param) from None
    width, height = im.size
    if width * height > MAX_INPUT_PIXELS or min(width, height) < 1:
        raise InputError(f"{param} declares {width}x{height} pixels; the limit is {MAX_INPUT_PIXELS} pixels.",
                         f"scale {param} down (e.g. to 2048 px on its longer side) first.", param=param)
    return im


def _decode(im, data: bytes, param: str):
    """Decode the pixels (a truncated file fails here) and apply the EXIF orientation."""
    from PIL import ImageOps

    try:
        im.load()
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - truncated or corrupt data
        raise InputError(f"{param} is truncated or corrupt ({len(data)} bytes; its pixels cannot be decoded).",
                         f"send the complete {FORMATS.get(im.format, 'image')} file as `{param}`.",
                         param=param) from None


def _to_8bit(im):
    """16-bit and 32-bit grayscale (PIL modes I;16*, I, F) scaled to 8 bits (PIL's convert would clip)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(im)
    if im.mode == "F":
        a = np.clip(a, 0.0, 1.0 if a.max(initial=0) <= 1.0 else 255.0) * (255.0 if a.max(initial=0) <= 1.0 else 1.0)
    elif a.max(initial=0) > 255:
        a = a.astype(np.uint32) >> 8
    return Image.fromarray(a.astype(np.uint8), mode="L")


def _alpha(im):
    """The alpha channel as L, or None when the image has none (palette transparency included)."""
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        return im.convert("RGBA").getchannel("A")
    return None


def _rgb(im):
    """Any mode → RGB: 16-bit scaled, palette expanded, CMYK converted, alpha flattened onto white."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = _to_8bit(im)
    alpha = _alpha(im)
    rgb = im.convert("RGB")
    if alpha is not None and alpha.getextrema()[0] < 255:
        white = Image.new("RGB", rgb.size, (255, 255, 255))
        rgb = Image.composite(rgb, white, alpha)
    return rgb


def read_image(data: bytes, param: str = "image") -> Picture:
    """Untrusted bytes → an RGB Picture, or InputError naming `param`."""
    im = _open(data, param)
    fmt = FORMATS[im.format]
    im = _decode(im, data, param)
    return Picture(_rgb(im), hashlib.sha256(data).hexdigest(), fmt, im.size)


def read_mask(data: bytes, param: str = "mask") -> Picture:
    """Untrusted bytes → a repaint mask (L: 255 where the mask is transparent), or InputError naming `param`."""
    from PIL import ImageOps

    im = _open(data, param)
    fmt = FORMATS[im.format]
    im = _decode(im, data, param)
    alpha = _alpha(im)
    if alpha is None:
        raise InputError(f"{param} has no alpha channel ({im.mode}), so it marks nothing to repaint.", MASK_FIX,
                         param=param)
    repaint = ImageOps.invert(alpha).point(lambda v: 255 if v >= 128 else 0)  # alpha < 128 = transparent
    if repaint.getextrema()[1] == 0:
        raise InputError(f"{param} is opaque everywhere: it marks nothing to repaint.",
                         "make the pixels to repaint transparent (alpha 0).", param=param)
    return Picture(repaint, hashlib.sha256(data).hexdigest(), fmt, im.size)


def check_pair(image: Picture, mask: Picture | None, image_param: str = "image", mask_param: str = "mask") -> None:
    """A mask applies to the (first) image and must have its size."""
    if mask is not None and mask.size != image.size:
        iw, ih = image.size
        mw, mh = mask.size
        raise InputError(f"{mask_param} is {mw}x{mh} but {image_param} is {iw}x{ih}; a mask must have its image's size.",
                         f"resize the mask to {iw}x{ih} (or paint it on the image itself).", param=mask_param)
