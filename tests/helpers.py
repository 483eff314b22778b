"""Helpers for tests: small images written on the spot."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 64), mode: str = "RGB") -> Path:
    """A random-noise image of ``size`` (w, h) saved by extension (.jpg/.png)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "RGBA":
        alpha = np.full((size[1], size[0]), 255, np.uint8)
        alpha[: size[1] // 2] = 0  # top half fully transparent
        image = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    elif mode == "P":
        image = image.quantize(16)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 64)) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def after_epoch(config, epoch: int, action):
    """Run ``action()`` in a thread once the run's metrics.jsonl reaches ``epoch``
    (a fault injected mid-run, while the driver is blocked in ``fit``)."""
    import threading
    import time

    from rp2k_dist.launch.trainer import read_metrics

    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any(m["epoch"] >= epoch for m in read_metrics(config)):
                action()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread
