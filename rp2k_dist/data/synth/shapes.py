"""The seven shape painters: one product silhouette per RP2K shape."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import ImageDraw

from .config import Box, Design, RGB, RIM


# --------------------------------------------------------------------------- shapes
# Each draws a silhouette filling a w x h canvas and returns the label box (x0, y0, x1, y1).


def _shade(colour: RGB, factor: float) -> RGB:
    return tuple(int(min(255, max(0, c * factor))) for c in colour)


def _draw_bottle(draw: ImageDraw.ImageDraw, w: int, h: int, d: Design) -> Box:
    """Narrow neck, sloping shoulders, cap."""
    draw.rectangle((0.37 * w, 0.0, 0.63 * w, 0.07 * h), fill=d.cap)
    draw.rectangle((0.39 * w, 0.07 * h, 0.61 * w, 0.23 * h), fill=d.body)
    shoulder = [(0.39 * w, 0.22 * h), (0.61 * w, 0.22 * h), (w - 1, 0.38 * h), (0, 0.38 * h)]
    draw.polygon(shoulder, fill=d.body)
    draw.rounded_rectangle((0, 0.36 * h, w - 1, h - 1), radius=0.12 * w, fill=d.body)
    return (0, 0.5 * h, w - 1, 0.86 * h)


def _draw_can(draw: ImageDraw.ImageDraw, w: int, h: int, d: Design) -> Box:
    """Short cylinder with metal rims top and bottom."""
    draw.ellipse((0, 0.86 * h, w - 1, h - 1), fill=_shade(RIM, 0.8))
    draw.rectangle((0, 0.06 * h, w - 1, 0.93 * h), fill=d.body)
    draw.rectangle((0, 0.06 * h, w - 1, 0.1 * h), fill=RIM)
    draw.ellipse((0, 0, w - 1, 0.12 * h), fill=RIM)
    draw.ellipse((0.12 * w, 0.015 * h, 0.88 * w, 0.1 * h), fill=_shade(RIM, 0.85))
    return (0, 0.16 * h, w - 1, 0.86 * h)


def _draw_box(draw: ImageDraw.ImageDraw, w: int, h: int, d: Design) -> Box:
    """Rectangular carton with a lit top face and a shaded side face."""
    k = 0.14 * w
    front = w - 1 - k
    draw.rectangle((0, k, front, h - 1), fill=d.body)
    draw.polygon([(0, k), (k, 0), (w - 1, 0), (front, k)], fill=_shade(d.body, 1.18))
    side = [(front, k), (w - 1, 0), (w - 1, h - 1 - k), (front, h - 1)]
    draw.polygon(side, fill=_shade(d.body, 0.7))
    return (0.06 * w, 0.26 * h, front - 0.06 * w, 0.84 * h)


def _draw_bag(draw: ImageDraw.ImageDraw, w: int, h: int, d: Design) -> Box:
    """Pillow pouch: bulging sides, crimped seals top and bottom."""
    ts = np.linspace(0.0, 1.0, 12)
    left = [(0.08 * w * (1 - math.sin(math.pi * t)), (0.06 + 0.88 * t) * h) for t in ts]
    right = [(w - 1 - x, y) for x, y in reversed(left)]
    draw.polygon(left + right, fill=d.body)
    seal = _shade(d.body, 0.85)
    for y0 in (0.0, 0.93 * h):
        draw.rectangle((0.08 * w, y0, 0.92 * w, y0 + 0.07 * h), fill=seal)
        teeth = 10
        for i in range(teeth):
            x = 0.08 * w + (i + 0.5) * 0.84 * w / teeth
            draw.line((x, y0, x, y0 + 0.07 * h), fill=_shade(d.body, 0.6), width=max(1, w // 60))
    return (0.12 * w, 0.24 * h, 0.88 * w, 0.8 * h)


def _draw_jar(draw: ImageDraw.ImageDraw, w: int, h: int, d: Design) -> Box:
    """Wide body with a ridged lid."""
    draw.rounded_rectangle((0, 0.14 * h, w - 1, h - 1), radius=0.16 * w, fill=d.body)
    draw.rounded_rectangle((0.07 * w, 0, 0.93 * w, 0.18 * h), radius=0.03 * w, fill=d.cap)
    for i in range(1, 6):
        x = 0.07 * w + i * 0.86 * w / 6
        draw.line((x, 0.02 * h, x, 0.16 * h), fill=_shade(d.cap, 0.75), width=max(1, w // 80))
    return (0, 0.34 * h, w - 1, 0.82 * h)


def _draw_handled_bottle(draw: ImageDraw.ImageDraw, w: int, h: int, d: Design) -> Box:
    """Jug: off-centre neck and a handle loop on the right shoulder."""
    ring = max(2, int(0.09 * w))
    draw.ellipse((0.5 * w, 0.16 * h, w - 1, 0.6 * h), outline=_shade(d.body, 0.9), width=ring)
    draw.rectangle((0.18 * w, 0.0, 0.42 * w, 0.07 * h), fill=d.cap)
    draw.rectangle((0.2 * w, 0.07 * h, 0.4 * w, 0.2 * h), fill=d.body)
    shoulder = [(0.2 * w, 0.19 * h), (0.4 * w, 0.19 * h), (0.8 * w, 0.32 * h), (0, 0.32 * h)]
    draw.polygon(shoulder, fill=d.body)
    draw.rounded_rectangle((0, 0.3 * h, 0.8 * w, h - 1), radius=0.08 * w, fill=d.body)
    return (0.03 * w, 0.48 * h, 0.77 * w, 0.86 * h)


def _draw_package(draw: ImageDraw.ImageDraw, w: int, h: int, d: Design) -> Box:
    """Flat pack (cigarettes): flip-top lid line and a thin side face."""
    side = 0.08 * w
    draw.rectangle((0, 0, w - 1 - side, h - 1), fill=d.body)
    draw.rectangle((w - 1 - side, 0, w - 1, h - 1), fill=_shade(d.body, 0.72))
    draw.line((0, 0.27 * h, w - 1, 0.27 * h), fill=_shade(d.body, 0.6), width=max(1, h // 90))
    return (0.05 * w, 0.33 * h, w - 1 - side - 0.05 * w, 0.93 * h)


SHAPE_DRAWERS: dict[str, Callable[[ImageDraw.ImageDraw, int, int, Design], Box]] = {
    "bottle": _draw_bottle,
    "can": _draw_can,
    "box": _draw_box,
    "bag": _draw_bag,
    "jar": _draw_jar,
    "handled bottle": _draw_handled_bottle,
    "package": _draw_package,
}
ROUND_SHAPES = frozenset({"bottle", "can", "jar", "handled bottle"})
