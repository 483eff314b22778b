"""Mid-epoch checkpoints every ``run.checkpoint_every_steps`` optimiser steps.

:class:`StepCheckpoints` runs after every training step on every rank. Every N global
steps (not at an epoch's last step: the epoch-end checkpoint follows) the ranks gather
their consumed-sample bitmaps (one collective, ~45 KB per rank for RP2K), rank 0 adds
them to a full checkpoint (model, optimiser, scheduler and RNG at this exact step) and
every rank reports. A run resumed from it trains the rest of the epoch
(:func:`rp2k_dist.data.epoch_state.rest_of_epoch`) at whatever world size it has.

Every ``run.preemption_check_steps`` steps the ranks also ask whether one of the run's
nodes is being drained (:meth:`WorkerContext.drain_notice`, a collective: all ranks get
rank 0's answer at the same step, so they agree on the step boundary). On the first
notice they write the same mid-epoch checkpoint at once and rank 0 records the event
(nodes, ranks, deadline, the checkpoint, when it was saved) in ``preemptions.jsonl``.
Training then goes on: when the node goes, the run restarts from that checkpoint (or a
later one) on the nodes left, losing at most the steps since the last checkpoint; a
notice given too late to act on loses the same, no more.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from ..data.epoch_state import ConsumedSamples, epoch_state
from ..data.loader import ShardLoader
from . import distributed as dist_utils
from ..run_folder import append_preemption, checkpoint_dir
from .context import DrainNotice, WorkerContext


#: Called on every rank after every optimiser step: ``observer(epoch, global_step, keys)``
#: (the 0-based epoch, the run's optimiser steps so far, the keys the step trained on).
StepObserver = Callable[[int, int, Sequence[str]], None]


class StepCheckpoints:
    """The per-step hook of the training loop: mid-epoch checkpoints, drain notices, and
    the run's step observers."""

    def __init__(self, every: int, loader: ShardLoader, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 context: WorkerContext, build: Callable[[int], dict[str, Any]],
                 drain_check_every: int = 0, observers: Sequence[StepObserver] = ()):
        """``build(epoch)``: rank 0's checkpoint of the current state, ``epoch`` epochs done;
        ``drain_check_every``: steps between drain-notice checks (0 = none)."""
        self.every = every
        self.drain_check_every = drain_check_every
        self.drain_notice: DrainNotice | None = None  # the first notice of this attempt, acted on
        self.loader = loader
        self.scheduler = scheduler
        self.context = context
        self.build = build
        self.observers = list(observers)
        self.epoch = 0
        self.steps = 0

    @property
    def global_step(self) -> int:
        """Optimiser steps done in the whole run (the scheduler counts them)."""
        return int(self.scheduler.last_epoch)

    def start_epoch(self, epoch: int, steps: int) -> None:
        """Epoch ``epoch`` (0-based) begins; this pass has ``steps`` optimiser steps."""
        self.epoch = epoch
        self.steps = steps

    def __call__(self, step: int, keys: Sequence[str], check_finite: Callable[[], None] = lambda: None) -> None:
        """After step ``step`` (of this loader pass) trained on ``keys``; ``check_finite()``
        raises if a loss since the last check was not finite (nothing broken is saved)."""
        for observe in self.observers:
            observe(self.epoch, self.global_step, keys)
        last = step + 1 >= self.steps  # the epoch-end checkpoint follows
        if (self.drain_notice is None and self.drain_check_every
                and self.global_step % self.drain_check_every == 0):
            notice = self.context.drain_notice()
            if notice is not None:
                self.drain_notice = notice
                check_finite()
                self.save_before_drain(notice, last)
                return
        if self.every and self.global_step % self.every == 0 and not last:
            check_finite()
            self.checkpoint()

    def save_before_drain(self, notice: DrainNotice, last: bool) -> None:
        """Act on a drain notice at this step boundary (every rank): the mid-epoch
        checkpoint (at an epoch's last step the epoch-end one, next), then rank 0 logs the
        event and adds it to ``preemptions.jsonl``."""
        detected = time.time()
        extra = {} if notice.deadline_ms is None else {"drain_deadline_ms": notice.deadline_ms}
        consumed = self.checkpoint(extra) if not last else None
        if self.context.rank != 0:
            return
        saved = time.time()
        folder = (checkpoint_dir(self.epoch + 1) if last
                  else checkpoint_dir(self.epoch, self.global_step))
        left = None if notice.deadline_ms is None else notice.deadline_ms / 1000 - detected
        event = {
            "detected_at": _iso(detected), "deadline": _iso(notice.deadline_ms / 1000) if notice.deadline_ms else None,
            "seconds_left": None if left is None else round(left, 3), "node_ids": notice.node_ids,
            "ranks": notice.ranks, "world_size": self.context.world_size, "epoch": self.epoch + 1,
            "global_step": self.global_step, "checkpoint": folder,
            "saved": "epoch-end checkpoint (after evaluation)" if last else "mid-epoch checkpoint",
            "consumed": consumed, "saved_at": None if last else _iso(saved),
            "saved_before_deadline": None if last or notice.deadline_ms is None else saved * 1000 < notice.deadline_ms,
        }
        when = "no deadline given" if left is None else f"deadline {event['deadline']} ({left:.0f} s left)"
        print(f"preemption notice: node(s) {', '.join(notice.node_ids) or '?'} (ranks {notice.ranks}) drained, {when}; "
              f"epoch {self.epoch + 1} step {self.global_step}: "
              + (f"saved {folder} in {saved - detected:.1f} s" if not last else f"{folder} follows at the epoch end"),
              flush=True)
        append_preemption(self.context.storage, event)

    def checkpoint(self, extra: dict[str, Any] | None = None) -> int:
        """Every rank: gather the consumed samples, rank 0 builds the checkpoint, all
        report it (with ``extra`` metrics). Returns the epoch's consumed samples."""
        consumed = ConsumedSamples(len(self.loader.consumed))
        for packed in dist_utils.all_gather_objects(np.packbits(self.loader.consumed.mask)):
            consumed.update(ConsumedSamples(len(consumed), np.unpackbits(packed, count=len(consumed)).astype(bool)))
        state = None
        if self.context.rank == 0:
            state = self.build(self.epoch)
            state["epoch_state"] = epoch_state(self.epoch, self.global_step, consumed)
        self.context.report({"epoch": self.epoch, "global_step": self.global_step, "consumed": consumed.count,
                             "world_size": self.context.world_size, **(extra or {})}, state)
        return consumed.count


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")
