"""The seven label patterns (one per type's label style) and the variant marks."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import ImageDraw

from .config import Box, Design, MARK_SPOTS
from .shapes import _shade


# --------------------------------------------------------------------------- label patterns
# Each paints the label box in a type's style; marks and print go on top afterwards.


def _pattern_band(draw: ImageDraw.ImageDraw, box: Box, d: Design) -> None:
    """Solid label with ink rules top and bottom (dairy, beer, seasonings)."""
    x0, y0, x1, y1 = box
    rule = 0.06 * (y1 - y0)
    draw.rectangle(box, fill=d.label)
    draw.rectangle((x0, y0, x1, y0 + rule), fill=d.ink)
    draw.rectangle((x0, y1 - rule, x1, y1), fill=d.ink)


def _pattern_stripes(draw: ImageDraw.ImageDraw, box: Box, d: Design) -> None:
    """Horizontal stripes, label colour on body colour (soft drinks)."""
    x0, y0, x1, y1 = box
    step = (y1 - y0) / 7
    for i in range(0, 7, 2):
        draw.rectangle((x0, y0 + i * step, x1, y0 + (i + 1) * step), fill=d.label)


def _pattern_sash(draw: ImageDraw.ImageDraw, box: Box, d: Design) -> None:
    """A diagonal sash across the label (soft drinks, beer, cosmetics)."""
    x0, y0, x1, y1 = box
    lh = y1 - y0
    sash = [(x0, y0 + 0.55 * lh), (x1, y0 + 0.05 * lh), (x1, y0 + 0.4 * lh), (x0, y0 + 0.9 * lh)]
    draw.polygon(sash, fill=d.label)


def _pattern_emblem(draw: ImageDraw.ImageDraw, box: Box, d: Design) -> None:
    """A round emblem with an ink ring in the label centre."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, fill=_shade(d.body, 1.08))
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, 0.36 * min(x1 - x0, y1 - y0)
    ring = max(1, int(r / 6))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=d.label, outline=d.ink, width=ring)


def _pattern_ornate(draw: ImageDraw.ImageDraw, box: Box, d: Design) -> None:
    """Double frame and a diamond: the ornate style of liquor and premium tobacco."""
    x0, y0, x1, y1 = box
    lw, lh = x1 - x0, y1 - y0
    draw.rectangle(box, fill=d.label)
    for inset, width in ((0.05, 0.03), (0.12, 0.015)):
        m = inset * min(lw, lh)
        frame = (x0 + m, y0 + m, x1 - m, y1 - m)
        draw.rectangle(frame, outline=d.ink, width=max(1, int(width * lw)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = 0.25 * lw, 0.25 * lh
    draw.polygon([(cx, cy - ry), (cx + rx, cy), (cx, cy + ry), (cx - rx, cy)], fill=d.ink)


def _pattern_blocks(draw: ImageDraw.ImageDraw, box: Box, d: Design) -> None:
    """Big colour block over plain ground (tobacco packs, seasoning labels)."""
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, x1, y0 + 0.48 * (y1 - y0)), fill=d.label)
    draw.rectangle((x0, y0 + 0.48 * (y1 - y0), x1, y0 + 0.52 * (y1 - y0)), fill=d.ink)


def _pattern_wave(draw: ImageDraw.ImageDraw, box: Box, d: Design) -> None:
    """Lower label part under a wavy edge (dairy, cosmetics)."""
    x0, y0, x1, y1 = box
    ts = np.linspace(0.0, 1.0, 16)
    crest = [(x0 + t * (x1 - x0), y0 + (0.45 + 0.1 * math.sin(6 * t)) * (y1 - y0)) for t in ts]
    draw.polygon(crest + [(x1, y1), (x0, y1)], fill=d.label)


PATTERNS: dict[str, Callable[[ImageDraw.ImageDraw, Box, Design], None]] = {
    "band": _pattern_band,
    "stripes": _pattern_stripes,
    "sash": _pattern_sash,
    "emblem": _pattern_emblem,
    "ornate": _pattern_ornate,
    "blocks": _pattern_blocks,
    "wave": _pattern_wave,
}


def _draw_marks(draw: ImageDraw.ImageDraw, box: Box, d: Design) -> None:
    """Fake print lines, the accent stripe and the variant mark."""
    x0, y0, x1, y1 = box
    lw, lh = x1 - x0, y1 - y0
    for y, x, length in d.text:
        line = (x0 + x * lw, y0 + y * lh, x0 + (x + length) * lw, y0 + (y + 0.06) * lh)
        draw.rectangle(line, fill=d.ink)
    draw.rectangle((x0, y0 + 0.56 * lh, x1, y0 + (0.56 + 0.14 * d.cue_size) * lh), fill=d.accent)
    mx, my = MARK_SPOTS[d.mark]
    mw, mh = min(0.26 * d.cue_size, 1 - mx), min(0.2 * d.cue_size, 1 - my)  # inside the label
    draw.rectangle(
        (x0 + mx * lw, y0 + my * lh, x0 + (mx + mw) * lw, y0 + (my + mh) * lh),
        fill=d.ink,
        outline=d.accent,
        width=max(1, int(0.03 * lw)),
    )
