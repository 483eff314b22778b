"""Image decoding and encoding shared by the reader, the packer and the loader."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import CorruptImageError

#: File endings the RP2K reader treats as images (RP2K ships .jpg and .png).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})

#: Errors that mean "this file is not a usable image" (never a bug in our code).
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB; transparency (RGBA, LA, palette with alpha) is
    composited onto ``background`` (white by default, as product photos are shown)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        canvas = Image.new("RGB", image.size, background)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image.convert("RGB")


def load_rgb(source: str | Path | bytes, min_shorter_side: int | None = None) -> Image.Image:
    """Decode a file (path or raw bytes) to a fully loaded RGB image.

    With ``min_shorter_side``, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8)
    whose shorter side is still at least that many pixels: several times faster than a
    full decode followed by a downscale. Raises :class:`CorruptImageError` naming the source when it cannot be decoded,
    including truncated files (PIL would otherwise pad them with grey silently).
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's palette-transparency chatter
            handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
            with handle, Image.open(handle) as image:
                if min_shorter_side and image.format == "JPEG":
                    scale = min_shorter_side / min(image.size)
                    if scale < 1:
                        image.draft("RGB", (round(image.width * scale), round(image.height * scale)))
                image.load()
                return to_rgb(image)
    except DECODE_ERRORS as err:
        raise CorruptImageError(f"cannot decode image {name}: {err}") from err


def resize_shorter_side(image: Image.Image, shorter_side: int) -> Image.Image:
    """Downscale so the shorter side is ``shorter_side`` px, aspect kept; never upscale."""
    width, height = image.size
    short = min(width, height)
    if short <= shorter_side:
        return image
    scale = shorter_side / short
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap: a fast box pre-shrink then an exact antialiased resize.
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """Encode RGB as baseline JPEG with 4:2:0 chroma (what nvJPEG and libjpeg-turbo decode fastest)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=2, optimize=False)
    return buffer.getvalue()
