"""TensorBoard event files next to ``metrics.jsonl`` (rank 0; ``<run>/tensorboard``).

Every numeric value of an epoch's metrics row becomes a scalar of the same name at step
``epoch``, so the two records hold the same numbers. A resumed run opens its writer with
``purge_step`` = the first epoch it trains: TensorBoard then drops what a crashed attempt
wrote for those epochs, and no epoch is shown twice. Object storage gets a copy of the
event files after every epoch (it cannot append).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from .. import run_folder
from ..storage import RunStorage

TENSORBOARD_DIR = run_folder.TENSORBOARD


class ScalarLog:
    """One TensorBoard writer for one training attempt of a run."""

    def __init__(self, storage: RunStorage, first_epoch: int):
        from tensorboardX import SummaryWriter

        self.storage = storage
        local = storage.local_path(TENSORBOARD_DIR)
        self._tmp = None if local is not None else tempfile.TemporaryDirectory()
        self.folder = Path(local if local is not None else self._tmp.name)
        self.writer = SummaryWriter(str(self.folder), purge_step=first_epoch if first_epoch > 1 else None,
                                    flush_secs=3600)

    def log(self, metrics: dict[str, Any]) -> None:
        """The epoch's numeric metrics as scalars at step ``metrics["epoch"]``."""
        step = int(metrics["epoch"])
        for name, value in sorted(metrics.items()):
            if name != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()
        if self._tmp is not None:
            for path in self.folder.iterdir():
                self.storage.write_bytes(f"{TENSORBOARD_DIR}/{path.name}", path.read_bytes())

    def close(self) -> None:
        self.writer.close()
        if self._tmp is not None:
            self._tmp.cleanup()
