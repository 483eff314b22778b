"""User-facing analysis of trained runs: UMAP of features (Fig. 3), run reports and run
comparisons (Tables 2-4), and model export (ONNX, safetensors).

Modules: :mod:`.umap_plot`, :mod:`.report`, :mod:`.export`. They import
their heavy dependencies (umap, matplotlib, onnx) themselves, so importing this package
stays cheap. The one helper shared by all of them lives here: reading the images of given
sample keys straight from the shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from ..data.manifest import INDEX_PARQUET, Manifest
from ..data.tar_index import samples_of
from ..errors import DataError

#: Samples of one shard closer than this are fetched with one ranged read (bytes).
MERGE_GAP = 1 << 20


def iter_shard_images(shards: str | Path | Manifest, keys: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """``(key, jpeg bytes)`` of every sample in ``keys``, read by byte range from the
    shards, local or in object storage (the manifest's ``index.parquet`` gives each key's
    shard and ``[offset, offset + length)``; neighbours less than :data:`MERGE_GAP` apart
    share one read). Order: shard order, then position in the shard. Raises DataError for
    keys that are not in the index."""
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
