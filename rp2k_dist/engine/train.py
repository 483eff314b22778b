"""The training engine: one function per worker, with or without Ray.

``train_worker(config, context)`` reads the shards, builds the model, loss and
optimiser from the config, resumes from the context's latest checkpoint, runs the epoch
loop (train, evaluate, report, checkpoint) and leaves the evaluation artefacts
(predictions, accuracy tables) in the run folder. Written in the spirit of torchvision's
``references/classification/train.py``: plain functions, read top to bottom; the data and
loaders are built in :mod:`.run_data`, the optimiser, schedule and loss in :mod:`.optim`, the
checkpoint in :mod:`.checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError, ExperimentConfig
from ..data.loader import ShardLoader
from ..evaluation.inference import autocast, predict_batches
from ..evaluation.metrics import accuracy_table, confused_pairs
from ..evaluation.predictions import Predictions
from .. import run_folder
from ..models import create_model, input_spec, load_weights_file
from ..run_folder import write_metrics
from ..storage import RunStorage, display
from . import distributed as dist_utils
from ..data.epoch_state import consumed_of
from .checkpoint import build_checkpoint, set_rng_state
from .batchnorm import batchnorm_eval, prepare_batchnorm, synced_layers
from .context import WorkerContext
from .global_batch import plan_batch
from .scalars import ScalarLog
from .selection import SelectedEpoch
from .step_checkpoints import StepCheckpoints, StepObserver
from ..errors import NonFiniteLossError
from .optim import (
    _drop_frozen_grads, build_criterion, build_optimizer, learning_rates, set_backbone_frozen,
    warmup_cosine,
)
from .run_data import (
    BatchToDevice, RunData, build_batches, build_holdout_loader, build_loaders, select_data,
)


CHECK_EVERY_STEPS = 50
"""Steps between reads of the on-device metrics (the non-finite check among them): the
only host-device synchronisation of the training loop besides the end of the epoch."""


class _StepMetrics:
    """Loss sum, correct predictions and the first non-finite step, accumulated on the
    device: a step never waits for the device, so the host can queue the next step's
    work while the accelerator runs this one."""

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), math.inf, device=device)  # step index, inf = none yet
        self.bad_loss = torch.zeros((), device=device)
        self.seen = 0
        self.checked_to = 0  # steps [0, checked_to) are known to be finite

    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        loss = loss.detach()
        bad = ~torch.isfinite(loss)
        new_bad = bad & torch.isinf(self.first_bad)
        self.first_bad = torch.where(new_bad, float(step), self.first_bad)
        self.bad_loss = torch.where(new_bad, loss.float(), self.bad_loss)
        self.loss_sum += loss.double() * labels.shape[0]
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen += labels.shape[0]

    def check_finite(self, steps_done: int, epoch: int) -> None:
        """Raise :class:`NonFiniteLossError` naming the first bad step of those since the
        last check (one synchronisation)."""
        first_bad = self.first_bad.item()
        if math.isfinite(first_bad):
            raise NonFiniteLossError(
                f"loss is {self.bad_loss.item()} at epoch {epoch} step {int(first_bad)} (checked over steps "
                f"{self.checked_to}-{steps_done - 1}): lower optim.lr, set optim.grad_clip, "
                "or check the data; checkpoints up to the previous epoch are intact"
            )
        self.checked_to = steps_done


StepHook = Callable[[int, list[str], Callable[[], None]], None]


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
    on_step: Callable[[int, int, int], None] | None = None,
    after_step: StepHook | None = None,
    accumulation: int = 1,
) -> dict[str, float]:
    """One pass over this rank's batches; returns metrics summed over all ranks.

    ``model`` is what the step runs (DDP and/or compiled); ``model_without_ddp`` the plain
    module underneath, whose ``loss``/``logits`` know the model's output (torchvision's name).
    ``on_step(epoch, step, steps)`` (1-based) runs after each step, for progress displays;
    ``after_step(step, keys, check_finite)`` after each optimiser step (mid-epoch
    checkpoints, which call ``check_finite()`` before saving), with the keys of all its
    micro-batches. ``accumulation``: micro-batches per optimiser step (a fixed global
    batch on few workers); their gradients are summed locally and DDP all-reduces only on
    the last one (``no_sync`` on the others), so a step averages over the global batch.

    Nothing in a step reads a device tensor on the host; the metrics are read every
    :data:`CHECK_EVERY_STEPS` steps and at the end of the epoch.
    """
    model.train()
    if config.model.bn == "frozen":
        batchnorm_eval(model_without_ddp)
    metrics = _StepMetrics(device)
    steps = 0
    start = time.perf_counter()
    total_steps = len(data_loader) // accumulation if on_step is not None else 0
    step_keys: list[str] = []
    for micro, batch in enumerate(data_loader):
        images, labels, keys = batch_to_device(batch)
        last_micro = (micro + 1) % accumulation == 0
        if micro % accumulation == 0:
            optimizer.zero_grad(set_to_none=True)
        # DDP all-reduces on the step's last micro-batch only; the others accumulate locally
        with contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync():
            with autocast(device, config.optim.amp):
                output = model(images, labels)  # API-Net pairs images by label; others ignore it
                loss = model_without_ddp.loss(output, labels, criterion)
            (loss / accumulation if accumulation > 1 else loss).backward()
        with torch.no_grad():
            metrics.add(micro, loss, model_without_ddp.logits(output), labels)
        step_keys.extend(keys)
        if not last_micro:
            continue
        if config.optim.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        _drop_frozen_grads(optimizer)
        optimizer.step()
        lr_scheduler.step()
        step, steps = steps, steps + 1
        if steps % CHECK_EVERY_STEPS == 0:
            metrics.check_finite(micro + 1, epoch)
        if after_step is not None:
            after_step(step, step_keys, lambda: metrics.check_finite(micro + 1, epoch))
        step_keys = []
        if on_step is not None:
            on_step(epoch + 1, steps, total_steps)
    metrics.check_finite(micro + 1 if steps else 0, epoch)
    elapsed = time.perf_counter() - start
    skipped = data_loader.stats.skipped + getattr(batch_to_device, "skipped", 0)
    loss_sum, correct, seen, skipped = dist_utils.all_reduce_sum(
        [metrics.loss_sum.item(), metrics.correct.item(), metrics.seen, skipped], device)
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


def select_on_holdout(
    selected: SelectedEpoch, epoch: int, model: nn.Module, holdout_loader: ShardLoader, batch_to_device: BatchToDevice,
    device: torch.device, classes: list[dict[str, Any]],
) -> dict[str, float]:
    """Evaluate epoch ``epoch`` (1-based) on the validation split and keep its weights in
    ``selected`` if it is the best so far (``run.select_epoch=holdout``); every rank takes the
    same decision, from rank 0's top-1. Returns the holdout metrics and the epoch kept so far."""
    val, _ = evaluate(model, holdout_loader, batch_to_device, device, classes)
    top1, = dist_utils.all_reduce_sum([val.get("val_top1", 0.0)], device)  # only rank 0 has it
    selected.consider(epoch, top1, model)
    return {"holdout_top1": top1, **({"holdout_top5": val["val_top5"], "holdout_samples": val["val_samples"]}
                                     if val else {}), "selected_epoch": selected.epoch}


