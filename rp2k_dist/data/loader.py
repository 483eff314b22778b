"""Stream shards to DDP ranks: equal steps for training, exactly-once for evaluation.

The work of one epoch is planned from the manifest alone, so every rank computes the
same plan without talking to the others:

1. the split's shards are shuffled with a seed derived from ``(seed, epoch)``;
2. they are dealt to ranks (``shards[rank::world]``) and then to the rank's loader
   workers; when there are too few shards to deal evenly, readers share shards and keep
   every m-th sample instead (``i % m == k``), so splitting stays exact and balanced;
3. each reader (rank x worker) knows its sample count, hence its number of full batches;
   a training epoch has ``min`` over ranks of the rank's full batches, and each worker
   gets a quota that adds up to exactly that. Evaluation keeps partial batches and no
   quota, so every test sample is seen exactly once whatever the world size.

Inside a reader: WebDataset tar reading -> shuffle buffer -> decode + transform ->
``partial=False`` batching. Samples that fail to decode are counted and skipped (no
sleeping warn-and-continue); if skips leave a rank short of its planned steps, a second,
differently shuffled pass tops it up, so DDP never sees unequal step counts. Too many
corrupt samples abort the run with :class:`CorruptDataError`.
"""

from __future__ import annotations

import multiprocessing as mp
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import DataConfig
from ..storage import open_input
from .images import DECODE_ERRORS
from .manifest import Manifest
from .transforms import stack_images
from .workers import worker_context

Transform = Callable[[bytes, np.random.Generator], torch.Tensor]


class CorruptDataError(RuntimeError):
    """More samples failed to decode than ``max_corrupt_fraction`` allows."""


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

    def __post_init__(self) -> None:
        if self.start_method not in mp.get_all_start_methods():
            raise ValueError(f"start_method {self.start_method!r} not in {mp.get_all_start_methods()}")

    @property
    def batch_size(self) -> int:
        """Images per rank per step."""
        d = self.data
        return (d.eval_batch_size or 2 * d.batch_size) if self.evaluation else d.batch_size

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


@dataclass(frozen=True)
class ReaderPlan:
    """What one reader (rank x loader worker) reads in one epoch."""

    shards: tuple[str, ...]
    modulo: tuple[int, int] | None  # (m, k): keep the i-th sample of the stream iff i % m == k
    samples: int  # samples it will see (from the manifest)
    quota: int | None = None  # batches it may emit (training), None = all (evaluation)


