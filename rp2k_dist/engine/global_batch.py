"""A fixed global batch: the optimisation does not depend on how many workers are alive.

``optim.global_batch`` (G) is the experiment's batch. On W live workers each worker
trains ``accumulation`` micro-batches of ``micro_batch`` images per optimiser step
(at most ``data.batch_size``: what fits in memory), gradients summed locally and
all-reduced once per step (DDP's ``no_sync`` on the other micro-steps), so every
optimiser step averages the gradient over G images on 1, 2 or 7 workers alike. The
steps per epoch (``samples // G``) and the learning rate (``optim.lr x G /
optim.lr_reference_batch``) come from G alone, so the schedule is the same at any
world size, after an elastic resize included.

When G images cannot be split evenly (G = 256 on 7 workers), the rule is: each worker
takes ``G // W`` images per step (at most ``W - 1`` images of G unused), cut into
``ceil((G // W) / data.batch_size)`` equal micro-batches of ``(G // W) // accumulation``
images (rounding down again). The effective batch ``micro_batch x accumulation x W``
(252 in that example) is what each step trains on; it is reported in every epoch's
metrics (``global_batch``, beside ``global_batch_target``), while the steps per epoch
and the learning rate stay those of G.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """How one optimiser step's images are shared among ``world_size`` workers."""

    target: int  # optim.global_batch (or data.batch_size x workers without one)
    world_size: int
    micro_batch: int  # images per worker per forward/backward
    accumulation: int  # micro-batches per worker per optimiser step
    fixed: bool  # optim.global_batch is set (steps and LR independent of the world size)

    @property
    def per_worker(self) -> int:
        return self.micro_batch * self.accumulation

    @property
    def effective(self) -> int:
        """Images in one optimiser step over all workers."""
        return self.per_worker * self.world_size

    def steps_per_epoch(self, samples: int) -> int:
        """Optimiser steps of an epoch over ``samples`` training samples (partial last step dropped)."""
        return samples // self.target

    def to_metrics(self) -> dict[str, int]:
        return {"global_batch": self.effective, "global_batch_target": self.target,
                "micro_batch": self.micro_batch, "accumulation_steps": self.accumulation}


def plan_batch(global_batch: int, world_size: int, max_micro_batch: int) -> BatchPlan:
    """The split of ``global_batch`` (0: ``max_micro_batch`` per worker, no accumulation)
    over ``world_size`` workers with micro-batches of at most ``max_micro_batch`` images."""
    if world_size < 1 or max_micro_batch < 1:
        raise ValueError(f"world size {world_size} and micro-batch {max_micro_batch} must be >= 1")
    if not global_batch:
        return BatchPlan(max_micro_batch * world_size, world_size, max_micro_batch, 1, fixed=False)
    per_worker = global_batch // world_size
    if per_worker < 1:
        raise ConfigError(f"optim.global_batch {global_batch} cannot give each of {world_size} workers an image; "
                          "raise it or lower run.workers")
    accumulation = math.ceil(per_worker / max_micro_batch)
    return BatchPlan(global_batch, world_size, per_worker // accumulation, accumulation, fixed=True)
