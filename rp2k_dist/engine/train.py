"""The training engine: one function per worker, with or without Ray.

``train_worker(config, context)`` reads the shards, builds the model, loss and
optimiser from the config, resumes from the context's latest checkpoint, runs the epoch
loop (train, evaluate, report, checkpoint) and leaves the evaluation artefacts
(predictions, accuracy tables) in the run folder. Written in the spirit of torchvision's
``references/classification/train.py``: plain functions, read top to bottom.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import ExperimentConfig, parse_meta_category
from ..data.loader import LoaderConfig, ShardLoader
from ..data.manifest import Manifest
from ..data.transforms import EvalTransform, RawJpeg, TrainTransform
from .batches import CpuBatches, DeviceBatches
from ..evaluation.inference import autocast, predict_batches
from ..evaluation.metrics import accuracy_table, confused_pairs
from ..evaluation.predictions import Predictions
from ..losses import ClassBalancedLoss
from ..input_spec import InputSpec
from ..models import create_model, input_spec
from .. import run_folder
from ..run_folder import FORMAT, VERSION, write_metrics
from ..storage import RunStorage
from . import distributed as dist_utils
from .checkpoint import rng_state, set_rng_state
from .context import WorkerContext


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite: the run stops instead of saving a broken model."""


@dataclass
class RunData:
    """The dataset as this run sees it (a specialist sees a subset of classes)."""

    manifest: Manifest
    class_subset: list[int] | None  # global indices, in the run's label order
    classes: list[dict[str, Any]]  # the run's class table, "index" = run label
    train_counts: list[int]


def select_data(config: ExperimentConfig) -> RunData:
    manifest = Manifest.load(config.data.shards)
    subset = None
    if config.data.meta_category:
        subset = manifest.classes_of(*parse_meta_category(config.data.meta_category))
    chosen = subset if subset is not None else list(range(manifest.num_classes))
    classes = [{**manifest.classes[g], "index": i, "global_index": g} for i, g in enumerate(chosen)]
    counts = manifest.class_counts("train")
    return RunData(manifest, subset, classes, [counts[g] for g in chosen])


def uses_device_decode(config: ExperimentConfig, device: torch.device) -> bool:
    """Decode and augment on the accelerator (``data.decode``: auto = when on CUDA)."""
    return config.data.decode == "device" or (config.data.decode == "auto" and device.type == "cuda")


#: Turns a loader batch into (normalised images, labels) on the device and the samples' keys.
BatchToDevice = Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor, list[str]]]


def build_batches(
    config: ExperimentConfig, spec: InputSpec, device: torch.device, rank: int
) -> tuple[BatchToDevice, BatchToDevice]:
    """(train, eval) callables turning loader batches into device tensors."""
    channels_last = config.model.channels_last
    if uses_device_decode(config, device):
        seed = config.run.seed * 1000 + rank
        return (DeviceBatches(spec, config.augment, device, channels_last, seed),
                DeviceBatches(spec, None, device, channels_last, seed))
    return CpuBatches(spec, device, channels_last), CpuBatches(spec, device, channels_last)


def build_loaders(config: ExperimentConfig, data: RunData, spec: InputSpec, rank: int, world: int, device: torch.device):
    c = config.data
    raw = uses_device_decode(config, device)
    common = dict(data=c, seed=config.run.seed, pin_memory=device.type == "cuda")
    balanced = (c.classes_per_batch, c.images_per_class) if c.classes_per_batch else None
    train = ShardLoader(data.manifest, "train", RawJpeg() if raw else TrainTransform(spec, config.augment),
                        LoaderConfig(**common), rank, world, train=True,
                        classes=data.class_subset, class_balanced=balanced)
    evaluation = ShardLoader(data.manifest, "test", RawJpeg() if raw else EvalTransform(spec),
                             LoaderConfig(evaluation=True, **common),
                             rank, world, train=False, classes=data.class_subset)
    return train, evaluation


