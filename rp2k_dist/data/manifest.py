"""The shard manifest: ``dataset.json`` (class table, counts, shard list) and
``index.parquet`` (one row per sample).

Everything downstream (loader, class-balanced loss, evaluation per meta-category) reads
the dataset through :class:`Manifest`, never by listing folders.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..storage import is_uri, join, read_bytes
from ..errors import ManifestError, MetaCategoryError, StorageError

FORMAT_VERSION = 1
DATASET_JSON = "dataset.json"
INDEX_PARQUET = "index.parquet"

#: Columns of index.parquet, in order.
INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("split", pa.string()),
        ("shard", pa.string()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("type", pa.string()),
        ("shape", pa.string()),
        ("source", pa.string()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        # The sample's tar members (headers, data, padding) in its shard: a ranged read of
        # [offset, offset + length) is the sample, so loaders read sub-shard chunks.
        ("offset", pa.int64()),
        ("length", pa.int64()),
        # 64-bit difference hash of the packed image (data.near_duplicates): groups of
        # near-copies go to the validation split together (data.holdout)
        ("phash", pa.int64()),
    ]
)
RANGE_COLUMNS = ("offset", "length")


def same_category(a: str, b: str) -> bool:
    """Meta-category values compare case-insensitively (``LIQUOR`` is ``liquor``)."""
    return a.strip().casefold() == b.strip().casefold()


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: file name (relative to the manifest), sample count, size, checksum."""

    name: str
    split: str
    samples: int
    bytes: int
    sha256: str


class Manifest:
    """A packed dataset: its folder (local, or an ``s3://``/``gs://`` prefix) and the parsed
    ``dataset.json``. Shards in object storage are streamed through pyarrow.fs."""

    def __init__(self, root: str | Path, data: dict[str, Any]):
        self.uri = str(root) if is_uri(root) else None
        # For display: the local folder, or the URI without its query (it may hold secrets).
        self.root = Path(root) if self.uri is None else Path(storage.display(self.uri).split("://", 1)[1])
        self.data = data

    @property
    def location_root(self) -> str:
        """The dataset folder as a local path or a URI (query kept)."""
        return self.uri or str(self.root)

    def location(self, name: str) -> str:
        """Where a file of the dataset lives: a local path or a URI."""
        return join(self.location_root, name)

    @classmethod
    def load(cls, root: str | Path) -> "Manifest":
        path = join(root, DATASET_JSON)
        try:
            raw = read_bytes(path)
        except StorageError as err:
            raise ManifestError(
                f"{storage.display(path)} not readable ({err}): {storage.display(root)} is not a packed dataset. Pack one with "
                f"`rp2k pack <RP2K root> {root}` (or `rp2k synth` first for the synthetic set)"
            ) from err
        try:
            data = json.loads(raw.decode("utf-8"))
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path} is not valid JSON ({err}); repack or restore it") from err
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                f"{path} has format_version {data.get('format_version')!r}, "
                f"this rp2k-dist reads {FORMAT_VERSION}; repack the dataset"
            )
        return cls(root, data)

    # -- classes ---------------------------------------------------------------------
    @property
    def classes(self) -> list[dict[str, Any]]:
        return self.data["classes"]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]

    def class_counts(self, split: str = "train") -> list[int]:
        """Packed images per class in ``split`` (index order): the CBL's ``n_c``."""
        return [c["counts"][split] for c in self.classes]

    def meta_categories(self, system: str) -> list[str]:
        """Per-class meta-category, ``system`` is ``"type"`` or ``"shape"``."""
        return [c[system] for c in self.classes]

    # -- shards ----------------------------------------------------------------------
    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.data["splits"]:
            raise ManifestError(f"split {split!r} not in {self.root} (has {sorted(self.data['splits'])})",
                                hint="pack a tree that has this split")
        return [ShardInfo(split=split, **s) for s in self.data["splits"][split]["shards"]]

    def shard_paths(self, split: str) -> list[str]:
        return [self.location(s.name) for s in self.shards(split)]

    def num_samples(self, split: str) -> int:
        return sum(s.samples for s in self.shards(split))

    def shard_counts(self, split: str, classes: Sequence[int] | None = None) -> dict[str, int]:
        """Samples per shard of ``split``; with ``classes``, only samples of those labels."""
        if classes is None:
            return {s.name: s.samples for s in self.shards(split)}
        keep = set(int(c) for c in classes)
        counts = {s.name: 0 for s in self.shards(split)}
        table = self.index().select(["split", "shard", "label"]).to_pydict()
        for row_split, shard, label in zip(table["split"], table["shard"], table["label"]):
            if row_split == split and label in keep:
                counts[shard] += 1
        return counts

    def classes_of(self, system: str, value: str) -> list[int]:
        """Indices of the classes whose ``system`` ("type"/"shape") meta-category is ``value``
        (compared case-insensitively)."""
        if system not in ("type", "shape"):
            raise MetaCategoryError(f"meta-category system must be 'type' or 'shape', got {system!r}")
        found = [c["index"] for c in self.classes if same_category(c[system], value)]
        if not found:
            values = ", ".join(sorted({c[system] for c in self.classes}))
            raise MetaCategoryError(f"data.meta_category: no class has {system} {value!r} in {self.root}; "
                                    f"present: {values}")
        return found

    def index(self) -> pa.Table:
        """The per-sample index (``index.parquet``)."""
        return pq.read_table(pa.BufferReader(read_bytes(self.location(INDEX_PARQUET))))


def write_atomic(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` through a temp file + rename (readers never see half)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def dump_json(data: Any) -> bytes:
    """Deterministic, human-readable JSON (CJK kept as is)."""
    return (json.dumps(data, ensure_ascii=False, indent=1, sort_keys=True) + "\n").encode("utf-8")


def table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_manifest(root: str | Path, data: dict[str, Any], rows: list[dict[str, Any]]) -> Manifest:
    """Write index.parquet then dataset.json (the latter marks the pack as complete);
    ``root`` is a local folder or a URI."""
    storage.write_bytes(join(root, INDEX_PARQUET), table_bytes(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)))
    data = {"format_version": FORMAT_VERSION, **data}
    storage.write_bytes(join(root, DATASET_JSON), dump_json(data))
    return Manifest(root, data)
