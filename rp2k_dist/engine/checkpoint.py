"""Self-describing checkpoints: everything needed to resume a run or to use the model.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads
with ``torch.load(..., weights_only=True)`` (no pickled code runs on load).
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import torch

FORMAT = "rp2k-dist-checkpoint"
VERSION = 1
FILENAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A file that is not a checkpoint of this project (or of an unknown version)."""


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_bytes(checkpoint: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def load_checkpoint(source: str | Path | bytes, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint file (or its bytes) with ``weights_only=True``."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            path = path / FILENAME
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} not found")
        data = torch.load(path, map_location=map_location, weights_only=True)
    else:
        data = torch.load(io.BytesIO(source), map_location=map_location, weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{source if not isinstance(source, bytes) else 'data'} is not an rp2k-dist checkpoint")
    if data.get("version") != VERSION:
        raise CheckpointError(f"checkpoint version {data.get('version')} is not {VERSION}")
    return data