def build_optimizer(model: nn.Module, config: ExperimentConfig, global_batch: int, cuda: bool):
    """SGD/AdamW with the learning rate scaled linearly by the global batch size."""
    o = config.optim
    lr = o.lr * global_batch / o.lr_reference_batch
    model_without_ddp = getattr(model, "module", model)
    if hasattr(model_without_ddp, "backbone_parameters"):
        groups = [{"params": list(model_without_ddp.backbone_parameters()), "name": "backbone"},
                  {"params": list(model_without_ddp.head_parameters()), "name": "head"}]
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "all"}]
    fused = {"fused": True} if (o.fused and cuda) else {}
    if o.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, **fused)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=o.weight_decay, **fused)
    return optimizer, lr


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier per step: linear warmup from 1 %, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return 0.01 + 0.99 * step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


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


def train_one_epoch(
    *,
    model: nn.Module,
    model_without_ddp: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    data_loader: ShardLoader,
    batch_to_device: BatchToDevice,
    device: torch.device,
    config: ExperimentConfig,
    epoch: int,
) -> dict[str, float]:
    """One pass over this rank's batches; returns metrics summed over all ranks.

    ``model`` is what the step runs (DDP and/or compiled); ``model_without_ddp`` the plain
    module underneath, whose ``loss``/``logits`` know the model's output (torchvision's name).
    """
    model.train()
    loss_sum = correct = seen = 0.0
    start = time.perf_counter()
    for step, batch in enumerate(data_loader):
        images, labels, _ = batch_to_device(batch)
        with autocast(device, config.optim.amp):
            output = model(images, labels)  # API-Net pairs images by label; others ignore it
            loss = model_without_ddp.loss(output, labels, criterion)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at epoch {epoch} step {step}: lower optim.lr, set optim.grad_clip, "
                "or check the data; checkpoints up to the previous epoch are intact"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        _drop_frozen_grads(optimizer)
        optimizer.step()
        lr_scheduler.step()
        with torch.no_grad():
            logits = model_without_ddp.logits(output)
            correct += (logits.argmax(1) == labels).sum().item()
        loss_sum += loss.item() * len(labels)
        seen += len(labels)
    elapsed = time.perf_counter() - start
    skipped = data_loader.stats.skipped + getattr(batch_to_device, "skipped", 0)
    loss_sum, correct, seen, skipped = dist_utils.all_reduce_sum([loss_sum, correct, seen, skipped], device)
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_top1": 100.0 * correct / max(seen, 1),
        "train_images": int(seen),
        "train_skipped": int(skipped),
        "images_per_second": seen / max(elapsed, 1e-9),
        "epoch_seconds": elapsed,
    }


