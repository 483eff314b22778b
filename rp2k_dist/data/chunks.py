"""The byte-range plan of an epoch: which contiguous runs of samples each reader reads.

A reader is one loader worker of one rank (``world_size x max(1, workers)`` readers in
all). The plan is computed from the manifest alone, so every rank and worker derives the
same one without talking to the others:

1. the split's samples, in shard order, are cut into chunks: the samples of one shard
   whose tar ranges start in the same ``chunk_bytes`` window (a few MB, one ranged read);
2. for training the chunks are shuffled with a seed derived from ``(seed, epoch)``;
   evaluation keeps shard order;
3. the chunk sequence is cut into ``readers`` contiguous runs of equal sample counts
   (differing by at most one), cutting a chunk at a sample boundary where a run ends.

Every sample of the split is planned exactly once, and each reader reads only its own
byte ranges: read amplification is 1.0 at any world size and shard count (no reader
walks a shard to keep its residue class). A reader fetches a piece (a chunk, or the part
of a chunk that is its own) with one ranged read, local or from object storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, ManifestError
from .holdout import HOLDOUT, train_holdout
from .manifest import Manifest

DEFAULT_CHUNK_MB = 4.0


def epoch_seed(*parts: int) -> int:
    """A 32-bit seed mixed from non-negative integers (``numpy.random.SeedSequence``): of
    an epoch's chunk order ``(seed, epoch)``, and of a reader's shuffle buffer ``(seed,
    epoch, pass, rank, worker)``. Orders may follow the world size; a sample's augmentation
    may not, and is seeded from its key instead (:func:`.augment.augment_seed`)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


@dataclass(frozen=True)
class Piece:
    """One ranged read: ``samples`` consecutive planned samples of one shard."""

    shard: str  # the shard's location (path or URI)
    first: int  # the first sample's row in the SampleTable
    samples: int
    offset: int
    length: int


@dataclass(frozen=True)
class ReaderPlan:
    """What one reader (rank x loader worker) reads in one epoch."""

    pieces: tuple[Piece, ...]
    samples: int  # planned samples (from the manifest)
    quota: int | None = None  # batches it may emit (training), None = all (evaluation)

    @property
    def bytes(self) -> int:
        return sum(p.length for p in self.pieces)


class SampleTable:
    """The samples of one split in shard order, with their byte ranges, cut into chunks."""

    def __init__(self, shards: Sequence[str], shard: np.ndarray, offset: np.ndarray, length: np.ndarray,
                 chunk_bytes: int = int(DEFAULT_CHUNK_MB * 1e6), keys: Sequence[str] | None = None,
                 positions: np.ndarray | None = None):
        """``keys``: the samples' keys (readers keep only their planned samples by key);
        ``positions``: each sample's position in the full split (a subset table keeps them)."""
        if chunk_bytes < 1:
            raise ValueError(f"chunk size must be >= 1 byte, got {chunk_bytes}")
        order = np.lexsort((offset, shard))
        self.shards = list(shards)
        self.shard = np.asarray(shard, np.int64)[order]
        self.offset = np.asarray(offset, np.int64)[order]
        self.length = np.asarray(length, np.int64)[order]
        self.keys = None if keys is None else np.asarray(keys, object)[order]
        self.positions = (np.arange(len(order), dtype=np.int64) if positions is None
                          else np.asarray(positions, np.int64)[order])
        self.chunk_bytes = chunk_bytes
        window = self.offset // chunk_bytes
        new = np.ones(len(self.shard), bool)
        new[1:] = (self.shard[1:] != self.shard[:-1]) | (window[1:] != window[:-1])
        self.chunk_start = np.flatnonzero(new)
        self.chunk_stop = np.append(self.chunk_start[1:], len(self.shard))

    @classmethod
    def from_manifest(cls, manifest: Manifest, split: str, classes: Sequence[int] | None = None,
                      chunk_bytes: int = int(DEFAULT_CHUNK_MB * 1e6), holdout: float = 0.0,
                      holdout_by: str = "groups") -> "SampleTable":
        """``split``'s samples (only labels in ``classes`` when given) from ``index.parquet``.
        ``holdout`` > 0: "train" leaves out the held-out share of the train split and
        ``"holdout"`` is that share, drawn ``holdout_by`` groups of near-duplicates or
        single keys (:mod:`.holdout`)."""
        index = manifest.index()
        if "offset" not in index.column_names:
            raise ManifestError(f"{manifest.root}/index.parquet has no byte ranges (packed by an older rp2k-dist)",
                                hint="repack the dataset with `rp2k pack`")
        columns = ["split", "shard", "key", "label", "offset", "length"]
        rows = index.select(columns + (["phash"] if "phash" in index.column_names else [])).to_pydict()
        source = split
        held = None
        if split == HOLDOUT or (split == "train" and holdout > 0):
            if split == HOLDOUT and holdout <= 0:
                raise ConfigError("the holdout split needs data.holdout > 0 (the share of train held out)")
            source = "train"
            train = [i for i, sp in enumerate(rows["split"]) if sp == "train"]
            mask = train_holdout(rows, holdout, holdout_by)
            held = {i for i, m in zip(train, mask) if m}
        names = [s.name for s in manifest.shards(source)]
        position = {name: i for i, name in enumerate(names)}
        keep = None if classes is None else set(int(c) for c in classes)
        picked = [i for i, (sp, lab) in enumerate(zip(rows["split"], rows["label"]))
                  if sp == source and (keep is None or lab in keep)
                  and (held is None or (i in held) == (split == HOLDOUT))]
        shard = np.array([position[rows["shard"][i]] for i in picked], np.int64)
        offset = np.array([rows["offset"][i] for i in picked], np.int64)
        length = np.array([rows["length"][i] for i in picked], np.int64)
        keys = [rows["key"][i] for i in picked]
        return cls(manifest.shard_paths(source), shard, offset, length, chunk_bytes, keys)

    def subset(self, keep: np.ndarray) -> "SampleTable":
        """The samples where ``keep`` (a mask over this table's rows) is true, with their
        positions in this table; chunks are the same byte windows, holding fewer samples."""
        keep = np.asarray(keep, bool)
        if keep.shape != (len(self),):
            raise ValueError(f"mask of {keep.shape} for a table of {len(self)} samples")
        return SampleTable(self.shards, self.shard[keep], self.offset[keep], self.length[keep], self.chunk_bytes,
                           None if self.keys is None else self.keys[keep], self.positions[keep])

    def __len__(self) -> int:
        return len(self.shard)

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_start)

    @property
    def bytes(self) -> int:
        """The planned samples' bytes (tar members): what one exact pass reads."""
        return int(self.length.sum())