def validation_gap(history: list[dict[str, Any]], test_top1: float) -> dict[str, Any] | None:
    """How far the validation split (``data.holdout``) read from test in a run that chose its
    epoch on it: top-1 on both at the delivered epoch and per epoch (points, validation minus
    test); None for a run that did not select on validation."""
    last = history[-1] if history else {}
    if "selected_epoch" not in last:
        return None
    chosen = next((m for m in history if m["epoch"] == last["selected_epoch"]), {})
    per_epoch = [{"epoch": m["epoch"], "validation_top1": m["holdout_top1"], "test_top1": m["val_top1"],
                  "gap": m["holdout_top1"] - m["val_top1"]} for m in history if "holdout_top1" in m and "val_top1" in m]
    return {"selected_epoch": last["selected_epoch"], "validation_top1": chosen.get("holdout_top1"),
            "validation_images": chosen.get("holdout_samples"), "test_top1": test_top1,
            "gap": None if chosen.get("holdout_top1") is None else chosen["holdout_top1"] - test_top1,
            "per_epoch": per_epoch}


def save_evaluation(storage: RunStorage, predictions: Predictions, data: RunData, metrics: dict[str, Any],
                    history: list[dict[str, Any]] | None = None) -> None:
    """Predictions as Parquet, Table 2 (JSON + Markdown), the most-confused pairs and, for a
    run that chose its epoch on validation, the validation-test gap."""
    import tempfile
    from pathlib import Path

    table = accuracy_table(predictions, data.classes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / run_folder.PREDICTIONS
        predictions.to_parquet(path, data.classes)
        storage.write_bytes(run_folder.PREDICTIONS, path.read_bytes())
    evaluation = {"table2": table.to_dict(), "confused_pairs": confused_pairs(predictions, data.classes),
                  "final": metrics}
    gap = validation_gap(history or [metrics], table.overall.top1)
    if gap is not None:
        evaluation["validation_gap"] = gap
    storage.write_text(run_folder.EVALUATION, json.dumps(evaluation, indent=1, ensure_ascii=False, default=float))
    storage.write_text(run_folder.TABLE2, table.to_markdown() + "\n")


def train_worker(
    config: ExperimentConfig, context: WorkerContext, on_finish: Callable[[nn.Module], None] | None = None,
    on_step: Callable[[int, int, int], None] | None = None, observers: Sequence[StepObserver] = (),
) -> dict[str, Any]:
    """Train (or resume) one run on this worker; returns the last epoch's metrics.
    ``on_finish(model)`` runs on every rank after the last epoch; ``on_step`` as in
    :func:`train_one_epoch`; each of ``observers`` sees every optimiser step's keys on every
    rank (:data:`~rp2k_dist.engine.step_checkpoints.StepObserver`)."""
    torch.manual_seed(config.run.seed + context.rank)
    device = context.device
    cuda = device.type == "cuda"
    data = select_data(config)
    spec = input_spec(config.model.name, config.model.crop_size or None)
    c = config.data
    batches = plan_batch(config.optim.global_batch, context.world_size,
                         c.classes_per_batch * c.images_per_class if c.classes_per_batch else c.batch_size)
    train_loader, eval_loader = build_loaders(config, data, spec, context.rank, context.world_size, device, batches)
    train_to_device, eval_to_device = build_batches(config, spec, device)
    selecting = config.run.select_epoch == "holdout"
    holdout_loader = build_holdout_loader(config, data, spec, context.rank, context.world_size, device) \
        if selecting else None

    model_without_ddp = create_model(config.model.name, len(data.classes), pretrained=config.model.pretrained or None,
                                     **config.model.head_args())
    if config.model.weights:
        # a specialist takes the general classifier's rows of its classes, by global index
        report = load_weights_file(model_without_ddp, config.model.weights,
                                   classes=[c["global_index"] for c in data.classes],
                                   partial=config.model.partial_weights)
        if context.rank == 0:
            print(report.summary(), flush=True)
            context.storage.write_text(run_folder.WEIGHTS_LOAD, json.dumps(report.to_dict(), indent=1))
    model_without_ddp.to(device)
    if config.model.channels_last:
        model_without_ddp.to(memory_format=torch.channels_last)
    model_without_ddp = prepare_batchnorm(model_without_ddp, config.model.bn, context.world_size, device)
    synced = synced_layers(model_without_ddp)
    model: nn.Module = model_without_ddp
    if context.world_size > 1:
        model = DistributedDataParallel(model_without_ddp, device_ids=[device.index] if cuda else None,
                                        gradient_as_bucket_view=True)
    if config.model.compile:
        model = torch.compile(model)
    criterion = build_criterion(config, data).to(device)

    # the learning rate and the schedule's steps come from the global batch alone, so with
    # optim.global_batch they are the same at any world size (rp2k_dist.engine.global_batch)
    optimizer, base_lr = build_optimizer(model_without_ddp, config, batches.target)
    steps_per_epoch = train_loader.steps_per_epoch if batches.fixed else len(train_loader)
    total = steps_per_epoch * config.optim.epochs
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        total, round(config.optim.warmup_epochs * steps_per_epoch), config.model.freeze_backbone_epochs * steps_per_epoch))

    history: list[dict[str, Any]] = []
    start_epoch = 0
    partial = None  # the consumed samples of an epoch interrupted after a mid-epoch checkpoint
    selected = SelectedEpoch() if selecting else None
    checkpoint = context.latest_checkpoint()
    if checkpoint is not None:
        mismatch = run_folder.resume_mismatch(checkpoint, config.model.name, [c["name"] for c in data.classes])
        if mismatch:
            raise ConfigError(f"run folder {display(context.storage.uri)} cannot be resumed: {mismatch}; "
                              "give another run.name, or remove that run folder to start afresh")
        model_without_ddp.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"])
        start_epoch, history = checkpoint["epoch"], list(checkpoint["metrics"])
        partial = checkpoint.get("epoch_state")
        if selecting:
            selected = SelectedEpoch.from_checkpoint(checkpoint.get("selected"))
    scalars = ScalarLog(context.storage, start_epoch + 1) if context.rank == 0 else None
    if context.rank == 0:
        context.storage.write_text(run_folder.CONFIG, config.to_yaml())

    metrics: dict[str, Any] = history[-1] if history else {}
    step_hook = StepCheckpoints(config.run.checkpoint_every_steps, train_loader, lr_scheduler, context, lambda epoch: build_checkpoint(
        model_without_ddp=model_without_ddp, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config,
        data=data, spec=spec, epoch=epoch, history=history, selected=selected), config.run.preemption_check_steps,
        observers)
    for epoch in range(start_epoch, config.optim.epochs):
        resumed = partial is not None and epoch == start_epoch
        steps_done = int(partial["global_step"]) - epoch * steps_per_epoch if resumed and batches.fixed else 0
        train_loader.set_epoch(epoch, consumed_of(partial) if resumed else None, steps_done)
        step_hook.start_epoch(epoch, len(train_loader) // batches.accumulation)
        set_backbone_frozen(optimizer, epoch < config.model.freeze_backbone_epochs)
        metrics = {"epoch": epoch + 1, **learning_rates(optimizer), **batches.to_metrics(),
                   **train_one_epoch(model=model, model_without_ddp=model_without_ddp, criterion=criterion,
                                     optimizer=optimizer, lr_scheduler=lr_scheduler, data_loader=train_loader,
                                     batch_to_device=train_to_device, device=device, config=config, epoch=epoch,
                                     on_step=on_step, after_step=step_hook, accumulation=batches.accumulation)}
        last = epoch + 1 == config.optim.epochs
        predictions = None
        if selected is not None:
            metrics.update(select_on_holdout(selected, epoch + 1, model_without_ddp, holdout_loader, eval_to_device,
                                             device, data.classes))
        if (epoch + 1) % config.run.eval_every == 0 or last:
            val, predictions = evaluate(model_without_ddp, eval_loader, eval_to_device, device, data.classes)
            metrics.update(val)
        if last and selected is not None and selected.epoch != epoch + 1:
            # deliver the epoch that validated best: its weights, its test predictions
            model_without_ddp.load_state_dict(selected.model)
            val, predictions = evaluate(model_without_ddp, eval_loader, eval_to_device, device, data.classes)
            metrics.update({f"selected_{name}": value for name, value in val.items()})
        metrics["world_size"] = context.world_size
        if synced:
            metrics["sync_batchnorm_layers"] = synced
        if epoch == start_epoch and start_epoch > 0:
            metrics["resumed_from_epoch"] = start_epoch
        if resumed:
            metrics["resumed_from_step"] = int(partial["global_step"])
        history.append(metrics)
        save = context.rank == 0 and ((epoch + 1) % config.run.checkpoint_every == 0 or last)
        if context.rank == 0:
            write_metrics(context.storage, history)
            scalars.log(metrics)
            if last and predictions is not None:
                save_evaluation(context.storage, predictions, data, metrics, history)
        state = build_checkpoint(
            model_without_ddp=model_without_ddp, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config,
            data=data, spec=spec, epoch=epoch + 1, history=history, selected=selected) if save else None
        context.report(metrics, state)
    if scalars is not None:
        scalars.close()
    if on_finish is not None:
        on_finish(model_without_ddp)
    return metrics
