"""The data of a run: which classes and samples it sees (a specialist's subset, the
validation split, unseen classes), and its train, evaluation and holdout loaders."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError, ExperimentConfig, parse_meta_category
from ..data.loader import LoaderConfig, ShardLoader
from ..data.manifest import Manifest
from ..data.transforms import EvalTransform, RawJpeg, TrainTransform
from .batches import CpuBatches, DeviceBatches
from ..input_spec import InputSpec
from ..data.holdout import HOLDOUT, held_out_classes, held_out_per_class
from .global_batch import BatchPlan
from ..errors import DataError


@dataclass
class RunData:
    """The dataset as this run sees it (a specialist sees a subset of classes)."""

    manifest: Manifest
    class_subset: list[int] | None  # global indices, in the run's label order
    classes: list[dict[str, Any]]  # the run's class table, "index" = run label
    train_counts: list[int]
    unseen: list[int] = dataclasses.field(default_factory=list)  # data.holdout_classes (global indices)


def select_data(config: ExperimentConfig) -> RunData:
    manifest = Manifest.load(config.data.shards)
    subset = None
    if config.data.meta_category:
        subset = manifest.classes_of(*parse_meta_category(config.data.meta_category))
    chosen = subset if subset is not None else list(range(manifest.num_classes))
    unseen = held_out_classes(manifest.classes, config.data.holdout_classes)
    classes = [{**manifest.classes[g], "index": i, "global_index": g, **({"unseen": True} if g in unseen else {})}
               for i, g in enumerate(chosen)]
    # the images each class trains on (the CBL's n_c): train less the held-out share; none
    # for an unseen class (its CBL weight is then 0: it is never a target)
    held = held_out_per_class(manifest, config.data.holdout, config.data.holdout_by)
    counts = [0 if g in unseen else n - int(held[g]) for g, n in enumerate(manifest.class_counts("train"))]
    return RunData(manifest, subset, classes, [counts[g] for g in chosen], unseen)


def uses_device_decode(config: ExperimentConfig, device: torch.device) -> bool:
    """Decode and augment on the accelerator (``data.decode``: auto = when on CUDA)."""
    return config.data.decode == "device" or (config.data.decode == "auto" and device.type == "cuda")


#: Turns a loader batch into (normalised images, labels) on the device and the samples' keys.
BatchToDevice = Callable[[dict[str, Any]], tuple[torch.Tensor, torch.Tensor, list[str]]]


def build_batches(config: ExperimentConfig, spec: InputSpec, device: torch.device) -> tuple[BatchToDevice, BatchToDevice]:
    """(train, eval) callables turning loader batches into device tensors."""
    channels_last = config.model.channels_last
    if uses_device_decode(config, device):  # augmentation seeds come with the loader's batches
        return DeviceBatches(spec, config.augment, device, channels_last), DeviceBatches(spec, None, device, channels_last)
    return CpuBatches(spec, device, channels_last), CpuBatches(spec, device, channels_last)


def build_loaders(config: ExperimentConfig, data: RunData, spec: InputSpec, rank: int, world: int, device: torch.device,
                  batches: BatchPlan | None = None):
    """(train, eval) loaders of this rank; ``batches``: the global batch's split (training
    micro-batches and steps per epoch), default ``data.batch_size`` per worker."""
    c = config.data
    raw = uses_device_decode(config, device)
    common = dict(data=c, seed=config.run.seed, pin_memory=device.type == "cuda")
    balanced = (c.classes_per_batch, c.images_per_class) if c.classes_per_batch else None
    fixed = {} if batches is None or not batches.fixed else dict(
        global_batch=batches.target, micro_batch=batches.micro_batch, step_batches=batches.accumulation)
    # unseen classes (data.holdout_classes) are out of training and of the closed-set evaluation
    train = ShardLoader(data.manifest, "train", RawJpeg() if raw else TrainTransform(spec, config.augment),
                        LoaderConfig(**common, **fixed), rank, world, train=True,
                        classes=data.class_subset, class_balanced=balanced, exclude=data.unseen)
    return train, build_eval_loader(config, data, spec, rank, world, device)


def build_eval_loader(config: ExperimentConfig, data: RunData, spec: InputSpec, rank: int, world: int,
                      device: torch.device, split: str = "test") -> ShardLoader:
    """This rank's share of ``split`` ("test", or "holdout": the validation split carved from
    train), each sample once over all ranks, the run's classes only."""
    raw = uses_device_decode(config, device)
    common = dict(data=config.data, seed=config.run.seed, pin_memory=device.type == "cuda")
    return ShardLoader(data.manifest, split, RawJpeg() if raw else EvalTransform(spec),
                       LoaderConfig(evaluation=True, **common),
                       rank, world, train=False, classes=data.class_subset, exclude=data.unseen)


def build_holdout_loader(config: ExperimentConfig, data: RunData, spec: InputSpec, rank: int, world: int,
                         device: torch.device) -> ShardLoader:
    """The validation split's loader for ``run.select_epoch=holdout``; a clear error when
    ``data.holdout`` leaves no image of the run's classes (too few train images per class)."""
    try:
        return build_eval_loader(config, data, spec, rank, world, device, split=HOLDOUT)
    except DataError as error:
        raise ConfigError(f"run.select_epoch=holdout: data.holdout={config.data.holdout:g} holds out no train image of "
                          f"this run's classes ({error})",
                          hint="raise data.holdout (a class keeps at least 2 train images and holds out "
                               "floor(n x holdout + 0.5) of n), or set run.select_epoch=last") from None
