"""The optimiser, the learning-rate schedule (linear warm-up, then cosine) and the loss of a
run, and the freezing of a backbone for its first epochs."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ExperimentConfig
from ..losses import ClassBalancedLoss
from .run_data import RunData


def build_optimizer(model: nn.Module, config: ExperimentConfig, global_batch: int):
    """SGD/AdamW with the learning rate scaled linearly by the global batch size; returns
    (optimizer, head learning rate).

    A model with a backbone / head split (API-Net) gets two parameter groups: "backbone" at
    lr x ``optim.backbone_lr_scale`` and "head" at lr; other models one group "all". Weight
    decay, momentum and the fused kernels are the optimiser's defaults, so they apply to
    every group, and the schedule (:func:`warmup_cosine` through ``LambdaLR``) multiplies
    each group's own initial rate. Parameters without gradient (``model.bn=frozen``) are
    left out."""
    o = config.optim
    lr = o.lr * global_batch / o.lr_reference_batch
    model_without_ddp = getattr(model, "module", model)

    def trained(params) -> list[nn.Parameter]:
        return [p for p in params if p.requires_grad]

    if hasattr(model_without_ddp, "backbone_parameters"):
        groups = [{"params": trained(model_without_ddp.backbone_parameters()), "name": "backbone",
                   "lr": lr * o.backbone_lr_scale},
                  {"params": trained(model_without_ddp.head_parameters()), "name": "head", "lr": lr}]
    else:
        groups = [{"params": trained(model.parameters()), "name": "all"}]
    if o.optimizer == "sgd":
        kind, options = torch.optim.SGD, {"momentum": o.momentum, "weight_decay": o.weight_decay}
    else:
        kind, options = torch.optim.AdamW, {"weight_decay": o.weight_decay}
    if o.fused:
        # fused kernels: CUDA, and CPU since torch 2.4 (there 2.4-5x faster than the default
        # kernels for ResNet-34's AdamW step on 2 cores); a device without them gets the defaults
        try:
            return kind(groups, lr=lr, fused=True, **options), lr
        except RuntimeError:
            pass
    return kind(groups, lr=lr, **options), lr


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current rate of the head (``lr``; the only group of other models) and, for a
    backbone / head split, of the backbone (``backbone_lr``)."""
    rates = {"lr": optimizer.param_groups[-1]["lr"]}
    rates.update({"backbone_lr": g["lr"] for g in optimizer.param_groups if g.get("name") == "backbone"})
    return rates


def warmup_cosine(total_steps: int, warmup_steps: int, warmup_start: int = 0):
    """LR multiplier per step: cosine from 1 to 0 over the steps outside the warm-up, with
    a linear warm-up (from 1 % of the rate the cosine has there) of ``warmup_steps`` steps
    starting at step ``warmup_start``. API-Net's frozen-backbone epochs come before the
    warm-up (``warmup_start`` = their steps): the head trains at the full rate while the
    backbone is frozen, and the warm-up, if any, eases the backbone in after unfreezing."""
    cosine_steps = max(1, total_steps - warmup_steps)

    def cosine(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / cosine_steps)))

    def factor(step: int) -> float:
        if step < warmup_start:
            return cosine(step)
        if step < warmup_start + warmup_steps:
            return cosine(warmup_start) * (0.01 + 0.99 * (step - warmup_start) / max(1, warmup_steps))
        return cosine(step - warmup_steps)

    return factor


def build_criterion(config: ExperimentConfig, data: RunData) -> nn.Module:
    """The classification loss: Class-Balanced Loss with ``loss.cbl_beta``, or without
    class weights (beta 0: plain cross-entropy for the softmax variant). ``loss.criterion``
    auto: API-Net trains without class weights as its official code does (its P x K
    sampler already draws classes uniformly), the other models with the paper's CBL."""
    c = config.loss
    use_cbl = c.criterion == "cbl" or (c.criterion == "auto" and config.model.name != "apinet")
    return ClassBalancedLoss(data.train_counts, c.cbl_beta if use_cbl else 0.0, c.variant,
                             c.focal_gamma, c.label_smoothing)


def set_backbone_frozen(optimizer: torch.optim.Optimizer, frozen: bool) -> None:
    """Mark the backbone group frozen (API-Net's first epochs). The gradients are still
    computed, so DDP's buckets stay the same; :func:`_drop_frozen_grads` discards them
    before the step, and the optimiser skips parameters without a gradient entirely."""
    for group in optimizer.param_groups:
        if group.get("name") == "backbone":
            group["frozen"] = frozen


def _drop_frozen_grads(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        if group.get("frozen"):
            for param in group["params"]:
                param.grad = None
