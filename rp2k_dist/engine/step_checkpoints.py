"""Mid-epoch checkpoints every ``run.checkpoint_every_steps`` optimiser steps.

:class:`StepCheckpoints` runs after every training step on every rank. Every N global
steps (not at an epoch's last step: the epoch-end checkpoint follows) the ranks gather
their consumed-sample bitmaps (one collective, ~45 KB per rank for RP2K), rank 0 adds
them to a full checkpoint (model, optimiser, scheduler and RNG at this exact step) and
every rank reports. A run resumed from it trains the rest of the epoch
(:func:`rp2k_dist.data.epoch_state.rest_of_epoch`) at whatever world size it has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..data.epoch_state import ConsumedSamples, KeyTrace, epoch_state
from ..data.loader import ShardLoader
from . import distributed as dist_utils
from .context import WorkerContext


class StepCheckpoints:
    """The per-step hook of the training loop (mid-epoch checkpoints, the test key trace)."""

    def __init__(self, every: int, loader: ShardLoader, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 context: WorkerContext, build: Callable[[int], dict[str, Any]], run: str = ""):
        """``build(epoch)``: rank 0's checkpoint of the current state, ``epoch`` epochs done."""
        self.every = every
        self.loader = loader
        self.scheduler = scheduler
        self.context = context
        self.build = build
        self.trace = KeyTrace.from_environment(run, context.rank, context.world_size, self.global_step)
        self.epoch = 0
        self.steps = 0

    @property
    def global_step(self) -> int:
        """Optimiser steps done in the whole run (the scheduler counts them)."""
        return int(self.scheduler.last_epoch)

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.steps = len(self.loader)

    def __call__(self, step: int, keys: Sequence[str], check_finite: Callable[[], None] = lambda: None) -> None:
        """After step ``step`` (of this loader pass) trained on ``keys``; ``check_finite()``
        raises if a loss since the last check was not finite (nothing broken is saved)."""
        if self.trace is not None:
            self.trace.write(self.epoch, self.global_step, keys)
        if self.every and self.global_step % self.every == 0 and step + 1 < self.steps:
            check_finite()
            self.checkpoint()

    def checkpoint(self) -> None:
        consumed = ConsumedSamples(len(self.loader.consumed))
        for packed in dist_utils.all_gather_objects(np.packbits(self.loader.consumed.mask)):
            consumed.update(ConsumedSamples(len(consumed), np.unpackbits(packed, count=len(consumed)).astype(bool)))
        state = None
        if self.context.rank == 0:
            state = self.build(self.epoch)
            state["epoch_state"] = epoch_state(self.epoch, self.global_step, consumed)
        self.context.report({"epoch": self.epoch, "global_step": self.global_step, "consumed": consumed.count,
                             "world_size": self.context.world_size}, state)
