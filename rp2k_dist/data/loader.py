"""Stream shards to DDP ranks: equal steps for training, exactly-once for evaluation.

The work of one epoch is planned from the manifest alone (:mod:`.chunks`), so every rank
computes the same plan without talking to the others: the split's samples are cut into
chunks of a few MB (contiguous byte ranges of a shard, from ``index.parquet``), shuffled
with a seed derived from ``(seed, epoch)`` for training, and dealt to the readers
(rank x loader worker) as contiguous runs of equal sample counts. Each reader reads only
its own byte ranges (ranged reads, local or object storage), so every byte of the split
is read once per epoch at any world size. A training epoch has ``min`` over ranks of the
rank's full batches, and each worker gets a quota that adds up to exactly that.
Evaluation keeps partial batches and no quota, so every test sample is seen exactly once
whatever the world size.

Inside a reader: ranged reads -> tar members -> shuffle buffer -> decode + transform ->
``partial=False`` batching. The order (chunk plan, shuffle buffer, class-balanced draws)
is seeded per rank and worker; each sample's augmentation is seeded from the run seed,
the epoch, the pass and the sample's key only (:func:`~.augment.augment_seed`), so it is
the same at any world size and after a mid-epoch resume. Samples that fail to decode, or that a damaged shard no longer
holds, are counted and skipped (no sleeping warn-and-continue); if skips leave a rank
short of its planned steps, a second, differently shuffled pass tops it up, so DDP never
sees unequal step counts. Too many corrupt samples abort the run with
:class:`CorruptDataError`.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import storage
from ..config import DataConfig
from .augment import augment_rng, augment_seed
from .chunks import Piece, ReaderPlan, SampleTable, epoch_seed, plan_epoch, plan_training_epoch, training_steps
from .epoch_state import ConsumedSamples, rest_of_epoch
from .images import DECODE_ERRORS
from .tar_index import samples_of
from .manifest import Manifest
from .transforms import stack_images
from .workers import worker_context
from ..errors import ConfigError, CorruptDataError, DataError
from .batching import _class_balanced_batches, _plain_batches


#: A sample's bytes and its own augmentation generator -> what the batch holds. Transforms
#: that draw nothing set ``uses_rng = False`` and are passed ``None`` (no generator is made).
Transform = Callable[[bytes, np.random.Generator | None], Any]


@dataclass(frozen=True)
class LoaderConfig:
    """One rank's loader: the streaming settings of the config's ``data`` section (batch
    size, loader workers, shuffle buffer, corrupt-sample budget; never re-declared here)
    plus what the caller decides for this loader."""

    data: DataConfig = field(default_factory=DataConfig)
    evaluation: bool = False  # batch data.eval_batch_size (0: 2 x data.batch_size) instead of data.batch_size
    seed: int = 0
    prefetch_factor: int = 4  # batches in flight per worker
    start_method: str = "forkserver"  # fork is unsafe inside Ray actors (threads)
    pin_memory: bool = False  # set when batches go to a CUDA device
    # a fixed global batch (optim.global_batch, from rp2k_dist.engine.global_batch): the
    # training epoch has samples // global_batch optimiser steps of step_batches batches
    # of micro_batch images on every rank, whatever the world size; 0 = off
    global_batch: int = 0
    micro_batch: int = 0
    step_batches: int = 1

    def __post_init__(self) -> None:
        if self.start_method not in mp.get_all_start_methods():
            raise ValueError(f"start_method {self.start_method!r} not in {mp.get_all_start_methods()}")

    @property
    def batch_size(self) -> int:
        """Images per rank per step."""
        d = self.data
        return (d.eval_batch_size or 2 * d.batch_size) if self.evaluation else (self.micro_batch or d.batch_size)

    @property
    def workers(self) -> int:
        """Loader processes per rank; 0 = read in the training process."""
        return self.data.loader_workers

    @property
    def shuffle_buffer(self) -> int:
        """Samples held for shuffling inside each worker."""
        return self.data.shuffle_buffer

    @property
    def max_corrupt_fraction(self) -> float:
        """Of an epoch's samples; above it the run stops."""
        return self.data.max_corrupt_fraction

    @property
    def chunk_mb(self) -> float:
        """Bytes per ranged read of a shard (one chunk of the epoch plan), in MB."""
        return self.data.chunk_mb


@dataclass
class LoaderStats:
    """Counts of the current epoch, summed over this rank's readers."""

    samples: int = 0
    skipped: int = 0
    bytes_read: int = 0  # shard bytes read by this rank's readers (ranged reads)
    errors: list[str] = field(default_factory=list)

    @property
    def corrupt_fraction(self) -> float:
        seen = self.samples + self.skipped
        return self.skipped / seen if seen else 0.0


