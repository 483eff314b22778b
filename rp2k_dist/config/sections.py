"""The config's sections: one dataclass per YAML section, a docstring per field, each section
validating itself in ``__post_init__``; :class:`ExperimentConfig` holds them all."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .coercion import _build, _check


#: The paper's augmentation magnitudes (30 px of border, 10 px of crop) as fractions of a
#: 224 px crop side: ``augment.border_max_frac`` / ``crop_max_frac`` at these values give the
#: paper's pixels at 224 px and the same share of the image at any other crop.
PAPER_BORDER_FRAC = 30 / 224
PAPER_CROP_FRAC = 10 / 224


@dataclass(frozen=True)
class AugmentConfig:
    """Switches and magnitudes of the paper's augmentations (all in pixels or fractions).

    ``border_max`` / ``crop_max`` are pixels of the image the augmentations see. Their
    ``*_frac`` twins, when set, replace them with a fraction of the model's input crop side
    (``model.crop_size``, else the model's own 224 / 299), resolved by :meth:`in_pixels`:
    one search space or preset then means the same share of the image at any resolution.
    """

    border: bool = True
    border_max: int = 30
    border_max_frac: float | None = None  # border_max = round(frac x crop side); None: border_max as given
    border_fill: str | int = "random"
    crop: bool = True
    crop_max: int = 10
    crop_max_frac: float | None = None  # crop_max = round(frac x crop side); None: crop_max as given
    perspective: bool = True
    perspective_scale: float = 0.2
    perspective_p: float = 0.5
    brightness: bool = True
    brightness_max: float = 0.2

    def __post_init__(self) -> None:
        _check(self.border_max >= 0 and self.crop_max >= 0, "augment.border_max and augment.crop_max must be >= 0 px")
        _check(self.border_max_frac is None or 0.0 <= self.border_max_frac <= 1.0,
               f"augment.border_max_frac must be in [0, 1] (of the crop side), got {self.border_max_frac}")
        _check(self.crop_max_frac is None or 0.0 <= self.crop_max_frac < 1.0,
               f"augment.crop_max_frac must be in [0, 1) (of the crop side), got {self.crop_max_frac}")
        _check(0.0 <= self.perspective_scale < 1.0,
               f"augment.perspective_scale must be in [0, 1), got {self.perspective_scale}")
        _check(0.0 <= self.perspective_p <= 1.0, f"augment.perspective_p must be in [0, 1], got {self.perspective_p}")
        _check(0.0 <= self.brightness_max < 1.0, f"augment.brightness_max must be in [0, 1), got {self.brightness_max}")
        _check(self.border_fill == "random" or (isinstance(self.border_fill, int) and 0 <= self.border_fill <= 255),
               f"augment.border_fill must be 'random' or a grey level 0..255, got {self.border_fill!r}")

    @classmethod
    def off(cls) -> "AugmentConfig":
        """No augmentation at all (evaluation, and the paper's 'without augmentation')."""
        return cls(border=False, crop=False, perspective=False, brightness=False)

    @property
    def any(self) -> bool:
        return self.border or self.crop or self.perspective or self.brightness

    def in_pixels(self, crop_size: int) -> "AugmentConfig":
        """A copy with ``border_max`` / ``crop_max`` in pixels for a ``crop_size`` px input
        crop: each ``*_frac`` that is set becomes ``round(frac x crop_size)`` px (and is
        cleared); the pixel keys stay as they are where no fraction is set."""
        resolved = {f"{name}_max": round(frac * crop_size) for name in ("border", "crop")
                    if (frac := getattr(self, f"{name}_max_frac")) is not None}
        return dataclasses.replace(self, **resolved, border_max_frac=None, crop_max_frac=None)


def parse_meta_category(text: str) -> tuple[str, str]:
    """``"type=liquor"`` -> ``("type", "liquor")``: a meta-category system and its value."""
    system, _, value = text.partition("=")
    _check(system in ("type", "shape") and bool(value), f"data.meta_category must look like 'type=liquor' or "
           f"'shape=can', got {text!r}")
    return system, value


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed (per worker = per GPU)."""

    shards: str = "runs/demo/shards"  # folder with dataset.json (a shared mount on clusters)
    batch_size: int = 64  # images per worker per step (with optim.global_batch: the largest micro-batch)
    eval_batch_size: int = 0  # 0 = 2 x batch_size
    loader_workers: int = 2  # decoding processes per training worker
    shuffle_buffer: int = 2000
    chunk_mb: float = 4.0  # bytes per ranged shard read: the unit the epoch plan deals to readers
    max_corrupt_fraction: float = 0.01
    decode: str = "auto"  # where JPEGs are decoded and augmented: cpu | device | auto (device on CUDA)
    meta_category: str = ""  # "type=liquor": train/evaluate only this meta-category's classes
    classes_per_batch: int = 0  # P of the P x K class-balanced batches (API-Net); 0 = plain batches
    images_per_class: int = 4  # K
    # share of each class's train images held out of training (the same for every run of the
    # dataset): the "holdout" split on which `rp2k ensemble` chooses the routing threshold
    # (Table 3 column e), run.select_epoch=holdout its epoch and `rp2k openset` its threshold; 0 = none
    holdout: float = 0.0
    # how data.holdout draws its images: "groups" keeps groups of near-duplicate photos (a
    # burst of one product, by the perceptual hash rp2k pack stores) together on one side, so
    # validation reads like test; "key" draws single images by a hash of their key (datasets
    # packed without hashes always do) (rp2k_dist.data.holdout)
    holdout_by: str = "groups"
    # classes never trained on (open-set evaluation, `rp2k openset`): a count, a fraction of
    # the classes, or a list of class names / indices; a count or fraction is drawn by a hash
    # of the class names, stratified across product types (rp2k_dist.data.holdout); 0 = none.
    # Class indices stay global: the model keeps a (never trained) output for each.
    holdout_classes: int | float | list = 0

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size must be >= 1")
        _check(self.eval_batch_size >= 0, "data.eval_batch_size must be >= 0")
        _check(self.loader_workers >= 0, "data.loader_workers must be >= 0")
        _check(self.chunk_mb > 0, "data.chunk_mb must be > 0")
        _check(0 <= self.max_corrupt_fraction <= 1, "data.max_corrupt_fraction must be in [0, 1]")
        _check(self.decode in ("auto", "cpu", "device"), "data.decode must be auto, cpu or device")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer must be >= 1")
        _check(0.0 <= self.holdout < 0.5, f"data.holdout must be in [0, 0.5), got {self.holdout}")
        _check(self.holdout_by in ("groups", "key"), f"data.holdout_by must be groups or key, got {self.holdout_by!r}")
        if self.meta_category:
            parse_meta_category(self.meta_category)
        spec = self.holdout_classes
        if isinstance(spec, list):
            _check(all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in spec),
                   f"data.holdout_classes as a list must hold class names or indices, got {spec!r}")
        elif isinstance(spec, float):
            _check(0.0 <= spec < 1.0, f"data.holdout_classes as a fraction must be in [0, 1), got {spec}")
        else:
            _check(isinstance(spec, int) and not isinstance(spec, bool) and spec >= 0,
                   f"data.holdout_classes must be a count >= 0, a fraction in [0, 1) or a list of classes, got {spec!r}")
        if self.classes_per_batch:
            _check(self.images_per_class >= 2, "data.images_per_class must be >= 2 (API-Net needs intra-class pairs)")
            _check(self.classes_per_batch >= 2, "data.classes_per_batch must be >= 2 (API-Net needs inter-class pairs)")


#: Models whose backbone and head are separate parameter groups (``backbone_parameters()``,
#: ``head_parameters()``): frozen-backbone epochs and ``optim.backbone_lr_scale`` apply to them.
SPLIT_MODELS = ("apinet",)
#: ``model.bn`` values (see :class:`ModelConfig`).
BN_MODES = ("train", "frozen", "sync")
#: ``model.head`` values, the margin losses of the cosine head, and the models that have one.
HEADS = ("softmax", "cosine")
MARGIN_LOSSES = ("arcface", "cosface")
COSINE_HEAD_MODELS = ("resnet34",)


@dataclass
class ModelConfig:
    """Architecture, initial weights and compute layout."""

    name: str = "resnet34"  # resnet34 | inception_v3 | apinet
    pretrained: str = ""  # "imagenet": torchvision weights from the local torch hub cache
    weights: str = ""  # a local weights file or a checkpoint of this project
    partial_weights: bool = False  # leave tensors the weights file cannot fill new instead of failing
    crop_size: int = 0  # 0 = the model's own input size (224 / 299)
    channels_last: bool = True
    compile: bool = False
    freeze_backbone_epochs: int = 0  # API-Net official: 8
    # BatchNorm while training: train (batch statistics; running statistics updated, also in
    # frozen-backbone epochs, as the official API-Net) | frozen (every BatchNorm layer in eval
    # mode without gradient for the WHOLE run: the running statistics and affine parameters of
    # model.weights / model.pretrained stay as they are) | sync (SyncBatchNorm: statistics over
    # the global batch under DDP; the same as train on one worker)
    bn: str = "train"
    # classifier: softmax (a linear layer, the paper's) | cosine (logits = scale x cosine of
    # the pooled feature and each class's weight vector, trained with an additive angular
    # (ArcFace) or cosine (CosFace) margin; pytorch-metric-learning's losses)
    head: str = "softmax"
    margin_loss: str = "arcface"  # cosine head: arcface | cosface
    margin: float = 0.0  # cosine head; 0 = the loss's default (ArcFace 28.6 degrees = 0.5 rad, CosFace 0.35)
    scale: float = 64.0  # cosine head: s of both papers

    def __post_init__(self) -> None:
        from ..models.registry import model_names  # torch is only needed once a config is checked

        _check(self.name in model_names(), f"model.name {self.name!r} is not a registered model; known: "
               f"{', '.join(model_names())}")
        _check(self.pretrained in ("", "imagenet"), "model.pretrained must be '' or 'imagenet'")
        _check(self.crop_size == 0 or self.crop_size >= 32, "model.crop_size must be 0 or >= 32")
        _check(self.freeze_backbone_epochs >= 0, "model.freeze_backbone_epochs must be >= 0")
        _check(self.bn in BN_MODES, f"model.bn must be one of {', '.join(BN_MODES)}, got {self.bn!r}")
        _check(self.head in HEADS, f"model.head must be one of {', '.join(HEADS)}, got {self.head!r}")
        _check(self.head == "softmax" or self.name in COSINE_HEAD_MODELS,
               f"model.head=cosine is available for {', '.join(COSINE_HEAD_MODELS)}, not {self.name}")
        _check(self.margin_loss in MARGIN_LOSSES,
               f"model.margin_loss must be one of {', '.join(MARGIN_LOSSES)}, got {self.margin_loss!r}")
        _check(self.margin >= 0 and self.scale > 0, "model.margin must be >= 0 and model.scale > 0")

    def head_args(self) -> dict[str, Any]:
        """The builder's keyword arguments of the head (empty for the softmax head, so
        checkpoints of softmax models keep their ``model_args``)."""
        if self.head == "softmax":
            return {}
        return {"head": self.head, "margin_loss": self.margin_loss, "margin": self.margin, "scale": self.scale}


@dataclass
class LossConfig:
    """Class-Balanced Loss (Cui et al. 2019); beta = 0 is plain cross-entropy."""

    # auto: CBL (cbl_beta) for ResNet-34 / InceptionV3 as in the paper, plain cross-entropy
    # for API-Net as in its official code; cbl | ce: that loss for every model
    criterion: str = "auto"
    cbl_beta: float = 0.99  # the paper's value
    variant: str = "softmax"  # softmax | sigmoid | focal
    focal_gamma: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check(self.criterion in ("auto", "cbl", "ce"), f"loss.criterion must be auto, cbl or ce, got {self.criterion!r}")
        _check(0.0 <= self.cbl_beta < 1.0, f"loss.cbl_beta must be in [0, 1), got {self.cbl_beta}")
        _check(self.variant in ("softmax", "sigmoid", "focal"), "loss.variant must be softmax, sigmoid or focal")
        _check(self.focal_gamma >= 0, "loss.focal_gamma must be >= 0")
        _check(0.0 <= self.label_smoothing < 1.0, "loss.label_smoothing must be in [0, 1)")


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (linear warmup, then cosine to zero)."""

    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1  # for the GLOBAL batch (all workers) of lr_reference_batch images
    # models with a backbone / head split (API-Net): the backbone trains at lr x this, the head
    # (mutual-vector layers and fc) at lr; both follow the same schedule
    backbone_lr_scale: float = 1.0
    # the experiment's batch over all workers: each optimiser step trains on global_batch
    # images whatever the live world size (micro-batches of at most data.batch_size per
    # worker, gradients accumulated); 0 = data.batch_size x run.workers (grows with workers)
    global_batch: int = 0
    lr_reference_batch: int = 256  # lr scales linearly with global batch / this (Goyal et al.)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 30
    warmup_epochs: float = 1.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    fused: bool = True  # fused optimiser kernels where available (CUDA; CPU with torch >= 2.4)

    def __post_init__(self) -> None:
        _check(self.optimizer in ("sgd", "adamw"), "optim.optimizer must be sgd or adamw")
        _check(self.lr > 0 and math.isfinite(self.lr), "optim.lr must be a positive number")
        _check(0 < self.backbone_lr_scale <= 1, f"optim.backbone_lr_scale must be in (0, 1], got {self.backbone_lr_scale}")
        _check(self.lr_reference_batch >= 1, "optim.lr_reference_batch must be >= 1")
        _check(self.global_batch >= 0, "optim.global_batch must be >= 0 (0 = data.batch_size x run.workers)")
        _check(self.epochs >= 1, "optim.epochs must be >= 1")
        _check(0 <= self.warmup_epochs <= self.epochs, "optim.warmup_epochs must be in [0, epochs]")
        _check(self.weight_decay >= 0 and self.grad_clip >= 0, "optim.weight_decay and grad_clip must be >= 0")


@dataclass
class RunConfig:
    """Run identity, storage, evaluation cadence and Ray scaling."""

    name: str = "rp2k"  # fixed name: rerunning the same name resumes it
    storage_path: str = "runs"  # local folder, or s3:// / gs:// (shared storage on clusters)
    seed: int = 0
    eval_every: int = 1  # epochs
    checkpoint_every: int = 1  # epochs
    checkpoint_every_steps: int = 0  # also every N optimiser steps, mid-epoch (exact resume); 0 = off
    keep_checkpoints: int = 2
    # the epoch whose weights the run delivers (final checkpoint, predictions, Table 2): "last",
    # or "holdout": the best top-1 on data.holdout, evaluated every epoch (rp2k_dist.engine.selection)
    select_epoch: str = "last"
    # Ray Train workers (one per GPU on a GPU cluster); [min, max] = elastic: start with
    # at least min, grow to max as capacity appears, continue on fewer after a lost node
    workers: int | list[int] = 2
    elastic_resize_interval_s: float = 60.0  # elastic runs: seconds between checks for more capacity
    preemption_check_steps: int = 10  # optimiser steps between checks for a node drain notice; 0 = off
    max_preemptions: int = -1  # restarts after node preemptions (counted apart from max_failures); -1 = unlimited
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_SPREAD (one worker per node)
    max_failures: int = 2  # restarts from the last checkpoint after a worker/node dies
    backend: str = ""  # "" = nccl on GPU, gloo on CPU
    rank_digests: bool = False  # write ranks/rank-N.json (node, parameter sha256) at the end: DDP sync checks

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, "run.name must be a non-empty name without '/'")
        _check(self.eval_every >= 1 and self.checkpoint_every >= 1, "run.eval_every and checkpoint_every must be >= 1")
        _check(self.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")
        _check(self.select_epoch in ("last", "holdout"), f"run.select_epoch must be last or holdout, got {self.select_epoch!r}")
        _check(self.checkpoint_every_steps >= 0, "run.checkpoint_every_steps must be >= 0 (0 = off)")
        if isinstance(self.workers, list):
            _check(len(self.workers) == 2 and all(isinstance(w, int) and not isinstance(w, bool) for w in self.workers)
                   and 1 <= self.workers[0] <= self.workers[1],
                   f"run.workers must be a count or [min, max] with 1 <= min <= max, got {self.workers!r}")
        _check(self.min_workers >= 1, "run.workers must be >= 1")
        _check(self.elastic_resize_interval_s >= 0, "run.elastic_resize_interval_s must be >= 0")
        _check(self.preemption_check_steps >= 0, "run.preemption_check_steps must be >= 0 (0 = off)")
        _check(self.max_preemptions >= -1, "run.max_preemptions must be >= -1 (-1 = unlimited)")
        _check(self.placement_strategy in ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"), "run.placement_strategy is invalid")
        _check(self.max_failures >= -1, "run.max_failures must be >= -1 (-1 = unlimited)")
        _check(self.backend in ("", "nccl", "gloo"), "run.backend must be '', nccl or gloo")

    @property
    def elastic(self) -> bool:
        return isinstance(self.workers, list)

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, list) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, list) else self.workers

    @property
    def unit(self) -> str:
        """The resource that limits how many such runs fit on a cluster: "GPU" or "CPU"."""
        return "GPU" if self.use_gpu else "CPU"

    def demand(self, workers: int | None = None) -> dict[str, float]:
        """What ``workers`` of the run's Ray Train workers hold (default: its maximum, as an
        elastic run may grow to it): ``{"CPU": n x cpus_per_worker}``, plus ``"GPU"``
        (n x gpus_per_worker) for a GPU run. ``demand(1)`` is one worker's bundle."""
        n = self.max_workers if workers is None else workers
        wanted = {"CPU": n * self.cpus_per_worker}
        if self.use_gpu:
            wanted["GPU"] = n * self.gpus_per_worker
        return wanted


