"""Reading samples back from byte ranges of plain tar shards.

A sample is the run of tar members that share its key (``<key>.jpg``, ``<key>.cls``,
``<key>.json``): headers, data and padding, contiguous in the shard. Its range
``[offset, offset + length)``, recorded by the packer in ``index.parquet``, read on its
own (or several consecutive samples' ranges read at once) is a valid tar stream without
the end-of-archive blocks, which is what a sub-shard reader fetches. Shards stay plain
tar files that ``tar``, ``webdataset`` and ``ray.data.read_webdataset`` read.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .manifest import Manifest


def key_of(name: str) -> str:
    """WebDataset's key: the member name up to the first dot of its basename."""
    folder, _, base = name.rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{folder}/{stem}" if folder else stem


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


#: Samples of one shard closer than this are fetched with one ranged read (bytes).
MERGE_GAP = 1 << 20


def iter_shard_images(shards: "str | Path | Manifest", keys: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """``(key, jpeg bytes)`` of every sample in ``keys``, read by byte range from the
    shards, local or in object storage (the manifest's ``index.parquet`` gives each key's
    shard and ``[offset, offset + length)``; neighbours less than :data:`MERGE_GAP` apart
    share one read). Order: shard order, then position in the shard. Raises DataError for
    keys that are not in the index."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from .. import storage
    from ..errors import DataError
    from .manifest import INDEX_PARQUET, Manifest

    manifest = shards if isinstance(shards, Manifest) else Manifest.load(shards)
    wanted = set(keys)
    index = manifest.index().select(["key", "shard", "offset", "length"])
    index = index.filter(pc.is_in(index.column("key"), value_set=pa.array(sorted(wanted), pa.string())))
    missing = wanted - set(index.column("key").to_pylist())
    if missing:
        raise DataError(f"{len(missing)} keys not in {storage.display(manifest.location(INDEX_PARQUET))}, "
                        f"e.g. {sorted(missing)[:3]}")
    rows = sorted(zip(*(index.column(c).to_pylist() for c in ("shard", "offset", "length", "key"))))
    spans: list[list[tuple[str, int, int, str]]] = []
    for row in rows:
        last = spans[-1][-1] if spans else None
        if last is not None and last[0] == row[0] and row[1] - (last[1] + last[2]) <= MERGE_GAP:
            spans[-1].append(row)
        else:
            spans.append([row])
    for span in spans:
        shard, start = span[0][0], span[0][1]
        data = storage.read_range(manifest.location(shard), start, span[-1][1] + span[-1][2] - start)
        for _, offset, length, key in span:
            sample = next(samples_of(data[offset - start: offset - start + length]))
            yield key, sample["jpg"]