class EpochState(ctypes.Structure):
    """What a loader's persistent workers read at the start of each pass: one
    struct in shared memory (``RawValue``), written by the training process between
    passes (:meth:`ShardLoader.set_epoch`, :meth:`ShardLoader.__iter__`)."""

    _fields_ = [
        ("epoch", ctypes.c_int64),
        ("refill", ctypes.c_int64),  # 0: the planned pass; 1, 2: passes topping up a rank short after skips
        ("resumed", ctypes.c_bool),  # a mid-epoch resume: plan only the samples not in ``consumed``
        ("batches", ctypes.c_int64),  # batches per rank with a fixed global batch, else 0
    ]


@dataclass
class _ReaderCounts:
    """A reader's tallies since its last batch."""

    skipped: int = 0  # planned samples that could not be read or decoded
    bytes: int = 0  # storage.bytes_read() when last reported


class _ShardStream(IterableDataset):
    """Yields this rank's batches; runs inside each loader worker."""

    def __init__(self, table: SampleTable, rank, world_size, transform, config, train, context, classes=None, pk=None):
        self.table = table
        self.remap = {label: i for i, label in enumerate(classes)} if classes is not None else None
        self.pk = pk
        self.batch_size = pk[0] * pk[1] if pk else config.batch_size
        self.rank = rank
        self.world_size = world_size
        self.transform = transform
        self.uses_rng = getattr(transform, "uses_rng", True)
        self.config = config
        self.train = train
        self.state: EpochState = context.RawValue(EpochState)
        self.consumed = context.RawArray("b", len(table) if train else 0)
        self._rest: tuple[bytes, SampleTable] | None = None
        self.storage_env = storage.environment()

    def planned_table(self) -> SampleTable:
        """The split, or in a resumed epoch the samples it has not consumed yet."""
        if not self.state.resumed:
            return self.table
        mask = bytes(self.consumed)
        if self._rest is None or self._rest[0] != mask:
            consumed = ConsumedSamples(len(self.table), np.frombuffer(mask, np.int8).astype(bool))
            self._rest = (mask, rest_of_epoch(self.table, consumed))
        return self._rest[1]

    def readers(self) -> list[ReaderPlan]:
        epoch = self.state.epoch
        c = self.config
        if self.train:
            table = self.planned_table()
            return plan_training_epoch(table, self.rank, self.world_size, c.workers, self.batch_size, epoch, c.seed,
                                       batches=self.state.batches if c.global_batch else None)[1]
        return plan_epoch(self.table, self.world_size, c.workers, shuffle=False, rank=self.rank)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch, refill = self.state.epoch, self.state.refill
        storage.use_environment(self.storage_env)
        table = self.planned_table() if self.train else self.table
        plan = self.readers()[worker]
        # the order of this reader's samples; each sample's augmentation has its own seed (_decode)
        seed = epoch_seed(self.config.seed, epoch, refill, self.rank, worker)
        errors: list[str] = []
        counts = _ReaderCounts(bytes=storage.bytes_read())
        samples = (s for piece in plan.pieces for s in self._read_piece(table, piece, counts, errors))
        if self.train:
            buffer = self.config.shuffle_buffer
            samples = wds.shuffle(buffer, min(buffer, 100), rng=random.Random(seed))(samples)
        decoded = self._decode(samples, epoch, refill, counts, errors)
        if self.pk and self.train:
            batches = _class_balanced_batches(decoded, *self.pk, np.random.default_rng(seed))
        else:
            batches = _plain_batches(decoded, self.batch_size, partial=not self.train)
        quota = plan.quota if self.train and not refill else None
        for emitted, (images, labels, keys) in enumerate(batches):
            if quota is not None and emitted >= quota:
                break
            batch = self._batch(images, labels, keys, counts.skipped, errors, epoch, refill)
            yield {**batch, "bytes_read": self._bytes_since(counts)}
            counts.skipped, errors[:] = 0, []
        yield {"skipped": counts.skipped, "errors": list(errors), "bytes_read": self._bytes_since(counts)}

    @staticmethod
    def _bytes_since(counts: _ReaderCounts) -> int:
        now = storage.bytes_read()
        delta, counts.bytes = now - counts.bytes, now
        return delta

    def _read_piece(self, table: SampleTable, piece: Piece, counts: _ReaderCounts,
                    errors: list[str]) -> Iterator[dict[str, Any]]:
        """The planned samples of one ranged read of ``table``'s plan; those a damaged shard
        no longer holds are counted as skipped."""
        where = f"{storage.display(piece.shard)} bytes {piece.offset}+{piece.length}"
        got = 0
        # the range may also hold samples outside the plan (other classes, consumed ones)
        planned = None if table.keys is None else set(table.keys[piece.first:piece.first + piece.samples])
        try:
            data = storage.read_range(piece.shard, piece.offset, piece.length)
            for sample in samples_of(data):
                if planned is not None and sample["__key__"] not in planned:
                    continue
                if self.remap is not None:
                    try:
                        label = int(sample["cls"])
                    except (KeyError, ValueError) as err:
                        errors.append(f"{sample['__key__']}: bad class field ({err})")
                        continue
                    if label not in self.remap:
                        continue
                    sample["cls"] = self.remap[label]
                got += 1
                yield sample
        # a missing, truncated or garbled shard is bad data; any other StorageError (credentials,
        # endpoint) is not, and propagates
        except (storage.NotFoundError, OSError, EOFError, tarfile.TarError) as err:
            errors.append(f"{where}: {type(err).__name__}: {err}"[:300])
        if got < piece.samples:
            counts.skipped += piece.samples - got
            errors.append(f"{where}: {piece.samples - got} of {piece.samples} planned samples unreadable"[:300])

    def _augment_seed(self, epoch: int, refill: int, key: str) -> int:
        return augment_seed(self.config.seed, epoch, refill, key)

    def _decode(self, samples, epoch: int, refill: int, counts: _ReaderCounts, errors):
        for sample in samples:
            try:
                rng = augment_rng(self._augment_seed(epoch, refill, sample["__key__"])) if self.uses_rng else None
                image = self.transform(sample["jpg"], rng)
                label = int(sample["cls"])
            except (*DECODE_ERRORS, KeyError) as err:
                counts.skipped += 1
                errors.append(f"{sample.get('__key__')}: {type(err).__name__}: {err}"[:300])
                continue
            yield image, label, sample["__key__"]

    def _batch(self, images, labels, keys, skipped, errors, epoch: int, refill: int) -> dict[str, Any]:
        if isinstance(images[0], bytes):  # device decoding: the JPEG bytes travel as they are, with each one's seed
            return {"jpeg": images, "seed": [self._augment_seed(epoch, refill, k) for k in keys],
                    "label": torch.tensor(labels, dtype=torch.int64), "key": keys,
                    "skipped": skipped, "errors": list(errors)}
        return {
            "image": stack_images(images),
            "label": torch.tensor(labels, dtype=torch.int64),
            "key": keys,
            "skipped": skipped,
            "errors": list(errors),
        }


