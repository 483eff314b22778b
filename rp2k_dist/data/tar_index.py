"""Byte ranges of the samples inside plain tar shards, and reading samples back from them.

A sample is the run of tar members that share its key (``<key>.jpg``, ``<key>.cls``,
``<key>.json``): headers, data and padding, contiguous in the shard. Its range
``[offset, offset + length)`` read on its own (or several consecutive samples' ranges
read at once) is a valid tar stream without the end-of-archive blocks, which is what a
sub-shard reader fetches. Shards stay plain tar files that ``tar``, ``webdataset`` and
``ray.data.read_webdataset`` read.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from typing import IO, Any

import pyarrow as pa

from .. import storage
from .manifest import INDEX_PARQUET, RANGE_COLUMNS, Manifest, table_bytes

BLOCK = 512


def member_end(member: tarfile.TarInfo) -> int:
    """The offset just past a member's data and its padding."""
    return member.offset_data + -(-member.size // BLOCK) * BLOCK


def key_of(name: str) -> str:
    """WebDataset's key: the member name up to the first dot of its basename."""
    folder, _, base = name.rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{folder}/{stem}" if folder else stem


def scan_ranges(stream: IO[bytes]) -> dict[str, tuple[int, int]]:
    """``{key: (offset, length)}`` of a tar stream, from its headers alone (no decode)."""
    ranges: dict[str, list[int]] = {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            span = ranges.setdefault(key_of(member.name), [member.offset, member_end(member)])
            span[0] = min(span[0], member.offset)
            span[1] = max(span[1], member_end(member))
    return {key: (start, end - start) for key, (start, end) in ranges.items()}


def samples_of(data: bytes) -> Iterator[dict[str, Any]]:
    """Samples (``{"__key__": k, "jpg": bytes, ...}``) of consecutive tar members in ``data``.

    Raises ``tarfile.TarError`` (or EOFError) past the last intact sample of a damaged range."""
    current: dict[str, Any] | None = None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key = key_of(member.name)
            field = member.name.rpartition("/")[2].split(".", 1)[1] if "." in member.name else ""
            payload = tar.extractfile(member).read()  # type: ignore[union-attr]
            if len(payload) != member.size:
                raise EOFError(f"member {member.name} truncated ({len(payload)} of {member.size} bytes)")
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            current[field] = payload
    if current is not None:
        yield current


def index_ranges(root: str, progress: bool = False) -> int:
    """Add the byte ranges of every sample to ``index.parquet`` of a dataset packed without
    them (a header scan of each shard); returns the number of samples indexed."""
    from tqdm.auto import tqdm

    manifest = Manifest.load(root)
    table = manifest.index()
    found: dict[tuple[str, str], tuple[int, int]] = {}
    shards = [s for split in manifest.data["splits"] for s in manifest.shards(split)]
    for shard in tqdm(shards, desc="index", unit="shard", disable=not progress or None):
        with storage.open_input(manifest.location(shard.name)) as stream:
            for key, span in scan_ranges(stream).items():
                found[(shard.name, key)] = span
    keys, names = table.column("key").to_pylist(), table.column("shard").to_pylist()
    missing = [k for k, s in zip(keys, names) if (s, k) not in found]
    if missing:
        raise ValueError(f"{len(missing)} samples of index.parquet are not in their shards (e.g. {missing[:3]}); "
                         f"run `rp2k verify {storage.display(root)}`")
    spans = [found[(s, k)] for k, s in zip(keys, names)]
    for column, values in zip(RANGE_COLUMNS, zip(*spans)):
        array = pa.array(values, pa.int64())
        if column in table.column_names:
            table = table.set_column(table.column_names.index(column), column, array)
        else:
            table = table.append_column(column, array)
    storage.write_bytes(manifest.location(INDEX_PARQUET), table_bytes(table))
    return len(spans)
