"""What a checkpoint holds: :func:`build_checkpoint` (everything needed to resume the run or to use
the model) and the random-number state, so a resumed run draws what the uninterrupted run would.

The checkpoint format itself (names, layout, loading) is :mod:`rp2k_dist.run_folder`'s.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from ..config import ExperimentConfig
from ..input_spec import InputSpec
from ..run_folder import FORMAT, VERSION
from .run_data import RunData
from .selection import SelectedEpoch


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


def build_checkpoint(
    *,
    model_without_ddp: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: ExperimentConfig,
    data: RunData,
    spec: InputSpec,
    epoch: int,
    history: list[dict[str, Any]],
    selected: SelectedEpoch | None = None,
) -> dict[str, Any]:
    """Everything needed to resume the run or to use the model (see :mod:`rp2k_dist.run_folder`);
    with ``run.select_epoch=holdout`` also the best epoch so far (``selected``)."""
    extra = {} if selected is None else {"selected": selected.to_checkpoint()}
    return {
        "format": FORMAT,
        "version": VERSION,
        "model_name": config.model.name,
        "model_args": {"num_classes": len(data.classes), **config.model.head_args()},
        "input_spec": spec.to_dict(),
        "classes": data.classes,
        "class_subset": data.class_subset,
        "config": config.to_dict(),
        "epoch": epoch,
        "model": model_without_ddp.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": lr_scheduler.state_dict(),
        "rng": rng_state(),
        "metrics": history,
        **extra,
    }
