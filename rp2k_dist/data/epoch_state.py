"""Exact mid-epoch resume: which samples of the current epoch were consumed.

A mid-epoch checkpoint records the epoch's consumed samples as a bitmap over the split's
sample positions (the rows of :class:`~.chunks.SampleTable`, in shard order, fixed by the
manifest): one bit per sample, about 45 KB for RP2K's 350k training images. Epoch and
per-reader progress would not do: the reader layout depends on the world size, and a
reader's shuffle buffer emits its samples out of order.

A resumed run, at the same or another world size, plans the rest of the epoch from the
samples not yet consumed (:func:`rest_of_epoch`): the same chunk planner deals only
those, balanced, so every rank computes the same number of remaining steps from the
manifest and the bitmap without talking to the others. Later epochs plan normally. This
is the design of MosaicML Streaming's resumption (an elastic, deterministic sample space
and the consumed part of it), with the bitmap making it exact under shuffle buffers.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .chunks import SampleTable

TRACE_ENV = "RP2K_TRACE_KEYS"  # a folder: every rank logs the sample keys of each step (tests only)
TRACE_PACE_ENV = "RP2K_TRACE_STEP_SECONDS"  # with it, each traced step also waits this long (tests of timing)


class ConsumedSamples:
    """A bitmap over a split's sample positions: the samples this epoch already trained on."""

    def __init__(self, size: int, mask: np.ndarray | None = None):
        self.mask = np.zeros(size, bool) if mask is None else np.asarray(mask, bool).copy()
        if self.mask.shape != (size,):
            raise ValueError(f"consumed-sample mask of {self.mask.shape} for a split of {size} samples")

    def __len__(self) -> int:
        return len(self.mask)

    @property
    def count(self) -> int:
        return int(self.mask.sum())

    def mark(self, positions: Iterable[int]) -> None:
        self.mask[np.fromiter(positions, np.int64)] = True

    def update(self, other: "ConsumedSamples") -> None:
        """Add another rank's consumed samples (the union over ranks)."""
        if len(other) != len(self):
            raise ValueError(f"consumed sets over {len(other)} and {len(self)} samples")
        self.mask |= other.mask

    def to_tensor(self) -> torch.Tensor:
        """Packed bits as a uint8 tensor (loads with ``weights_only=True``)."""
        return torch.from_numpy(np.packbits(self.mask))

    @classmethod
    def from_tensor(cls, bits: torch.Tensor, size: int) -> "ConsumedSamples":
        packed = bits.cpu().numpy().astype(np.uint8)
        if len(packed) != -(-size // 8):
            raise ValueError(f"consumed-sample bitmap of {len(packed)} bytes does not fit a split of {size} samples "
                             "(the checkpoint was written for other shards or another class subset)")
        return cls(size, np.unpackbits(packed, count=size).astype(bool))


def rest_of_epoch(table: SampleTable, consumed: ConsumedSamples) -> SampleTable:
    """The samples of ``table`` (a full split) that ``consumed`` does not hold."""
    if len(consumed) != len(table):
        raise ValueError(f"consumed set over {len(consumed)} samples for a split of {len(table)}")
    return table.subset(~consumed.mask)


def epoch_state(epoch: int, global_step: int, consumed: ConsumedSamples) -> dict[str, Any]:
    """The checkpoint entry of a mid-epoch checkpoint: the epoch's index, the optimiser
    steps done so far (all epochs) and the epoch's consumed-sample bitmap."""
    return {"epoch": epoch, "global_step": global_step, "samples": len(consumed), "consumed": consumed.to_tensor()}


def consumed_of(state: dict[str, Any]) -> ConsumedSamples:
    return ConsumedSamples.from_tensor(state["consumed"], int(state["samples"]))


class KeyTrace:
    """Test instrumentation: with ``RP2K_TRACE_KEYS=<folder>`` each training process appends
    one JSON line per step (epoch, global step, the resume step it started from, the
    attempt's start time on rank 0, keys) to ``<folder>/<run name>/``; with
    ``RP2K_TRACE_STEP_SECONDS`` each step then waits that long (so a test's events fall
    inside the run). Unset in production, where :meth:`from_environment` returns None."""

    def __init__(self, folder: str | Path, rank: int, world_size: int, origin: int, attempt: int = 0,
                 pace: float = 0.0):
        self.path = Path(folder) / f"rank{rank}-{os.getpid()}-{time.time_ns()}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.head = {"rank": rank, "world_size": world_size, "origin": origin, "attempt": attempt}
        self.pace = pace

    @classmethod
    def from_environment(cls, run: str, rank: int, world_size: int, origin: int,
                         attempt: Callable[[], int] = time.time_ns) -> "KeyTrace | None":
        """``attempt()``: an id shared by the attempt's ranks (every rank calls it when tracing)."""
        folder = os.environ.get(TRACE_ENV)
        if not folder:
            return None
        return cls(Path(folder) / run, rank, world_size, origin, attempt(), float(os.environ.get(TRACE_PACE_ENV, 0)))

    def write(self, epoch: int, global_step: int, keys: Sequence[str]) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps({**self.head, "epoch": epoch, "step": global_step, "keys": list(keys)}) + "\n")
        if self.pace:
            time.sleep(self.pace)


def read_trace(folder: str | Path) -> list[dict[str, Any]]:
    """Every step line of a trace folder."""
    return [json.loads(line) for path in sorted(Path(folder).glob("*.jsonl")) for line in path.read_text().splitlines()]


def trained_steps(lines: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """The steps that count, by global step: a step trained again after a restart replaces
    the lost one (the attempt with the latest resume point at or before it wins; of two
    attempts resumed from the same point, the later)."""

    def attempt(line: dict[str, Any]) -> tuple[int, int]:
        return line["origin"], line.get("attempt", 0)

    best: dict[int, tuple[int, int]] = {}
    for line in lines:
        best[line["step"]] = max(best.get(line["step"], (-1, -1)), attempt(line))
    steps: dict[int, list[dict[str, Any]]] = {}
    for line in lines:
        if attempt(line) == best[line["step"]]:
            steps.setdefault(line["step"], []).append(line)
    return steps
