"""One photo of a product: the product drawn and lit, a background, viewpoint, lighting,
blur, and the encoded bytes."""

from __future__ import annotations

import math
from io import BytesIO

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .config import SHAPE_ASPECT, Design, _jitter, _pick
from .patterns import PATTERNS, _draw_marks
from .shapes import ROUND_SHAPES, SHAPE_DRAWERS


def _cylinder_light(width: int) -> np.ndarray:
    """Per-column brightness of a lit cylinder: dark edges, a highlight left of centre."""
    x = (np.arange(width) + 0.5) / width
    return 0.72 + 0.32 * np.sin(np.pi * x) ** 0.6 + 0.22 * np.exp(-(((x - 0.3) / 0.07) ** 2))


def _product(d: Design, height: int) -> Image.Image:
    """The product alone on a transparent canvas, ``height`` px tall (RGBA)."""
    width = max(8, round(height * SHAPE_ASPECT[d.shape] * d.aspect))
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    box = SHAPE_DRAWERS[d.shape](draw, width, height, d)
    PATTERNS[d.pattern](draw, box, d)
    _draw_marks(draw, box, d)
    if d.shape in ROUND_SHAPES or d.shape == "bag":
        pixels = np.asarray(image, dtype=np.float32)
        light = _cylinder_light(width)[None, :]
        if d.shape == "bag":  # a pillow: brightest in the middle both ways, and flatter
            rows = np.sin(np.linspace(0, np.pi, height))[:, None]
            light = 0.85 + 0.15 * (light - 0.72) / 0.54 * rows
        pixels[..., :3] *= light[..., None]
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGBA")
    return image


# --------------------------------------------------------------------------- photos


def _background(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A shop-like backdrop: plain, gradient, shelf edge with neighbours, or blotchy noise."""
    kind = int(rng.integers(4))
    base = _jitter((int(rng.integers(120, 250)),) * 3, rng, 30)
    if kind == 0:
        return Image.new("RGB", (width, height), base)
    if kind == 1:
        top, bottom = np.array(base, np.float32), np.array(_jitter(base, rng, 70), np.float32)
        t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
        column = top * (1 - t) + bottom * t
        return Image.fromarray(np.broadcast_to(column, (height, width, 3)).astype(np.uint8))
    if kind == 2:
        image = Image.new("RGB", (width, height), base)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 3))):  # shelf edges / price strips
            y = rng.uniform(0, height)
            edge = _pick(rng, ((235, 235, 235), (90, 90, 95), (240, 170, 40), (200, 40, 40)))
            draw.rectangle((0, y, width, y + rng.uniform(0.04, 0.1) * height), fill=edge)
        for x in (0, width):  # neighbouring products cut by the crop
            reach = rng.uniform(0.04, 0.16) * width
            colour = tuple(int(c) for c in rng.integers(20, 240, 3))
            neighbour = (x - reach, rng.uniform(0.05, 0.4) * height, x + reach, height)
            draw.rounded_rectangle(neighbour, radius=reach / 3, fill=colour)
        return image
    # Blotches: a coarse grid of muted colours around the base, blown up, plus grain.
    grid = (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 1)
    coarse = np.array(base) + rng.normal(0, 28, grid) + rng.normal(0, 12, grid[:2] + (3,))
    coarse = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
    blotches = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    grain = rng.normal(0.0, 6.0, (height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(blotches + grain, 0, 255).astype(np.uint8))


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> tuple[float, ...]:
    """PIL PERSPECTIVE coefficients mapping output points ``dst`` to input points ``src``."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    return tuple(np.linalg.solve(np.array(rows, float), np.array(rhs, float)).tolist())


def _viewpoint(product: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Slight perspective tilt and rotation in one warp (premultiplied alpha: no dark
    fringes); the canvas grows to hold the warped product."""
    w, h = product.size
    corners = np.array([(0, 0), (w, 0), (w, h), (0, h)], float)
    tilted = corners + rng.uniform(-1, 1, (4, 2)) * np.array([0.07 * w, 0.05 * h])
    angle = math.radians(rng.uniform(-7, 7))
    turn = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    dst = (tilted - (w / 2, h / 2)) @ turn.T
    dst -= dst.min(axis=0)
    size = tuple(int(v) + 1 for v in dst.max(axis=0))
    coeffs = _perspective_coeffs(dst, corners)
    warped = product.convert("RGBa").transform(
        size, Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR
    )
    return warped.convert("RGBA")


def _lighting(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, white balance and sensor noise on an HxWx3 float array."""
    contrast, brightness = rng.uniform(0.75, 1.2), rng.uniform(0.72, 1.25)
    gains = rng.uniform(0.93, 1.07, 3).astype(np.float32)
    pixels = (pixels - 128.0) * contrast + 128.0
    pixels *= brightness * gains
    pixels += rng.normal(0.0, rng.uniform(0.0, 6.0), pixels.shape[:2] + (1,)).astype(np.float32)
    return np.clip(pixels, 0, 255)


def _photo(
    design: Design, image_size: int, rng: np.random.Generator, transparent: bool = False
) -> Image.Image:
    """One shop photo of the product: RGB, or RGBA with a transparent backdrop.

    The longer side is ``image_size``; most photos are portrait, as product crops are.
    """
    aspect = rng.uniform(0.5, 0.95) if rng.random() < 0.8 else rng.uniform(0.95, 1.35)
    if aspect > 1:
        width, height = image_size, round(image_size / aspect)
    else:
        width, height = round(image_size * aspect), image_size
    # Drawn at twice the size and halved after the warp: anti-aliased edges.
    tall = rng.uniform(0.6, 0.88) * height
    wide = tall * SHAPE_ASPECT[design.shape] * design.aspect
    tall = min(tall, tall * 0.88 * width / wide)
    product = _viewpoint(_product(design, max(16, round(2 * tall))), rng).reduce(2)
    pw, ph = product.size
    x = int((width - pw) / 2 + rng.uniform(-0.5, 0.5) * max(0, width - pw))
    y = int((height - ph) / 2 + rng.uniform(-0.5, 0.5) * max(0, height - ph))
    if transparent:
        canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        canvas.alpha_composite(product, (max(x, 0), max(y, 0)))
    else:
        canvas = _background(width, height, rng)
        canvas.paste(product, (x, y), product)
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels[..., :3] = _lighting(pixels[..., :3], rng)
    image = Image.fromarray(pixels.astype(np.uint8), canvas.mode)
    if rng.random() < 0.25:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.4) * image_size / 160))
    return image


def _encode(image: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    """File bytes of one image of ``kind`` (see :class:`ImageSpec`)."""
    out = BytesIO()
    if kind == "jpg" or kind == "corrupt":
        image.save(out, "JPEG", quality=int(rng.integers(55, 96)))
    elif kind == "palette":
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=128).save(out, "PNG")
    else:  # "png" (RGB) or "rgba"
        image.save(out, "PNG")
    data = out.getvalue()
    if kind == "corrupt":  # a download cut inside the headers, then junk: undecodable
        data = data[: data.index(b"\xff\xda") // 2] + rng.bytes(256)
    return data