class ShardLoader:
    """Batches of one split for one rank: ``{"image": uint8 NCHW, "label": int64 N, "key": [str]}``
    (``{"jpeg": [bytes], "seed": [int], ...}`` with the :class:`~rp2k_dist.data.transforms.RawJpeg`
    transform: each image's :func:`~rp2k_dist.data.augment.augment_seed`, for device augmentation).

    Training loaders (``train=True``) shuffle, drop partial batches and yield exactly
    ``len(loader)`` batches per epoch on every rank; call :meth:`set_epoch` first.
    Evaluation loaders yield every sample of the split exactly once across all ranks.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        transform: Transform,
        config: LoaderConfig = LoaderConfig(),
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
        classes: Sequence[int] | None = None,
        class_balanced: tuple[int, int] | None = None,
        exclude: Sequence[int] = (),
    ):
        """``classes``: keep only these global labels, relabelled 0..len-1 in that order
        (a meta-category specialist). ``class_balanced``: (P, K) batches for training.
        ``exclude``: global labels left out entirely, without relabelling (unseen classes,
        ``data.holdout_classes``)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        kept = classes
        if exclude:
            left_out = set(int(c) for c in exclude)
            kept = [c for c in (classes if classes is not None else range(manifest.num_classes)) if c not in left_out]
        table = SampleTable.from_manifest(manifest, split, kept, int(config.chunk_mb * 1e6), config.data.holdout,
                                            config.data.holdout_by)
        if len(table) == 0:
            raise DataError(f"split {split!r} of {manifest.root} has no samples"
                            + (" of the run's classes (data.meta_category)" if classes is not None else ""))
        self.split = split
        self.root = manifest.root
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.epoch = 0
        self.stats = LoaderStats()
        self.consumed = ConsumedSamples(len(table) if train else 0)
        self._positions: dict[str, int] | None = None
        self._batches: int | None = None  # this epoch's batches with a fixed global batch (set_epoch)
        context = worker_context(config.start_method)
        self.dataset = _ShardStream(table, rank, world_size, transform, config, train, context, classes, class_balanced)
        self.loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=config.workers,
            persistent_workers=config.workers > 0,
            multiprocessing_context=context if config.workers > 0 else None,
            prefetch_factor=config.prefetch_factor if config.workers > 0 else None,
            pin_memory=config.pin_memory,
        )
        if train and config.global_batch and self.steps_per_epoch == 0:
            raise ConfigError(f"optim.global_batch: split {split!r} has {len(table)} samples, not one optimiser "
                              f"step of {config.global_batch}; lower it")
        if train and len(self) == 0:
            raise ConfigError(
                f"data.batch_size: split {split!r} has {len(table)} samples, not one full batch of "
                f"{self.dataset.batch_size} per rank for world size {world_size}; lower data.batch_size"
            )

    def set_epoch(self, epoch: int, consumed: ConsumedSamples | None = None, steps_done: int = 0) -> None:
        """Select the epoch: its chunk order and its samples' augmentation seeds.
        ``consumed``: the samples of this epoch already trained on (a mid-epoch checkpoint,
        summed over all ranks of the run that wrote it); the epoch then plans only the rest,
        dealt over this run's ranks, each augmented as it would have been without the stop. :attr:`consumed` tracks this rank's samples of the epoch (with ``consumed``).
        ``steps_done``: with a fixed global batch, the optimiser steps of the epoch already
        done (the epoch keeps ``samples // global_batch`` steps in all)."""
        if consumed is not None and not self.train:
            raise ValueError("only a training loader resumes mid-epoch")
        self.epoch = epoch
        self.dataset.state.epoch = epoch
        self.dataset.state.resumed = consumed is not None
        if self.train and self.config.global_batch:
            steps = self.steps_per_epoch - steps_done
            if steps < 0:
                raise ValueError(f"{steps_done} steps done of an epoch of {self.steps_per_epoch}")
            self._batches = steps * self.config.step_batches
            self.dataset.state.batches = self._batches
        if self.train:
            self.consumed = ConsumedSamples(len(self.dataset.table), None if consumed is None else consumed.mask)
            self.dataset.consumed[:] = self.consumed.mask.astype(np.int8).tobytes()

    def positions(self, keys: Sequence[str]) -> list[int]:
        """The split positions (rows of the sample table) of training samples' keys."""
        if self._positions is None:
            table = self.dataset.table
            self._positions = {str(k): int(p) for k, p in zip(table.keys, table.positions)}
        return [self._positions[k] for k in keys]

    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps of a whole epoch with a fixed global batch (any world size)."""
        return len(self.dataset.table) // self.config.global_batch

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch."""
        c = self.config
        if self.train and c.global_batch:
            return self._batches if self._batches is not None else self.steps_per_epoch * c.step_batches
        if self.train:
            table = self.dataset.planned_table()
            return training_steps(len(table), self.world_size, c.workers, self.dataset.batch_size)[0]
        return sum(-(-p.samples // c.batch_size) for p in self.dataset.readers())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stats = LoaderStats()
        steps = len(self) if self.train else None
        emitted = 0
        for refill in (0, 1, 2):
            self.dataset.state.refill = refill
            for item in self.loader:
                self._count(item)
                if "key" not in item:
                    continue
                if steps is not None and emitted >= steps:
                    break
                if self.train:  # consumed once handed out: a checkpoint after this step holds it
                    self.consumed.mark(self.positions(item["key"]))
                emitted += 1
                yield item
            if steps is None or emitted >= steps:
                break
        self._check_corrupt(final=True)
        if steps is not None and emitted < steps:
            if self.dataset.pk and not self.stats.skipped:
                raise ConfigError(
                    f"{self.split}: the class-balanced sampler formed only {emitted} of {steps} batches of "
                    f"{self.dataset.pk[0]} classes x {self.dataset.pk[1]} images on rank {self.rank}: too few "
                    "classes with >= 2 images per loader stream; lower data.classes_per_batch or data.loader_workers"
                )
            raise CorruptDataError(
                f"{self.split}: only {emitted} of {steps} planned batches could be read on rank "
                f"{self.rank} ({self.stats.skipped} samples skipped); run `rp2k verify {self.root}`"
            )

    def _count(self, item: dict[str, Any]) -> None:
        self.stats.skipped += item["skipped"]
        self.stats.bytes_read += item["bytes_read"]
        self.stats.errors.extend(item["errors"][: max(0, 20 - len(self.stats.errors))])
        if "key" in item:
            self.stats.samples += len(item["key"])
        self._check_corrupt(final=False)

    def _check_corrupt(self, final: bool) -> None:
        s = self.stats
        if (final or s.samples + s.skipped >= 200) and s.skipped and s.corrupt_fraction > self.config.max_corrupt_fraction:
            shown = "; ".join(s.errors[:3])
            raise CorruptDataError(
                f"{self.split}: {s.skipped} of {s.samples + s.skipped} samples could not be decoded "
                f"({s.corrupt_fraction:.1%} > max_corrupt_fraction {self.config.max_corrupt_fraction:.1%}); "
                f"first errors: {shown}. Run `rp2k verify {self.root}` and repack damaged shards"
            )
