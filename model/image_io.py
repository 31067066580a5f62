"""Image files and PIL images -> 8-bit RGB: the one conversion the processors, the reward backbones, the training data
and the eval tools all use.

PIL's own `convert("RGB")` clips instead of scaling: a 16-bit greyscale PNG (mode I;16, values up to 65535) comes out
all white, a float image in [0, 1] (mode F) all black. `to_rgb` maps such images to 8-bit levels first, then
converts as transformers' `convert_to_rgb` does:
    I;16, I;16L, I;16B, I;16N   16-bit levels: round(v / 257) (65535 -> 255)
    I (32-bit int)              the bit depth is not stored: values within 0-255 are 8-bit levels; otherwise values
                                within 0-65535 are 16-bit levels (/ 257); anything else is an error (the range of a
                                mode-I image is not known, so it is not guessed). A 16-bit image that lies entirely
                                below 256 (nearly black) therefore reads as 8-bit.
    F (32-bit float)            values within [0, 1] are the unit range (x 255); values within [0, 255] are 8-bit
                                levels; NaN, infinities or anything outside [0, 255] are an error.
A transparency key on such an image becomes an alpha band. Transparency (an alpha band, a palette with alpha, or a
`transparency` key) is composited onto white; CMYK, YCbCr, LAB, HSV, palette and 1-bit images go through PIL's
conversion. Pillow decodes 16-bit RGB(A) and grey+alpha PNGs to 8-bit modes itself (high byte), so they need nothing.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

__all__ = ["IMAGE_SUFFIXES", "open_image", "decode_image", "to_rgb", "load_rgb"]

# The file suffixes the dataset readers and eval tools take as images (lower case; compare with `suffix.lower()`).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Errors Pillow raises for a file it cannot decode (truncated data, unknown format, bad header or EXIF block, or a
# pixel count past its decompression-bomb limit).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file completely (a broken file fails here, not halfway through a batch), turned upright by its
    EXIF orientation as transformers' `load_image` does; the mode is kept. A missing file raises FileNotFoundError,
    an undecodable one ValueError, both naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file {path!r}")
    return _decode(path, path)


def decode_image(data: bytes, name: str) -> Image.Image:
    """`open_image` of an encoded image held in memory (e.g. a tar member); errors name `name`."""
    return _decode(io.BytesIO(data), name)


def _decode(source, name: str) -> Image.Image:
    try:
        with Image.open(source) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except _DECODE_ERRORS as e:
        raise ValueError(f"cannot read image {name!r} ({type(e).__name__}: {e})") from None


def _to_8bit(image: Image.Image) -> Image.Image:
    """A mode I;16*, I or F image -> mode L (LA with its transparency key as alpha), scaled as the module says."""
    a = np.asarray(image)
    if a.size == 0:
        return Image.new("L", image.size)
    lo, hi = float(a.min()), float(a.max())
    if image.mode.startswith("I;16"):
        scale = 1 / 257
    elif image.mode == "I":
        if lo < 0 or hi > 65535:
            raise ValueError(f"mode-I image with values {lo:.0f}..{hi:.0f}: expected 8-bit (0-255) or 16-bit "
                             f"(0-65535) levels")
        scale = 1 / 257 if hi > 255 else 1
    else:
        if not np.isfinite(a).all():
            raise ValueError("mode-F image with NaN or infinite values")
        if lo < 0 or hi > 255:
            raise ValueError(f"mode-F image with values {lo:g}..{hi:g}: expected the range [0, 1] or [0, 255]")
        scale = 255 if hi <= 1 else 1
    out = Image.fromarray(np.rint(a.astype(np.float64) * scale).astype(np.uint8), "L")
    key = image.info.get("transparency")
    if key is not None:  # one raw value marks transparent pixels
        out.putalpha(Image.fromarray(np.where(a == key, 0, 255).astype(np.uint8), "L"))
    return out


def to_rgb(image: Image.Image, alpha: str = "white") -> Image.Image:
    """An RGB copy of `image`. alpha="white" composites transparency onto white (transformers' `convert_to_rgb`);
    alpha="drop" discards it (transformers' `load_image`, what its processors do with file paths). Raises ValueError
    for a mode-I or mode-F image outside the ranges above or a mode PIL cannot convert."""
    if alpha not in ("white", "drop"):
        raise ValueError(f"alpha must be 'white' or 'drop', got {alpha!r}")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = _to_8bit(image)
    try:
        if alpha == "white" and image.has_transparency_data:
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:  # e.g. "conversion from La to RGB not supported"
        raise ValueError(f"cannot convert a mode-{image.mode} image to RGB ({e})") from None


def load_rgb(image: Image.Image | str | os.PathLike, alpha: str = "white") -> Image.Image:
    """`to_rgb` of a PIL image, or of the image file at a path (`open_image`)."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a path, got {type(image).__name__}")
    return to_rgb(image, alpha)
