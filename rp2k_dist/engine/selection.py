"""The epoch a run delivers (``run.select_epoch``): its last, or the one with the best top-1
on the validation split carved from train (``data.holdout``, :mod:`rp2k_dist.data.holdout`).

Choosing on validation is early stopping without stopping: every epoch trains, the weights of
the best epoch so far are kept (a CPU copy, in every checkpoint, so a resumed run chooses as
an uninterrupted one), and at the end the run evaluates, saves and hands on those weights.
Ties keep the earlier epoch (less fine-tuning for the same validation result). The test split
is never looked at before the choice is made.

This is what an API-Net specialist needs at small scale: it starts at the general model's
accuracy on its category (Table 3's (b)) and a few epochs of fine-tuning on a few hundred
images can lose what the frozen-backbone epoch gave; with ``holdout`` it keeps the epoch that
validated best instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn


@dataclass
class SelectedEpoch:
    """The best epoch so far by validation top-1 (``epoch`` is 1-based; 0 = none yet)."""

    epoch: int = 0
    top1: float = -1.0
    model: dict[str, Tensor] | None = None

    def consider(self, epoch: int, top1: float, model: nn.Module) -> bool:
        """Keep ``model``'s weights if epoch ``epoch`` validated better than every earlier
        one; returns whether it did. Every rank calls it with the same ``top1``."""
        if top1 <= self.top1:
            return False
        self.epoch, self.top1 = epoch, top1
        self.model = {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}
        return True

    def to_checkpoint(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "top1": self.top1, "model": self.model}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any] | None) -> "SelectedEpoch":
        if not saved:
            return cls()
        return cls(int(saved["epoch"]), float(saved["top1"]), saved["model"])