def _count_mod(n: int, m: int, k: int) -> int:
    return max(0, (n - k + m - 1) // m)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


#: Shard-level splitting is used while the smallest share holds at least this fraction of
#: the mean share; otherwise readers split at sample level (exact, but each reads all shards).
BALANCE = 0.75


def _deal(shards: list[tuple[str, int]], parts: int, part: int) -> list[tuple[str, int]] | None:
    """``shards[part::parts]`` if dealing whole shards keeps the parts balanced, else None."""
    if len(shards) < parts:
        return None
    sizes = [sum(n for _, n in shards[p::parts]) for p in range(parts)]
    if min(sizes) < BALANCE * (sum(sizes) / parts):
        return None
    return shards[part::parts]


def plan_readers(
    shards: Sequence[tuple[str, int]],
    rank: int,
    world_size: int,
    workers: int,
    epoch: int = 0,
    seed: int = 0,
    shuffle: bool = True,
) -> list[ReaderPlan]:
    """The readers of ``rank``: one per loader worker (one if ``workers`` is 0)."""
    order = list(shards)
    if shuffle:
        random.Random(_seed(seed, epoch)).shuffle(order)
    readers = max(1, workers)
    mine = _deal(order, world_size, rank)
    if mine is not None:
        plans = []
        for w in range(readers):
            theirs = _deal(mine, readers, w)
            if theirs is None:  # too few shards for this rank's workers: split its samples
                total = sum(n for _, n in mine)
                return [ReaderPlan(tuple(u for u, _ in mine), (readers, k), _count_mod(total, readers, k))
                        for k in range(readers)]
            plans.append(ReaderPlan(tuple(u for u, _ in theirs), None, sum(n for _, n in theirs)))
        return plans
    # Too few (or too uneven) shards for the ranks: every reader walks all shards in the
    # same order and keeps its residue class of the sample index.
    total = sum(n for _, n in order)
    urls = tuple(u for u, _ in order)
    m = world_size * readers
    return [
        ReaderPlan(urls, (m, rank + world_size * w), _count_mod(total, m, rank + world_size * w))
        for w in range(readers)
    ]


def plan_training_epoch(
    shards: Sequence[tuple[str, int]],
    rank: int,
    world_size: int,
    workers: int,
    batch_size: int,
    epoch: int = 0,
    seed: int = 0,
) -> tuple[int, list[ReaderPlan]]:
    """Steps of the epoch (the same on every rank) and this rank's readers with quotas."""
    full = [
        [p.samples // batch_size for p in plan_readers(shards, r, world_size, workers, epoch, seed)]
        for r in range(world_size)
    ]
    steps = min(sum(f) for f in full)
    quotas = list(full[rank])
    excess = sum(quotas) - steps
    while excess > 0:  # trim the largest quotas first: readers finish close together
        quotas[int(np.argmax(quotas))] -= 1
        excess -= 1
    readers = plan_readers(shards, rank, world_size, workers, epoch, seed)
    return steps, [ReaderPlan(p.shards, p.modulo, p.samples, q) for p, q in zip(readers, quotas)]


@dataclass
class LoaderStats:
    """Counts of the current epoch, summed over this rank's readers."""

    samples: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def corrupt_fraction(self) -> float:
        seen = self.samples + self.skipped
        return self.skipped / seen if seen else 0.0


class _ShardStream(IterableDataset):
    """Yields this rank's batches; runs inside each loader worker."""

    def __init__(self, shards, rank, world_size, transform, config, train, context, classes=None, pk=None):
        self.shards = shards
        self.remap = {label: i for i, label in enumerate(classes)} if classes is not None else None
        self.pk = pk
        self.batch_size = pk[0] * pk[1] if pk else config.batch_size
        self.rank = rank
        self.world_size = world_size
        self.transform = transform
        self.config = config
        self.train = train
        # (epoch, pass) shared with the persistent workers, read at each new iteration.
        self.state = context.RawArray("q", 2)

    def readers(self) -> list[ReaderPlan]:
        epoch = int(self.state[0])
        c = self.config
        if self.train:
            return plan_training_epoch(self.shards, self.rank, self.world_size, c.workers, self.batch_size, epoch, c.seed)[1]
        return plan_readers(self.shards, self.rank, self.world_size, c.workers, shuffle=False)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch, refill = int(self.state[0]), int(self.state[1])
        plan = self.readers()[worker]
        seed = _seed(self.config.seed, epoch, refill, self.rank, worker)
        errors: list[str] = []

        def on_error(exn: Exception) -> bool:
            errors.append(f"{type(exn).__name__}: {exn}"[:300])
            return True  # keep reading; counted instead of slept on

        samples = _tar_samples(plan.shards, on_error)
        if self.remap is not None:
            samples = self._keep_classes(samples, errors)
        if plan.modulo is not None:
            m, k = plan.modulo
            samples = (s for i, s in enumerate(samples) if i % m == k)
        if self.train:
            buffer = self.config.shuffle_buffer
            samples = wds.shuffle(buffer, min(buffer, 100), rng=random.Random(seed))(samples)
        rng = np.random.default_rng(seed)
        counter = {"skipped": 0}
        decoded = self._decode(samples, rng, counter, errors)
        if self.pk and self.train:
            batches = _class_balanced_batches(decoded, *self.pk, rng)
        else:
            batches = _plain_batches(decoded, self.batch_size, partial=not self.train)
        quota = plan.quota if self.train and not refill else None
        for emitted, (images, labels, keys) in enumerate(batches):
            if quota is not None and emitted >= quota:
                break
            yield self._batch(images, labels, keys, counter["skipped"], errors)
            counter["skipped"], errors[:] = 0, []
        if counter["skipped"] or errors:
            yield {"skipped": counter["skipped"], "errors": list(errors)}

    def _keep_classes(self, samples, errors):
        for sample in samples:
            try:
                label = int(sample["cls"])
            except (KeyError, ValueError) as err:
                errors.append(f"{sample.get('__key__')}: bad class field ({err})")
                continue
            if label in self.remap:
                sample["cls"] = self.remap[label]
                yield sample

    def _decode(self, samples, rng, counter, errors):
        for sample in samples:
            try:
                image = self.transform(sample["jpg"], rng)
                label = int(sample["cls"])
            except (*DECODE_ERRORS, KeyError) as err:
                counter["skipped"] += 1
                errors.append(f"{sample.get('__key__')}: {type(err).__name__}: {err}"[:300])
                continue
            yield image, label, sample["__key__"]

    @staticmethod
    def _batch(images, labels, keys, skipped, errors) -> dict[str, Any]:
        if isinstance(images[0], bytes):  # device decoding: the JPEG bytes travel as they are
            return {"jpeg": images, "label": torch.tensor(labels, dtype=torch.int64), "key": keys,
                    "skipped": skipped, "errors": list(errors)}
        return {
            "image": stack_images(images),
            "label": torch.tensor(labels, dtype=torch.int64),
            "key": keys,
            "skipped": skipped,
            "errors": list(errors),
        }


def _open_shards(urls, handler):
    """WebDataset's url_opener, for local paths and any pyarrow.fs URI (s3://, gs://, ...)."""
    for url in urls:
        try:
            yield {"url": url, "stream": open_input(url)}
        except Exception as exn:  # noqa: BLE001 - reported through the handler, like WebDataset
            if not handler(exn):
                return


def _tar_samples(urls, handler):
    """Samples of the shards at ``urls``, in order (tar members grouped by key)."""
    files = wds.tariterators.tar_file_expander(_open_shards(urls, handler), handler=handler)
    return wds.tariterators.group_by_keys(files, handler=handler)


def _plain_batches(decoded, batch_size: int, partial: bool):
    images, labels, keys = [], [], []
    for image, label, key in decoded:
        images.append(image)
        labels.append(label)
        keys.append(key)
        if len(images) == batch_size:
            yield images, labels, keys
            images, labels, keys = [], [], []
    if images and partial:
        yield images, labels, keys


def _class_balanced_batches(decoded, classes_per_batch: int, per_class: int, rng: np.random.Generator):
    """P x K batches from a stream: P classes, K images each (API-Net's sampler).

    Images wait in per-class pools; a batch is drawn once at least P classes hold two or
    more images (an intra-class pair needs two) and, while the stream still flows, half of
    them hold K. A class with fewer than K waiting images repeats some of them to fill its
    K slots; every waiting image is used once. Classes that never gather two images in a
    reader's stream cannot take part.
    """
    pools: dict[int, list] = {}

    def ready() -> list[int]:
        return sorted(c for c, pool in pools.items() if len(pool) >= min(2, per_class))

    def draw(candidates: list[int]):
        chosen = rng.choice(candidates, size=classes_per_batch, replace=False)
        images, labels, keys = [], [], []
        for c in chosen:
            pool = pools[int(c)]
            take = [pool.pop(int(rng.integers(len(pool)))) for _ in range(min(per_class, len(pool)))]
            take += [take[int(rng.integers(len(take)))] for _ in range(per_class - len(take))]
            for image, key in take:
                images.append(image)
                labels.append(int(c))
                keys.append(key)
        return images, labels, keys

    for image, label, key in decoded:
        pools.setdefault(label, []).append((image, key))
        candidates = ready()
        full = sum(len(pools[c]) >= per_class for c in candidates)
        if len(candidates) >= classes_per_batch and full >= classes_per_batch // 2:
            yield draw(candidates)
    while len(candidates := ready()) >= classes_per_batch:  # the stream ended: use what waits
        yield draw(candidates)


class ShardLoader:
    """Batches of one split for one rank: ``{"image": uint8 NCHW, "label": int64 N, "key": [str]}``
    (``{"jpeg": [bytes], ...}`` with the :class:`~rp2k_dist.data.transforms.RawJpeg` transform).

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
    ):
        """``classes``: keep only these global labels, relabelled 0..len-1 in that order
        (a meta-category specialist). ``class_balanced``: (P, K) batches for training."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        counts = manifest.shard_counts(split, classes)
        shards = [(path, counts[info.name]) for path, info in zip(manifest.shard_paths(split), manifest.shards(split))]
        if not shards or sum(n for _, n in shards) == 0:
            raise ValueError(f"split {split!r} of {manifest.root} has no samples")
        self.split = split
        self.root = manifest.root
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.epoch = 0
        self.stats = LoaderStats()
        context = worker_context(config.start_method)
        self.dataset = _ShardStream(shards, rank, world_size, transform, config, train, context, classes, class_balanced)
        self.loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=config.workers,
            persistent_workers=config.workers > 0,
            multiprocessing_context=context if config.workers > 0 else None,
            prefetch_factor=config.prefetch_factor if config.workers > 0 else None,
            pin_memory=config.pin_memory,
        )
        if train and len(self) == 0:
            raise ValueError(
                f"split {split!r} has {sum(n for _, n in shards)} samples: not one full batch of "
                f"{self.dataset.batch_size} per rank for world size {world_size}; lower batch_size"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order and augmentation seeds."""
        self.epoch = epoch
        self.dataset.state[0] = epoch

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch."""
        c = self.config
        if self.train:
            return plan_training_epoch(self.dataset.shards, self.rank, self.world_size, c.workers, self.dataset.batch_size, self.epoch, c.seed)[0]
        return sum(-(-p.samples // c.batch_size) for p in self.dataset.readers())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stats = LoaderStats()
        steps = len(self) if self.train else None
        emitted = 0
        for refill in (0, 1, 2):
            self.dataset.state[1] = refill
            for item in self.loader:
                self._count(item)
                if "key" not in item:
                    continue
                if steps is not None and emitted >= steps:
                    break
                emitted += 1
                yield item
            if steps is None or emitted >= steps:
                break
        self._check_corrupt(final=True)
        if steps is not None and emitted < steps:
            if self.dataset.pk and not self.stats.skipped:
                raise ValueError(
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
