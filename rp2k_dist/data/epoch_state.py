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

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .chunks import SampleTable


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