@dataclass
class ExperimentConfig:
    """Everything one training run needs."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        _check(self.optim.backbone_lr_scale == 1 or self.model.name in SPLIT_MODELS,
               f"optim.backbone_lr_scale applies to models with a backbone / head split ({', '.join(SPLIT_MODELS)}); "
               f"{self.model.name} trains as one parameter group: set it to 1")
        if self.optim.global_batch:
            _check(not self.data.classes_per_batch, "optim.global_batch does not apply to P x K batches "
                   "(data.classes_per_batch): set optim.global_batch=0")
            _check(self.optim.global_batch >= self.run.max_workers, f"optim.global_batch {self.optim.global_batch} "
                   f"is below run.workers' {self.run.max_workers}: every worker needs one image per step")
        if self.model.head == "cosine":
            _check(self.loss.variant == "softmax" and not self.loss.label_smoothing,
                   "model.head=cosine trains with a margin softmax loss weighted per sample by CBL: set "
                   "loss.variant=softmax and loss.label_smoothing=0")
        _check(self.run.select_epoch != "holdout" or self.data.holdout > 0,
               "run.select_epoch=holdout chooses the epoch on the validation split carved from train: set data.holdout "
               "(e.g. 0.1)")
        _check(not self.run.elastic or bool(self.optim.global_batch),
               "elastic run.workers [min, max] needs a fixed optim.global_batch (else the experiment changes with "
               "the number of live workers)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_absolute_paths(self) -> "ExperimentConfig":
        """A copy whose local paths (``run.storage_path``, ``data.shards``,
        ``model.weights``) are absolute, as Ray workers and job drivers start in other
        folders; URIs are kept as they are. The config itself is not changed."""
        from ..storage import absolute  # pyarrow: only once a run is launched

        copy = config_from_dict(self.to_dict())
        copy.run.storage_path = absolute(copy.run.storage_path)
        copy.data.shards = absolute(copy.data.shards)
        if copy.model.weights:
            copy.model.weights = absolute(copy.model.weights)
        return copy

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


SCHEDULERS = ("asha", "none")


@dataclass
class SweepConfig:
    """The ``tune:`` section of a sweep preset (``rp2k tune`` flags override it)."""

    samples: int | None = None  # per grid point; None: 1 for a pure grid, else 16
    scheduler: str = "asha"  # asha | none (FIFO: every trial runs all epochs)
    max_concurrent: int | None = None  # None: from the cluster's GPUs (or CPUs)
    grace_period: int = 1  # ASHA: epochs before a trial can be stopped
    reduction_factor: int = 2  # ASHA: keep the best 1/reduction_factor at each rung

    def __post_init__(self) -> None:
        _check(self.scheduler in SCHEDULERS, f"tune.scheduler must be one of {', '.join(SCHEDULERS)}, "
               f"got {self.scheduler!r}")
        for name in ("samples", "max_concurrent"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"tune.{name} must be a positive integer, got {value!r}")
        _check(self.grace_period >= 1, f"tune.grace_period must be an integer >= 1, got {self.grace_period!r}")
        _check(self.reduction_factor >= 2, f"tune.reduction_factor must be an integer >= 2, got {self.reduction_factor!r}")

    def with_flags(self, flags: Mapping[str, Any]) -> "SweepConfig":
        """A copy with the given fields replaced (None values mean "flag not given")."""
        given = {f.name: flags[f.name] for f in fields(self) if flags.get(f.name) is not None}
        return _build(SweepConfig, {**dataclasses.asdict(self), **given}, "tune.")


def sweep_config(data: Mapping[str, Any] | None) -> SweepConfig:
    """The ``tune:`` section of a sweep preset, checked like every other section."""
    return _build(SweepConfig, dict(data or {}), "tune.")


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuild a config saved with :meth:`ExperimentConfig.to_dict` (e.g. in a checkpoint)."""
    return _build(ExperimentConfig, data, "")