def reader_samples(total: int, readers: int) -> np.ndarray:
    """Samples of each reader: ``total`` split into ``readers`` contiguous runs, sizes within one."""
    bounds = (np.arange(readers + 1, dtype=np.int64) * total) // readers
    return np.diff(bounds)


def plan_epoch(table: SampleTable, world_size: int, workers: int, epoch: int = 0, seed: int = 0,
               shuffle: bool = True, rank: int | None = None, sizes: Sequence[int] | None = None) -> list[ReaderPlan]:
    """Every reader's plan (reader ``rank * max(1, workers) + w``), or only ``rank``'s readers.
    ``sizes``: each reader's sample count (their sum at most the table's; the rest of the
    shuffled chunk sequence is left out of the epoch); default all samples, evenly."""
    per_rank = max(1, workers)
    readers = world_size * per_rank
    order = np.arange(table.num_chunks)
    if shuffle:
        order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(table.num_chunks)
    start, stop = table.chunk_start[order], table.chunk_stop[order]
    cum = np.concatenate([[0], np.cumsum(stop - start)])
    if sizes is None:
        bounds = (np.arange(readers + 1, dtype=np.int64) * int(cum[-1])) // readers
    else:
        if len(sizes) != readers or sum(sizes) > int(cum[-1]):
            raise ValueError(f"{len(sizes)} reader sizes summing to {sum(sizes)} for {readers} readers "
                             f"of {int(cum[-1])} samples")
        bounds = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64))])
    wanted = range(readers) if rank is None else range(rank * per_rank, (rank + 1) * per_rank)
    plans = []
    for r in wanted:
        lo, hi = int(bounds[r]), int(bounds[r + 1])
        pieces = []
        if hi > lo:
            first_chunk = int(np.searchsorted(cum, lo, side="right")) - 1
            last_chunk = int(np.searchsorted(cum, hi, side="left"))
            for c in range(first_chunk, last_chunk):
                a = int(start[c]) + max(lo, int(cum[c])) - int(cum[c])
                b = int(start[c]) + min(hi, int(cum[c + 1])) - int(cum[c])
                end = int(table.offset[b - 1] + table.length[b - 1])
                pieces.append(Piece(table.shards[int(table.shard[a])], a, b - a, int(table.offset[a]),
                                    end - int(table.offset[a])))
        plans.append(ReaderPlan(tuple(pieces), hi - lo))
    return plans


def training_steps(total: int, world_size: int, workers: int, batch_size: int) -> tuple[int, list[list[int]]]:
    """Steps of a training epoch (equal on every rank) and each rank's readers' quotas."""
    per_rank = max(1, workers)
    full = (reader_samples(total, world_size * per_rank) // batch_size).reshape(world_size, per_rank)
    steps = int(full.sum(axis=1).min())
    quotas = []
    for rank_full in full.tolist():
        excess = sum(rank_full) - steps
        while excess > 0:  # trim the largest quotas first: readers finish close together
            rank_full[int(np.argmax(rank_full))] -= 1
            excess -= 1
        quotas.append(rank_full)
    return steps, quotas


def fixed_batch_quotas(batches: int, world_size: int, workers: int) -> list[int]:
    """Each reader's batches when every rank yields exactly ``batches`` (a fixed global
    batch): a rank's ``batches`` split over its readers, within one."""
    return reader_samples(batches, max(1, workers)).tolist() * world_size


def plan_training_epoch(table: SampleTable, rank: int, world_size: int, workers: int, batch_size: int,
                        epoch: int = 0, seed: int = 0, batches: int | None = None) -> tuple[int, list[ReaderPlan]]:
    """Steps of the epoch (the same on every rank) and this rank's readers with quotas.
    ``batches``: exactly this many batches per rank (a fixed global batch), each reader
    dealt exactly its quota's samples; the shuffled remainder sits the epoch out."""
    if batches is None:
        steps, quotas = training_steps(len(table), world_size, workers, batch_size)
        readers = plan_epoch(table, world_size, workers, epoch, seed, shuffle=True, rank=rank)
        return steps, [ReaderPlan(p.pieces, p.samples, q) for p, q in zip(readers, quotas[rank])]
    quotas = fixed_batch_quotas(batches, world_size, workers)
    sizes = [q * batch_size for q in quotas]
    if sum(sizes) > len(table):
        raise ValueError(f"{batches} batches of {batch_size} on each of {world_size} ranks need {sum(sizes)} "
                         f"samples; the epoch has {len(table)}")
    readers = plan_epoch(table, world_size, workers, epoch, seed, shuffle=True, rank=rank, sizes=sizes)
    per_rank = max(1, workers)
    return batches, [ReaderPlan(p.pieces, p.samples, q) for p, q in zip(readers, quotas[rank * per_rank:])]
