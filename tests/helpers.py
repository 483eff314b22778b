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


def untrained_run(config, folder: Path, crop: int = 32) -> dict:
    """An epoch-1 checkpoint of a freshly initialised ResNet-34 (seed 0) for ``config``,
    written into run folder ``folder``: a run the evaluation commands can load, in seconds.
    Returns the data selection and the checkpoint."""
    import torch

    from rp2k_dist.engine.checkpoint import build_checkpoint
    from rp2k_dist.engine.run_data import select_data
    from rp2k_dist.models import create_model, input_spec
    from rp2k_dist.run_folder import checkpoint_dir, to_bytes

    data = select_data(config)
    torch.manual_seed(0)
    model = create_model("resnet34", len(data.classes), **config.model.head_args())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint = build_checkpoint(model_without_ddp=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
                                  data=data, spec=input_spec("resnet34", crop), epoch=1, history=[])
    (folder / checkpoint_dir(1)).mkdir(parents=True)
    (folder / checkpoint_dir(1) / "checkpoint.pt").write_bytes(to_bytes(checkpoint))
    return {"data": data, "checkpoint": checkpoint}