def evaluate(
    model: nn.Module, data_loader: ShardLoader, batch_to_device: BatchToDevice, device: torch.device,
    classes: list[dict[str, Any]],
) -> tuple[dict[str, float], Predictions | None]:
    """Evaluate on every test sample exactly once; rank 0 gets the gathered predictions."""
    dist_utils.broadcast_buffers(model)  # every rank evaluates the model rank 0 checkpoints
    local = predict_batches(model, map(batch_to_device, data_loader), device)
    gathered = [p for p in dist_utils.all_gather_objects(local) if p is not None]
    if not dist_utils.is_main_process():
        return {}, None
    predictions = Predictions.concat(gathered)
    table = accuracy_table(predictions, classes)
    return {"val_top1": table.overall.top1, "val_top5": table.overall.top5,
            "val_macro_top1": table.macro.top1, "val_samples": table.overall.samples}, predictions


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
) -> dict[str, Any]:
    """Everything needed to resume the run or to use the model (see :mod:`rp2k_dist.run_folder`)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "model_name": config.model.name,
        "model_args": {"num_classes": len(data.classes)},
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
    }


def save_evaluation(storage: RunStorage, predictions: Predictions, data: RunData, metrics: dict[str, Any]) -> None:
    """Predictions as Parquet, Table 2 (JSON + Markdown) and the most-confused pairs."""
    import tempfile
    from pathlib import Path

    table = accuracy_table(predictions, data.classes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / run_folder.PREDICTIONS
        predictions.to_parquet(path, data.classes)
        storage.write_bytes(run_folder.PREDICTIONS, path.read_bytes())
    evaluation = {"table2": table.to_dict(), "confused_pairs": confused_pairs(predictions, data.classes),
                  "final": metrics}
    storage.write_text(run_folder.EVALUATION, json.dumps(evaluation, indent=1, ensure_ascii=False, default=float))
    storage.write_text(run_folder.TABLE2, table.to_markdown() + "\n")


def train_worker(
    config: ExperimentConfig, context: WorkerContext, on_finish: Callable[[nn.Module], None] | None = None
) -> dict[str, Any]:
    """Train (or resume) one run on this worker; returns the last epoch's metrics.
    ``on_finish(model)`` runs on every rank after the last epoch."""
    torch.manual_seed(config.run.seed + context.rank)
    device = context.device
    cuda = device.type == "cuda"
    data = select_data(config)
    spec = input_spec(config.model.name, config.model.crop_size or None)
    train_loader, eval_loader = build_loaders(config, data, spec, context.rank, context.world_size, device)
    train_to_device, eval_to_device = build_batches(config, spec, device, context.rank)

    model_without_ddp = create_model(config.model.name, len(data.classes), pretrained=config.model.pretrained or None,
                        weights=config.model.weights or None)
    model_without_ddp.to(device)
    if config.model.channels_last:
        model_without_ddp.to(memory_format=torch.channels_last)
    model: nn.Module = model_without_ddp
    if context.world_size > 1:
        model = DistributedDataParallel(model_without_ddp, device_ids=[device.index] if cuda else None,
                                        gradient_as_bucket_view=True)
    if config.model.compile:
        model = torch.compile(model)
    criterion = ClassBalancedLoss(data.train_counts, config.loss.cbl_beta, config.loss.variant,
                                  config.loss.focal_gamma, config.loss.label_smoothing).to(device)

    global_batch = train_loader.dataset.batch_size * context.world_size
    optimizer, base_lr = build_optimizer(model_without_ddp, config, global_batch, cuda)
    steps_per_epoch = len(train_loader)
    total = steps_per_epoch * config.optim.epochs
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, round(config.optim.warmup_epochs * steps_per_epoch)))

    history: list[dict[str, Any]] = []
    start_epoch = 0
    checkpoint = context.latest_checkpoint()
    if checkpoint is not None:
        model_without_ddp.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"])
        start_epoch, history = checkpoint["epoch"], list(checkpoint["metrics"])
    if context.rank == 0:
        context.storage.write_text(run_folder.CONFIG, config.to_yaml())

    metrics: dict[str, Any] = history[-1] if history else {}
    for epoch in range(start_epoch, config.optim.epochs):
        train_loader.set_epoch(epoch)
        set_backbone_frozen(optimizer, epoch < config.model.freeze_backbone_epochs)
        metrics = {"epoch": epoch + 1, "lr": optimizer.param_groups[-1]["lr"], "global_batch": global_batch,
                   **train_one_epoch(model=model, model_without_ddp=model_without_ddp, criterion=criterion,
                                     optimizer=optimizer, lr_scheduler=lr_scheduler, data_loader=train_loader,
                                     batch_to_device=train_to_device, device=device, config=config, epoch=epoch)}
        last = epoch + 1 == config.optim.epochs
        predictions = None
        if (epoch + 1) % config.run.eval_every == 0 or last:
            val, predictions = evaluate(model_without_ddp, eval_loader, eval_to_device, device, data.classes)
            metrics.update(val)
        metrics["world_size"] = context.world_size
        if epoch == start_epoch and start_epoch > 0:
            metrics["resumed_from_epoch"] = start_epoch
        history.append(metrics)
        save = context.rank == 0 and ((epoch + 1) % config.run.checkpoint_every == 0 or last)
        if context.rank == 0:
            write_metrics(context.storage, history)
            if last and predictions is not None:
                save_evaluation(context.storage, predictions, data, metrics)
        state = build_checkpoint(
            model_without_ddp=model_without_ddp, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config,
            data=data, spec=spec, epoch=epoch + 1, history=history) if save else None
        context.report(metrics, state)
    if on_finish is not None:
        on_finish(model_without_ddp)
    return metrics
