"""Repack an RP2K tree into WebDataset tar shards plus a manifest.

Each sample is ``<key>.jpg`` (resized at pack time: shorter side ``shorter_side`` px, aspect
kept, re-encoded JPEG), ``<key>.cls`` (class index) and ``<key>.json`` (sku, type, shape,
class name, source path). Output::

    OUT/train-000000.tar ...  OUT/test-000000.tar ...
    OUT/index.parquet         one row per sample
    OUT/dataset.json          class table, counts, shard list with sha256 (written last)

The shard plan (which source goes to which shard under which key) is a pure function of
the scanned tree, the metadata and :class:`PackConfig`, so packing is deterministic.
Shards are encoded in parallel processes, each written to a temp file and renamed, with a
small record under ``OUT/.pack/``: a rerun after a crash skips the finished shards.
``OUT`` may be a URI (``s3://bucket/rp2k/shards``): each shard is encoded to a local temp
file and uploaded whole, so an object appears only when it is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm.auto import tqdm

from .images import CorruptImageError, encode_jpeg, load_rgb, resize_shorter_side
from .. import storage
from ..storage import join
from .near_duplicates import phash
from .manifest import DATASET_JSON, Manifest, dump_json, write_manifest
from .rp2k import SPLITS, RP2KIndex
from .workers import worker_context
from ..errors import ConfigError, PackError

STATE_DIR = ".pack"
#: Tar bytes per sample beyond the JPEG: three 512-byte headers, one block each for
#: the class and JSON members, and half a block of padding after the JPEG on average.
TAR_OVERHEAD = 5 * 512 + 256
PILOT_SAMPLES = 32


@dataclass(frozen=True)
class PackConfig:
    """How to pack. Sizes in pixels and megabytes."""

    shorter_side: int = 320  # px; covers 224 (ResNet-34) and 299 (InceptionV3) crops
    jpeg_quality: int = 90
    shard_size_mb: float = 256.0  # target per shard; RP2K at 320 px gives ~60 train shards
    samples_per_shard: int | None = None  # overrides shard_size_mb when set
    seed: int = 0  # sample order inside the shards
    workers: int = 0  # encoding processes; 0 = all cores

    def __post_init__(self) -> None:
        checks = (
            (self.shorter_side >= 32, f"--shorter-side must be >= 32 px, got {self.shorter_side}"),
            (1 <= self.jpeg_quality <= 100, f"--quality must be in 1..100, got {self.jpeg_quality}"),
            (self.shard_size_mb > 0, f"--shard-size-mb must be > 0, got {self.shard_size_mb}"),
            (self.samples_per_shard is None or self.samples_per_shard >= 1,
             f"--samples-per-shard must be >= 1, got {self.samples_per_shard}"),
            (self.workers >= 0, f"--workers must be >= 0, got {self.workers}"),
        )
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class PlannedSample:
    key: str
    label: int
    source: str  # path relative to the dataset root


@dataclass(frozen=True)
class ShardPlan:
    name: str
    split: str
    samples: tuple[PlannedSample, ...]


def encode_sample(path: Path, config: PackConfig) -> bytes:
    """Decode, resize (shorter side) and re-encode one image as JPEG bytes."""
    return _encode(path, config)[0]


def _encode(path: Path, config: PackConfig) -> tuple[bytes, int]:
    """JPEG bytes of the resized image and its difference hash (:func:`.near_duplicates.phash`)."""
    image = resize_shorter_side(load_rgb(path, min_shorter_side=config.shorter_side), config.shorter_side)
    return encode_jpeg(image, config.jpeg_quality), phash(image)


def _samples_per_shard(index: RP2KIndex, config: PackConfig) -> int:
    """From the config, or from the encoded size of a fixed pilot set of train images."""
    if config.samples_per_shard is not None:
        return config.samples_per_shard
    records = index.records["train"] or index.records["test"]
    step = max(1, len(records) // PILOT_SAMPLES)
    sizes = []
    for record in records[::step][:PILOT_SAMPLES]:
        try:
            sizes.append(len(encode_sample(index.path(record), config)) + TAR_OVERHEAD)
        except CorruptImageError:
            continue
    mean = float(np.mean(sizes)) if sizes else 64_000.0
    return max(1, int(config.shard_size_mb * 1e6 // mean))


def plan_shards(index: RP2KIndex, config: PackConfig) -> list[ShardPlan]:
    """Deterministic shard plan: each split shuffled with the seed, cut into equal shards.

    Keys are ``<split>-<position in the sorted listing>``: unique even where basenames
    repeat across classes, and free of dots (WebDataset splits key and field at a dot).
    """
    per_shard = _samples_per_shard(index, config)
    plans = []
    for split_id, split in enumerate(SPLITS):
        records = index.records[split]
        order = np.random.default_rng([config.seed, split_id]).permutation(len(records))
        samples = [
            PlannedSample(f"{split}-{i:07d}", records[i].label, records[i].relpath) for i in order
        ]
        for shard_id in range(math.ceil(len(samples) / per_shard)):
            chunk = samples[shard_id * per_shard : (shard_id + 1) * per_shard]
            plans.append(ShardPlan(f"{split}-{shard_id:06d}.tar", split, tuple(chunk)))
    return plans


def _fingerprint(index: RP2KIndex, config: PackConfig, plans: list[ShardPlan]) -> str:
    digest = hashlib.sha256()
    settings = {k: v for k, v in asdict(config).items() if k != "workers"}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for info in index.classes:
        digest.update(json.dumps([info.name, info.product.as_dict()], ensure_ascii=False).encode())
    for plan in plans:
        digest.update(plan.name.encode())
        for sample in plan.samples:
            digest.update(f"{sample.key}\0{sample.label}\0{sample.source}\0".encode())
    return digest.hexdigest()


def _write_shard(
    root: str, out: str, plan: ShardPlan, classes: list[dict[str, str]], config: PackConfig
) -> dict[str, Any]:
    """Encode one shard into ``out`` (a local temp file, then a rename or an upload); returns its record."""
    if storage.is_uri(out):
        handle, name = tempfile.mkstemp(prefix=f".{plan.name}.", suffix=".partial")
        os.close(handle)
        tmp = Path(name)
    else:
        tmp = Path(out) / f".{plan.name}.partial"
    rows, skipped = [], []
    with open(tmp, "wb") as stream:
        # A fixed integer mtime: identical input gives byte-identical tars, and no PAX
        # header per member (a float mtime costs 1 KiB of PAX record per file).
        with wds.TarWriter(stream, encoder=False, mtime=0) as sink:
            for sample in plan.samples:
                try:
                    jpeg, image_hash = _encode(Path(root) / sample.source, config)
                except CorruptImageError as err:
                    skipped.append({"split": plan.split, "source": sample.source, "reason": str(err.__cause__ or err)})
                    continue
                info = classes[sample.label]
                offset = sink.tarstream.offset
                meta = {
                    "class_name": info["name"], "sku": info["sku"], "type": info["type"],
                    "shape": info["shape"], "source": sample.source, "split": plan.split,
                    **({"extra": info["extra"]} if info.get("extra") else {}),
                }
                sink.write({
                    "__key__": sample.key,
                    "jpg": jpeg,
                    "cls": str(sample.label).encode(),
                    "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8"),
                })
                rows.append({
                    "key": sample.key, "split": plan.split, "shard": plan.name,
                    "label": sample.label, "class_name": info["name"], "type": info["type"],
                    "shape": info["shape"], "source": sample.source, "bytes": len(jpeg),
                    "sha256": hashlib.sha256(jpeg).hexdigest(),
                    "offset": offset, "length": sink.tarstream.offset - offset, "phash": image_hash,
                })
        stream.flush()
        os.fsync(stream.fileno())
    record = {
        "name": plan.name, "split": plan.split, "samples": len(rows),
        "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp),
        "rows": rows, "skipped": skipped,
    }
    storage.put_file(tmp, join(out, plan.name))
    storage.write_bytes(join(out, STATE_DIR, f"{plan.name}.json"), dump_json(record))
    return record


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _finished(out: str, plan: ShardPlan) -> dict[str, Any] | None:
    """The record of a shard a previous run finished, or None."""
    record_path = join(out, STATE_DIR, f"{plan.name}.json")
    if not storage.exists(record_path):
        return None
    try:
        record = json.loads(storage.read_bytes(record_path).decode("utf-8"))
    except json.JSONDecodeError:
        return None
    return record if record.get("bytes") == storage.size(join(out, plan.name)) else None


def _prepare_output(out: str, fingerprint: str, overwrite: bool) -> None:
    marker = join(out, STATE_DIR, "plan.json")
    if storage.listdir(out):
        previous = json.loads(storage.read_bytes(marker)).get("fingerprint") if storage.exists(marker) else None
        if previous != fingerprint:
            if not overwrite:
                what = "a different pack" if previous else "files that are not a pack in progress"
                raise PackError(
                    f"{storage.display(out)} holds {what}; choose an empty folder or pass --overwrite to replace it"
                )
            storage.delete_dir(out)
    storage.write_bytes(marker, dump_json({"fingerprint": fingerprint}))


def pack_dataset(
    index: RP2KIndex,
    out: str | Path,
    config: PackConfig = PackConfig(),
    overwrite: bool = False,
    progress: bool = False,
) -> Manifest:
    """Pack ``index`` into shards under ``out`` and write the manifest.

    Resumes an interrupted pack of the same plan; a finished pack of the same plan is
    returned as is.
    """
    out = str(out)
    plans = plan_shards(index, config)
    fingerprint = _fingerprint(index, config, plans)
    if storage.exists(join(out, DATASET_JSON)) and not overwrite:
        existing = Manifest.load(out)
        if existing.data.get("fingerprint") == fingerprint:
            return existing
    _prepare_output(out, fingerprint, overwrite)

    classes = [
        {"name": c.name, **{k: v for k, v in c.product.as_dict().items() if k != "name"}}
        for c in index.classes
    ]
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for plan in plans:
        done = _finished(out, plan)
        if done is not None:
            records[plan.name] = done
        else:
            todo.append(plan)

    workers = config.workers or os.cpu_count() or 1
    total = sum(len(p.samples) for p in plans)
    with tqdm(total=total, initial=total - sum(len(p.samples) for p in todo), unit="img",
              desc="pack", disable=not progress or None) as bar:
        if workers == 1 or len(todo) <= 1:
            for plan in todo:
                records[plan.name] = _write_shard(str(index.root), out, plan, classes, config)
                bar.update(len(plan.samples))
        else:
            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=worker_context()) as pool:
                futures = {
                    pool.submit(_write_shard, str(index.root), out, plan, classes, config): plan
                    for plan in todo
                }
                for future in as_completed(futures):
                    plan = futures[future]
                    records[plan.name] = future.result()
                    bar.update(len(plan.samples))

    return _write_manifest(out, index, config, plans, records, fingerprint)


def _write_manifest(
    out: str,
    index: RP2KIndex,
    config: PackConfig,
    plans: list[ShardPlan],
    records: dict[str, dict[str, Any]],
    fingerprint: str,
) -> Manifest:
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    splits: dict[str, dict[str, Any]] = {split: {"samples": 0, "shards": []} for split in SPLITS}
    counts = {split: [0] * index.num_classes for split in SPLITS}
    for plan in plans:
        record = records[plan.name]
        rows.extend(record["rows"])
        skipped.extend(record["skipped"])
        split = splits[plan.split]
        split["samples"] += record["samples"]
        split["shards"].append({k: record[k] for k in ("name", "samples", "bytes", "sha256")})
        for row in record["rows"]:
            counts[plan.split][row["label"]] += 1
    classes = [
        {
            "index": c.index, "name": c.name, **{k: v for k, v in c.product.as_dict().items() if k != "name"},
            "product_name": c.product.name,
            "counts": {split: counts[split][c.index] for split in SPLITS},
        }
        for c in index.classes
    ]
    data = {
        "fingerprint": fingerprint,
        "source": {"root": str(index.root), "layout": index.layout},
        "pack": {k: v for k, v in asdict(config).items() if k != "workers"},
        "classes": classes,
        "splits": splits,
        "skipped": skipped,
        "scan_report": index.report.as_dict(),
    }
    return write_manifest(out, data, rows)
