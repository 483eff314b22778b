"""Where the engine runs: rank, device, checkpoints and metrics of one worker.

:func:`rp2k_dist.engine.train.train_worker` talks only to a :class:`WorkerContext`.
:class:`LocalContext` runs it in one process (tests, debugging); the Ray layer provides
the same interface on top of ``ray.train`` so the engine runs unchanged under Ray Train.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import torch

from ..storage import RunStorage
from ..data.epoch_state import checkpoint_name
from .checkpoint import FILENAME, load_checkpoint, to_bytes


class WorkerContext(Protocol):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    storage: RunStorage

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint to resume from, or None for a fresh start."""

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        """Called by every rank after each epoch; rank 0 passes the checkpoint (or None)."""


def write_metrics(storage: RunStorage, history: list[dict[str, Any]]) -> None:
    """The run's metrics history as JSON lines (rewritten whole: resumes never duplicate)."""
    storage.write_text("metrics.jsonl", "".join(json.dumps(m, sort_keys=True) + "\n" for m in history))


class LocalContext:
    """A single process: rank 0 of 1; checkpoints under ``<run>/checkpoints/epoch_NNNN``."""

    rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, storage: RunStorage, device: str | torch.device | None = None, keep: int = 2):
        self.storage = storage
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.keep = keep

    def checkpoints(self) -> list[str]:
        return [n for n in self.storage.listdir("checkpoints") if n.startswith("epoch_")]

    def latest_checkpoint(self) -> dict[str, Any] | None:
        names = self.checkpoints()
        if not names:
            return None
        return load_checkpoint(self.storage.read_bytes(f"checkpoints/{names[-1]}/{FILENAME}"))

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        if checkpoint is not None:
            self.storage.write_bytes(f"checkpoints/{checkpoint_name(checkpoint)}/{FILENAME}", to_bytes(checkpoint))
            for old in self.checkpoints()[: -self.keep]:
                self.storage.delete_dir(f"checkpoints/{old}")
