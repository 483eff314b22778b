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
from collections.abc import Iterator
from typing import Any


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
