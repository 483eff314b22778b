"""Where the engine runs: rank, device, checkpoints and metrics of one worker.

:func:`rp2k_dist.engine.train.train_worker` talks only to a :class:`WorkerContext`.
:class:`LocalContext` runs it in one process (tests, debugging); the Ray layer provides
the same interface on top of ``ray.train`` so the engine runs unchanged under Ray Train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..run_folder import CHECKPOINT, checkpoint_dir_of, checkpoint_dirs, load_checkpoint, to_bytes
from ..storage import RunStorage


@dataclass(frozen=True)
class DrainNotice:
    """A node of the run is being drained (a spot/preemptible instance reclaimed, or
    ``ray drain-node``): which nodes and ranks go, and by when."""

    deadline_ms: int | None  # UNIX time in ms when the node goes; None = not given
    node_ids: list[str] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)


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

    def drain_notice(self) -> DrainNotice | None:
        """A drain notice for one of the run's nodes, or None. A collective: every rank
        calls it at the same step and gets the same answer."""


class LocalContext:
    """A single process: rank 0 of 1; checkpoints in ``<run>/epoch_NNNN/`` as under Ray Train.

    ``rank`` / ``world_size``: one rank of a ``torch.distributed`` group the caller has
    initialised on this machine (processes without Ray: benchmarks, tests); every rank reads
    the same run folder, rank 0 writes the checkpoints."""

    def __init__(self, storage: RunStorage, device: str | torch.device | None = None, keep: int = 2,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.rank, self.world_size, self.local_rank = rank, world_size, rank
        self.storage = storage
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.keep = keep

    def latest_checkpoint(self) -> dict[str, Any] | None:
        folders = checkpoint_dirs(self.storage)
        if not folders:
            return None
        return load_checkpoint(self.storage.read_bytes(f"{folders[-1]}/{CHECKPOINT}"))

    def drain_notice(self) -> DrainNotice | None:
        return None  # one process on this machine: nothing drains it

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        if checkpoint is not None:
            self.storage.write_bytes(f"{checkpoint_dir_of(checkpoint)}/{CHECKPOINT}", to_bytes(checkpoint))
            for old in checkpoint_dirs(self.storage)[: -self.keep]:
                self.storage.delete_dir(old)
